"""Checkpoints load the parts a resumed run trains with onto its device, one tensor at a time, and
keep generator states and kept weights on the CPU (fwbw.training.checkpoint.load)."""

from __future__ import annotations

import torch

from fwbw.training import checkpoint


def test_model_optimizer_and_average_go_to_the_device_generator_states_stay_on_the_cpu(tmp_path, monkeypatch):
    payload = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {"0": {"exp_avg": torch.zeros(2)}}, "param_groups": []},
               "average": {"w": torch.full((2,), 3.0)}, "task_rng": torch.get_rng_state(),
               "best_weights": {"w": torch.ones(2)}, "train_state": {"step": 1}}
    monkeypatch.setattr(checkpoint, "check_fence", lambda run_dir: None)
    path = checkpoint.save(tmp_path, 1, payload, "cfg")
    placed = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, *a, **k: placed.append(device) or self)
    loaded = checkpoint.load(path, device="meta-device")
    assert len(placed) == 3  # model.w, optimizer's exp_avg, average.w
    assert torch.equal(loaded["task_rng"], torch.get_rng_state()) and torch.equal(loaded["best_weights"]["w"], torch.ones(2))
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.zeros(2))
