"""Leak probes on the model path and the training path (docs/method.md#the-bw-mask-defect): silent
on the real tasks, firing on every deliberately broken variant, recorded in summary.json."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

import fwbw.model.hlb_gpt
import fwbw.model.tasks
from fwbw import ModelConfig, build_model
from fwbw.model.masks import mask_and_distance
from fwbw.training import probes
from fwbw.training.probes import (
    leak_summary,
    model_path_leaks,
    probe_copy,
    training_path_leaks,
)
from fwbw.training.trainer import train

SILENT = {"fw": False, "bw": False}
ALL_FIRE = {"fw": True, "bw": True}
BW_FIRES = {"fw": False, "bw": True}


def probe_model(depth=2, max_seq_len=16, task_tokens=False, num_heads=1, bw_mask="causal", seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=40, depth=depth, width=32, max_seq_len=max_seq_len, bw_mask=bw_mask,
        task_tokens=task_tokens, num_heads=num_heads,
    )
    return probe_copy(build_model(config))


def both_probes(model) -> tuple[dict[str, bool], dict[str, bool]]:
    return model_path_leaks(model), training_path_leaks(model)


@pytest.mark.parametrize("num_heads", (1, 2))
@pytest.mark.parametrize("depth", (1, 3))
@pytest.mark.parametrize("task_tokens", (False, True), ids=("plain", "task_tokens"))
def test_both_probes_stay_silent_on_the_real_tasks(task_tokens, depth, num_heads):
    model = probe_model(depth=depth, task_tokens=task_tokens, num_heads=num_heads)
    assert both_probes(model) == (SILENT, SILENT)


def test_the_training_probe_sees_exactly_the_causal_reads():
    """Not vacuous: with the stacked [fw; reversed bw] pass, the fw loss at t reads fw slots 0..t
    and the bw loss at t (reversed order) reads reversed slots 0..t, nothing of the other task."""
    model = probe_model(depth=2)
    with torch.no_grad():
        for block in model.blocks:
            block.position_bias_mult.fill_(-3.0)  # every allowed key clearly visible
    window = probes._perturbed_windows(model, 16, trials=1, seed=0)[0, :1]
    reads = probes._training_reads(model, window)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    none = torch.zeros(16, 16, dtype=torch.bool)
    assert torch.equal(reads["fw"], torch.cat([causal, none], dim=1))
    assert torch.equal(reads["bw"], torch.cat([none, causal], dim=1))


# --- (a) an off-by-one target shift -------------------------------------------------------


@pytest.mark.parametrize("task_tokens", (False, True), ids=("plain", "task_tokens"))
def test_both_probes_fire_when_targets_are_shifted_onto_the_inputs(task_tokens, monkeypatch):
    real = fwbw.model.tasks.task_batch

    def targets_are_inputs(windows, direction, config):
        inputs, _ = real(windows, direction, config)
        return inputs, inputs  # fw: one step too early; bw: one step the other way

    monkeypatch.setattr(fwbw.model.tasks, "task_batch", targets_are_inputs)
    assert both_probes(probe_model(task_tokens=task_tokens)) == (ALL_FIRE, ALL_FIRE)


# --- (b) a mask that admits one future key --------------------------------------------------


def admitting_one_future_key(broken_directions):
    real = mask_and_distance

    def patched(seq_len, direction, bw_mask="causal", max_seq_len=None, device=None):
        allowed, dist = real(seq_len, direction, bw_mask, max_seq_len, device)
        if direction in broken_directions:
            offsets = torch.arange(seq_len)[None, :] - torch.arange(seq_len)[:, None]
            allowed = offsets <= 1 if direction == "fw" else offsets >= -1
        return allowed, dist

    return patched


def test_both_probes_fire_when_the_masks_admit_one_future_key(monkeypatch):
    monkeypatch.setattr(fwbw.model.hlb_gpt, "mask_and_distance", admitting_one_future_key(("fw", "bw")))
    assert both_probes(probe_model()) == (ALL_FIRE, ALL_FIRE)


def test_causal_bw_training_runs_through_the_fw_mask(monkeypatch):
    """A broken fw mask breaks both trained tasks; a broken bw mask only `model(x, "bw")`, since
    training runs causal bw as fw over the reversed inputs."""
    monkeypatch.setattr(fwbw.model.hlb_gpt, "mask_and_distance", admitting_one_future_key(("fw",)))
    assert both_probes(probe_model()) == ({"fw": True, "bw": False}, ALL_FIRE)
    monkeypatch.setattr(fwbw.model.hlb_gpt, "mask_and_distance", admitting_one_future_key(("bw",)))
    assert both_probes(probe_model()) == (BW_FIRES, SILENT)


# --- (c) the study's legacy mask -----------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "max_seq_len"),
    [(2, 16), (3, 64), (1, 32), (1, 16)],
    ids=("depth2-T=M", "depth3-T=M/4", "depth1-T=M/2", "depth1-T=M"),
)
@pytest.mark.parametrize("task_tokens", (False, True), ids=("plain", "task_tokens"))
def test_both_probes_fire_on_the_legacy_mask(depth, max_seq_len, task_tokens):
    model = probe_model(depth=depth, max_seq_len=max_seq_len, task_tokens=task_tokens, bw_mask="legacy-flip")
    assert both_probes(model) == (BW_FIRES, BW_FIRES)


# --- summary.json ----------------------------------------------------------------------------


def test_leak_summary_names_both_paths():
    model = build_model(ModelConfig(vocab_size=40, depth=2, width=32, max_seq_len=32, bw_mask="legacy-flip"))
    assert leak_summary(model) == {
        "probe_leak_fw": False, "probe_leak_bw": True, "probe_train_leak_fw": False, "probe_train_leak_bw": True,
    }
    assert model.training and model.embedding.weight.dtype == torch.float32  # the copy was probed


@pytest.mark.parametrize(("bw_mask", "leaks"), [("causal", False), ("legacy-flip", True)])
def test_summary_records_both_probes(bw_mask, leaks, tmp_path, tiny_data):
    summary = train(tiny_config(bw_mask=bw_mask, train_tokens=2048), tmp_path / "run", data=tiny_data, progress=False)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    probed = {key: saved[key] for key in ("probe_leak_fw", "probe_leak_bw", "probe_train_leak_fw", "probe_train_leak_bw")}
    assert probed == {"probe_leak_fw": False, "probe_leak_bw": leaks, "probe_train_leak_fw": False, "probe_train_leak_bw": leaks}
    assert saved == summary and saved["leaks_labels"] is leaks
