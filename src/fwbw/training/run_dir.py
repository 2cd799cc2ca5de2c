"""A run directory's life: its layout, whether it can be written, which config it belongs to, its
status, and the lease of the worker that trains it.

  config.json          the TrainConfig: the directory belongs to this config and no other
  metrics.jsonl        one line per validation point
  summary.json         final numbers, written when training ends
  model_config.json    the trained model's shape and
  model.safetensors    its weights
  checkpoints/         resumable state (fwbw.training.checkpoint), each stamped with the config id
  cut.json             the layer-cut evaluation (fwbw.training.evaluation)
  samples.json         fw and bw continuations of held-out prompts (fwbw.study.samples)
  status.json          pending | running | done | failed, with the error (written by a sweep)
  .lock                the claim (a lease) of the sweep worker training it: see below
  tensorboard/, wandb/ what --tracker tensorboard / wandb write (fwbw.training.trackers)

The claim is a lease: .lock holds the worker's host, pid, owner token and lease length; its
modification time is the heartbeat, on the holder's clock. It is written in full under a private
name and hard-linked into place (never half-written, never replacing another). While the run
trains, `hold` moves the heartbeat every lease / 4 through the claim's open file descriptor, which
touches only that claim's own file: a holder that lost its claim never revives it, and at its
next heartbeat sees another owner in .lock and says so (training goes on). A claim is stale when
its pid is dead on this host (at once), or, from another host, its heartbeat is older than its own
lease; a live claim is never taken. Clocks of hosts may differ by seconds; leases are minutes.
To remove a claim (a stale one, or one's own on release) a worker first takes its gate, a claim
at .lock.<owner>.end (one worker gets it), then reads .lock again and unlinks it only if it still
holds that owner's claim (and it is still stale). Only a gate's holder removes a claim and links
never replace, so the claim cannot change in between; a taker then links its own claim, which a
newcomer may beat: one worker holds the run either way. A gate left by a worker that died in
those milliseconds is itself a stale claim. Only link, unlink and utime touch shared names, all
atomic on NFS. An old-format claim (pid and host only) gets the default lease from its file's
time; a claim whose lease is not a finite number of seconds > 0 is unreadable, hence stale. A
worker paused longer than its lease can lose the run and learns so at its next heartbeat.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from fwbw.files import atomic_write_json, read_json
from fwbw.schema import ConfigError, differences
from fwbw.training.config import TrainConfig, identity_of

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL_CONFIG = "model_config.json"
MODEL_WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"  # the weights validation selected (averaged with eval_ema)
CHECKPOINTS = "checkpoints"
CUT = "cut.json"
SAMPLES = "samples.json"
STATUS = "status.json"
LOCK = ".lock"
OUTPUTS = (METRICS, SUMMARY, MODEL_CONFIG, MODEL_WEIGHTS, BEST_WEIGHTS, CUT, SAMPLES)  # what training, the cut and sampling write
RUN_FILES = (CONFIG, *OUTPUTS, STATUS)  # what a restart removes, with the checkpoints
STATUSES = ("pending", "running", "done", "failed")
SHOWN_DIFFERENCES = 3  # differing fields named when a directory belongs to another config
OUT_EXAMPLE = "runs/my-run"
RESTART_HINT = "--restart starts it over, or give another --out"
LEASE_S = 600.0  # default lease: a claim not renewed for this long is stale (Execution.lease_s)
RENEWALS_PER_LEASE = 4  # heartbeats per lease: a late one or two do not lose the run
CLAIM_ATTEMPTS = 3  # links tried: again after a stale claim was ended or the claim vanished
OWNER_HEX = 16  # hex digits of an owner token
OWNER = re.compile(r"[0-9a-f]+")  # an owner token: safe in a gate's file name
GATE = ".end"  # .lock.<owner>.end: the gate of the claim of <owner>
# a sweep's layout (fwbw.study.sweep_dir), here so that a run can tell it is one of a sweep's runs
RUNS = "runs"  # SWEEP/runs/<run_id>/ are its run directories
SWEEP_FILE = "sweep.json"


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
    """The identity of a config: a hash of its identity dict (TrainConfig.identity), stamped on every
    checkpoint of its run."""
    return hashlib.sha256(_canonical(config.identity()).encode()).hexdigest()


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
    shown = differences(identity_of(saved), config.identity(), SHOWN_DIFFERENCES)
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


# --- status and lease (sweeps) --------------------------------------------------------------


def read_status(run_dir: Path, corrupt_is_pending: bool = True) -> dict:
    """status.json; a run without one is pending. An unreadable one is pending too, its error
    naming the file (a worker then trains the run again from its checkpoints), or with
    `corrupt_is_pending=False` raises ValueError naming the file (the results table). A run it
    says is done is pending while it has no summary.json (written when training ends), its error
    saying so."""
    path = Path(run_dir) / STATUS
    try:
        status = read_json(path)
        if not isinstance(status, dict) or status.get("status") not in STATUSES:
            raise ValueError(f"{path}: not a run status (a JSON object with status {' | '.join(STATUSES)})")
    except FileNotFoundError:
        return {"status": "pending", "error": None}
    except (OSError, ValueError) as error:
        if not corrupt_is_pending:
            raise
        return {"status": "pending", "error": str(error)}
    if status["status"] == "done" and not (Path(run_dir) / SUMMARY).is_file():
        return {"status": "pending", "error": f"{path}: says done, but the run has no {SUMMARY}"}
    return status


def write_status(run_dir: Path, status: str, error: str | None = None) -> None:
    atomic_write_json(Path(run_dir) / STATUS, {"status": status, "error": error})


@dataclass(frozen=True)
class Worker:
    """Who claims runs and judges claims, on which clock: this host and process by default (tests
    simulate other hosts and clocks)."""

    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    clock: Callable[[], float] = time.time


@dataclass(frozen=True)
class Claim:
    """A claim as read from its file. `identity` is its owner token; a claim of the old format
    (pid and host only) or an unreadable one (host None) is named by a hash of its bytes."""

    identity: str
    host: str | None
    pid: int | None
    lease_s: float
    heartbeat: float  # the file's modification time, on its holder's clock

    def age(self, judge: Worker) -> float:
        return judge.clock() - self.heartbeat

    def is_stale(self, judge: Worker) -> bool:
        """On the holder's host its pid decides, at once; elsewhere its heartbeat, older than its
        own lease. An unreadable claim is stale."""
        if self.host is None:
            return True
        if self.host == judge.host:
            return not _pid_alive(self.pid)
        return self.age(judge) > self.lease_s


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_claim(path: Path) -> Claim | None:
    """The claim in `path` (a run's .lock, or a gate), None if there is none; its bytes and its
    heartbeat are read from one open file, so that they belong to the same claim."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None
    with handle:
        heartbeat = os.fstat(handle.fileno()).st_mtime
        data = handle.read()
    try:
        record = json.loads(data)
        host, pid, lease_s = str(record["host"]), int(record["pid"]), float(record.get("lease_s", LEASE_S))
        if not valid_lease(lease_s):  # a lease that never (inf, nan) or always ends: unreadable
            raise ValueError(f"lease_s {lease_s}")
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return Claim(_hashed(data), None, None, 0.0, heartbeat)
    owner = record.get("owner")
    identity = owner if isinstance(owner, str) and OWNER.fullmatch(owner) else _hashed(data)
    return Claim(identity, host, pid, lease_s, heartbeat)


def valid_lease(lease_s: float) -> bool:
    """A lease is a finite number of seconds > 0."""
    return math.isfinite(lease_s) and lease_s > 0


def _hashed(data: bytes) -> str:
    return "h" + hashlib.sha256(data).hexdigest()[:OWNER_HEX]


def _link_new(path: Path, content: bytes, now: float) -> int | None:
    """Write a claim in full under a private name, its heartbeat `now`, and hard-link it to `path`:
    an open descriptor of its file, or None if `path` is taken."""
    private = path.with_name(f"{path.name}.{uuid.uuid4().hex[:OWNER_HEX]}.new")
    private.write_bytes(content)
    fd = os.open(private, os.O_RDONLY)
    try:
        os.fsync(fd)  # on NFS: in the file before another host can open it
        os.utime(fd, (now, now))
        os.link(private, path)
    except FileExistsError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    finally:
        private.unlink(missing_ok=True)
    return fd


def _take(path: Path, content: bytes, worker: Worker) -> int | None:
    """Put `worker`'s claim (`content`) at `path`, ending a stale claim found there first: an open
    descriptor of its file, or None while a live claim holds `path`."""
    for _ in range(CLAIM_ATTEMPTS):
        fd = _link_new(path, content, worker.clock())
        if fd is not None:
            return fd
        found = read_claim(path)
        if found is None:
            continue  # released meanwhile: link again
        if not found.is_stale(worker):
            return None
        _end(path, found.identity, content, worker, only_stale=True)
    return None


def _end(path: Path, identity: str, content: bytes, worker: Worker, only_stale: bool) -> None:
    """Remove the claim `identity` from `path`, if this worker takes its gate (a claim at
    PATH.<identity>.end) and `path` still holds that claim (still stale, with `only_stale`).
    Whoever removes a claim holds its gate, and links never replace a file, so between that
    check and the removal no other worker can change `path`."""
    gate = path.with_name(f"{path.name}.{identity}{GATE}")
    fd = _take(gate, content, worker)
    if fd is None:
        return  # another worker is ending it
    os.close(fd)
    try:
        current = read_claim(path)
        if current is not None and current.identity == identity and (current.is_stale(worker) or not only_stale):
            path.unlink(missing_ok=True)
    finally:
        gate.unlink(missing_ok=True)


@dataclass(frozen=True)
class Lease:
    """A claim this process holds. Its file stays open: the heartbeat is renewed through the open
    descriptor, so it only ever touches this claim's own file, never one that replaced it."""

    path: Path
    identity: str
    content: bytes
    worker: Worker
    lease_s: float
    fd: int

    def renew(self) -> bool:
        """Move the heartbeat to now; False once another worker holds the run instead."""
        now = self.worker.clock()
        os.utime(self.fd, (now, now))
        current = read_claim(self.path)
        return current is not None and current.identity == self.identity

    def release(self) -> None:
        """Remove the claim, unless another worker has taken it over."""
        try:
            _end(self.path, self.identity, self.content, self.worker, only_stale=False)
        finally:
            os.close(self.fd)

    def keep_alive(self, stop: threading.Event, lost: threading.Event) -> None:
        """Renew RENEWALS_PER_LEASE times per lease until `stop`; once another worker holds the
        run, set `lost` (the training stops at its next step) and say so."""
        while not stop.wait(self.lease_s / RENEWALS_PER_LEASE):
            try:
                still_held = self.renew()
            except OSError as error:  # e.g. ESTALE once another host removed the claim
                print(f"{self.path.parent}: heartbeat not written: {error}", file=sys.stderr, flush=True)
                current = read_claim(self.path)
                still_held = current is not None and current.identity == self.identity
            if not still_held:
                print(f"{self.path.parent}: lease lost: {_holder_text(read_claim(self.path))} "
                      "holds the run now; this worker stops training it", file=sys.stderr, flush=True)
                lost.set()
                return


def _holder_text(claim: Claim | None) -> str:
    return "nobody" if claim is None else f"{claim.host} (pid {claim.pid})"


def take_lease(run_dir: Path, lease_s: float = LEASE_S, worker: Worker | None = None) -> Lease | None:
    """Claim the run for `worker` (this process by default) with a lease of `lease_s` seconds,
    taking over a stale claim; None while a live one holds it."""
    if not valid_lease(lease_s):
        raise ValueError(f"a lease is a finite number of seconds > 0, got {lease_s}")
    worker = worker or Worker()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = uuid.uuid4().hex[:OWNER_HEX]
    content = json.dumps({"host": worker.host, "pid": worker.pid, "owner": owner, "lease_s": lease_s}).encode()
    fd = _take(run_dir / LOCK, content, worker)
    return None if fd is None else Lease(run_dir / LOCK, owner, content, worker, lease_s, fd)


_HELD: dict[str, Lease] = {}  # this process's leases by run directory: claim, hold, release


def claim(run_dir: Path, lease_s: float = LEASE_S, worker: Worker | None = None) -> bool:
    """Take the run's lease (take_lease) and keep it for hold and release; True if taken."""
    lease = take_lease(run_dir, lease_s, worker)
    if lease is not None:
        _HELD[os.path.abspath(run_dir)] = lease
    return lease is not None


class LeaseLost(RuntimeError):
    """Another worker took over the run while this one trained it (its heartbeat was late)."""


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[threading.Event]:
    """Keep this process's lease on the run alive (a heartbeat thread) while the block runs; the
    event it yields is set once the lease is lost (without a lease, never)."""
    lost = threading.Event()
    lease = _HELD.get(os.path.abspath(run_dir))
    if lease is None:
        yield lost
        return
    stop = threading.Event()
    heartbeat = threading.Thread(target=lease.keep_alive, args=(stop, lost), name=f"lease {run_dir}", daemon=True)
    heartbeat.start()
    try:
        yield lost
    finally:
        stop.set()
        heartbeat.join()


def release(run_dir: Path) -> None:
    """Give up this process's lease on the run, if it holds one."""
    lease = _HELD.pop(os.path.abspath(run_dir), None)
    if lease is not None:
        lease.release()
