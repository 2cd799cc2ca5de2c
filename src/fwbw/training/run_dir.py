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
  .lock                the claim (a lease) of the worker training it, a sweep's or `fwbw train`'s: see below
  lease_epoch          the newest epoch of the run's claims (kept for good)
  tensorboard/, wandb/ what --tracker tensorboard / wandb write (fwbw.training.trackers)

The claim is a lease: .lock holds the worker's host, boot id, pid namespace, pid and the pid's
start time, an owner token, the lease length and the claim's epoch; its modification time is the
heartbeat, on the holder's clock. Clocks of hosts may differ by seconds; leases are minutes.

Taking. A claim is written in full under a private name and hard-linked into place: never
half-written, never replacing another (a retransmitted NFS link that fails with EEXIST after it
succeeded is told by the private file's link count, 2). Its epoch is one above the newest:
recorded in lease_epoch, or of the stale claim it ends; once in place it is recorded there
(written aside, renamed over). Only a taker paused for longer than a lease between choosing its
epoch and linking can repeat one: the fence below compares owner tokens too.

Liveness. A claim is live (never taken) while: from another host, its heartbeat is younger than
its own lease; on its own host, it was made since the last boot (its boot id; another one:
stale at once) and its pid runs with the start time it had then (a dead or reused pid: stale at
once); made in another pid namespace of the host (a container), as from another host. An
old-format claim (pid and host only) is judged by its pid here and by the default lease from its
file's time elsewhere; a claim whose lease is not a finite number of seconds > 0 is unreadable,
hence stale.

Heartbeat. While the run trains, `hold` moves the heartbeat every lease / 4 through the claim's
open file descriptor, which touches only that claim's own file: a holder that lost its claim
never revives it. It sets the event the trainer watches once .lock holds another owner, or after
FAILED_CHECKS heartbeats in a row that could not confirm the claim (EIO, ETIMEDOUT, no claim
found): within 3/4 of a lease, before others may judge the claim stale.

Ending. To remove a claim (a stale one, or one's own on release) a worker first takes its gate,
a claim at .lock.<owner>.end (one worker gets it; a release tries again while a taker holds it).
It then renames .lock aside to a private name and unlinks what it moved only if that is the
claim meant (and still stale, for a taker); anything else is linked back, never over a claim
linked meanwhile. So a worker paused past its gate's lease, whose gate another worker ended to
complete the takeover, never removes the claim that replaced the stale one. A gate left by a
worker that died is itself a stale claim.

Fencing. Every write of a holder to the run (status, config, checkpoints, metrics, model,
summary, cut, samples) first checks that .lock still holds its claim and lease_epoch no newer epoch
(check_fence: two reads of small files), else raises LeaseLost (one line) and writes nothing;
each checkpoint records its epoch. A holder that lost the run writes nothing after the newer
claim is in place, but for a write already past its check (milliseconds; a lease is minutes).
`fwbw train` takes the same claim (training_lease); the torchrun processes of a sweep worker
write under the worker's lease (LEASE_ENV).

Why not flufl.lock: it takes a lock the same NFS-safe way (a private file linked into place, its
link count read when link fails) and breaks one whose lifetime ran out, but it holds no epoch, so
a holder paused past its lifetime is not stopped from writing over the run once another broke
its lock, and on its own host it reads a lock's pid alone (flufl.lock 10's LockFile.state), so
a reused pid, or a container sharing the host's name, looks like the holder. Both would have to be built around it; the gate, the fence and the liveness
rules above are the larger part of this module, so fwbw keeps one implementation of its own.

What NFS must guarantee: link, rename and unlink are atomic on the server, and link never
replaces a file; close-to-open consistency (a claim fsynced before it is linked is read whole by
whoever opens it after); attributes such as a heartbeat may be cached for up to a minute, far
less than a lease.
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

from fwbw.files import atomic_write_json, atomic_write_text, process_alive, read_json, safetensors_complete
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
FAILED_CHECKS = 3  # heartbeats in a row that cannot confirm the claim lose it: < RENEWALS_PER_LEASE, before it can go stale
CLAIM_ATTEMPTS = 3  # links tried: again after a stale claim was ended or the claim vanished
RELEASE_ATTEMPTS = 5  # gates tried by a release while a taker holds the gate (it judges the claim, in milliseconds)
RELEASE_WAIT_S = 0.1  # between them
EPOCH = "lease_epoch"  # the newest epoch of the run's claims: kept for good, a restart included
ASIDE = ".gone"  # .lock.<random>.gone: a claim renamed aside, to be removed if it is the one meant
LEASE_ENV = "FWBW_LEASE"  # names a sweep worker's lease to the `fwbw train` processes it starts under torchrun
BOOT_ID = "/proc/sys/kernel/random/boot_id"  # changes when the host reboots
PID_NAMESPACE = "/proc/self/ns/pid"  # pids are comparable within one namespace only
STARTTIME_FIELD = 22  # of /proc/<pid>/stat: when the process started (a reused pid starts later)
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
    return name in RUN_FILES or name in (CHECKPOINTS, EPOCH) or name.startswith(LOCK)


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
    check_fence(run_dir)
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
    check_fence(run_dir)
    run_dir = Path(run_dir)
    for name in OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


# --- status and lease (sweeps, and `fwbw train`) --------------------------------------------


def read_status(run_dir: Path, corrupt_is_pending: bool = True) -> dict:
    """status.json; a run without one is pending. An unreadable one is pending too, its error
    naming the file (a worker then trains the run again from its checkpoints), or with
    `corrupt_is_pending=False` raises ValueError naming the file (the results table). A run it
    says is done is pending while it has no summary.json (written when training ends) or its
    model.safetensors is cut short (files.safetensors_complete), its error saying so."""
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
    model = Path(run_dir) / MODEL_WEIGHTS
    if status["status"] == "done" and model.exists() and not safetensors_complete(model):
        return {"status": "pending", "error": f"{path}: says done, but its {MODEL_WEIGHTS} is cut short"}
    return status


def write_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """status.json, by the run's lease holder while it holds the lease (check_fence)."""
    check_fence(run_dir)
    atomic_write_json(Path(run_dir) / STATUS, {"status": status, "error": error})


def _proc_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:  # no /proc (not Linux), or not readable
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink(PID_NAMESPACE)
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/<pid>/stat field 22); None
    where unreadable (a dead pid, another pid namespace's, no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[STARTTIME_FIELD - 3])  # fields after "(comm)" start at 3
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Worker:
    """Who claims runs and judges claims, on which clock: this host, boot, pid namespace and
    process by default (tests simulate other hosts, boots, namespaces and clocks)."""

    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    clock: Callable[[], float] = time.time
    boot_id: str | None = field(default_factory=lambda: _proc_text(BOOT_ID))
    pid_ns: str | None = field(default_factory=_pid_namespace)


@dataclass(frozen=True)
class Claim:
    """A claim as read from its file. `identity` is its owner token; a claim of the old format
    (pid and host only) or an unreadable one (host None) is named by a hash of its bytes. A claim
    of an older fwbw has no epoch (0), boot id, pid namespace or start time (None)."""

    identity: str
    host: str | None
    pid: int | None
    lease_s: float
    heartbeat: float  # the file's modification time, on its holder's clock
    epoch: int = 0
    boot_id: str | None = None
    pid_ns: str | None = None
    started: int | None = None  # the pid's start time (_start_time) when it claimed

    def age(self, judge: Worker) -> float:
        return judge.clock() - self.heartbeat

    def is_stale(self, judge: Worker) -> bool:
        """From another host, or another pid namespace of this one (its pids are not ours to
        see), when its heartbeat is older than its own lease; on this host, at once when it was
        made before a reboot (another boot id), else when its pid is dead or now another
        process's (another start time). An unreadable claim is stale. (Hosts are told apart by
        name: two machines of one name look like one rebooted.)"""
        if self.host is None:
            return True
        if self.host != judge.host:
            return self.age(judge) > self.lease_s
        if _known_and_differ(self.boot_id, judge.boot_id):
            return True
        if _known_and_differ(self.pid_ns, judge.pid_ns):
            return self.age(judge) > self.lease_s
        return not _pid_alive(self.pid, self.started)


def _known_and_differ(ours: str | None, theirs: str | None) -> bool:
    return None not in (ours, theirs) and ours != theirs


def _pid_alive(pid: int, started: int | None) -> bool:
    """Whether `pid` runs and, if its start time is known then and now, is the same process."""
    if not process_alive(pid):
        return False
    now = _start_time(pid)
    return started is None or now is None or now == started


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
        fields = _claim_fields(record)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return Claim(_hashed(data), None, None, 0.0, heartbeat)
    owner = record.get("owner")
    identity = owner if isinstance(owner, str) and OWNER.fullmatch(owner) else _hashed(data)
    return Claim(identity, heartbeat=heartbeat, **fields)


def _claim_fields(record: dict) -> dict:
    """A claim's record as Claim's fields; ValueError (or KeyError, TypeError) when unreadable."""
    lease_s = float(record.get("lease_s", LEASE_S))
    if not valid_lease(lease_s):  # a lease that never (inf, nan) or always ends: unreadable
        raise ValueError(f"lease_s {lease_s}")
    started = record.get("started")
    return {"host": str(record["host"]), "pid": int(record["pid"]), "lease_s": lease_s,
            "epoch": int(record.get("epoch", 0)), "boot_id": _text(record.get("boot_id")),
            "pid_ns": _text(record.get("pid_ns")), "started": None if started is None else int(started)}


def _text(value) -> str | None:
    return None if value is None else str(value)


def valid_lease(lease_s: float) -> bool:
    """A lease is a finite number of seconds > 0."""
    return math.isfinite(lease_s) and lease_s > 0


def _hashed(data: bytes) -> str:
    return "h" + hashlib.sha256(data).hexdigest()[:OWNER_HEX]


def _private(path: Path, suffix: str) -> Path:
    """A name beside `path` that no other worker uses."""
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:OWNER_HEX]}{suffix}")


def _link(source: Path, target: Path) -> bool:
    """Hard-link `source` (a file of one link) to `target`, never replacing a file there; whether
    it was linked. On NFS a retransmitted link can fail with EEXIST after it succeeded: the
    source's link count, 2, then says it did (the recipe of open(2)'s O_EXCL note)."""
    try:
        os.link(source, target)
    except FileExistsError:
        return os.stat(source).st_nlink == 2
    return True


def _rename(source: Path, target: Path) -> bool:
    """Rename `source` to a private `target`; False when there was nothing at `source`. On NFS a
    retransmitted rename can fail with ENOENT after it succeeded: the private target then says it did."""
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return target.exists()
    return True


def _link_new(path: Path, content: bytes, now: float) -> int | None:
    """Write a claim in full under a private name, its heartbeat `now`, and hard-link it to `path`:
    an open descriptor of its file, or None if `path` is taken."""
    private = _private(path, ".new")
    private.write_bytes(content)
    fd = os.open(private, os.O_RDONLY)
    try:
        os.fsync(fd)  # on NFS: in the file before another host can open it
        os.utime(fd, (now, now))
        linked = _link(private, path)
    except BaseException:
        os.close(fd)
        raise
    finally:
        private.unlink(missing_ok=True)
    if not linked:
        os.close(fd)
        return None
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


def _end(path: Path, identity: str, content: bytes, worker: Worker, only_stale: bool) -> bool:
    """Remove the claim `identity` from `path` (only while it is stale, with `only_stale`), if this
    worker (its claim `content`) takes the claim's gate PATH.<identity>.end; False when another
    worker holds the gate. One worker at a time ends a claim; if its gate goes stale (the worker
    paused) and another ends it, _remove still never removes another claim."""
    gate = path.with_name(f"{path.name}.{identity}{GATE}")
    fd = _take(gate, content, worker)
    if fd is None:
        return False
    os.close(fd)
    try:
        _remove(path, identity, worker if only_stale else None)
    finally:
        _remove(gate, json.loads(content)["owner"])
    return True


def _remove(path: Path, identity: str, judge: Worker | None = None) -> None:
    """Unlink the claim `identity` at `path` while it is there (and stale to `judge`, if given).
    There is no compare-and-unlink: the file is renamed aside first (atomic), the claim moved is
    read again, and one other than meant (a claim that replaced it while this worker paused) is
    linked back (a link never replaces: a claim linked meanwhile stays, and the one moved aside
    has lost the run, which its holder's next check finds)."""
    if not _meant(read_claim(path), identity, judge):
        return
    aside = _private(path, ASIDE)
    if not _rename(path, aside):
        return
    try:
        if not _meant(read_claim(aside), identity, judge):
            _link(aside, path)
    finally:
        aside.unlink(missing_ok=True)


def _meant(found: Claim | None, identity: str, judge: Worker | None) -> bool:
    return found is not None and found.identity == identity and (judge is None or found.is_stale(judge))


def recorded_epoch(run_dir: Path) -> int:
    """The newest epoch recorded in the run directory (0 before the first claim)."""
    try:
        return int((Path(run_dir) / EPOCH).read_text())
    except (OSError, ValueError):
        return 0


def _next_epoch(run_dir: Path) -> int:
    """One above the newest epoch: the recorded one, or that of the claim at .lock (whose holder
    may have died before recording it)."""
    found = read_claim(run_dir / LOCK)
    return max(recorded_epoch(run_dir), 0 if found is None else found.epoch) + 1


class LeaseLost(RuntimeError):
    """Another worker took over the run while this one trained it (its heartbeat was late), or
    this one's claim is gone: it writes nothing more to the run."""


@dataclass(frozen=True)
class Fence:
    """What a lease holder's writes check first (check_fence): its claim is still the one at
    .lock, and no newer epoch was recorded. Two reads of small files."""

    run_dir: Path
    identity: str
    epoch: int

    def check(self) -> int:
        """The epoch; LeaseLost (one line) once the claim is not the run's newest."""
        current = read_claim(self.run_dir / LOCK)
        if current is None or current.identity != self.identity or recorded_epoch(self.run_dir) > self.epoch:
            raise LeaseLost(f"{self.run_dir}: lease of epoch {self.epoch} lost ({_holder_text(current)} holds the run "
                            "now): this worker writes nothing more to it")
        return self.epoch


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
    epoch: int

    @property
    def fence(self) -> Fence:
        return Fence(self.path.parent, self.identity, self.epoch)

    def renew(self) -> bool:
        """Move the heartbeat to now; False once another worker holds the run instead."""
        now = self.worker.clock()
        os.utime(self.fd, (now, now))
        current = read_claim(self.path)
        return current is not None and current.identity == self.identity

    def release(self) -> None:
        """Remove the claim, unless another worker has taken it over. While a taker holds its
        gate (it judges the claim), tried again RELEASE_ATTEMPTS times, RELEASE_WAIT_S apart."""
        try:
            for attempt in range(RELEASE_ATTEMPTS):
                if attempt:
                    time.sleep(RELEASE_WAIT_S)
                if _end(self.path, self.identity, self.content, self.worker, only_stale=False):
                    return
        finally:
            os.close(self.fd)

    def keep_alive(self, stop: threading.Event, lost: threading.Event) -> None:
        """Renew RENEWALS_PER_LEASE times per lease until `stop`. Once another worker holds the run,
        or FAILED_CHECKS heartbeats in a row could not confirm the claim (an OSError such as EIO,
        ETIMEDOUT or ESTALE, each tried again at the next heartbeat, or no claim found), say so
        and set `lost` (the training stops at its next step); `lost` is set however the thread
        ends unless stopped, so that a run never goes on without its heartbeat."""
        failures = 0
        try:
            while not stop.wait(self.lease_s / RENEWALS_PER_LEASE):
                found = None
                try:
                    if self.renew():
                        failures = 0
                        continue
                    found = read_claim(self.path)
                except OSError as error:
                    _say(f"{self.path.parent}: heartbeat not written: {error}")
                if found is not None and found.identity != self.identity:
                    _say(f"{self.path.parent}: lease lost: {_holder_text(found)} holds the run now; "
                         "this worker stops training it")
                    return
                failures += 1
                if failures == FAILED_CHECKS:
                    _say(f"{self.path.parent}: lease lost: {failures} heartbeats in a row could not confirm its "
                         "claim; this worker stops training it")
                    return
        finally:
            if not stop.is_set():
                lost.set()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _holder_text(claim: Claim | None) -> str:
    return "nobody" if claim is None else f"{claim.host} (pid {claim.pid})"


def take_lease(run_dir: Path, lease_s: float = LEASE_S, worker: Worker | None = None) -> Lease | None:
    """Claim the run for `worker` (this process by default) with a lease of `lease_s` seconds,
    taking over a stale claim, under the run's next epoch (then recorded); None while a live
    claim holds it."""
    if not valid_lease(lease_s):
        raise ValueError(f"a lease is a finite number of seconds > 0, got {lease_s}")
    worker = worker or Worker()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    owner, epoch = uuid.uuid4().hex[:OWNER_HEX], _next_epoch(run_dir)
    content = json.dumps({"host": worker.host, "pid": worker.pid, "owner": owner, "lease_s": lease_s, "epoch": epoch,
                          "boot_id": worker.boot_id, "pid_ns": worker.pid_ns, "started": _start_time(worker.pid)}).encode()
    fd = _take(run_dir / LOCK, content, worker)
    if fd is None:
        return None
    if recorded_epoch(run_dir) < epoch:
        atomic_write_text(run_dir / EPOCH, f"{epoch}\n")
    return Lease(run_dir / LOCK, owner, content, worker, lease_s, fd, epoch)


_HELD: dict[str, Lease] = {}  # the leases this process took, by run directory: claim, hold, release
_FENCES: dict[str, Fence] = {}  # what its writes to a run directory check: its own leases' and inherited ones


def claim(run_dir: Path, lease_s: float = LEASE_S, worker: Worker | None = None) -> bool:
    """Take the run's lease (take_lease) and keep it for hold, release and the writes' fence
    (check_fence); True if taken."""
    lease = take_lease(run_dir, lease_s, worker)
    if lease is not None:
        _HELD[os.path.abspath(run_dir)] = lease
        _FENCES[os.path.abspath(run_dir)] = lease.fence
    return lease is not None


def check_fence(run_dir: Path) -> int | None:
    """Before a write to the run directory: LeaseLost (one line) once this process's lease on it
    is no longer the run's newest claim; its epoch, or None where it holds none (a plain train())."""
    fence = _FENCES.get(os.path.abspath(run_dir))
    return None if fence is None else fence.check()


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
    _FENCES.pop(os.path.abspath(run_dir), None)
    lease = _HELD.pop(os.path.abspath(run_dir), None)
    if lease is not None:
        lease.release()


@contextlib.contextmanager
def passed_on(run_dir: Path) -> Iterator[None]:
    """While the block runs, LEASE_ENV names this process's lease on the run, so that the
    processes it starts (torchrun's `fwbw train`) write under it (training_lease)."""
    key, before = os.path.abspath(run_dir), os.environ.get(LEASE_ENV)
    fence = _FENCES.get(key)
    if fence is not None:
        os.environ[LEASE_ENV] = json.dumps({"run_dir": key, "owner": fence.identity, "epoch": fence.epoch})
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LEASE_ENV, None)
        else:
            os.environ[LEASE_ENV] = before


def _inherited_fence(run_dir: Path) -> Fence | None:
    """The lease LEASE_ENV names, if it is one on `run_dir`."""
    try:
        record = json.loads(os.environ[LEASE_ENV])
        if os.path.abspath(record["run_dir"]) == os.path.abspath(run_dir):
            return Fence(Path(run_dir), str(record["owner"]), int(record["epoch"]))
    except (KeyError, ValueError, TypeError):
        pass
    return None


@contextlib.contextmanager
def training_lease(run_dir: Path, main: bool = True) -> Iterator[threading.Event]:
    """What `fwbw train` trains under; the event it yields is set once the lease is lost. The lease
    of the sweep worker that started it (LEASE_ENV names it; that worker renews and releases it),
    or one of its own, taken here, renewed while the block runs and released after (ConfigError,
    one line, while another worker's live claim holds the run). Ranks other than the main one
    (`main` False) write nothing and hold nothing."""
    key, inherited = os.path.abspath(run_dir), _inherited_fence(run_dir)
    if not main:
        yield threading.Event()
    elif inherited is not None:
        _FENCES[key] = inherited
        try:
            inherited.check()
            yield threading.Event()
        finally:
            _FENCES.pop(key, None)
    elif not claim(run_dir):
        holder = _holder_text(read_claim(Path(run_dir) / LOCK))
        raise ConfigError(f"out: {run_dir} is being trained by {holder}, whose claim is live: "
                          "wait for it to end, or give another --out")
    else:
        try:
            with hold(run_dir) as lost:
                yield lost
        finally:
            release(run_dir)
