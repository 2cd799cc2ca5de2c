"""An exponential moving average (EMA) of a model's weights, evaluated instead of the raw weights
to take the step-to-step noise out of validation (docs/method.md#evaluation-noise-and-early-stopping).

After optimizer step t (counted from 1) the average moves toward the weights by
    average = d_t * average + (1 - d_t) * weights,   d_t = min(decay, (1 + t) / (10 + t)),
the warm-up of d_t (TensorFlow's ExponentialMovingAverage with num_updates) keeping the first
steps' random initialisation from dominating a short run's average."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
@torch.no_grad()
def swapped_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """`weights` (state-dict names to values) in the model for the block, its own back after it."""
    current = model.state_dict()
    saved = {name: current[name].clone() for name in weights}
    for name, value in weights.items():
        current[name].copy_(value)
    try:
        yield
    finally:
        for name, value in saved.items():
            current[name].copy_(value)


def ema_decay(decay: float, updates: int) -> float:
    """d_t after `updates` optimizer steps."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """The EMA of `model`'s floating-point parameters, kept in fp32 on the model's device."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.average = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - ema_decay(self.decay, self.updates)
        names = list(self.average)
        params = dict(model.named_parameters())
        torch._foreach_lerp_([self.average[n] for n in names], [params[n].detach().float() for n in names], weight)

    def swapped_in(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The average in the model's parameters for the block, the trained weights back after it."""
        return swapped_weights(model, self.average)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "average": dict(self.average)}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for name, value in state["average"].items():
            self.average[name].copy_(value)
