"""Label-leak probes on both paths a task runs through (docs/method.md#the-bw-mask-defect).

- model path: `model.hidden(inputs, direction)` on each task's inputs, as `model(x, direction)`
  runs it (the output layer maps each position on its own, so it cannot add a leak);
- training path: `task_hidden`, the batched code that training and validation run, with the
  gradient of each position's training loss w.r.t. the input embeddings.

Both want `probe_copy(model)`; `leak_summary` makes one and runs both.

Neither trusts the task code for what is forbidden. Replacing window token j by another id and
watching which ids change gives each target's source index k_t and each input slot's source
index. Position t leaks if it depends on a slot whose source is k_t or lies beyond it in the
task's direction (fw: source >= k_t; bw: source <= k_t); a task token has no source and is
never forbidden. In float64 a forbidden dependence is exactly zero (up to rounding) and an
allowed one is many orders of magnitude above TOLERANCE.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from fwbw.model import tasks
from fwbw.model.masks import DIRECTIONS

PROBE_SEQ_LEN = 16
TOLERANCE = 1e-9  # relative: a dependence smaller than this times the largest one counts as none
PROBE_PREFIXES = ("probe_leak", "probe_train_leak")  # summary.json's key prefix per path: model, training


def probe_keys(direction: str) -> tuple[str, ...]:
    """summary.json's keys of the probes of `direction`'s task, one per path (PROBE_PREFIXES)."""
    return tuple(f"{path}_{direction}" for path in PROBE_PREFIXES)


PROBE_KEYS = tuple(key for direction in DIRECTIONS for key in probe_keys(direction))  # summary.json's probe flags


def probe_copy(model):
    """A float64 copy of `model` on its device, in eval mode, without parameter gradients."""
    return copy.deepcopy(model).to(torch.float64).eval().requires_grad_(False)


def leak_summary(model) -> dict[str, bool]:
    """summary.json's probe flags (PROBE_KEYS): whether each task leaks on the model path and on
    the training path."""
    probe = probe_copy(model)
    by_path = (model_path_leaks(probe), training_path_leaks(probe))  # in the order of PROBE_PREFIXES
    return {key: leaks[direction] for direction in DIRECTIONS for key, leaks in zip(probe_keys(direction), by_path)}


def model_path_leaks(probe, seq_len: int = PROBE_SEQ_LEN, trials: int = 2, seed: int = 0) -> dict[str, bool]:
    """{direction: whether some position of `probe.hidden(inputs, direction)` on the task's
    inputs reads its target or beyond}."""
    config = probe.config
    copies = _perturbed_windows(probe, seq_len, trials, seed)  # [trials, L + 1, L]
    window_indices = torch.arange(copies.shape[-1], device=copies.device)
    leaks = {}
    for direction in DIRECTIONS:
        inputs, targets = tasks.task_batch(copies.flatten(0, 1), direction, config)
        with torch.no_grad():
            hidden = probe.hidden(inputs, direction).unflatten(0, copies.shape[:2])
        leaked = False
        for trial_hidden, trial_targets in zip(hidden, targets.unflatten(0, copies.shape[:2])):
            change = (trial_hidden[1:] - trial_hidden[:1]).abs().amax(dim=-1)  # [j, t]
            reads = _clearly_nonzero(change.T, trial_hidden[0].abs().max())  # [t, j]
            forbidden = _forbidden(_sources(trial_targets), window_indices, direction)
            leaked |= bool((reads & forbidden).any())
        leaks[direction] = leaked
    return leaks


def training_path_leaks(probe, seq_len: int = PROBE_SEQ_LEN, trials: int = 1, seed: int = 0) -> dict[str, bool]:
    """{direction: whether some position's training loss has a gradient w.r.t. the embedding of
    an input slot holding its target or a token beyond it}."""
    copies = _perturbed_windows(probe, seq_len, trials, seed)
    leaks = dict.fromkeys(DIRECTIONS, False)
    for trial in copies:
        slot_source, target_source = _training_provenance(probe, trial)
        for direction, reads in _training_reads(probe, trial[:1]).items():
            forbidden = _forbidden(target_source[direction], slot_source, direction)
            leaks[direction] |= bool((reads & forbidden).any())
    return leaks


def _perturbed_windows(probe, seq_len: int, trials: int, seed: int) -> torch.Tensor:
    """[trials, L + 1, L] on the probe's device: per trial a random window, then one copy per
    position j with token j replaced by a different id."""
    config = probe.config
    length = tasks.window_length(min(seq_len, config.max_seq_len), config.task_tokens)
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, config.vocab_size, (trials, 1, length), generator=generator)
    copies = windows.repeat(1, length + 1, 1)
    shift = torch.randint(1, config.vocab_size, (trials, length), generator=generator)
    positions = torch.arange(length)
    copies[:, positions + 1, positions] = (windows[:, 0] + shift) % config.vocab_size
    return copies.to(probe.output.weight.device)


def _sources(ids: torch.Tensor) -> torch.Tensor:
    """ids [L + 1, ...] built from a window (row 0) and its L perturbed copies -> for each entry
    of ids[0], the window index it came from, or -1 where no perturbation changes it."""
    changed = ids[1:] != ids[:1]
    return torch.where(changed.any(dim=0), changed.int().argmax(dim=0), -1)


def _forbidden(target_source: torch.Tensor, slot_source: torch.Tensor, direction: str) -> torch.Tensor:
    """[position, slot]: the slot's source is the position's target or beyond it."""
    target, source = target_source[:, None], slot_source[None, :]
    beyond = source >= target if direction == "fw" else source <= target
    return beyond & (target >= 0) & (source >= 0)


def _clearly_nonzero(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values > TOLERANCE * scale


@contextlib.contextmanager
def _embedding_calls(model):
    """Collects (ids, embeddings) of every call of the model's embedding inside the block; the
    embeddings are made leaves that require grad."""
    calls = []

    def record(_module, args, output):
        calls.append((args[0], output.detach().requires_grad_()))
        return calls[-1][1]

    handle = model.embedding.register_forward_hook(record)
    try:
        yield calls
    finally:
        handle.remove()


def _training_provenance(probe, copies: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(source of every embedded slot, flattened over the embedding calls; {direction: source of
    every target}) of `task_hidden`, one window at a time so every copy has the same layout."""
    one_block = probe.truncated(1)  # the blocks do not decide which ids go where
    ids, targets = [], []
    with torch.no_grad():
        for window in copies.split(1):
            with _embedding_calls(one_block) as calls:
                results = tasks.task_hidden(one_block, window, DIRECTIONS)
            ids.append(torch.cat([call_ids.flatten() for call_ids, _ in calls]))
            targets.append({direction: y.flatten() for direction, (_, y) in results.items()})
    target_source = {d: _sources(torch.stack([row[d] for row in targets])) for d in DIRECTIONS}
    return _sources(torch.stack(ids)), target_source


def _training_reads(probe, window: torch.Tensor) -> dict[str, torch.Tensor]:
    """{direction: reads[t, slot]}: whether the training loss at position t of `window` has a
    gradient w.r.t. the embedding of that slot (slots flattened over the embedding calls)."""
    with _embedding_calls(probe) as calls:
        results = tasks.task_hidden(probe, window, DIRECTIONS)
    embedded = [output for _, output in calls]
    reads = {}
    for direction, (hidden, targets) in results.items():
        detached = hidden.detach().requires_grad_()
        losses = F.cross_entropy(probe.output(detached).flatten(0, 1), targets.flatten(), reduction="none")
        # row t of the summed loss's gradient is d loss_t / d hidden_t: positions share no output
        (loss_grad,) = torch.autograd.grad(losses.sum(), detached)
        rows = []
        for t in range(hidden.shape[1]):
            grads = torch.autograd.grad(
                hidden[0, t], embedded, loss_grad[0, t], retain_graph=True, allow_unused=True, materialize_grads=True
            )
            size = torch.cat([grad.norm(dim=-1).flatten() for grad in grads])
            rows.append(_clearly_nonzero(size, size.max()))
        reads[direction] = torch.stack(rows)
    return reads
