"""The model's shape: hlb-gpt v0.4.1 (docs/method.md#the-model)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fwbw.model.masks import BW_MASKS
from fwbw.schema import require

QK_DIM_DIV = 8  # hlb-gpt: queries and keys are width / 8 wide


def check_attention_shape(width: int, num_heads: int, qk_dim_div: int = QK_DIM_DIV) -> None:
    """The width splits into the query/key width (width / qk_dim_div), and num_heads heads divide
    both widths."""
    require(width >= qk_dim_div and width % qk_dim_div == 0, "width", f"must be a positive multiple of {qk_dim_div}, got {width}")
    qk_dim = width // qk_dim_div
    require(
        num_heads >= 1 and qk_dim % num_heads == 0 and width % num_heads == 0,
        "num_heads",
        f"must be >= 1 and divide the query/key width {qk_dim} and the width {width}, got {num_heads}",
        related=("width",),
    )


@dataclass(frozen=True)
class ModelConfig:
    """hlb-gpt v0.4.1 (docs/method.md#the-model). With task_tokens the vocabulary grows by two:
    the fw token (id vocab_size) and the bw token (id vocab_size + 1). num_heads splits the
    attention as the study's code could (1: hlb-gpt's single head). dropout is the probability of
    residual dropout in training mode (0: hlb-gpt, none)."""

    vocab_size: int
    depth: int
    width: int
    max_seq_len: int
    bw_mask: str = "causal"
    task_tokens: bool = False
    qk_dim_div: int = QK_DIM_DIV
    expand_factor: int = 2
    num_heads: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        require(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        require(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        require(self.qk_dim_div >= 1, "qk_dim_div", f"must be >= 1, got {self.qk_dim_div}")
        check_attention_shape(self.width, self.num_heads, self.qk_dim_div)
        require(self.expand_factor >= 2, "expand_factor", f"must be >= 2, got {self.expand_factor}")
        require(self.max_seq_len >= 2, "max_seq_len", f"must be >= 2, got {self.max_seq_len}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.bw_mask in BW_MASKS, "bw_mask", f"must be one of {BW_MASKS}, got {self.bw_mask!r}")

    @property
    def qk_dim(self) -> int:
        return self.width // self.qk_dim_div

    @property
    def total_vocab(self) -> int:
        return self.vocab_size + (2 if self.task_tokens else 0)

    @property
    def fw_token_id(self) -> int:
        return self.vocab_size

    @property
    def bw_token_id(self) -> int:
        return self.vocab_size + 1


def shape_for_model_scale(scale: float) -> tuple[int, int]:
    """hlb-gpt's sizing by `model_scale` s (docs/method.md#the-model): depth = round(8 log2(1 + s))
    and width = the multiple of 64 nearest to 384 log2(1 + s); s = 1 gives (8, 384)."""
    require(scale > 0, "model_scale", f"must be > 0, got {scale}")
    size = math.log2(1 + scale)
    return round(8 * size), 64 * round(384 * size / 64)
