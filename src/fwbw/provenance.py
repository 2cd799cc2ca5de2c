"""What determines a run's numbers beyond its config: the code (fwbw's version, its git commit and
whether its sources were modified), torch, the device, the CPU threads and Python."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent  # the fwbw package this process imported
CPUINFO = Path("/proc/cpuinfo")
GIT_TIMEOUT_S = 5.0
UNKNOWN = "unknown"


def provenance(device: torch.device) -> dict:
    """The run's code, library and hardware, as JSON-ready values ("unknown", or None for
    git_dirty, where a lookup fails)."""
    return {
        "fwbw_version": fwbw_version(),
        "git_commit": git_commit(PACKAGE_DIR),
        "git_dirty": git_dirty(PACKAGE_DIR),
        "torch_version": torch.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
    }


def fwbw_version() -> str:
    try:
        return importlib.metadata.version("fwbw")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN


def run_git(directory: Path, *args: str) -> str | None:
    """The stdout of `git -C directory args`, or None when git is missing, fails or times out."""
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def in_checkout(package_dir: Path) -> bool:
    """Whether `package_dir` is part of a git checkout: its __init__.py is tracked there (a package
    installed into a virtual environment that sits inside some work tree is not)."""
    return run_git(package_dir, "ls-files", "--error-unmatch", "__init__.py") is not None


def git_commit(package_dir: Path) -> str:
    head = run_git(package_dir, "rev-parse", "HEAD") if in_checkout(package_dir) else None
    return head.strip() if head else UNKNOWN


def git_dirty(package_dir: Path) -> bool | None:
    """Whether tracked files under the checkout's src/ differ from its commit (untracked files are
    not looked at); None when unknown."""
    if not in_checkout(package_dir):
        return None
    changes = run_git(package_dir, "status", "--porcelain", "--untracked-files=no", "--", ":/src")
    return None if changes is None else bool(changes.strip())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model() or platform.processor() or UNKNOWN


def cpu_model() -> str | None:
    """The first "model name" in /proc/cpuinfo, or None where there is none."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None
