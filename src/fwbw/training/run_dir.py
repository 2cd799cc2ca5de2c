"""A run directory's life: its layout, whether it can be written, which config it belongs to, its
status, and the lock of the worker that trains it.

  config.json          the TrainConfig: the directory belongs to this config and no other
  metrics.jsonl        one line per validation point
  summary.json         final numbers, written when training ends
  model_config.json    the trained model's shape and
  model.safetensors    its weights
  checkpoints/         resumable state (fwbw.training.checkpoint), each stamped with the config id
  cut.json             the layer-cut evaluation (fwbw.training.evaluation)
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
from fwbw.schema import ConfigError
from fwbw.training.config import TrainConfig

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL_CONFIG = "model_config.json"
MODEL_WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"
CUT = "cut.json"
STATUS = "status.json"
LOCK = ".lock"
RUN_FILES = (CONFIG, METRICS, SUMMARY, MODEL_CONFIG, MODEL_WEIGHTS, CUT, STATUS)  # what a restart removes
SHOWN_DIFFERENCES = 3  # differing fields named when a directory belongs to another config


def check_run_dir(run_dir: Path) -> None:
    """Fail before any work if `run_dir` is no place for a run: empty ('' is the current
    directory), the filesystem root, a file, or not writable."""
    path = Path(run_dir)
    if path == Path("."):
        raise ConfigError("out: empty or '.': name a run directory, e.g. runs/my-run")
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise ConfigError(f"out: {run_dir} is the filesystem root: name a run directory below it")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out: {run_dir} is a file, not a directory")
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"out: {run_dir} is not writable ({existing} is not a writable directory)")


# --- the config a run directory belongs to --------------------------------------------------


def config_id(config: TrainConfig) -> str:
    """The identity of a config: a hash of its dict, stamped on every checkpoint of its run."""
    return hashlib.sha256(_canonical(config.to_dict()).encode()).hexdigest()


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """'field: saved -> wanted' for every field whose JSON differs, nested dicts by dotted name."""
    lines = []
    for key in dict.fromkeys([*wanted, *saved]):
        if isinstance(saved.get(key), dict) and isinstance(wanted.get(key), dict):
            lines += _differences(saved[key], wanted[key], f"{prefix}{key}.")
        elif _shown(saved, key) != _shown(wanted, key):
            lines.append(f"{prefix}{key}: {_shown(saved, key)} -> {_shown(wanted, key)}")
    return lines


def _shown(values: dict, key: str) -> str:
    return _canonical(values[key]) if key in values else "(none)"


def check_owner(run_dir: Path, config: TrainConfig) -> None:
    """Refuse a run directory whose config.json holds another config, naming the first fields
    that differ; a directory without config.json belongs to no run yet."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        return
    saved = read_json(path)
    differences = _differences(saved if isinstance(saved, dict) else {}, config.to_dict())
    if differences:
        shown = "; ".join(differences[:SHOWN_DIFFERENCES]) + ("; ..." if len(differences) > SHOWN_DIFFERENCES else "")
        raise ConfigError(
            f"out: {run_dir} holds the run of another config ({shown}); "
            "--restart starts it over, or give another --out"
        )


def start_run(run_dir: Path, config: TrainConfig, restart: bool = False) -> None:
    """Make `run_dir` the home of `config`'s run: refuse another config's directory, or with
    `restart` first remove every file of the run it holds, then write config.json."""
    run_dir = Path(run_dir)
    if restart:
        clear_run(run_dir)
    else:
        check_owner(run_dir, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / CONFIG, config.to_dict())


def clear_run(run_dir: Path) -> None:
    """Remove the run's files and checkpoints (other files in the folder are left alone)."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


# --- status and lock (sweeps) ---------------------------------------------------------------


def read_status(run_dir: Path) -> dict:
    """status.json; a run without one is pending, and so is one whose status.json is unreadable
    (its error then names the file)."""
    try:
        return read_json(Path(run_dir) / STATUS)
    except FileNotFoundError:
        return {"status": "pending", "error": None}
    except (OSError, ValueError) as error:
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
