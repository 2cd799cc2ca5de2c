"""Late-interaction token embeddings from a trained run.

A text is tokenized with the run's tokenizer and cut to the run's context, its first seq_len tokens
(seq_len - 1 with task tokens, whose marker takes a position). Its token t is embedded as
  fw    the final normalised hidden state at t of the fw pass, which has seen tokens 0..t,
  bw    that of the bw pass, model.hidden(tokens, "bw") in the text's own order, which has seen
        tokens t..end,
  fwbw  both: [fw; bw] / sqrt(2), a unit vector whose dot product with another is the mean of the
        fw and the bw cosine,
each direction L2-normalised. With task tokens the run's markers are added as training added them
(the fw marker before the text, the bw marker after it) and their own positions dropped. `blocks`
takes the states after the first n blocks instead (model.truncated(n), its final norm applied).
A fine-tuned encoder (fwbw.retrieval.finetune) then applies its learned projection and normalises.

Single vectors from the same states, the baselines that show what late interaction adds: "mean"
averages each direction's token vectors, "last" takes the one state that has seen the whole text,
the last token's for fw and the first token's for bw; each is normalised, then combined as above.

Texts are encoded in batches of similar length, padded on the side a text's positions never see
(fw on the right, bw on the left): the model has no absolute positions, so padding changes
nothing. That needs the causal bw mask; the study's leaking legacy-flip mask depends on absolute
positions and lets every position see the whole text, so runs trained with it embed fw only.

Each direction's token vectors are cached in fp16 under cache_dir, one safetensors file per (model
weights, blocks, direction, token ids of the texts), and reused by every embed, pooling and system
that needs them; encodings are rounded to fp16 whether cached or not, so both give equal scores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from fwbw.data.corpora import load_corpus_tokenizer
from fwbw.data.tokenizer import Tokenizer
from fwbw.files import atomic_write, sha256_of
from fwbw.model.hlb_gpt import HlbGpt
from fwbw.training import checkpoint
from fwbw.training.config import TrainConfig
from fwbw.training.precision import autocast, resolve_device, resolve_dtype
from fwbw.training.run_dir import MODEL_WEIGHTS, finished_run_config

EMBEDS = {"fw": ("fw",), "bw": ("bw",), "fwbw": ("fw", "bw")}  # embed -> its directions, in order
POOLINGS = ("mean", "last")
ENCODE_BATCH_TOKENS = 16384  # padded tokens per forward pass
COMBINE_ROWS = 65536  # token vectors combined at once (bounds the fp32 copy)
CACHE_FORMAT = 1  # part of every cache key: bump it when what a cache file holds changes
PAD_ID = 0  # any id: a text's own positions never see the padding


@dataclass(frozen=True, eq=False)
class TokenEmbeddings:
    """Unit vectors of the tokens of texts, packed: text i owns rows offsets[i]:offsets[i + 1]."""

    ids: tuple[str, ...]
    vectors: torch.Tensor  # [total tokens, dim], float16
    lengths: torch.Tensor  # [texts], int64, each >= 1

    @property
    def offsets(self) -> torch.Tensor:
        return F.pad(self.lengths.cumsum(0), (1, 0))

    def padded(self, indices: torch.Tensor, repeat_last: bool = False) -> torch.Tensor:
        """The texts at `indices` as fp32 vectors [n, L, dim], padded past each text's end with
        zeros, or with `repeat_last` with copies of its last token (see maxsim_matrix)."""
        lengths = self.lengths[indices]
        positions = torch.arange(int(lengths.max()))
        last = (lengths - 1)[:, None]
        vectors = self.vectors[self.offsets[indices][:, None] + torch.minimum(positions, last)].float()
        return vectors if repeat_last else vectors.masked_fill((positions > last)[..., None], 0)


def check_embed(embed: str, config: TrainConfig) -> tuple[str, ...]:
    """The directions of `embed`; ValueError for an unknown one or a bw embedding of a run whose
    bw mask is not causal."""
    if embed not in EMBEDS:
        raise ValueError(f"embed: expected one of {', '.join(EMBEDS)}, got {embed!r}")
    if "bw" in EMBEDS[embed] and config.bw_mask != "causal":
        raise ValueError(
            f"embed {embed}: the run's bw mask {config.bw_mask} lets every position see the whole text, "
            "so the run has no bw token embeddings; use --embed fw"
        )
    return EMBEDS[embed]


def check_blocks(blocks: int | None, config: TrainConfig) -> int:
    """The number of blocks whose output is embedded (None: all of them)."""
    if blocks is None:
        return config.depth
    if not 1 <= blocks <= config.depth:
        raise ValueError(f"blocks: the run has {config.depth} blocks, so expected 1..{config.depth}, got {blocks}")
    return blocks


def text_tokens(tokenizer: Tokenizer, texts: Mapping[str, str], max_seq_len: int, task_tokens: bool) -> list[list[int]]:
    """Each text's token ids, cut to what fits the model's context beside a task marker."""
    limit = max_seq_len - int(task_tokens)
    tokens = [ids[:limit] for ids in tokenizer.encode_batch(list(texts.values()))]
    for text_id, ids in zip(texts, tokens):
        if not ids:
            raise ValueError(f"text {text_id!r} is empty: it has no tokens to embed")
    return tokens


def token_states(model: HlbGpt, tokens: Sequence[Sequence[int]], direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction's unit vectors [B, L, width] for texts of token ids, row b position j holding
    token j of text b (zero past its end), and the mask [B, L]; differentiable."""
    config = model.config
    marker = [config.fw_token_id if direction == "fw" else config.bw_token_id] if config.task_tokens else []
    sequences = [[*marker, *ids] if direction == "fw" else [*ids, *marker] for ids in tokens]
    lengths = torch.tensor([len(ids) for ids in tokens])
    padded_length = max(len(sequence) for sequence in sequences)
    inputs = torch.full((len(tokens), padded_length), PAD_ID)
    starts = []  # where each text's first token sits in its row
    for row, sequence in enumerate(sequences):
        first = 0 if direction == "fw" else padded_length - len(sequence)
        inputs[row, first : first + len(sequence)] = torch.tensor(sequence)
        starts.append(first + (len(marker) if direction == "fw" else 0))
    device = next(model.parameters()).device
    hidden = model.hidden(inputs.to(device), direction).float()
    positions = torch.arange(int(lengths.max()))
    index = (torch.tensor(starts)[:, None] + positions).clamp(max=padded_length - 1).to(device)
    states = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    mask = (positions < lengths[:, None]).to(device)
    return F.normalize(states, dim=-1).masked_fill(~mask[..., None], 0), mask


def combine(states: Sequence[torch.Tensor], projection: nn.Linear | None = None) -> torch.Tensor:
    """One embedding from each direction's unit vectors (fw first): their concatenation divided by
    sqrt(directions), then, for a fine-tuned encoder, its projection, normalised."""
    joined = torch.cat(list(states), dim=-1) / math.sqrt(len(states))
    return joined if projection is None else F.normalize(projection(joined), dim=-1)


class Encoder:
    """Token embeddings of texts from one model (see the module docstring)."""

    def __init__(
        self,
        model: HlbGpt,
        config: TrainConfig,
        embed: str,
        weights_digest: str,
        blocks: int | None = None,
        projection: nn.Linear | None = None,
        cache_dir: Path | None = None,
        device: str = "auto",
        progress: bool = True,
    ):
        """weights_digest: the sha256 of the model's weights, naming its cache files."""
        self.config = config
        self.embed = embed
        self.directions = check_embed(embed, config)
        self.blocks = check_blocks(blocks, config)
        self.device = resolve_device(device)
        self.model = model.truncated(self.blocks).to(self.device) if self.blocks < config.depth else model.to(self.device)
        self.projection = None if projection is None else projection.to(self.device)
        self.weights_digest = weights_digest
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.progress = progress
        self.tokenizer = load_corpus_tokenizer(config.data, config.tokenizer, progress=progress)

    @property
    def dim(self) -> int:
        return self.model.config.width * len(self.directions) if self.projection is None else self.projection.out_features

    def precision(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, resolve_dtype(self.config.dtype))

    def tokenize(self, texts: Mapping[str, str]) -> list[list[int]]:
        return text_tokens(self.tokenizer, texts, self.model.config.max_seq_len, self.model.config.task_tokens)

    def embed_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, L, dim] and mask [B, L] of a few texts, differentiable and uncached (fine-tuning)."""
        tokens = self.tokenize({str(i): text for i, text in enumerate(texts)})
        with self.precision():
            states = [token_states(self.model, tokens, direction) for direction in self.directions]
        return combine([vectors for vectors, _ in states], self.projection).float(), states[0][1]

    @torch.no_grad()
    def encode(self, texts: Mapping[str, str]) -> TokenEmbeddings:
        """Every token's embedding, in fp16."""
        per_direction = self._direction_embeddings(texts)
        first = per_direction[0]
        pieces = [
            combine([d.vectors[start : start + COMBINE_ROWS].to(self.device).float() for d in per_direction], self.projection)
            for start in range(0, len(first.vectors), COMBINE_ROWS)
        ]
        return TokenEmbeddings(first.ids, torch.cat(pieces).half().cpu(), first.lengths)

    @torch.no_grad()
    def encode_pooled(self, texts: Mapping[str, str], pooling: str) -> TokenEmbeddings:
        """One embedding per text (each of length 1), pooled from its token states: see POOLINGS."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
        per_direction = self._direction_embeddings(texts)
        pooled = [pool(states, direction, pooling).to(self.device) for states, direction in zip(per_direction, self.directions)]
        first = per_direction[0]
        return TokenEmbeddings(first.ids, combine(pooled, self.projection).half().cpu(), torch.ones_like(first.lengths))

    def _direction_embeddings(self, texts: Mapping[str, str]) -> list[TokenEmbeddings]:
        tokens = self.tokenize(texts)
        ids, lengths = tuple(texts), torch.tensor([len(t) for t in tokens])
        return [TokenEmbeddings(ids, self._cached_vectors(tokens, lengths, direction), lengths) for direction in self.directions]

    def _cached_vectors(self, tokens: list[list[int]], lengths: torch.Tensor, direction: str) -> torch.Tensor:
        if self.cache_dir is None:
            return self._encode_direction(tokens, direction)
        path = self.cache_dir / f"{direction}-blocks{self.blocks}-{self._cache_key(tokens, direction)}.safetensors"
        try:
            cached = load_file(str(path))
            if torch.equal(cached["lengths"], lengths):
                return cached["vectors"]
        except (OSError, SafetensorError, KeyError):
            pass  # not cached yet, or unreadable: encode again
        vectors = self._encode_direction(tokens, direction)
        atomic_write(path, lambda tmp: save_file({"vectors": vectors, "lengths": lengths}, str(tmp)))
        return vectors

    def _cache_key(self, tokens: list[list[int]], direction: str) -> str:
        token_digest = hashlib.sha256()
        for ids in tokens:
            token_digest.update(np.asarray([len(ids), *ids], dtype=np.int64).tobytes())
        key = [CACHE_FORMAT, self.weights_digest, self.blocks, direction, token_digest.hexdigest()]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]

    def _encode_direction(self, tokens: list[list[int]], direction: str) -> torch.Tensor:
        """Packed fp16 unit vectors [total tokens, width] of one direction, texts in their order."""
        per_text: list[torch.Tensor | None] = [None] * len(tokens)
        self.model.eval()
        with tqdm(total=len(tokens), desc=f"encode {direction}", unit="text", disable=not self.progress) as bar:
            for batch in length_blocks([len(ids) for ids in tokens], ENCODE_BATCH_TOKENS):
                with self.precision():
                    states, _ = token_states(self.model, [tokens[i] for i in batch], direction)
                for row, i in enumerate(batch):
                    per_text[i] = states[row, : len(tokens[i])].half().cpu()
                bar.update(len(batch))
        return torch.cat(per_text)


def length_blocks(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Text indices, shortest first, cut into blocks of at most max_tokens tokens once padded to
    the block's longest text (at least one text each)."""
    blocks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if blocks and (len(blocks[-1]) + 1) * lengths[i] <= max_tokens:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    return blocks


def pool(states: TokenEmbeddings, direction: str, pooling: str) -> torch.Tensor:
    """One unit vector [texts, width] per text from one direction's token vectors."""
    if pooling == "mean":
        text_of_token = torch.repeat_interleave(torch.arange(len(states.lengths)), states.lengths)
        sums = torch.zeros(len(states.lengths), states.vectors.shape[1]).index_add_(0, text_of_token, states.vectors.float())
        return F.normalize(sums, dim=-1)  # the mean's direction
    seen_all = states.offsets[1:] - 1 if direction == "fw" else states.offsets[:-1]
    return F.normalize(states.vectors[seen_all].float(), dim=-1)


def load_encoder(
    run_dir: Path,
    embed: str = "fwbw",
    blocks: int | None = None,
    cache_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Encoder:
    """The zero-shot encoder of a finished run; ValueError (one line) for a directory that is not one."""
    run_dir = Path(run_dir)
    config = finished_run_config(run_dir)
    check_embed(embed, config)
    check_blocks(blocks, config)
    model = checkpoint.load_model(run_dir)
    return Encoder(model, config, embed, sha256_of(run_dir / MODEL_WEIGHTS), blocks, None, cache_dir, device, progress)
