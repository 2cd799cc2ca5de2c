"""torch.compile of the model's blocks: the same losses as eager, the same weights' names, on
by default where it measured faster (CUDA, and long runs on CPU; docs/method.md#compilation)."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, tiny_config, without_seconds
from safetensors.torch import load_file

from fwbw.training.trainer import (
    COMPILE_MIN_CPU_STEPS,
    Trainer,
    compile_by_default,
    expected_steps,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_by_default_on_cuda_and_for_long_runs_on_cpu(tmp_path, tiny_data):
    assert compile_by_default(torch.device("cuda", 0), expected_steps=1) is True
    assert compile_by_default(torch.device("cpu"), expected_steps=COMPILE_MIN_CPU_STEPS - 1) is False
    assert compile_by_default(torch.device("cpu"), expected_steps=COMPILE_MIN_CPU_STEPS) is True
    short = Trainer(tiny_config(train_tokens=3000), tmp_path / "short", data=tiny_data, progress=False)
    assert expected_steps(short.config, short.budget) == 3000 / 512 and short.compiled is False


@pytest.mark.slow
def test_compiled_and_eager_training_agree(tmp_path, tiny_data):
    config = tiny_config(train_tokens=3000)  # 6 steps, fw and fw+bw, with 2 evaluations
    summaries = {
        compiled: Trainer(config, tmp_path / str(compiled), data=tiny_data, progress=False, compile=compiled).run()
        for compiled in (False, True)
    }
    assert [summaries[c]["compiled"] for c in (False, True)] == [False, True]
    eager, compiled = (without_seconds(read_metrics(tmp_path / str(c))) for c in (False, True))
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        assert a["step"] == b["step"]
        for key in ("fw_loss", "bw_loss", "train_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5)
    weights = [load_file(tmp_path / str(c) / "model.safetensors") for c in (False, True)]
    assert weights[0].keys() == weights[1].keys()
