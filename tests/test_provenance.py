"""provenance: what determines a run's numbers beyond its config."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fwbw import provenance as prov

CPU = torch.device("cpu")
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(directory: Path, *args: str) -> str:
    identity = ("-c", "user.name=test", "-c", "user.email=test@example.com")
    command = ["git", *identity, "-C", str(directory), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A committed git checkout holding src/fwbw/__init__.py and README, imported from."""
    package = tmp_path / "src" / "fwbw"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (tmp_path / "README").write_text("")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    monkeypatch.setattr(prov, "PACKAGE_DIR", package)
    return tmp_path


def test_provenance_has_every_key_with_its_type_and_is_json_ready():
    record = prov.provenance(CPU)
    assert list(record) == [
        "fwbw_version", "git_commit", "git_dirty", "torch_version", "device", "device_name", "threads",
        "python_version",
    ]
    assert all(isinstance(record[key], str) for key in record if key not in ("git_dirty", "threads"))
    assert record["git_dirty"] in (True, False, None)
    assert record["fwbw_version"] == importlib.metadata.version("fwbw")
    assert record["torch_version"] == torch.__version__
    assert record["device"] == "cpu"
    assert record["threads"] == torch.get_num_threads()
    assert record["python_version"] == platform.python_version()
    assert json.loads(json.dumps(record)) == record


@needs_git
def test_git_commit_is_the_head_of_the_checkout_fwbw_was_imported_from():
    repo_root = Path(prov.__file__).resolve().parents[2]
    done = subprocess.run(["git", "-C", str(repo_root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("fwbw was not imported from a git checkout")
    record = prov.provenance(CPU)
    assert record["git_commit"] == done.stdout.strip()
    assert isinstance(record["git_dirty"], bool)


@needs_git
def test_git_dirty_means_modified_tracked_files_under_src(checkout):
    head = git(checkout, "rev-parse", "HEAD").strip()
    record = prov.provenance(CPU)
    assert (record["git_commit"], record["git_dirty"]) == (head, False)
    (checkout / "src" / "untracked.py").write_text("x = 1\n")
    (checkout / "README").write_text("outside src\n")
    assert prov.provenance(CPU)["git_dirty"] is False
    (checkout / "src" / "fwbw" / "__init__.py").write_text("x = 1\n")
    assert prov.provenance(CPU)["git_dirty"] is True


def test_unknown_when_the_package_is_not_in_a_git_checkout(tmp_path, monkeypatch):
    (tmp_path / "__init__.py").write_text("")
    monkeypatch.setattr(prov, "PACKAGE_DIR", tmp_path)
    record = prov.provenance(CPU)
    assert (record["git_commit"], record["git_dirty"]) == ("unknown", None)


@needs_git
def test_unknown_when_the_package_sits_untracked_inside_a_work_tree(checkout, monkeypatch):
    installed = checkout / ".venv" / "fwbw"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    monkeypatch.setattr(prov, "PACKAGE_DIR", installed)
    record = prov.provenance(CPU)
    assert (record["git_commit"], record["git_dirty"]) == ("unknown", None)


def test_unknown_when_git_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    record = prov.provenance(CPU)
    assert (record["git_commit"], record["git_dirty"]) == ("unknown", None)


def test_unknown_when_git_times_out(monkeypatch):
    def timeout(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(subprocess, "run", timeout)
    record = prov.provenance(CPU)
    assert (record["git_commit"], record["git_dirty"]) == ("unknown", None)


def test_fwbw_version_unknown_when_not_installed(monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_found)
    assert prov.fwbw_version() == "unknown"


def test_threads_follow_torch_set_num_threads():
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert prov.provenance(CPU)["threads"] == threads
    finally:
        torch.set_num_threads(before)


def test_device_name_is_the_cuda_name_for_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU {device}")
    assert prov.provenance(torch.device("cuda", 1))["device_name"] == "GPU cuda:1"


def test_cpu_device_name_is_the_first_model_name_in_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU @ 3.0GHz\n\nmodel name\t: Other\n")
    monkeypatch.setattr(prov, "CPUINFO", cpuinfo)
    assert prov.device_name(CPU) == "Example CPU @ 3.0GHz"


def test_cpu_device_name_falls_back_to_the_processor_then_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(prov, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(platform, "processor", lambda: "x86_64")
    assert prov.device_name(CPU) == "x86_64"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert prov.device_name(CPU) == "unknown"
