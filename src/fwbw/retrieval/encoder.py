"""Late-interaction token embeddings from a trained run.

A text is tokenized with the run's tokenizer and cut into overlapping chunks of chunk_tokens
tokens (default: the run's context, seq_len tokens, seq_len - 1 with task tokens, whose marker takes
a position), each starting chunk_tokens // 2 tokens after the one before and the last ending at
the text's end; a text that fits is one chunk. Each chunk is encoded on its own, and a text's
embedding is the token vectors of all its chunks, one chunk after another: MaxSim sees every part
of a long text, a token where two chunks overlap twice (each time with its own chunk's context).
A chunk's token t is embedded as
  fw    the final normalised hidden state at t of the fw pass, which has seen tokens 0..t,
  bw    that of the bw pass, model.hidden(tokens, "bw") in the chunk's own order, which has seen
        tokens t..end,
  fwbw  both: [fw; bw] / sqrt(2), a unit vector whose dot product with another is the mean of the
        fw and the bw cosine,
  echo  that of a fw pass over the chunk read twice, at t in the second copy, which has seen the
        whole chunk, then tokens 0..t again (echo embeddings: Springer et al. 2024, "Repetition
        improves language model embeddings"): whole-text states from the fw direction alone. Both
        copies must fit the context, so its chunks are at most half of it (the default),
  around  the two states that predict token t, [fw at t-1; bw at t+1] / sqrt(2): the text on
        both sides of t but not t itself (the fw state at t-1 has seen tokens 0..t-1, the bw one at
        t+1 tokens t+1..end). At a chunk's first token the fw half is the fw task marker's state
        (which predicts it), or a zero vector without task tokens; at its last the bw half likewise,
each view (a pass: fw, bw or echo, or a pass's states one position off: fw-prev, bw-next; VIEWS)
L2-normalised (a missing state stays a zero vector). With task tokens the run's markers are
added as training added them (the fw marker before the chunk or its two copies, the bw marker
after it) and their own positions dropped.

Query fillers (query augmentation, ColBERT's [MASK] padding of queries: Khattab & Zaharia 2020):
with `fillers` N > 0 each chunk of a text (in practice a query) is read with N filler tokens
(FILLER_TEXT's one token) after it by a fw pass and before it by a bw pass, and their N states,
each of which has read the whole chunk, are embedded after the chunk's own tokens; the fw view's
filler i (the i-th after the chunk) is paired with the bw view's filler that has as many fillers
between it and the chunk. A text then takes chunks of chunk_tokens - N tokens, so that chunk and
fillers fit where a chunk did.

Markers (ColBERT's [Q] and [D]; here E5's text prefixes, Wang et al. 2022, "Text embeddings by
weakly-supervised contrastive pre-training"): with a `marker` text (MARKERS: one for queries, one
for documents) every chunk is read with the marker's tokens first, by either pass (fw: before the
chunk; bw: after it, in the text's own order), so that each token's state knows which side of the
search it is on; their own states are not embedded, and a chunk keeps chunk_tokens less the marker's
tokens. `blocks` takes the states after the first n blocks
instead (model.truncated(n), its final norm applied). A fine-tuned encoder
(fwbw.retrieval.finetune) then applies its learned projection and normalises; fine-tuning embeds
each text's first chunk only (Encoder.embed_batch).

Single vectors from the same states, the baselines that show what late interaction adds: "mean"
averages each view's token vectors over every chunk, "last" takes the state that has seen a whole
chunk at the text's end: the last chunk's last token for fw and echo, the first chunk's first
token for bw (the whole text, when it is one chunk); each is normalised, then combined as above.

Chunks are encoded in batches of similar length, padded on the side a chunk's positions never see
(fw on the right, bw on the left): the model has no absolute positions, so padding changes
nothing. That needs the causal bw mask; the study's leaking legacy-flip mask depends on absolute
positions and lets every position see the whole text, so runs trained with it embed fw or echo
only.

Each view's token vectors are cached in fp16 under cache_dir, one safetensors file per (model
weights, blocks, view, chunk length, token ids of the texts, framing: fillers and marker), and reused by every embed, pooling
and system that needs them; encodings are rounded to fp16 whether cached or not, so both give
equal scores.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
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
from fwbw.model.config import ModelConfig
from fwbw.model.hlb_gpt import HlbGpt
from fwbw.training import checkpoint
from fwbw.training.config import TrainConfig
from fwbw.training.precision import autocast, resolve_device, resolve_dtype
from fwbw.training.run_dir import MODEL_WEIGHTS, finished_run_config


@dataclass(frozen=True)
class View:
    """A pass that embeds a chunk: `direction`'s, over `copies` copies of the chunk one after
    another, whose states at the copy it reads last are the chunk's token vectors."""

    direction: str
    copies: int = 1
    shift: int = 0  # embed the state this many positions after each token's (-1: the one before)


VIEWS = {"fw": View("fw"), "bw": View("bw"), "echo": View("fw", copies=2), "fw-prev": View("fw", shift=-1),
         "bw-next": View("bw", shift=1)}
EMBEDS = {"fw": ("fw",), "bw": ("bw",), "fwbw": ("fw", "bw"), "echo": ("echo",),  # embed -> its views, in order
          "around": ("fw-prev", "bw-next")}
MARKERS = {"query": "query: ", "document": "passage: "}  # role -> its marker text
FILLER_TEXT = "\n"  # a query filler: one token of every tokenizer of the corpora, which separates their paragraphs
POOLINGS = ("mean", "last")
ENCODE_BATCH_TOKENS = 16384  # padded tokens per forward pass
COMBINE_ROWS = 65536  # token vectors combined at once (bounds the fp32 copy)
CACHE_FORMAT = 2  # part of every cache key: bump it when what a cache file holds changes
PAD_ID = 0  # any id: a chunk's own positions never see the padding


@dataclass(frozen=True, eq=False)
class TokenEmbeddings:
    """Unit vectors of the tokens of texts, packed: text i owns rows offsets[i]:offsets[i + 1]."""

    ids: tuple[str, ...]
    vectors: torch.Tensor  # [total tokens, dim], float16
    lengths: torch.Tensor  # [texts], int64, each >= 1: the vectors of all its chunks

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
    """The views of `embed`; ValueError for an unknown one or a bw embedding of a run whose bw mask
    is not causal."""
    if embed not in EMBEDS:
        raise ValueError(f"embed: expected one of {', '.join(EMBEDS)}, got {embed!r}")
    if any(VIEWS[view].direction == "bw" for view in EMBEDS[embed]) and config.bw_mask != "causal":
        raise ValueError(
            f"embed {embed}: the run's bw mask {config.bw_mask} lets every position see the whole text, "
            "so the run has no bw token embeddings; use --embed fw or echo"
        )
    return EMBEDS[embed]


def check_blocks(blocks: int | None, config: TrainConfig) -> int:
    """The number of blocks whose output is embedded (None: all of them)."""
    if blocks is None:
        return config.depth
    if not 1 <= blocks <= config.depth:
        raise ValueError(f"blocks: the run has {config.depth} blocks, so expected 1..{config.depth}, got {blocks}")
    return blocks


def check_chunk_tokens(chunk_tokens: int | None, embed: str, config: TrainConfig) -> int:
    """The length of `embed`'s chunks (None: the longest whose copies fit the run's context beside
    a task marker: the context, half of it for echo); ValueError (one line) for one below 2 or
    above that."""
    context = config.seq_len - int(config.task_tokens)
    copies = max(VIEWS[view].copies for view in check_embed(embed, config))
    longest = context // copies
    if chunk_tokens is None:
        return longest
    if not 2 <= chunk_tokens <= longest:
        room = f"the run's context of {context} tokens"
        room = room if copies == 1 else f"embed {embed} reads each chunk {copies} times within {room}"
        raise ValueError(f"chunk tokens: expected 2..{longest} ({room}), got {chunk_tokens}")
    return chunk_tokens


@dataclass(frozen=True)
class Framing:
    """What each pass reads around a chunk besides its tokens: query fillers (`fillers` of the
    token `filler`) and a marker's tokens."""

    fillers: int = 0
    filler: int | None = None  # filler_id's, given with any fillers
    marker: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.fillers and self.filler is None:
            raise ValueError("query fillers: give the filler's token id (filler_id)")

    def room(self, chunk_tokens: int) -> int:
        """The text's own tokens in a chunk of chunk_tokens."""
        return chunk_tokens - self.fillers - len(self.marker)


def check_fillers(fillers: int, chunk_tokens: int, marker_tokens: int = 0) -> int:
    """The number of query fillers; ValueError (one line) unless a chunk keeps at least 2 tokens of its
    own beside them and a marker of marker_tokens."""
    most = chunk_tokens - marker_tokens - 2
    if most < 0:
        raise ValueError(f"markers: a marker of {marker_tokens} tokens leaves chunks of {chunk_tokens} under 2 tokens of "
                         f"the text's own; give chunks of at least {marker_tokens + 2}")
    if not 0 <= fillers <= most:
        beside = f" beside a marker of {marker_tokens}" if marker_tokens else ""
        raise ValueError(f"query fillers: expected 0..{most} (chunks of {chunk_tokens} tokens keep at least "
                         f"2 of the text's own{beside}), got {fillers}")
    return fillers


def check_pooling(pooling: str | None, embed: str, fillers: int = 0) -> None:
    """ValueError (one line) for an unknown pooling, or one the embed or query fillers do not allow."""
    if pooling is None:
        return
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
    if fillers:
        raise ValueError("query fillers: late interaction only (a pooled text is one vector; its fillers would not add one)")
    if pooling == "last" and any(VIEWS[view].shift for view in EMBEDS.get(embed, ())):
        raise ValueError(f"pooling last: embed {embed}'s states never see a whole chunk; pool it by mean")


def filler_id(tokenizer: Tokenizer) -> int:
    """The query filler's token id; ValueError (one line) for a tokenizer that splits FILLER_TEXT."""
    ids = tokenizer.encode(FILLER_TEXT)
    if len(ids) != 1:
        raise ValueError(f"query fillers: the run's tokenizer reads the filler {FILLER_TEXT!r} as {len(ids)} tokens, not one")
    return ids[0]


def text_tokens(tokenizer: Tokenizer, texts: Mapping[str, str]) -> list[list[int]]:
    """Each text's token ids, all of them."""
    tokens = tokenizer.encode_batch(list(texts.values()))
    for text_id, ids in zip(texts, tokens):
        if not ids:
            raise ValueError(f"text {text_id!r} is empty: it has no tokens to embed")
    return tokens


def chunk_starts(length: int, chunk_tokens: int) -> list[int]:
    """Where the chunks of a text of `length` tokens start: every chunk_tokens // 2 tokens, and the
    last chunk where it ends at the text's end (just 0 for a text that fits one chunk)."""
    last = max(length - chunk_tokens, 0)
    return [*range(0, last, chunk_tokens // 2), last]


def text_chunks(ids: Sequence[int], chunk_tokens: int) -> list[list[int]]:
    """A text's chunks of token ids (chunk_starts)."""
    return [list(ids[start : start + chunk_tokens]) for start in chunk_starts(len(ids), chunk_tokens)]


def view_inputs(ids: Sequence[int], view: View, config: ModelConfig,
                framing: Framing = Framing()) -> tuple[list[int], list[int]]:
    """What one pass of `view` reads for a chunk: the copies, the framing's fillers after them (fw)
    or before them (bw), its marker read first (fw: before the copies; bw: after them) and
    training's task marker (fw's first, bw's last); and, for each vector the chunk yields (its tokens
    in order, then its fillers nearest first), the position in that sequence whose state it is,
    shifted by view.shift (-1: none, a zero vector)."""
    length, fillers = len(ids), framing.fillers
    if view.direction == "bw":
        task_marker = [config.bw_token_id] if config.task_tokens else []
        sequence = [*[framing.filler] * fillers, *ids, *framing.marker, *task_marker]
        slots = [fillers + t for t in range(length)] + [fillers - 1 - i for i in range(fillers)]
    else:
        first = [*([config.fw_token_id] if config.task_tokens else []), *framing.marker]
        sequence = [*first, *[*ids] * view.copies, *[framing.filler] * fillers]
        start = len(first) + length * (view.copies - 1)
        slots = list(range(start, start + length + fillers))
    return sequence, [slot + view.shift if 0 <= slot + view.shift < len(sequence) else -1 for slot in slots]


def token_states(model: HlbGpt, tokens: Sequence[Sequence[int]], view: str,
                 framing: Framing = Framing()) -> tuple[torch.Tensor, torch.Tensor]:
    """One view's unit vectors [B, L, width] for chunks of token ids, row b position j holding
    vector j of chunk b (view_inputs' order; zero past its end or where there is no state), and the
    mask [B, L] of the vectors each chunk has; differentiable."""
    direction = VIEWS[view].direction
    inputs_of = [view_inputs(ids, VIEWS[view], model.config, framing) for ids in tokens]
    padded_length = max(len(sequence) for sequence, _ in inputs_of)
    width = max(len(slots) for _, slots in inputs_of)
    inputs = torch.full((len(tokens), padded_length), PAD_ID)
    index = torch.full((len(tokens), width), -1)  # each vector's position in its padded row, -1: none
    mask = torch.zeros((len(tokens), width), dtype=torch.bool)
    for row, (sequence, slots) in enumerate(inputs_of):
        first = 0 if direction == "fw" else padded_length - len(sequence)
        inputs[row, first : first + len(sequence)] = torch.tensor(sequence)
        slots = torch.tensor(slots)
        index[row, : len(slots)] = torch.where(slots >= 0, slots + first, -1)
        mask[row, : len(slots)] = True
    device = next(model.parameters()).device
    hidden = model.hidden(inputs.to(device), direction).float()
    index, mask = index.to(device), mask.to(device)
    states = hidden.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
    return F.normalize(states, dim=-1).masked_fill((index < 0)[..., None], 0), mask


def combine(states: Sequence[torch.Tensor], projection: nn.Linear | None = None) -> torch.Tensor:
    """One embedding from each view's unit vectors (in EMBEDS' order): their concatenation divided
    by sqrt(views), then, for a fine-tuned encoder, its projection, normalised."""
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
        chunk_tokens: int | None = None,
    ):
        """weights_digest: the sha256 of the model's weights, naming its cache files; chunk_tokens:
        see check_chunk_tokens."""
        self.config = config
        self.embed = embed
        self.views = check_embed(embed, config)
        self.blocks = check_blocks(blocks, config)
        self.chunk_tokens = check_chunk_tokens(chunk_tokens, embed, config)
        self.device = resolve_device(device)
        self.model = model.truncated(self.blocks).to(self.device) if self.blocks < config.depth else model.to(self.device)
        self.projection = None if projection is None else projection.to(self.device)
        self.weights_digest = weights_digest
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.progress = progress
        self.tokenizer = load_corpus_tokenizer(config.data, config.tokenizer, progress=progress)

    @property
    def dim(self) -> int:
        return self.model.config.width * len(self.views) if self.projection is None else self.projection.out_features

    def chunked(self, chunk_tokens: int | None) -> Encoder:
        """This encoder (its model shared) with chunks of chunk_tokens tokens (see check_chunk_tokens)."""
        encoder = copy.copy(self)
        encoder.chunk_tokens = check_chunk_tokens(chunk_tokens, self.embed, self.config)
        return encoder

    def precision(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, resolve_dtype(self.config.dtype))

    def tokenize(self, texts: Mapping[str, str]) -> list[list[int]]:
        return text_tokens(self.tokenizer, texts)

    def framing(self, fillers: int = 0, marker: str | None = None) -> Framing:
        """The framing of `fillers` query fillers and the `marker` text (None: none) in this encoder's
        chunks; ValueError (one line) where they leave a chunk under 2 tokens of its own."""
        marker_ids = tuple(self.tokenizer.encode(marker)) if marker else ()
        check_fillers(fillers, self.chunk_tokens, len(marker_ids))
        return Framing(fillers, filler_id(self.tokenizer) if fillers else None, marker_ids)

    def embed_batch(self, texts: Sequence[str], marker: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, L, dim] and mask [B, L] of a few texts, each cut to its first chunk (read
        after `marker`), differentiable and uncached (fine-tuning)."""
        framing = self.framing(marker=marker)
        room = framing.room(self.chunk_tokens)
        tokens = [ids[:room] for ids in self.tokenize({str(i): text for i, text in enumerate(texts)})]
        with self.precision():
            states = [token_states(self.model, tokens, view, framing) for view in self.views]
        return combine([vectors for vectors, _ in states], self.projection).float(), states[0][1]

    def encode(self, texts: Mapping[str, str], fillers: int = 0, marker: str | None = None) -> TokenEmbeddings:
        """Every token's embedding (and each chunk's `fillers` query fillers'; each chunk read after
        `marker`), chunk after chunk, in fp16."""
        return combine_views(self.view_embeddings(texts, fillers, marker), self.projection, self.device)

    def encode_pooled(self, texts: Mapping[str, str], pooling: str, marker: str | None = None) -> TokenEmbeddings:
        """One embedding per text (each of length 1), pooled from its token states: see POOLINGS."""
        check_pooling(pooling, self.embed)
        directions = [VIEWS[view].direction for view in self.views]
        return pool_views(self.view_embeddings(texts, marker=marker), directions, pooling, self.projection, self.device)

    @torch.no_grad()
    def view_embeddings(self, texts: Mapping[str, str], fillers: int = 0, marker: str | None = None) -> list[TokenEmbeddings]:
        """Each view's unit token vectors of the texts (with `fillers` query fillers per chunk, each
        chunk read after `marker`), in self.views' order, before they are combined."""
        tokens = self.tokenize(texts)
        framing = self.framing(fillers, marker)
        room = framing.room(self.chunk_tokens)
        lengths = torch.tensor([sum(len(chunk) + fillers for chunk in text_chunks(t, room)) for t in tokens])
        return [TokenEmbeddings(tuple(texts), self._cached_vectors(tokens, lengths, view, framing), lengths)
                for view in self.views]

    def _cached_vectors(self, tokens: list[list[int]], lengths: torch.Tensor, view: str, framing: Framing) -> torch.Tensor:
        if self.cache_dir is None:
            return self._encode_direction(tokens, view, framing)
        path = self.cache_dir / f"{view}-blocks{self.blocks}-{self._cache_key(tokens, view, framing)}.safetensors"
        try:
            cached = load_file(str(path))
            if torch.equal(cached["lengths"], lengths):
                _touch(path)
                return cached["vectors"]
        except (OSError, SafetensorError, KeyError):
            pass  # not cached yet, or unreadable: encode again
        vectors = self._encode_direction(tokens, view, framing)
        atomic_write(path, lambda tmp: save_file({"vectors": vectors, "lengths": lengths}, str(tmp)))
        return vectors

    def _cache_key(self, tokens: list[list[int]], view: str, framing: Framing) -> str:
        token_digest = hashlib.sha256()
        for ids in tokens:
            token_digest.update(np.asarray([len(ids), *ids], dtype=np.int64).tobytes())
        key = [CACHE_FORMAT, self.weights_digest, self.blocks, view, self.chunk_tokens, token_digest.hexdigest()]
        if framing != Framing():  # a key without one as before framings existed
            key.append(dataclasses.asdict(framing))
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]

    @torch.no_grad()
    def _encode_direction(self, tokens: list[list[int]], view: str, framing: Framing) -> torch.Tensor:
        """Packed fp16 unit vectors [total vectors, width] of one view of the texts: each text's
        chunks in order (each chunk's tokens, then its fillers), texts in their order."""
        chunks = [chunk for ids in tokens for chunk in text_chunks(ids, framing.room(self.chunk_tokens))]
        per_chunk: list[torch.Tensor | None] = [None] * len(chunks)
        self.model.eval()
        extra = framing.fillers + len(framing.marker)
        with tqdm(total=len(chunks), desc=f"encode {view}", unit="chunk", disable=not self.progress) as bar:
            for batch in length_blocks([len(ids) * VIEWS[view].copies + extra for ids in chunks], ENCODE_BATCH_TOKENS):
                with self.precision():
                    states, _ = token_states(self.model, [chunks[i] for i in batch], view, framing)
                for row, i in enumerate(batch):
                    per_chunk[i] = states[row, : len(chunks[i]) + framing.fillers].half().cpu()
                bar.update(len(batch))
        return torch.cat(per_chunk)


def _touch(path: Path) -> None:
    """Mark a cache file used now (prune_cache removes the least recently used first), unless another
    process pruned it meanwhile."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)


def prune_cache(cache_dir: Path, max_bytes: int) -> list[Path]:
    """Remove the least recently used cache files (by modification time, which a read renews) until
    cache_dir holds at most max_bytes; the files removed. Files another process removes meanwhile are
    passed over."""
    sizes = {}
    for path in Path(cache_dir).glob("*.safetensors") if Path(cache_dir).is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            sizes[path] = (path.stat().st_mtime, path.stat().st_size)
    total = sum(size for _, size in sizes.values())
    removed = []
    for path in sorted(sizes, key=lambda path: sizes[path][0]):
        if total <= max_bytes:
            break
        total -= sizes[path][1]
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


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


@torch.no_grad()
def combine_views(per_view: Sequence[TokenEmbeddings], projection: nn.Linear | None, device: torch.device) -> TokenEmbeddings:
    """The texts' token embeddings from each view's token vectors (combine), in fp16."""
    first = per_view[0]
    pieces = [
        combine([v.vectors[start : start + COMBINE_ROWS].to(device).float() for v in per_view], projection)
        for start in range(0, len(first.vectors), COMBINE_ROWS)
    ]
    return TokenEmbeddings(first.ids, torch.cat(pieces).half().cpu(), first.lengths)


@torch.no_grad()
def pool_views(per_view: Sequence[TokenEmbeddings], directions: Sequence[str], pooling: str, projection: nn.Linear | None,
               device: torch.device) -> TokenEmbeddings:
    """One embedding per text (each of length 1): each view pooled (pool; its pass reading in
    directions[i]), then combined, in fp16."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
    pooled = [pool(states, direction, pooling).to(device) for states, direction in zip(per_view, directions)]
    first = per_view[0]
    return TokenEmbeddings(first.ids, combine(pooled, projection).half().cpu(), torch.ones_like(first.lengths))


def pool(states: TokenEmbeddings, direction: str, pooling: str) -> torch.Tensor:
    """One unit vector [texts, width] per text from one view's token vectors, that view's pass
    reading in `direction`."""
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
    chunk_tokens: int | None = None,
) -> Encoder:
    """The zero-shot encoder of a finished run; ValueError (one line) for a directory that is not one."""
    run_dir = Path(run_dir)
    config = finished_run_config(run_dir)
    check_embed(embed, config)
    check_blocks(blocks, config)
    check_chunk_tokens(chunk_tokens, embed, config)
    model = checkpoint.load_model(run_dir)
    return Encoder(model, config, embed, sha256_of(run_dir / MODEL_WEIGHTS), blocks, None, cache_dir, device, progress,
                   chunk_tokens)
