"""The peak-memory estimate (docs/method.md#memory-estimate): its formula on a hand-computed
config, what it scales with, autograd's saved tensors and a step's measured peak against it, and
`fwbw sweep --dry-run`'s memory column and out-of-memory warning."""

import dataclasses
import os
import types

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from fwbw import cli
from fwbw.data.tokenizer import vocab_size_of
from fwbw.model.hlb_gpt import build_model
from fwbw.model.masks import DIRECTIONS
from fwbw.model.tasks import task_stats, window_length
from fwbw.study import sweep
from fwbw.study.configure import build_sweep_spec
from fwbw.study.estimate import ShapeTiming
from fwbw.study.sweep import describe_runs, run_id
from fwbw.training import memory
from fwbw.training.bench import BenchShape, bench_trainer
from fwbw.training.config import RecipeConfig, TrainConfig
from fwbw.training.memory import (
    GIB,
    DeviceMemory,
    device_memory,
    estimate_memory,
    microbatch_tokens,
    short_bytes,
)
from fwbw.training.precision import autocast, resolve_dtype

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

# depth 2, width 64 (query/key 8, expansion 128, 1 head), length 32, 256 tokens a microbatch (8
# windows), a vocabulary of 100 ids padded to 128, bf16 ('auto'), fw only
HAND = TrainConfig(depth=2, width=64, seq_len=32, recipe=RecipeConfig(tokens_per_microbatch=256))
HAND_VOCAB = 100
FAKE_TIMING = ShapeTiming(fw_step_s=0.1, fwbw_step_s=0.2, eval_s=1.0, measured=True)


def untimed(config) -> ShapeTiming:
    return FAKE_TIMING


def test_the_formula_on_a_hand_computed_config():
    params = 2 * 128 * 64 + 2 * ((2 * 8 + 2 * 128) * 64 + 64 * 128 + 64 + 1) + 64  # 67,778 (count_params)
    # per token and block: fp32 residual and LayerNorm statistics 4*64 + 8 = 264; bf16 normalised
    # input, fused output, GELU output and projection input 2 * (64 + 2*8 + 4*128) = 1,184; fp32
    # query, key, value and scores 4 * (2*8 + 64 + 1*32) = 448: 1,896
    # outside the blocks: token id 8, frequency scale 4, final LayerNorm 4*64 + 8, its output 4*64
    # and the loss's gradient of it 4*64: 788
    activations = 256 * (2 * 1896 + 788)  # 1,172,480
    # output-weight gradient 4*128*64 = 32,768; bf16 copies of the block weights
    # 2 * (272*64 + 64*128) * 2 = 102,400; distance table and mask 5 * 32**2 = 5,120; the loss's
    # chunk of 256 rows at 4 + 4 + 2 + 2 + 4 bytes a logit: 256*128*16 = 524,288, and the bf16
    # output weight 128*64*2 = 16,384
    workspace = 32_768 + 102_400 + 5_120 + 524_288 + 16_384  # 680,960
    estimate = estimate_memory(HAND, HAND_VOCAB)
    assert (params, activations, workspace) == (67_778, 1_172_480, 680_960)
    assert estimate == memory.MemoryEstimate(
        weights=4 * params, grads=4 * params, optimizer=8 * params, activations=activations, workspace=workspace
    )
    assert estimate.total == 16 * params + activations + workspace == 2_937_888


def with_changes(config: TrainConfig, tokens: int | None = None, **changes) -> TrainConfig:
    recipe = config.recipe if tokens is None else dataclasses.replace(config.recipe, tokens_per_microbatch=tokens)
    return dataclasses.replace(config, recipe=recipe, **changes)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_twice_the_tokens_twice_the_activations(dtype):
    base = with_changes(HAND, dtype=dtype)
    single, double = (estimate_memory(with_changes(base, tokens), HAND_VOCAB) for tokens in (256, 512))
    assert double.activations == 2 * single.activations
    assert (double.weights, double.grads, double.optimizer) == (single.weights, single.grads, single.optimizer)


def test_each_data_parallel_rank_is_planned_for_a_whole_microbatch():
    """Ranks train whole microbatches while a step has one for each (fwbw.training.data_parallel), so
    every rank may hold one whole microbatch's activations: the estimate is the one-process one."""
    spec = data_constrained(device="cpu")
    lines = describe_runs(spec, untimed, device_memory_gib=1.0, nproc_per_run=2).splitlines()
    peak = estimate_memory(spec.configs()[0], vocab_size_of(spec.base.tokenizer)).total
    assert f"  mem {short_bytes(peak):>9}  " in lines[0]
    assert lines[3] == ("mem: of each of the 2 processes of a run (--nproc-per-run, times --nodes-per-run): a whole microbatch, as each "
                        "trains whole ones while a step has one for every process")


def test_fw_and_bw_in_one_pass_double_the_activations():
    fw_only = estimate_memory(HAND, HAND_VOCAB)
    stacked = estimate_memory(with_changes(HAND, p_bw=0.05), HAND_VOCAB)
    assert stacked.activations == 2 * fw_only.activations
    assert stacked.workspace == fw_only.workspace + 4 * 128 * 64  # a second output-weight gradient
    # legacy-flip bw runs its own pass with its own mask; "either" trains one task a step
    flipped = estimate_memory(with_changes(HAND, p_bw=0.05, bw_mask="legacy-flip"), HAND_VOCAB)
    assert (flipped.activations, flipped.workspace) == (stacked.activations, stacked.workspace + 5 * 32**2)
    assert estimate_memory(with_changes(HAND, p_bw=1.0, bw_mode="either"), HAND_VOCAB) == fw_only


def saved_bytes(config: TrainConfig, vocab: int, directions: tuple[str, ...]) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one microbatch's task loss,
    parameters left out."""
    model = build_model(config.model_config(vocab))
    windows = torch.randint(0, vocab, (microbatch_tokens(config) // config.seq_len, window_length(config.seq_len, config.task_tokens)))
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast(torch.device("cpu"), resolve_dtype(config.dtype)):
            task_stats(model, windows, directions, accuracy=False)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


@pytest.mark.parametrize("changes", [{}, {"dtype": "fp32"}, {"num_heads": 2}, {"num_heads": 2, "dtype": "fp32"},
                                     {"p_bw": 0.5}, {"task_tokens": True, "p_bw": 0.5}])
def test_the_activations_are_what_autograd_saves(changes):
    """Exactly: the estimate's activations, less the final hidden state (held while the loss runs,
    not saved), plus its saved workspace (workspace less the loss's transient chunk)."""
    config = with_changes(HAND, **changes)
    directions = DIRECTIONS if config.p_bw else ("fw",)
    model = config.model_config(HAND_VOCAB)
    itemsize = 2 if resolve_dtype(config.dtype) == "bf16" else 4
    estimate = estimate_memory(config, HAND_VOCAB)
    tokens = len(directions) * microbatch_tokens(config)
    hidden = tokens * 4 * model.width
    chunk = memory.loss_chunk_bytes(model, microbatch_tokens(config), itemsize)
    assert saved_bytes(config, HAND_VOCAB, directions) == estimate.activations - hidden + estimate.workspace - chunk


def live_tensor_peak(trainer, directions: tuple[str, ...]) -> int:
    """The most bytes of CPU tensors alive during one training step (after two, so that AdamW's
    state exists): the weights and optimizer state, plus the peak of the step's allocations."""
    for _ in range(2):
        trainer.train_step(directions)
    standing = sum(p.nbytes for p in trainer.model.parameters())
    standing += sum(t.nbytes for state in trainer.optimizer.state.values() for t in state.values() if t.dim() > 0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step(directions)

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    allocations = sorted((event.start_time_ns, event.extra_fields.alloc_size)
                         for event in walk(prof.profiler.kineto_results.experimental_event_tree())
                         if event.tag == _EventType.Allocation)
    live = peak = 0
    for _, size in allocations:
        live += size
        peak = max(peak, live)
    return standing + peak


@pytest.mark.parametrize("dtype, directions", [("bf16", ("fw",)), ("fp32", DIRECTIONS)])
def test_the_estimate_bounds_a_steps_measured_peak_closely(tmp_path, dtype, directions):
    """Conservative and within 10% (here 1.5-2.5% over: the peak, in the loss, holds no gradients
    yet; on larger shapes, 1-8%, docs/method.md#memory-estimate)."""
    shape = BenchShape("calibration", width=64, depth=2, vocab=1024, seq_len=64, tokens_per_step=2048)
    trainer = bench_trainer(shape, batch=32, device="cpu", dtype=dtype, run_dir=tmp_path / "run")
    config = dataclasses.replace(trainer.config, p_bw=0.5 if len(directions) == 2 else 0.0)
    estimate = estimate_memory(config, shape.vocab).total
    assert 1.0 <= estimate / live_tensor_peak(trainer, directions) <= 1.1


# --- the dry run ------------------------------------------------------------------------------


def data_constrained(**overrides):
    return build_sweep_spec("data-constrained", None, {"seeds": 1, **overrides})


def test_each_run_shows_its_estimated_peak():
    spec = data_constrained(device="cpu")
    lines = describe_runs(spec, untimed, device_memory_gib=1.0).splitlines()
    for line, config in zip(lines, spec.configs()):
        peak = estimate_memory(config, vocab_size_of(config.tokenizer)).total
        assert f"  mem {short_bytes(peak):>9}  " in line
    assert [line.split("mem")[1].split()[:2] for line in lines[:3]] == [["188", "MiB"], ["211", "MiB"], ["211", "MiB"]]
    assert len(lines) == 3 + 2  # no warning under 1 GiB


def test_runs_above_the_given_memory_are_warned_of():
    """0.2 GiB (205 MiB): the p_bw 0 run's 188 MiB fits, the fw+bw runs' 211 MiB do not."""
    spec = data_constrained(device="cpu")
    configs = spec.configs()
    lines = describe_runs(spec, untimed, device_memory_gib=0.2).splitlines()
    assert lines[3] == (f"warning: 2 runs may run out of memory: estimated peak above --device-memory 205 MiB "
                        f"(largest 211 MiB: {max(run_id(c) for c in configs[1:])})")
    assert lines[4].startswith("3 runs, ") and len(lines) == 6


def test_without_a_given_size_the_runs_device_is_checked(monkeypatch):
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 50_000}  # a 195 MiB machine
    monkeypatch.setattr(memory.os, "sysconf", pages.__getitem__)
    assert device_memory("cpu") == DeviceMemory(204_800_000, "this machine's 195 MiB of RAM")
    lines = describe_runs(data_constrained(device="cpu"), untimed).splitlines()
    assert lines[3].startswith("warning: 2 runs may run out of memory: estimated peak above this machine's 195 MiB of RAM")


def test_a_gpu_is_sized_by_its_own_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert device_memory("cuda") == DeviceMemory(80 * GIB, "the 80.0 GiB of the NVIDIA H100 80GB HBM3")


def test_no_warning_without_the_runs_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_memory("cuda") is None
    lines = describe_runs(data_constrained(device="cuda"), untimed).splitlines()
    assert not any(line.startswith("warning") for line in lines) and len(lines) == 5


def test_the_real_machines_ram():
    assert device_memory("cpu").bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_the_device_memory_flag(monkeypatch, capsys):
    monkeypatch.setattr(sweep, "MachineTimer", lambda: untimed)
    argv = ["sweep", "--preset", "data-constrained", "--seeds", "1", "--device", "cpu", "--dry-run"]
    assert cli.main([*argv, "--device-memory", "0.2"]) == 0
    assert capsys.readouterr().out.splitlines()[3].startswith("warning: 2 runs may run out of memory")
    assert cli.main([*argv, "--device-memory", "4"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert cli.main([*argv, "--device-memory", "0"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "fwbw sweep: error: device_memory: must be > 0 GiB, got 0\n")
