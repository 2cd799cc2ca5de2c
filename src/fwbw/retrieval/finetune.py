"""Contrastive fine-tuning of a run's token embeddings for retrieval, ColBERT's recipe scaled down.

What is trained: the run's whole LM (token embedding, every block the embed uses, final norm) and a
linear projection of the chosen embed (fw, bw or fwbw; fwbw.retrieval.encoder), L2-normalised after
it, as ColBERT projects BERT's states (Khattab & Zaharia 2020). The whole LM, as ColBERT fine-tunes
all of BERT: the fw-only and the fw+bw model of a comparison get the same treatment, and at these
sizes 300 steps take under 2 minutes on one CPU thread (depth 2, width 128, fwbw). The projection
maps to `dim` dimensions (default: the embed's own, width for fw or bw, 2 · width for fwbw) and
starts as the identity (rectangular where dim is larger), so that fine-tuning starts from the
zero-shot encoder's embeddings, fwbw's concatenation of fw and bw whole; a dim below the embed's
would lose part of it from the start and is refused.

AdamW, a constant lr of 3e-4, AdamW's default weight decay 0.01. Small models take larger
fine-tuning rates than BERT-base's 1e-5..1e-4: on a depth-2 width-128 fw+bw run (1 epoch of
wiki-sample), 300 steps on `description` gave nDCG@10 0.524, 0.577 and 0.595 at 1e-4, 3e-4 and
1e-3 (zero-shot 0.411), with a random 2:1 projection to 128 dimensions. Those queries came from
wiki-sample's validation articles, all of which are wiki-sample-v2's validation articles, so the
rate was chosen on what is now the dev split. 3e-4 keeps most of the gain at a rate that leaves
the LM closer to what pre-training made of it, which the comparison is about.

The loss is InfoNCE with in-batch negatives (van den Oord et al. 2018; Karpukhin et al. 2020). For
a batch of B (query, positive document) pairs, query i's candidates are the B positives and, with
hard_negatives "bm25" (one per pair, bm25_hard_negatives: mined from the pairs' own documents, so
from training articles only), the batch's B hard negatives:
  loss = mean over i of  -log softmax over candidates j of  (s(q_i, d_j) / τ)  at j = i
with s the MaxSim score divided by the query's token count (the mean of its tokens' best cosines,
in [-1, 1], so one temperature suits queries of every length) and τ = 0.05 (SimCSE's; not tuned). A
candidate that is no negative (another pair's positive with the same query text or the same
document text as pair i's) is left out of query i's softmax. Batches are epochs of a seeded
shuffle, so a seed fixes the result.

A fine-tuning lives in its own directory, never the run's files:
  model.safetensors, model_config.json   the fine-tuned LM (fwbw.training.checkpoint's format)
  projection.safetensors                  the projection's weight [dim, embed width]
  finetune.json                           settings, the run's path and config, the sha256 of its
                                          weights and of the pairs, the loss of every step, seconds;
                                          written last, so it marks a finished fine-tuning
A directory holding a finished fine-tuning of the same settings, run weights and pairs is loaded
instead of trained again; one holding another fine-tuning is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from fwbw.files import atomic_write, atomic_write_json, read_json, sha256_of
from fwbw.retrieval.bm25 import bm25_run
from fwbw.retrieval.encoder import EMBEDS, MARKERS, Encoder, check_blocks, check_embed
from fwbw.retrieval.maxsim import maxsim_matrix, repeat_last_token
from fwbw.retrieval.metrics import ranking
from fwbw.schema import check_fields, differences, from_mapping, require
from fwbw.training import checkpoint
from fwbw.training.config import TrainConfig
from fwbw.training.run_dir import (
    MODEL_WEIGHTS,
    SHOWN_DIFFERENCES,
    check_writable,
    finished_run_config,
)

SETTINGS_FILE = "finetune.json"
PROJECTION_FILE = "projection.safetensors"
WEIGHT_DECAY = 0.01  # AdamW's default
HARD_NEGATIVES = (None, "bm25")
LATER_FIELDS = {"markers": False}  # settings added later: what a fine-tuning from before had


@dataclass(frozen=True)
class FinetuneSettings:
    embed: str = "fwbw"
    blocks: int | None = None  # None: every block
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-4
    temperature: float = 0.05
    dim: int | None = None  # None: the embed's own dimensions
    seed: int = 0
    hard_negatives: str | None = None  # None, or "bm25" (bm25_hard_negatives)
    markers: bool = False  # each query and document read after its role's marker (encoder.MARKERS)

    def __post_init__(self) -> None:
        check_fields(self)
        require(self.embed in EMBEDS, "embed", f"must be one of {', '.join(EMBEDS)}, got {self.embed!r}")
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.batch_size >= 2, "batch_size", f"must be >= 2 (in-batch negatives), got {self.batch_size}")
        for name in ("lr", "temperature"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require(self.dim is None or self.dim >= 1, "dim", f"must be >= 1, got {self.dim}")
        require(self.hard_negatives in HARD_NEGATIVES, "hard_negatives",
                f"must be one of {', '.join(map(str, HARD_NEGATIVES))}, got {self.hard_negatives!r}")


def infonce_loss(
    encoder: Encoder, queries: Sequence[str], documents: Sequence[str], temperature: float, negatives: Sequence[str] = (),
    markers: bool = False,
) -> torch.Tensor:
    """The InfoNCE loss of pairs (queries[i], documents[i]), differentiable (module docstring); with
    markers each text read after its role's marker."""
    candidates = [*documents, *negatives]
    query_vectors, query_mask = encoder.embed_batch(queries, MARKERS["query"] if markers else None)
    document_vectors, document_mask = encoder.embed_batch(candidates, MARKERS["document"] if markers else None)
    scores = maxsim_matrix(query_vectors, repeat_last_token(document_vectors, document_mask.sum(dim=1)))
    logits = scores / query_mask.sum(dim=1, keepdim=True) / temperature
    logits = logits.masked_fill(false_negatives(queries, documents, candidates).to(logits.device), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device))


def false_negatives(queries: Sequence[str], documents: Sequence[str], candidates: Sequence[str]) -> torch.Tensor:
    """[queries, candidates]: whether candidate j is a positive of query i other than its own."""
    return torch.tensor([
        [j != i and (candidate == documents[i] or (j < len(queries) and queries[j] == queries[i]))
         for j, candidate in enumerate(candidates)]
        for i in range(len(queries))
    ])


def pair_batches(n_pairs: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of pair indices: epochs of a seeded shuffle, each cut into full batches (of
    every pair when there are fewer than batch_size)."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, n_pairs)
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = torch.randperm(n_pairs, generator=generator).tolist()
        batches += [order[start : start + size] for start in range(0, n_pairs - size + 1, size)]
    return batches[:steps]


def finetune(
    run_dir: Path,
    pairs: Sequence[tuple[str, str]],
    out_dir: Path,
    settings: FinetuneSettings = FinetuneSettings(),
    cache_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Encoder:
    """Fine-tune the finished run's encoder on (query, positive document) pairs, save it in out_dir
    and return it, an encoder like the zero-shot one."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = finished_run_config(run_dir)
    projection = initial_projection(config.width * len(check_embed(settings.embed, config)), settings.dim)
    check_blocks(settings.blocks, config)
    if not pairs:
        raise ValueError("fine-tuning needs at least one (query, document) pair")
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError(f"finetune out: {out_dir} is the run's own directory; give a folder of its own")
    check_writable(out_dir, "finetune out: ")
    identity = {
        "settings": dataclasses.asdict(settings),
        "run_weights_sha256": sha256_of(run_dir / MODEL_WEIGHTS),
        "pairs_sha256": hashlib.sha256(json.dumps(list(pairs)).encode()).hexdigest(),
    }
    if _finished_with(out_dir, identity):
        return load_finetuned(out_dir, cache_dir, device, progress)
    started = time.time()
    torch.manual_seed(settings.seed)
    model = checkpoint.load_model(run_dir)
    encoder = Encoder(model, config, settings.embed, "", settings.blocks, projection, device=device, progress=progress)
    negatives = bm25_hard_negatives(pairs) if settings.hard_negatives else None
    losses = _train(encoder, pairs, negatives, settings, progress)
    checkpoint.save_model(out_dir, model)
    weight = projection.weight.detach().cpu().contiguous()
    atomic_write(out_dir / PROJECTION_FILE, lambda tmp: save_file({"weight": weight}, str(tmp)))
    record = {**identity, "run": str(run_dir.resolve()), "config": config.to_dict(), "n_pairs": len(pairs),
              "losses": losses, "seconds": time.time() - started}
    atomic_write_json(out_dir / SETTINGS_FILE, record)
    return load_finetuned(out_dir, cache_dir, device, progress)


def bm25_hard_negatives(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """One hard negative per pair, from the pairs' own documents: the one BM25 ranks highest for the
    pair's query that is no positive of that query (no pair of the same query holds it), else the
    first such document; ValueError (one line) where every document is a positive of a query."""
    documents = list(dict.fromkeys(document for _, document in pairs))
    positives: dict[str, set[str]] = {}
    for query, document in pairs:
        positives.setdefault(query, set()).add(document)
    depth = max(map(len, positives.values())) + 1  # deep enough to hold a non-positive, where BM25 finds one
    corpus = {f"d{i}": document for i, document in enumerate(documents)}
    run = bm25_run(corpus, {f"q{i}": query for i, query in enumerate(positives)}, depth)
    negative = {}
    for i, query in enumerate(positives):
        ranked = (corpus[docid] for docid in ranking(run[f"q{i}"]))
        negative[query] = _first_other(itertools.chain(ranked, documents), positives[query], query)
    return [negative[query] for query, _ in pairs]


def _first_other(candidates: Iterable[str], positives: set[str], query: str) -> str:
    found = next((candidate for candidate in candidates if candidate not in positives), None)
    if found is None:
        raise ValueError(f"hard negatives: every document is a positive of the query {query!r}")
    return found


def initial_projection(embed_dim: int, dim: int | None) -> nn.Linear:
    """The projection of an embed of embed_dim dimensions to dim (None: embed_dim), as it starts:
    the identity, lossless; ValueError (one line) for a dim below embed_dim."""
    dim = embed_dim if dim is None else dim
    if dim < embed_dim:
        raise ValueError(f"dim: the embed has {embed_dim} dimensions, so a projection to {dim} could not start "
                         "lossless; give at least that or none")
    projection = nn.Linear(embed_dim, dim, bias=False)
    nn.init.eye_(projection.weight)
    return projection


def _finished_with(out_dir: Path, identity: dict) -> bool:
    """Whether out_dir holds the finished fine-tuning `identity` names; ValueError (one line) when
    it holds another, whose files are never replaced."""
    if not (out_dir / SETTINGS_FILE).is_file():
        return False
    record = read_json(out_dir / SETTINGS_FILE)
    saved = {key: record.get(key) for key in identity} if isinstance(record, dict) else {}
    if isinstance(saved.get("settings"), dict):
        saved["settings"] = {**LATER_FIELDS, **saved["settings"]}
    shown = differences(saved, identity, SHOWN_DIFFERENCES)
    if shown:
        raise ValueError(f"finetune out: {out_dir} holds another fine-tuning ({shown}); give another folder")
    return True


def _train(
    encoder: Encoder, pairs: Sequence[tuple[str, str]], negatives: Sequence[str] | None, settings: FinetuneSettings,
    progress: bool,
) -> list[float]:
    parameters = [*encoder.model.parameters(), *encoder.projection.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=WEIGHT_DECAY)
    encoder.model.train()
    losses: list[float] = []
    batches = pair_batches(len(pairs), settings.batch_size, settings.steps, settings.seed)
    with tqdm(batches, desc="fine-tune", unit="step", disable=not progress) as bar:
        for batch in bar:
            loss = infonce_loss(
                encoder, [pairs[i][0] for i in batch], [pairs[i][1] for i in batch], settings.temperature,
                [negatives[i] for i in batch] if negatives is not None else (), settings.markers,
            )
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"fine-tuning diverged at step {len(losses) + 1} (loss {loss.item()}); try a lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def load_finetuned(out_dir: Path, cache_dir: Path | None = None, device: str = "auto", progress: bool = True) -> Encoder:
    """The encoder a finished fine-tuning saved in out_dir; ValueError (one line) for a folder without one."""
    out_dir = Path(out_dir)
    if not (out_dir / SETTINGS_FILE).is_file():
        raise ValueError(f"{out_dir} holds no finished fine-tuning (no {SETTINGS_FILE})")
    record = read_json(out_dir / SETTINGS_FILE)
    settings = from_mapping(FinetuneSettings, record["settings"])
    config = TrainConfig.from_dict(record["config"])
    model = checkpoint.load_model(out_dir)
    weight = load_file(str(out_dir / PROJECTION_FILE))["weight"]
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    projection.load_state_dict({"weight": weight})
    weights_digest = sha256_of(out_dir / MODEL_WEIGHTS)
    return Encoder(model, config, settings.embed, weights_digest, settings.blocks, projection, cache_dir, device, progress)
