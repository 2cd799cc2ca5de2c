import json

import pytest

from fwbw.training import bench
from fwbw.training.bench import BenchConfig, format_table, run_bench, select_configs

TINY = BenchConfig("tiny", width=32, depth=1, vocab=64, seq_len=16, tokens_per_step=64)
ROW_TYPES = {
    "name": str,
    "width": int,
    "depth": int,
    "vocab": int,
    "seq_len": int,
    "batch": int,
    "dtype": str,
    "fw_tokens_per_s": float,
    "fwbw_tokens_per_s": float,
    "fwbw_over_fw_step_time": float,
    "mfu_fw": float,
    "fw_step_ms": float,
    "fwbw_step_ms": float,
    "flops_per_token": float,
}


@pytest.fixture(scope="module")
def result() -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(bench.MATMUL_SIZE, "cpu", 256)
        return json.loads(json.dumps(run_bench([TINY], device="cpu", dtype="fp32", steps=2, warmup=1, progress=False)))


def test_result_shape(result: dict) -> None:
    assert result["device"] == "cpu"
    assert isinstance(result["torch"], str)
    assert isinstance(result["threads"], int) and result["threads"] >= 1
    assert set(result["peak_gflops"]) == {"fp32", "bf16"}
    assert all(value > 0 for value in result["peak_gflops"].values())
    (row,) = result["configs"]
    for key, kind in ROW_TYPES.items():
        assert isinstance(row[key], kind), key
    assert (row["name"], row["batch"], row["dtype"]) == ("tiny", 4, "fp32")


def test_throughputs_consistent(result: dict) -> None:
    row = result["configs"][0]
    tokens = row["batch"] * row["seq_len"]
    assert row["fw_tokens_per_s"] > 0 and row["fwbw_tokens_per_s"] > 0
    assert row["fw_tokens_per_s"] == pytest.approx(tokens / (row["fw_step_ms"] / 1e3))
    assert row["fwbw_tokens_per_s"] == pytest.approx(tokens / (row["fwbw_step_ms"] / 1e3))
    # the median of per-pair ratios (interleaved steps) is close to the ratio of the medians
    assert row["fwbw_over_fw_step_time"] == pytest.approx(row["fwbw_step_ms"] / row["fw_step_ms"], rel=0.5)
    assert 0 < row["mfu_fw"]


def test_format_table(result: dict) -> None:
    table = format_table(result)
    assert "tiny" in table and "fp32" in table and "bf16" in table


def test_select_configs() -> None:
    assert [c.name for c in select_configs(None)] == [c.name for c in bench.STANDARD_CONFIGS]
    assert [c.name for c in select_configs(["hlb-default"])] == ["hlb-default"]
    with pytest.raises(ValueError, match="nope"):
        select_configs(["small", "nope"])


def test_rejects_bad_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        run_bench([TINY], steps=0, progress=False)
