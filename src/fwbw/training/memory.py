"""A training run's peak memory on its device, estimated before it runs
(docs/method.md#memory-estimate), and the memory of the device it would run on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fwbw.model.config import ModelConfig
from fwbw.model.hlb_gpt import block_matrix_params, count_params
from fwbw.model.losses import CHUNK_TOKENS
from fwbw.schema import require
from fwbw.training.config import TrainConfig
from fwbw.training.precision import TORCH_DTYPES, resolve_device, resolve_dtype
from fwbw.training.recipe import batch_size_for

FP32 = 4  # bytes of the fp32 weights, gradients, AdamW moments and residual stream
TOKEN_ID = 8  # bytes of an int64 token id
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step holds at its peak: fp32 weights, their fp32 gradients, AdamW's two
    fp32 moments, the activations held for the run's largest microbatch (proportional to its
    tokens), and a workspace that is not (the loss's output-weight gradients, the block weights'
    low-precision copies, the masks and the loss's chunk of logits)."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.workspace


def stacked_tasks(config: TrainConfig) -> int:
    """How many tasks one forward pass can hold: 2 when p_bw > 0 under bw_mode add (fw and bw on
    the same windows, each with its own graph until the backward pass), else 1."""
    return 2 if config.bw_mode == "add" and config.p_bw > 0 else 1


def block_bytes_per_token(model: ModelConfig, seq_len: int, itemsize: int) -> int:
    """Bytes one block saves for backward per token (docs/method.md#memory-estimate): the fp32
    residual and LayerNorm statistics, the normalised input cast to the compute dtype, the fused
    expansion, the GELU output and the projection's input, and the attention's fp32 query, key,
    value and scores as the CPU math path saves them (a conservative count: CUDA's fused kernels
    keep no scores). The value is an fp32 copy, except under fp32 with one head, where it is a
    view of the whole GEGLU output, which is then saved."""
    d, qk, h = model.width, model.qk_dim, model.num_heads
    expand = d * model.expand_factor
    value = expand if itemsize == FP32 and h == 1 else d
    residual_and_norm = FP32 * d + 2 * FP32
    return residual_and_norm + itemsize * (d + 2 * qk + 4 * expand) + FP32 * (2 * qk + value + h * seq_len)


def token_bytes(model: ModelConfig, seq_len: int, itemsize: int) -> int:
    """Bytes held per token of one task while its loss runs: what every block saves, the token
    id and its fp32 frequency scale (the embedding), the final LayerNorm's input and statistics,
    its fp32 output (the hidden state the loss reads) and the loss's fp32 gradient of it."""
    outside_blocks = TOKEN_ID + FP32 + (FP32 * model.width + 2 * FP32) + 2 * FP32 * model.width
    return model.depth * block_bytes_per_token(model, seq_len, itemsize) + outside_blocks


def forward_passes(config: TrainConfig) -> int:
    """The model passes of one microbatch: its tasks share one, except legacy-flip bw, which needs
    its own mask (fwbw.model.tasks.task_hidden)."""
    return 1 if config.bw_mask == "causal" else stacked_tasks(config)


def saved_fixed_bytes(model: ModelConfig, seq_len: int, itemsize: int, tasks: int, passes: int) -> int:
    """What backward keeps besides the per-token activations: each task's fp32 output-weight
    gradient (losses.py computes it in the forward pass), the block weights' copies in a lower
    compute dtype (autocast), and each pass's fp32 distance table and bool mask [T, T]."""
    copies = model.depth * block_matrix_params(model) * itemsize if itemsize < FP32 else 0
    return tasks * FP32 * model.total_vocab * model.width + copies + passes * (FP32 + 1) * seq_len**2


def loss_chunk_bytes(model: ModelConfig, tokens: int, itemsize: int) -> int:
    """The loss's transient memory at its peak, a log-softmax (losses.py): the previous chunk's
    fp32 log-probabilities and their low-precision copy, still bound, and the current chunk's
    logits, their fp32 cast and its log-softmax; plus the output weight's low-precision copy.
    Under fp32 the copies and the cast are the tensors themselves. (A microbatch of one chunk has
    no previous one: counted all the same, an overcount below CHUNK_TOKENS tokens.)"""
    rows, vocab = min(tokens, CHUNK_TOKENS), model.total_vocab
    low = itemsize < FP32
    per_logit = 2 * FP32 + itemsize + low * (itemsize + FP32)
    return rows * vocab * per_logit + low * vocab * model.width * itemsize


def microbatch_tokens(config: TrainConfig) -> int:
    """Data tokens of the run's largest microbatch, at its full sequence length, where the attention
    scores per token are largest. Data-parallel ranks train whole microbatches while a step has at
    least one per rank (fwbw.training.data_parallel), so this is also each rank's largest part."""
    return batch_size_for(config.seq_len, config.recipe) * config.seq_len


def estimate_memory(config: TrainConfig, vocab_size: int) -> MemoryEstimate:
    """The peak memory of `config`'s training step on a tokenizer of `vocab_size` ids, on one process
    or on each data-parallel rank alike (formula and derivation: docs/method.md#memory-estimate).
    Conservative: everything is counted as alive at once, gradients included, and the attention
    scores as saved."""
    model = config.model_config(vocab_size)
    params = count_params(model)
    itemsize = TORCH_DTYPES[resolve_dtype(config.dtype)].itemsize
    tasks = stacked_tasks(config)
    tokens = microbatch_tokens(config)
    return MemoryEstimate(
        weights=FP32 * params,
        grads=FP32 * params,
        optimizer=2 * FP32 * params,
        activations=tasks * tokens * token_bytes(model, config.seq_len, itemsize),
        workspace=saved_fixed_bytes(model, config.seq_len, itemsize, tasks, forward_passes(config))
        + loss_chunk_bytes(model, tokens, itemsize),
    )


@dataclass(frozen=True)
class DeviceMemory:
    """How much memory a run may use, and a label saying whose it is."""

    bytes: int
    label: str


def device_memory(device: str) -> DeviceMemory | None:
    """The memory of the device a run of `device` would train on here: the GPU's, or this
    machine's RAM on CPU; None where this machine lacks the device."""
    try:
        resolved = resolve_device(device)
    except RuntimeError:
        return None
    if resolved.type == "cuda":
        size = torch.cuda.get_device_properties(resolved).total_memory
        return DeviceMemory(size, f"the {short_bytes(size)} of the {torch.cuda.get_device_name(resolved)}")
    size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceMemory(size, f"this machine's {short_bytes(size)} of RAM")


def given_memory(gib: float) -> DeviceMemory:
    """A device size the user gives (`fwbw sweep --device-memory GIB`)."""
    require(gib > 0, "device_memory", f"must be > 0 GiB, got {gib:g}")
    size = int(gib * GIB)
    return DeviceMemory(size, f"--device-memory {short_bytes(size)}")


def short_bytes(count: float) -> str:
    """A byte count in GiB to one decimal from 1 GiB up, else in whole MiB."""
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / 2**20:.0f} MiB"
