"""The hlb-gpt v0.4.1 language model (docs/method.md#the-model), able to run either causal
direction.

No absolute positions: the only position signal is a learned linear distance bias per block, so
bw-causal attention over x equals fw-causal attention over reversed x, reversed back.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from fwbw.model.config import ModelConfig
from fwbw.model.masks import mask_and_distance


def residual_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """nanoGPT's residual dropout: `x` dropped with probability p in training mode. At p = 0 or in
    eval mode dropout is not called at all, so it draws no random numbers."""
    return F.dropout(x, p) if training and p > 0 else x


class LatentAttentionBlock(nn.Module):
    """Pre-norm residual block: one fused projection feeds a GEGLU whose output is split into a
    local (MLP-like) half and the value of the attention; both are projected back. With
    num_heads h, the query, key and value are split into h heads that share one distance bias
    (h = 1 is hlb-gpt's single head)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.width
        self.num_heads = config.num_heads
        self.qk_dim = config.qk_dim
        self.expand_dim = width * config.expand_factor
        self.value_dim = width
        self.dropout = config.dropout
        self.norm = nn.LayerNorm(width, bias=False)
        fused_out = 2 * self.qk_dim + 2 * self.expand_dim
        self.expand = nn.Parameter(
            torch.randn(fused_out, width) * (0.5 / math.sqrt(width) / config.expand_factor)
        )
        self.project = nn.Parameter(
            torch.randn(width, self.expand_dim)
            * (1.0 / math.sqrt(width) / config.expand_factor / config.depth)
        )
        self.position_bias_mult = nn.Parameter(torch.tensor(1.0))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, h * c] -> [B, h, T, c]."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        bias = torch.where(allowed, F.softplus(self.position_bias_mult) * dist, float("-inf"))
        query, key, linear, pre_gelu = F.linear(self.norm(x), self.expand).split(
            (self.qk_dim, self.qk_dim, self.expand_dim, self.expand_dim), dim=-1
        )
        geglu = linear * F.gelu(pre_gelu)
        local, value = geglu.split((self.expand_dim - self.value_dim, self.value_dim), dim=-1)
        attention = F.scaled_dot_product_attention(
            self._heads(query), self._heads(key), self._heads(value), attn_mask=bias.to(query.dtype)
        )
        attention = attention.transpose(-3, -2).flatten(-2)  # [B, h, T, c] -> [B, T, h * c]
        branch = F.linear(torch.cat([local, attention], dim=-1), self.project)
        return x + residual_dropout(branch, self.dropout, self.training)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def frequency_scaled(embedded: torch.Tensor, tokens: torch.Tensor, counted: torch.Tensor, vocab: int) -> torch.Tensor:
    """hlb-gpt's scale_grad_by_freq: the gradient reaching each embedding row divided by how often
    its token occurs in `counted`, the batch `tokens` belongs to (a data-parallel rank looks up its
    share of a global batch but counts the whole batch, so the ranks' gradients sum to one
    process's)."""
    counts = torch.bincount(counted.flatten(), minlength=vocab)
    scale = 1.0 / counts[tokens].clamp(min=1).to(embedded.dtype)
    return _ScaleGradient.apply(embedded, scale[..., None])


class HlbGpt(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.embedding = nn.Embedding(config.total_vocab, width)  # scaled by frequency in `embed`
        self.blocks = nn.ModuleList(LatentAttentionBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width, bias=False)
        self.output = nn.Linear(width, config.total_vocab, bias=False)
        with torch.no_grad():
            self.embedding.weight.normal_(std=0.25 / math.sqrt(width))
            self.output.weight.normal_(std=0.5 / math.sqrt(width))

    def forward(self, tokens: torch.Tensor, direction: str = "fw") -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V].

        fw: logits[:, t] predict tokens[:, t+1] from tokens[:, :t+1].
        bw: logits[:, t] predict tokens[:, t-1] from tokens[:, t:] (legacy-flip: the study's
        leaking mask, sliced from max_seq_len, instead).
        """
        return self.output(self.hidden(tokens, direction))

    def hidden(
        self, tokens: torch.Tensor, direction: str = "fw", embedding_groups: int = 1, counted: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final normalised hidden states [B, T, width], before the output layer.

        embedding_groups: the batch is that many tasks stacked; the embedding's gradient is then
        scaled by token frequencies within each task's rows (see `embed`), so a stacked pass gets
        the same gradients as one pass per task. counted: the tokens whose frequencies count,
        stacked the same way (default: `tokens`).
        """
        seq_len = tokens.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.config.max_seq_len}")
        allowed, dist = mask_and_distance(
            seq_len, direction, self.config.bw_mask, max_seq_len=self.config.max_seq_len, device=tokens.device
        )
        x = self.embed(tokens, embedding_groups, tokens if counted is None else counted)
        x = residual_dropout(x, self.config.dropout, self.training)
        for block in self.blocks:
            x = block(x, allowed, dist)
        return self.norm(x)

    def embed(self, tokens: torch.Tensor, groups: int, counted: torch.Tensor) -> torch.Tensor:
        """The embeddings of `tokens`; under autograd, each group's gradient frequency-scaled by
        the counts of its group of `counted` (frequency_scaled)."""
        embedded = self.embedding(tokens)
        if not (torch.is_grad_enabled() and self.embedding.weight.requires_grad):
            return embedded
        pairs = zip(embedded.chunk(groups), tokens.chunk(groups), counted.chunk(groups))
        return torch.cat([frequency_scaled(x, t, c, self.config.total_vocab) for x, t, c in pairs])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def truncated(self, num_blocks: int) -> HlbGpt:
        """A model that shares this one's weights but keeps only the first `num_blocks` blocks."""
        if not 1 <= num_blocks <= self.config.depth:
            raise ValueError(f"num_blocks must be in [1, {self.config.depth}], got {num_blocks}")
        clone = copy.copy(self)
        clone._modules = dict(self._modules)
        clone.blocks = nn.ModuleList(self.blocks[:num_blocks])
        clone.config = dataclasses.replace(self.config, depth=num_blocks)
        return clone


def build_model(config: ModelConfig) -> HlbGpt:
    return HlbGpt(config)


def block_matrix_params(config: ModelConfig) -> int:
    """The weights of one block's two matrices: the fused expand and the projection back."""
    d = config.width
    expand = d * config.expand_factor
    return (2 * config.qk_dim + 2 * expand) * d + d * expand


def count_params(config: ModelConfig) -> int:
    """HlbGpt(config).num_params() without building it."""
    d = config.width
    block = block_matrix_params(config) + d + 1  # the matrices, the norm, the bias scale
    return 2 * config.total_vocab * d + config.depth * block + d


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward), counting the
    matmuls: 2 FLOPs per weight, plus causal attention's QK^T and AV over seq_len / 2 keys."""
    d = config.width
    attention_per_block = 2 * (seq_len / 2) * (config.qk_dim + d)
    forward = config.depth * (2 * block_matrix_params(config) + attention_per_block) + 2 * d * config.total_vocab
    return 3 * forward
