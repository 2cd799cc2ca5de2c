"""`fwbw bench`: the trainer's own step, timed with its tasks forced, and the result's figures."""

import json
import types

import pytest
import torch

from fwbw.model.hlb_gpt import training_flops_per_token
from fwbw.training import bench
from fwbw.training.bench import (
    BenchShape,
    bench_trainer,
    datasheet_peak_gflops,
    format_table,
    mfu,
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
    "world_size": int,
    "compiled": bool,
    "fw_tokens_per_s": float,
    "fwbw_tokens_per_s": float,
    "fwbw_over_fw_step_time": float,
    "mfu_fw": float,
    "mfu_fwbw": float,
    "mfu_fw_datasheet": type(None),  # no datasheet peak on CPU
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
        result = run_bench([TINY], device="cpu", dtype="fp32", steps=STEPS, warmup=WARMUP, progress=False, compile=False)
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
    assert result["world_size"] == 1
    assert isinstance(result["allocator_tuned"], bool)
    assert set(result["peak_gflops"]) == {"fp32", "bf16"}
    assert result["device_name"] is None and result["datasheet_peak_gflops"] is None
    assert all(value > 0 for value in result["peak_gflops"].values())
    (row,) = result["configs"]
    assert set(row) == set(ROW_TYPES)
    for key, kind in ROW_TYPES.items():
        assert isinstance(row[key], kind), key
    assert (row["name"], row["batch"], row["dtype"], row["world_size"], row["compiled"]) == ("tiny", 4, "fp32", 1, False)


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
    assert "malloc" in lines[0] and "fp32" in lines[1] and "bf16" in lines[1] and "datasheet" not in lines[1]
    assert lines[2].split()[:2] == ["shape", "width"] and lines[2].endswith("MFU fw  MFU fw datasheet")
    assert lines[3].split()[:7] == ["tiny", "32", "1", "64", "16", "4", "fp32"]
    assert lines[3].split()[-1] == "-"  # no datasheet peak on CPU


def test_format_table_with_a_datasheet_peak(result: dict) -> None:
    row = {**result["configs"][0], "mfu_fw": 0.25, "mfu_fw_datasheet": 0.125}
    gpu = {**result, "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "datasheet_peak_gflops": 989e3,
           "configs": [row]}
    lines = format_table(gpu).splitlines()
    assert lines[0].startswith("device cuda:0 (NVIDIA H100 80GB HBM3)  processes 1  torch ")
    assert lines[1].endswith("  datasheet bf16 989000")
    assert lines[3].split()[-2:] == ["25.0%", "12.5%"]


def test_select_shapes() -> None:
    assert [s.name for s in select_shapes(None)] == ["small", "hlb-default"]
    assert [s.name for s in select_shapes(["hlb-default", "small"])] == ["hlb-default", "small"]
    with pytest.raises(ValueError, match="^unknown bench shape\\(s\\) nope; known: small, hlb-default$"):
        select_shapes(["small", "nope"])


def test_compiling_needs_a_warmup_step_not_to_time_the_compilation() -> None:
    with pytest.raises(ValueError, match=r"^bench --warmup 0 with --compile would time the compilation"):
        run_bench([TINY], warmup=0, progress=False, compile=True)


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


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA H100 80GB HBM3", 989),
    ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
    ("NVIDIA GeForce RTX 4090", None), ("Tesla V100-SXM2-16GB", None), (None, None),
])
def test_datasheet_peaks_by_device_name(name, tflops) -> None:
    assert datasheet_peak_gflops(name) == (None if tflops is None else tflops * 1e3)


def test_mfu_divides_by_the_peak_of_every_rank() -> None:
    """1e6 FLOPs a token at 1e5 tokens/s is 1e11 FLOP/s: a quarter of one 400 GFLOP/s device,
    an eighth of two."""
    assert mfu(1e6, 1e5, 400.0) == mfu(1e6, 1e5, 400.0, world_size=1) == 0.25
    assert mfu(1e6, 1e5, 400.0, world_size=2) == 0.125


def test_a_rows_mfu_counts_the_global_batch_over_all_ranks(monkeypatch) -> None:
    """A 2-rank trainer given the global batch of 4 windows of 16 tokens: 64 tokens per step of
    1.5 s (the fw median) against 2 devices of 10 GFLOP/s each, measured or on the datasheet."""
    real_trainer, trainers = bench.bench_trainer, []

    def two_rank_trainer(*args):
        trainer = real_trainer(*args)
        trainer.parallel = types.SimpleNamespace(world_size=2)
        trainers.append(trainer)
        return trainer

    monkeypatch.setattr(bench, "bench_trainer", two_rank_trainer)
    monkeypatch.setattr(bench, "time_train_steps", lambda trainer, steps, warmup: {"fw": [1.5], "fwbw": [3.0]})
    row = bench.bench_shape(TINY, torch.device("cpu"), "fp32", 10.0, steps=1, warmup=0, progress=False,
                            datasheet_gflops=20.0)
    flops_per_token = training_flops_per_token(trainers[0].model.config, 16)
    assert (row["world_size"], row["fw_tokens_per_s"], row["fwbw_tokens_per_s"]) == (2, 64 / 1.5, 64 / 3.0)
    assert row["mfu_fw"] == pytest.approx(flops_per_token * 64 / 1.5 / (2 * 10e9), rel=1e-12)
    assert row["mfu_fwbw"] == pytest.approx(2 * flops_per_token * 64 / 3.0 / (2 * 10e9), rel=1e-12)
    assert row["mfu_fw_datasheet"] == pytest.approx(row["mfu_fw"] / 2, rel=1e-12)
