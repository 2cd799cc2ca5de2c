"""`fwbw bench`: the trainer's own step, timed with its tasks forced, and the result's figures."""

import json

import pytest
import torch

from fwbw.training import bench
from fwbw.training.bench import (
    BenchShape,
    bench_trainer,
    format_table,
    run_bench,
    select_shapes,
)
from fwbw.training.trainer import Trainer

TINY = BenchShape("tiny", width=32, depth=1, vocab=64, seq_len=16, tokens_per_step=64)
WARMUP, STEPS = 1, 2
ROW_TYPES = {
    "name": str,
    "width": int,
    "depth": int,
    "vocab": int,
    "seq_len": int,
    "batch": int,
    "params": int,
    "dtype": str,
    "fw_tokens_per_s": float,
    "fwbw_tokens_per_s": float,
    "fwbw_over_fw_step_time": float,
    "mfu_fw": float,
    "mfu_fwbw": float,
    "fw_step_ms": float,
    "fwbw_step_ms": float,
    "flops_per_token": float,
}


@pytest.fixture(scope="module")
def timed_steps() -> dict:
    """The bench's result, and the tasks of every Trainer.train_step it called."""
    directions = []
    real_step = Trainer.train_step

    def recording_step(self, forced=None):
        directions.append(forced)
        return real_step(self, forced)

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(bench.MATMUL_SIZE, "cpu", 256)
        patch.setattr(Trainer, "train_step", recording_step)
        result = run_bench([TINY], device="cpu", dtype="fp32", steps=STEPS, warmup=WARMUP, progress=False)
    return {"result": json.loads(json.dumps(result)), "directions": directions}


@pytest.fixture(scope="module")
def result(timed_steps) -> dict:
    return timed_steps["result"]


def test_bench_times_the_trainers_step_with_forced_tasks(timed_steps):
    assert timed_steps["directions"] == [("fw",), ("fw", "bw")] * (WARMUP + STEPS)


def test_bench_trainer_takes_one_fixed_microbatch_at_full_length_and_writes_nothing(tmp_path):
    trainer = bench_trainer(TINY, batch=4, device="cpu", dtype="fp32", run_dir=tmp_path / "run")
    for directions in [("fw",), ("fw", "bw"), ("bw",)] * 3:
        trainer.train_step(directions)
    assert trainer.state.step == 9
    assert trainer.state.tokens == 9 * 4 * 16  # 4 windows of 16 tokens at every step, step 0 included
    assert trainer.microbatching.estimate == 1.0
    assert trainer.model.config.vocab_size == 64 and trainer.model.config.depth == 1
    assert not (tmp_path / "run").exists()


def test_result_shape(result: dict) -> None:
    assert result["device"] == "cpu"
    assert isinstance(result["torch"], str)
    assert isinstance(result["threads"], int) and result["threads"] >= 1
    assert isinstance(result["allocator_tuned"], bool)
    assert set(result["peak_gflops"]) == {"fp32", "bf16"}
    assert all(value > 0 for value in result["peak_gflops"].values())
    (row,) = result["configs"]
    assert set(row) == set(ROW_TYPES)
    for key, kind in ROW_TYPES.items():
        assert isinstance(row[key], kind), key
    assert (row["name"], row["batch"], row["dtype"]) == ("tiny", 4, "fp32")


def test_throughputs_consistent(result: dict) -> None:
    row = result["configs"][0]
    tokens = row["batch"] * row["seq_len"]
    assert row["fw_tokens_per_s"] > 0 and row["fwbw_tokens_per_s"] > 0
    assert row["fw_tokens_per_s"] == pytest.approx(tokens / (row["fw_step_ms"] / 1e3))
    assert row["fwbw_tokens_per_s"] == pytest.approx(tokens / (row["fwbw_step_ms"] / 1e3))
    peak = result["peak_gflops"]["fp32"] * 1e9
    assert row["mfu_fw"] == pytest.approx(row["flops_per_token"] * row["fw_tokens_per_s"] / peak)
    assert row["mfu_fwbw"] == pytest.approx(2 * row["flops_per_token"] * row["fwbw_tokens_per_s"] / peak)


def test_format_table(result: dict) -> None:
    lines = format_table(result).splitlines()
    assert "malloc" in lines[0] and "fp32" in lines[1] and "bf16" in lines[1]
    assert lines[2].split()[:2] == ["shape", "width"]
    assert lines[3].split()[:7] == ["tiny", "32", "1", "64", "16", "4", "fp32"]


def test_select_shapes() -> None:
    assert [s.name for s in select_shapes(None)] == ["small", "hlb-default"]
    assert [s.name for s in select_shapes(["hlb-default", "small"])] == ["hlb-default", "small"]
    with pytest.raises(ValueError, match="^unknown bench shape\\(s\\) nope; known: small, hlb-default$"):
        select_shapes(["small", "nope"])


def test_rejects_bad_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        run_bench([TINY], steps=0, progress=False)


def test_step_time_ratio_is_the_median_of_interleaved_pairs(monkeypatch) -> None:
    """fwbw_over_fw_step_time pairs each fw step with the fw+bw step timed right after it, so a
    slow moment of the machine hits both; here the ratio of the medians (3.0 / 1.5 = 2) differs."""
    times = {"fw": [1.0, 1.5, 4.0], "fwbw": [3.0, 2.0, 10.0]}  # pair ratios 3, 4/3, 2.5
    monkeypatch.setattr(bench, "time_train_steps", lambda trainer, steps, warmup: times)
    row = bench.bench_shape(TINY, torch.device("cpu"), "fp32", 1.0, steps=3, warmup=0, progress=False)
    assert row["fwbw_over_fw_step_time"] == 2.5
    assert (row["fw_step_ms"], row["fwbw_step_ms"]) == (1500.0, 3000.0)
