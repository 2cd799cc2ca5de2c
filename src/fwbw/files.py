"""File helpers every layer shares: atomic writes (a crash leaves either the old file or the new
one, never half of one), reads of JSON that fail with one line naming the file, and sha256."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def atomic_write(path: Path, write: Callable[[Path], T]) -> T:
    """Call write(tmp) on a temporary path in the same folder, then rename it over `path`; return
    what write returned. A failure removes the temporary file and raises an OSError naming `path`.
    The temporary file's name holds this host and process (.NAME.HOST-PID.XXXXXXXX.tmp), so one
    that a killed process left (kill -9 between create and rename) is removed by the next write of
    the same file on the same host."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(path)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path, os.getpid()), suffix=".tmp")
        os.close(handle)
    except OSError as error:
        raise cannot_write(path, error) from error
    try:
        result = write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by their owner only
        os.replace(tmp, path)
        return result
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise cannot_write(path, error) from error
        raise


def _tmp_prefix(path: Path, pid: int) -> str:
    return f".{path.name}.{socket.gethostname()}-{pid}."


def _remove_orphans(path: Path) -> None:
    """Remove the temporary files of `path` left by processes of this host that have ended."""
    ours = re.compile(re.escape(f".{path.name}.{socket.gethostname()}-") + r"(\d+)\.[a-z0-9_]+\.tmp")
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = ours.fullmatch(candidate.name)
        if match and not process_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (another user's counts); True for no pid of its own (<= 0)."""
    if pid <= 0:
        return True  # no process of its own: leave the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class WriteFailed(OSError):
    """A write that failed (disk full, no permission), in one line that names the file."""

    def __init__(self, path: Path, reason: str, errno: int | None = None):
        super().__init__(f"cannot write {path}: {reason}")
        self.reason = reason
        self.errno = errno  # errno alone keeps str() as the message above


def cannot_write(path: Path, error: Exception) -> WriteFailed:
    if isinstance(error, WriteFailed):
        reason = error.reason
    else:
        reason = getattr(error, "strerror", None) or (str(error) or type(error).__name__).splitlines()[0]
    return WriteFailed(path, reason, getattr(error, "errno", None))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    """The JSON value in `path`; a file that is not JSON raises ValueError naming it and the position."""
    path = Path(path)
    return _parse_json(path, read_text(path))


def read_jsonl(path: Path) -> list:
    """One JSON value per non-empty line; a bad line raises ValueError naming the file and the line."""
    return [value for _, value in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: Path) -> list[tuple[int, Any]]:
    """(line number, value) for each non-empty line, so that a check of a value can name its line."""
    path = Path(path)
    return [
        (line_number, _parse_json(path, line, line_number))
        for line_number, line in enumerate(read_text(path).splitlines(), start=1)
        if line.strip()
    ]


def read_text(path: Path) -> str:
    """The file as UTF-8 text; other bytes raise ValueError naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start})") from None


def _parse_json(path: Path, text: str, line_number: int | None = None) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        line = error.lineno if line_number is None else line_number
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {line} column {error.colno})") from None
    except _DuplicateKey as error:
        where = "" if line_number is None else f" at line {line_number}"
        raise ValueError(f"{path}: not valid JSON (duplicate key {error.args[0]!r}{where})") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object's dict; a key given twice is refused (json.loads would keep the last)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file holds every byte its header promises: 8 bytes giving the header's
    length n, the JSON header, then the tensors, the last ending at the largest data offset (a cheap
    check against a file cut short; it reads the header only)."""
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if header_length > size:
                return False
            header = json.loads(handle.read(header_length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        return size == 8 + header_length + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):  # AttributeError: a header not a table
        return False


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
