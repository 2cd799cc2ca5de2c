"""scripts/gpu-check.sh, here in its CPU fallback (CUDA hidden): one JSON line of sane figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT, subprocess_env

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check.sh"


@pytest.mark.slow
def test_the_gpu_check_falls_back_to_the_cpu_and_prints_one_json_line_of_figures(tmp_path):
    env = {**subprocess_env(), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "FWBW_CACHE": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    figures = json.loads(line)
    assert (figures["device"], figures["fallback"], figures["device_name"]) == ("cpu", True, None)
    assert figures["peak_bf16_gflops"] > 0 and figures["datasheet_peak_gflops"] is None
    assert 0 < figures["seconds"] < SUBPROCESS_TIMEOUT
    smallest, largest = figures["sizes"]
    assert smallest["params"] < largest["params"]
    for size in (smallest, largest):
        assert size["compiled"] is False and size["train_steps"] >= 1 and size["mfu_fw_datasheet"] is None
        assert all(size[key] > 0 for key in ("mfu_fw", "mfu_fwbw", "fw_tokens_per_s", "fwbw_tokens_per_s",
                                             "train_tokens_per_s", "memory_estimate_bytes"))
        assert size["memory_peak_bytes"] is None and size["peak_over_estimate"] is None  # measured on CUDA only
    run = figures["torchrun"]
    assert (run["world_size"], run["compiled"]) == (1, False) and run["steps"] >= 1 and run["mean_train_tokens_per_s"] > 0
