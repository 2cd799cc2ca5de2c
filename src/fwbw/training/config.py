"""Typed, validated configs of a training run. Every value is checked on construction; a bad
value raises `ConfigError` with one line naming the field. A run saves its `TrainConfig` as JSON
and can be rebuilt from that file alone."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwbw.data.corpora import validate_corpus_spec
from fwbw.data.tokenizer import validate_tokenizer_spec, vocab_size_of
from fwbw.files import read_json
from fwbw.model.config import ModelConfig, check_attention_shape, shape_for_model_scale
from fwbw.model.hlb_gpt import count_params
from fwbw.model.masks import BW_MASKS
from fwbw.schema import ConfigError, check_fields, from_mapping, require, typed
from fwbw.training.precision import DTYPE_CHOICES
from fwbw.training.recipe import RecipeConfig, check_numbers

BW_MODES = ("add", "either")
WD_LOSSES = ("tasks", "fw")  # which loss the dynamic weight decay reads: the step's mean task loss, or its fw loss
DEVICES = ("auto", "cpu", "cuda")
# two ways to size a model: hlb-gpt's model_scale, or depth and width. A layer of values that gives
# one replaces what the layers below it gave of the other.
SIZE_ALTERNATIVE = (("model_scale",), ("depth", "width"))
MAX_DEPTH = 1000  # blocks: a deeper model takes minutes just to build
MAX_PARAMS = 10**12  # 4 TB of fp32 weights, beyond any one device


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, model shape, task mix, budget and recipe.

    Task mix: every step trains fw, and with probability p_bw also bw (bw_mode "add": the two
    losses summed) or bw instead of fw (bw_mode "either"). bw_mode "either" with p_bw = 1 trains
    bw only: the study's "backward only" mode. adaptive_p_bw is the study's
    `adjust_backward_prob`: after every bw pass, p_bw = clamp(ppl_bw / ppl_fw, 0.01, 1) from that
    step's losses (the most recent fw loss under "either"), p_bw being the starting value."""

    data: str = "wiki-sample"
    tokenizer: str = "bpe:8192"
    depth: int = 4
    width: int = 128
    model_scale: float | None = None  # hlb-gpt's sizing; when set, depth and width follow from it
    seq_len: int = 256
    bw_mask: str = "causal"
    task_tokens: bool = False
    num_heads: int = 1
    p_bw: float = 0.0
    bw_mode: str = "add"
    adaptive_p_bw: bool = False
    epochs: float = 1.0
    train_tokens: int | None = None
    seed: int = 100
    eval_every_epochs: float = 0.25
    eval_tokens: int = 65536
    train_eval_tokens: int = 0
    checkpoint_every_steps: int = 200
    device: str = "auto"
    dtype: str = "auto"
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    # --- added after the first published sweeps: left out of a config's identity (run ids,
    # checkpoint stamps) while at the value in LATER_FIELDS, so those runs keep their ids
    train_fraction: float = 1.0  # the nested share of the training documents trained on (fwbw.data.corpora)
    subset_seed: int = 0  # which documents make that share (its own seed, not the training seed)
    replay: bool = False  # every step also trains fw on windows trained on before (added like bw)
    dropout: float = 0.0  # residual dropout (fwbw.model.hlb_gpt)
    wd_loss: str = "tasks"  # the loss the dynamic weight decay reads (WD_LOSSES)
    wd_constant: float | None = None  # a fixed weight decay instead of the dynamic one
    wd_scale: float = 1.0  # multiplies the weight decay, dynamic or fixed
    eval_ema: float | None = None  # evaluate an exponential moving average of the weights with this decay
    patience: int | None = None  # stop after this many evaluations without a lower validation fw loss
    eval_bw: bool | None = None  # evaluate the bw task (None: only when the run trains it)
    compile: bool | None = None  # torch.compile the blocks (None: fwbw.training.trainer.compile_by_default)
    threads: int | None = None  # torch's CPU threads (None: torch's default)

    def __post_init__(self) -> None:
        check_fields(self)
        _reraise_as_config_error("data", validate_corpus_spec, self.data)
        _reraise_as_config_error("tokenizer", validate_tokenizer_spec, self.tokenizer)
        self._check_model_scale()
        require(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        check_attention_shape(self.width, self.num_heads)
        require(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        tokens = self.recipe.tokens_per_microbatch
        require(tokens >= self.seq_len, "recipe.tokens_per_microbatch", f"must hold one window of seq_len {self.seq_len}, got {tokens}",
                related=("seq_len",))
        require(self.bw_mask in BW_MASKS, "bw_mask", f"must be one of {BW_MASKS}, got {self.bw_mask!r}")
        require(0.0 <= self.p_bw <= 1.0, "p_bw", f"must be in [0, 1], got {self.p_bw}")
        require(self.bw_mode in BW_MODES, "bw_mode", f"must be one of {BW_MODES}, got {self.bw_mode!r}")
        self._check_adaptive_p_bw()
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        require(self.train_tokens is None or self.train_tokens > 0, "train_tokens", f"must be > 0, got {self.train_tokens}")
        require(self.eval_every_epochs > 0, "eval_every_epochs", f"must be > 0, got {self.eval_every_epochs}")
        require(self.eval_tokens >= self.seq_len + 1, "eval_tokens", f"must be >= seq_len + 1, got {self.eval_tokens}",
                related=("seq_len",))
        require(self.train_eval_tokens == 0 or self.train_eval_tokens >= self.seq_len + 1, "train_eval_tokens",
                f"must be 0 (off) or >= seq_len + 1, got {self.train_eval_tokens}", related=("seq_len",))
        require(self.checkpoint_every_steps >= 1, "checkpoint_every_steps", f"must be >= 1, got {self.checkpoint_every_steps}")
        require(self.device in DEVICES, "device", f"must be one of {DEVICES}, got {self.device!r}")
        require(self.dtype in DTYPE_CHOICES, "dtype", f"must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        self._check_later_fields()
        self._check_size()  # last: they count the model the fields above describe
        self._check_recipe_numbers()

    def _check_later_fields(self) -> None:
        require(0 < self.train_fraction <= 1, "train_fraction", f"must be in (0, 1], got {self.train_fraction}")
        require(self.subset_seed >= 0, "subset_seed", f"must be >= 0, got {self.subset_seed}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.wd_loss in WD_LOSSES, "wd_loss", f"must be one of {WD_LOSSES}, got {self.wd_loss!r}")
        require(self.wd_constant is None or self.wd_loss == "tasks", "wd_loss", "has no effect with a wd_constant",
                related=("wd_constant",))
        require(self.wd_constant is None or 0 <= self.wd_constant < math.inf, "wd_constant",
                f"must be >= 0 and finite, got {self.wd_constant}")
        require(0 <= self.wd_scale < math.inf, "wd_scale", f"must be >= 0 and finite, got {self.wd_scale}")
        require(self.eval_ema is None or 0 < self.eval_ema < 1, "eval_ema", f"must be in (0, 1), got {self.eval_ema}")
        require(self.patience is None or self.patience >= 1, "patience", f"must be >= 1 evaluations, got {self.patience}")
        require(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")

    def trains_bw(self) -> bool:
        """Whether any step of this run may train the bw task."""
        return self.p_bw > 0

    def evaluates_bw(self) -> bool:
        return self.trains_bw() if self.eval_bw is None else self.eval_bw

    def _check_model_scale(self) -> None:
        if self.model_scale is None:
            return
        depth, width = shape_for_model_scale(self.model_scale)
        require(depth >= 1 and width >= 64, "model_scale", f"{self.model_scale:g} is too small (depth {depth}, width {width})")
        require(
            (self.depth, self.width) == (depth, width),
            "model_scale",
            f"{self.model_scale:g} means depth {depth} and width {width}, got depth {self.depth} and width {self.width}",
            related=("depth", "width"),
        )

    def _check_size(self) -> None:
        """A model that can be built: at most MAX_DEPTH blocks and MAX_PARAMS parameters."""
        params = self.num_params()
        if self.model_scale is not None:
            require(self.depth <= MAX_DEPTH and params <= MAX_PARAMS, "model_scale",
                    f"{self.model_scale:g} means depth {self.depth} and width {self.width}, {params:.3g} parameters: "
                    f"more than {MAX_DEPTH} blocks or {MAX_PARAMS:.0e} parameters")
        require(self.depth <= MAX_DEPTH, "depth", f"must be <= {MAX_DEPTH}, got {self.depth}")
        require(params <= MAX_PARAMS, "width", f"{self.width} at depth {self.depth} makes {params:.3g} parameters, "
                f"more than {MAX_PARAMS:.0e}", related=("depth",))

    def _check_recipe_numbers(self) -> None:
        try:
            check_numbers(self.recipe, self.num_params())
        except ConfigError as error:
            raise error.inside("recipe.") from None

    def num_params(self) -> int:
        """The model's parameter count, counted without building it (the tokenizer's spec gives its vocabulary)."""
        return count_params(self.model_config(vocab_size_of(self.tokenizer)))

    def _check_adaptive_p_bw(self) -> None:
        """adaptive_p_bw moves p_bw after a bw pass, from that step's fw loss or the last one, so
        under "either" it needs fw passes (p_bw < 1). With p_bw 0 it never moves: such a run is the
        fw-only baseline of an adaptive grid."""
        if not self.adaptive_p_bw:
            return
        require(
            self.bw_mode != "either" or self.p_bw < 1,
            "adaptive_p_bw",
            "needs p_bw < 1 under bw_mode either: with p_bw 1 no step trains fw, so p_bw never moves",
            related=("p_bw", "bw_mode"),
        )

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model for a tokenizer of `vocab_size` ids, padded to a multiple of 64 as hlb-gpt
        pads GPT-2's 50257 to 50304 (faster matmuls; the extra rows are never targets)."""
        return ModelConfig(
            vocab_size=-(-vocab_size // 64) * 64,
            depth=self.depth,
            width=self.width,
            max_seq_len=self.seq_len,
            bw_mask=self.bw_mask,
            task_tokens=self.task_tokens,
            num_heads=self.num_heads,
            dropout=self.dropout,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """to_dict without the later fields at their LATER_FIELDS values: what makes a run this run."""
        return identity_of(self.to_dict())

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from plain data (a file's values): unknown fields are refused, and a
        `model_scale` given without depth and width sets them."""
        values = dict(values)
        scale = typed(values.get("model_scale"), float | None, "model_scale")
        if scale is not None and "depth" not in values and "width" not in values:
            values["depth"], values["width"] = shape_for_model_scale(scale)
        return from_mapping(cls, values)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        values = read_json(path)
        require(isinstance(values, dict), str(path), "holds no config (a JSON object)")
        return cls.from_dict(values)


# fields added after the first published sweeps, and the value that behaves as those runs did
LATER_FIELDS = {
    "train_fraction": 1.0, "subset_seed": 0, "replay": False, "dropout": 0.0, "wd_loss": "tasks", "wd_constant": None,
    "wd_scale": 1.0, "eval_ema": None, "patience": None, "eval_bw": None, "compile": None, "threads": None,
}


def identity_of(values: dict[str, Any]) -> dict[str, Any]:
    """A config's plain data without the later fields that sit at their LATER_FIELDS value (a
    config.json written before they existed has the same identity as one written after)."""
    return {key: value for key, value in values.items() if key not in LATER_FIELDS or value != LATER_FIELDS[key]}


def _reraise_as_config_error(field_name: str, check, value) -> None:
    try:
        check(value)
    except ValueError as error:
        message = str(error)
        prefix = f"{field_name}: "
        raise ConfigError(message if message.startswith(prefix) else prefix + message) from None
