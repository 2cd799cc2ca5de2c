"""A run directory's life: its layout, whether it can be written, which config it belongs to, its
status, and the lock of the worker that trains it.

  config.json          the TrainConfig: the directory belongs to this config and no other
  metrics.jsonl        one line per validation point
  summary.json         final numbers, written when training ends
  model_config.json    the trained model's shape and
  model.safetensors    its weights
  checkpoints/         resumable state (fwbw.training.checkpoint), each stamped with the config id
  cut.json             the layer-cut evaluation (fwbw.training.evaluation)
  samples.json         fw and bw continuations of held-out prompts (fwbw.study.samples)
  status.json          pending | running | done | failed, with the error (written by a sweep)
  .lock                held by the worker running it (written in full, then hard-linked into place)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

from fwbw.files import atomic_write_json, read_json
from fwbw.schema import ConfigError, differences
from fwbw.training.config import TrainConfig

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL_CONFIG = "model_config.json"
MODEL_WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"
CUT = "cut.json"
SAMPLES = "samples.json"
STATUS = "status.json"
LOCK = ".lock"
OUTPUTS = (METRICS, SUMMARY, MODEL_CONFIG, MODEL_WEIGHTS, CUT, SAMPLES)  # what training, the cut and sampling write
RUN_FILES = (CONFIG, *OUTPUTS, STATUS)  # what a restart removes, with the checkpoints
STATUSES = ("pending", "running", "done", "failed")
SHOWN_DIFFERENCES = 3  # differing fields named when a directory belongs to another config
OUT_EXAMPLE = "runs/my-run"
RESTART_HINT = "--restart starts it over, or give another --out"


def check_run_dir(run_dir: Path) -> None:
    """Fail before any work if `run_dir` is no place for a run's (or a sweep's, or a report's)
    files: a folder that holds others (the current directory, one above it, the home directory,
    the filesystem root), a file, or not writable."""
    path = Path(run_dir)
    resolved = path.resolve()
    shown = "'' or '.'" if path == Path(".") else str(run_dir)
    for folder, name in _shared_folders(resolved):
        if resolved == folder:
            raise ConfigError(f"out: {shown} is {name}: name a folder of its own, e.g. {OUT_EXAMPLE}")
    check_writable(path, "out: ")


def _shared_folders(resolved: Path) -> list[tuple[Path, str]]:
    """The folders a run must never be written into: (folder, what it is)."""
    cwd = Path.cwd().resolve()
    folders = [(Path(resolved.anchor), "the filesystem root"), (cwd, "the current directory")]
    folders += [(parent, "a folder above the current directory") for parent in cwd.parents]
    try:
        folders.append((Path.home().resolve(), "the home directory"))
    except RuntimeError:  # no home directory to protect
        pass
    return folders


def check_writable(folder: Path, prefix: str = "") -> None:
    """Fail before any work if files cannot be written in `folder`, or (while it does not exist)
    it cannot be created: a file in the way, no permission, a read-only filesystem. `prefix`
    starts the message: the flag, or the file that was to be written."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{prefix}{folder} is a file, not a directory")
    resolved = existing = path.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        where = "" if existing == resolved else f" ({existing} is not a writable directory)"
        raise ConfigError(f"{prefix}{folder} is not writable{where}")


# --- the config a run directory belongs to --------------------------------------------------


def config_id(config: TrainConfig) -> str:
    """The identity of a config: a hash of its dict, stamped on every checkpoint of its run."""
    return hashlib.sha256(_canonical(config.to_dict()).encode()).hexdigest()


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def finished_run_config(run_dir: Path) -> TrainConfig:
    """The config of a finished run: its config.json, once training has saved the model's weights.
    ValueError (one line) for a directory without either."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG})")
    if not (run_dir / MODEL_WEIGHTS).is_file():
        raise ValueError(f"{run_dir}: no trained model ({MODEL_WEIGHTS}): has the run finished?")
    return TrainConfig.load(run_dir / CONFIG)


def check_owner(run_dir: Path, config: TrainConfig, restart: bool = False) -> None:
    """Refuse a run directory that is not `config`'s: one whose config.json holds another config
    (unless `restart`), naming the first fields that differ, or is no run config at all, and a
    folder of other files without a run (its files are never mixed with a run's). A directory
    without config.json and without other files belongs to no run yet."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not path.exists():
        _check_holds_no_other_files(run_dir)
        return
    if restart:
        return
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise ConfigError(f"out: {path} is not a run config (a JSON object); {RESTART_HINT}")
    shown = differences(saved, config.to_dict(), SHOWN_DIFFERENCES)
    if shown:
        raise ConfigError(f"out: {run_dir} holds the run of another config ({shown}); {RESTART_HINT}")


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or name == CHECKPOINTS or name.startswith(LOCK)


def _check_holds_no_other_files(run_dir: Path) -> None:
    if not run_dir.is_dir():
        return
    others = sorted(path.name for path in run_dir.iterdir() if not _is_run_file(path.name))
    if others:
        raise ConfigError(
            f"out: {run_dir} holds other files ({', '.join(others[:SHOWN_DIFFERENCES])}"
            f"{', ...' if len(others) > SHOWN_DIFFERENCES else ''}) and no run ({CONFIG}): give a new or empty folder"
        )


def start_run(run_dir: Path, config: TrainConfig, restart: bool = False) -> None:
    """Make `run_dir` the home of `config`'s run: refuse one that is not (see check_owner), or
    with `restart` first remove every file of the run it holds, then write config.json."""
    run_dir = Path(run_dir)
    check_owner(run_dir, config, restart)
    if restart:
        clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / CONFIG, config.to_dict())


def clear_run(run_dir: Path) -> None:
    """Remove the run's files and checkpoints (other files in the folder are left alone)."""
    clear_outputs(run_dir)
    for name in (CONFIG, STATUS):
        (Path(run_dir) / name).unlink(missing_ok=True)


def clear_outputs(run_dir: Path) -> None:
    """Remove what training and the cut wrote, checkpoints included, keeping config.json, the
    status and the lock: the run starts from scratch without files of an earlier attempt."""
    run_dir = Path(run_dir)
    for name in OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


# --- status and lock (sweeps) ---------------------------------------------------------------


def read_status(run_dir: Path, corrupt_is_pending: bool = True) -> dict:
    """status.json; a run without one is pending. An unreadable one is pending too, its error
    naming the file (a worker then trains the run again from its checkpoints), or with
    `corrupt_is_pending=False` raises ValueError naming the file (the results table)."""
    path = Path(run_dir) / STATUS
    try:
        status = read_json(path)
        if not isinstance(status, dict) or status.get("status") not in STATUSES:
            raise ValueError(f"{path}: not a run status (a JSON object with status {' | '.join(STATUSES)})")
        return status
    except FileNotFoundError:
        return {"status": "pending", "error": None}
    except (OSError, ValueError) as error:
        if not corrupt_is_pending:
            raise
        return {"status": "pending", "error": str(error)}


def write_status(run_dir: Path, status: str, error: str | None = None) -> None:
    atomic_write_json(Path(run_dir) / STATUS, {"status": status, "error": error})


def _lock_holder_alive(lock: Path) -> bool:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return False  # unreadable or half-written by a worker that died while writing it
    if holder.get("host") != socket.gethostname():
        return True  # another machine's worker: we cannot tell, so respect the lock
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError):
        return False
    except PermissionError:
        return True
    return True


def claim(run_dir: Path) -> bool:
    """Atomically take the run's lock; a lock left by a dead process on this host is taken over.

    The lock is written in full under a private name and hard-linked into place, so it is never
    seen empty; a stale lock is first renamed away, which only one worker can do."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    owner = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    mine = run_dir / f"{LOCK}.{owner}"
    mine.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        for _ in range(3):
            try:
                os.link(mine, lock)
                return True
            except FileExistsError:
                if _lock_holder_alive(lock) or not _move_stale_lock(lock, run_dir / f"{LOCK}.stale.{owner}"):
                    return False
        return False
    finally:
        mine.unlink(missing_ok=True)


def _move_stale_lock(lock: Path, parking: Path) -> bool:
    """Rename a dead worker's lock away; if it turns out to be live (another worker replaced
    it meanwhile), put it back and report failure."""
    try:
        os.rename(lock, parking)
    except FileNotFoundError:
        return True  # someone else removed it: try to take the lock again
    if _lock_holder_alive(parking):
        os.rename(parking, lock)
        return False
    parking.unlink(missing_ok=True)
    return True


def release(run_dir: Path) -> None:
    (Path(run_dir) / LOCK).unlink(missing_ok=True)
