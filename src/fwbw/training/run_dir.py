"""A run directory's life: whether it can be written, its status, and the lock of the worker
that trains it.

  status.json     pending | running | done | failed, with the error
  .lock           held by the worker running it (written in full, then hard-linked into place)
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

from fwbw.files import atomic_write_json
from fwbw.schema import ConfigError


def check_run_dir(run_dir: Path) -> None:
    """Fail before any work if the run directory cannot be created or written."""
    existing = Path(run_dir).resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"out: {run_dir} is not writable ({existing} is not a writable directory)")




def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {"status": "pending"}


def write_status(run_dir: Path, status: str, error: str | None = None) -> None:
    atomic_write_json(run_dir / "status.json", {"status": status, "error": error})


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
    lock = run_dir / ".lock"
    owner = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    mine = run_dir / f".lock.{owner}"
    mine.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        for _ in range(3):
            try:
                os.link(mine, lock)
                return True
            except FileExistsError:
                if _lock_holder_alive(lock) or not _move_stale_lock(lock, run_dir / f".lock.stale.{owner}"):
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
    (run_dir / ".lock").unlink(missing_ok=True)
