"""fwbw.files: atomic writes leave no temporary file behind, even after a process was killed mid-write."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from fwbw.files import atomic_write, atomic_write_text


def ended_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_temporary_file_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    host = socket.gethostname()
    target = tmp_path / "layer_cut.png"
    orphan = tmp_path / f".layer_cut.png.{host}-{ended_pid()}.ab12cd_9.tmp"
    live = tmp_path / f".layer_cut.png.{host}-{os.getpid()}.zz99yy_0.tmp"  # a writer still at work
    elsewhere = tmp_path / f".layer_cut.png.other-node-{ended_pid()}.ab12cd_9.tmp"  # another host's: not ours to judge
    other_file = tmp_path / f".other.png.{host}-{ended_pid()}.ab12cd_9.tmp"
    for path in (orphan, live, elsewhere, other_file):
        path.write_text("half")
    atomic_write_text(target, "whole")
    assert target.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, elsewhere.name, other_file.name])


def test_the_temporary_file_names_this_host_and_process_and_is_gone_after_the_write(tmp_path):
    seen = []
    atomic_write(tmp_path / "x.json", lambda tmp: seen.append(tmp.name) or tmp.write_text("{}"))
    assert seen[0].startswith(f".x.json.{socket.gethostname()}-{os.getpid()}.") and seen[0].endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_safetensors_file_cut_short_or_garbled_is_not_complete(tmp_path):
    import torch
    from safetensors.torch import save_file

    from fwbw.files import safetensors_complete

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(5)}, str(path))
    whole = path.read_bytes()
    assert safetensors_complete(path)
    for cut in (whole[:-1], whole[:20], b"", b"\xff" * 64):
        path.write_bytes(cut)
        assert not safetensors_complete(path), len(cut)
    path.write_bytes(whole + b"\0")  # longer than its header says: not what was written either
    assert not safetensors_complete(path)
    assert not safetensors_complete(tmp_path / "missing.safetensors")


def test_a_safetensors_header_that_is_no_table_is_not_complete(tmp_path):
    from fwbw.files import safetensors_complete

    path = tmp_path / "model.safetensors"
    path.write_bytes((2).to_bytes(8, "little") + b"[]")
    assert not safetensors_complete(path)
