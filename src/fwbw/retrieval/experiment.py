"""One retrieval experiment: one system evaluated on one task into a result directory, resumably.

Systems (System.name):
  bm25                  fwbw.retrieval.bm25, Anserini's setting (k1 0.9, b 0.4)
  late-interaction      a finished run's token embeddings (embed fw | bw | fwbw | echo | around,
                        optionally after its first `blocks` blocks, a long text in overlapping chunks
                        of chunk_tokens, each query with query_fillers fillers (zero-shot only),
                        with markers each query and document read after its role's marker;
                        fwbw.retrieval.encoder) scored by MaxSim
  single-vector-mean    one vector per text from the same states, mean-pooled or the last token's
  single-vector-last    (encoder.POOLINGS), scored by their cosine
  rerank-bm25           BM25's `rerank` best documents of each query ordered by the run's score of
                        them (any of the above), its candidates (BM25's and the run's score of each)
                        kept in candidates.csv (fwbw.retrieval.fusion)
  fusion-bm25           the same candidates ordered by a convex combination of both scores
                        (fusion.fuse), its weight tuned (fusion.tune_weight) on `fuse_from`: the
                        finished rerank-bm25 result of the same system on the task's dev queries
The embed fwfw is fwbw's matched control (fwbw.retrieval.ensemble): the fw views of the run and of
`partner`, a second run of the same setting, zero-shot. Similarities are computed in
`maxsim_dtype` (fp32, or bf16: maxsim.maxsim_search).
A run's system is zero-shot, or with finetune_steps > 0 first fine-tuned (seeded by finetune_seed,
with BM25 hard negatives or none) on the benchmark's training pairs (fwbw.retrieval.finetune) into
its own folder. Each query keeps its TREC_DEPTH best documents. A task is evaluated on one split of
its queries: dev, what choices are made on, or test, what is reported. The wiki-sample tasks take
only runs trained on the corpus whose splits they follow (benchmark.LM_CORPUS): any other's
training text may hold their queries.

A result directory holds run_files' files (metrics.json written last: a finished result) and
  settings.json   what the result is of, written before any work: task, split, system, embed,
                  blocks, chunk_tokens (the length used, the default's too), query_fillers, markers, pooling,
                  finetune_steps and settings, rerank, the fusion weight, maxsim_dtype, the run's
                  (and the partner's) weights' sha256 (and, not compared, the run's path)
  timings.json    seconds to load or fine-tune the encoder, to encode the corpus (corpus_encoded:
                  false when every view came from the token cache) and the queries, to search,
                  and per query (encoding the query and searching); BM25's: to index and search, and
                  that per query
A directory whose metrics.json exists for the same settings (a field added since it was written
taken at its default: LATER_FIELDS) is skipped; one that holds another
result (one from before chunking, which cut texts to the context and has no chunk_tokens, too), or
other files and no settings.json, is refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fwbw.data.corpora import load_corpus_tokenizer
from fwbw.files import atomic_write_json, read_json, sha256_of
from fwbw.retrieval.benchmark import LM_CORPUS, TASKS, Benchmark, check_split
from fwbw.retrieval.bm25 import bm25_run
from fwbw.retrieval.encoder import (
    EMBEDS,
    MARKERS,
    Encoder,
    TokenEmbeddings,
    check_blocks,
    check_chunk_tokens,
    check_embed,
    check_fillers,
    check_pooling,
    load_encoder,
)
from fwbw.retrieval.ensemble import CONTROL_EMBED, load_paired_encoder
from fwbw.retrieval.finetune import LATER_FIELDS as FINETUNE_LATER_FIELDS
from fwbw.retrieval.finetune import FinetuneSettings, finetune
from fwbw.retrieval.fusion import (
    CANDIDATES_FILE,
    TUNING_SPLIT,
    fuse,
    read_candidates,
    rerank,
    tune_weight,
    write_candidates,
)
from fwbw.retrieval.maxsim import maxsim_candidates, maxsim_search
from fwbw.retrieval.run_files import METRICS_FILE, TREC_DEPTH, write_result
from fwbw.retrieval.tasks import BEIR_PREFIX, load_task, validate_task_spec
from fwbw.schema import differences
from fwbw.training.config import TrainConfig
from fwbw.training.run_dir import (
    MODEL_WEIGHTS,
    SHOWN_DIFFERENCES,
    STATUS,
    check_writable,
    finished_run_config,
    read_status,
)

SETTINGS_FILE = "settings.json"
TIMINGS_FILE = "timings.json"
FINETUNED = "finetuned"  # a result directory's fine-tuning folder, unless given another
BM25 = "bm25"
LATE_INTERACTION = "late-interaction"
SINGLE_VECTOR = "single-vector"
RERANK, FUSION = "rerank-bm25", "fusion-bm25"
MAXSIM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LATER_FIELDS = {"query_fillers": 0, "markers": False}  # settings.json fields added later: what a result from before had


@dataclass(frozen=True)
class System:
    """What retrieves: BM25 (run None), or a finished run's embeddings (see the module docstring)."""

    run: Path | None = None
    embed: str | None = None  # fw | bw | fwbw | echo, for a run
    blocks: int | None = None  # None: every block
    pooling: str | None = None  # None: late interaction over every token
    finetune_steps: int = 0
    finetune_seed: int = 0
    hard_negatives: str | None = None  # None, or "bm25"
    chunk_tokens: int | None = None  # a long text's chunk length; None: encoder.check_chunk_tokens's default
    partner: Path | None = None  # embed fwfw's second run
    rerank: int | None = None  # rerank BM25's this many best documents of each query
    fuse_from: Path | None = None  # fuse with BM25, the weight tuned on this dev rerank result
    maxsim_dtype: str = "fp32"
    query_fillers: int = 0  # filler tokens read with each query chunk (encoder: query fillers)
    markers: bool = False  # each query and document read after its role's marker (encoder.MARKERS)

    @property
    def name(self) -> str:
        if self.run is None:
            return BM25
        if self.rerank is not None:
            return RERANK if self.fuse_from is None else FUSION
        return LATE_INTERACTION if self.pooling is None else f"{SINGLE_VECTOR}-{self.pooling}"

    @property
    def encoder_embed(self) -> str:
        """The embed each run's encoder makes: fw for fwfw, whose two fw views are combined."""
        return "fw" if self.embed == CONTROL_EMBED else self.embed

    def finetune_settings(self) -> FinetuneSettings:
        return FinetuneSettings(embed=self.embed, blocks=self.blocks, steps=self.finetune_steps, seed=self.finetune_seed,
                                hard_negatives=self.hard_negatives, markers=self.markers)

    def marker(self, role: str) -> str | None:
        """The marker text a text of `role` (query, document) is read after; None without markers."""
        return MARKERS[role] if self.markers else None


@dataclass(frozen=True)
class Outcome:
    metrics: dict[str, Any]  # metrics.json
    skipped: bool  # True: the directory held this finished result already


def canonical_task(spec: str) -> str:
    """The task spec as results record it: a BEIR folder by its absolute path."""
    validate_task_spec(spec)
    if not spec.startswith(BEIR_PREFIX):
        return spec
    return BEIR_PREFIX + str(Path(spec.removeprefix(BEIR_PREFIX)).expanduser().resolve())


def finished_run(run_dir: Path) -> TrainConfig:
    """The config of a run that has finished; ValueError (one line) for a directory that is not a run,
    has no trained model, or whose sweep status is not done (it is still being cut or sampled, or failed)."""
    config = finished_run_config(run_dir)
    if (Path(run_dir) / STATUS).exists():
        status = read_status(run_dir, corrupt_is_pending=False)["status"]
        if status != "done":
            raise ValueError(f"{run_dir}: the run's status is {status}, not done: it has not finished")
    return config


def check_system(system: System, task: str) -> TrainConfig | None:
    """The run's config (None for BM25); ValueError (one line) for a system that cannot be evaluated
    on the task."""
    if system.finetune_steps < 0:
        raise ValueError(f"finetune steps: expected >= 0, got {system.finetune_steps}")
    tuning = [name for name, value in (("finetune seed", system.finetune_seed),
                                       ("hard negatives", system.hard_negatives)) if value]
    if tuning and not system.finetune_steps:
        raise ValueError(f"{tuning[0]}: a zero-shot system (finetune steps 0) is not fine-tuned")
    check_query_fillers(system.query_fillers, system.finetune_steps, system.pooling, system.encoder_embed)
    if system.maxsim_dtype not in MAXSIM_DTYPES:
        raise ValueError(f"maxsim dtype: expected one of {', '.join(MAXSIM_DTYPES)}, got {system.maxsim_dtype!r}")
    check_hybrid(system)
    if system.run is None:
        given = [name for name in ("embed", "blocks", "pooling", "chunk_tokens", "partner", "rerank")
                 if getattr(system, name) is not None]
        given += [name for name, value in (("query fillers", system.query_fillers), ("markers", system.markers)) if value]
        if given or system.finetune_steps:
            raise ValueError(f"bm25 takes no {', '.join(given) or 'fine-tuning'}: those choose a run's embeddings")
        return None
    config = finished_run(system.run)
    if system.embed is None:
        raise ValueError(f"embed: a run's system needs one of {', '.join([*EMBEDS, CONTROL_EMBED])}")
    check_partner(system, task, config)
    check_embed(system.encoder_embed, config)
    check_blocks(system.blocks, config)
    check_framing(system, check_chunk_tokens(system.chunk_tokens, system.encoder_embed, config), config)
    check_training_data(task, config, system.run)
    return config


def check_query_fillers(fillers: int, finetune_steps: int, pooling: str | None, embed: str | None) -> None:
    """ValueError (one line) for a negative number of query fillers, fillers with fine-tuning or
    pooling, or a pooling the embed does not allow."""
    if fillers < 0:
        raise ValueError(f"query fillers: expected 0 or more, got {fillers}")
    if fillers and finetune_steps:
        raise ValueError("query fillers: zero-shot only (fine-tuning reads its queries without them)")
    check_pooling(pooling, embed, fillers)


def check_framing(system: System, chunk_tokens: int, config: TrainConfig) -> None:
    """ValueError (one line) where the query fillers and the markers leave a chunk under 2 tokens."""
    tokenizer = load_corpus_tokenizer(config.data, config.tokenizer, progress=False) if system.markers else None
    for role in ("query", "document"):
        marker = system.marker(role)
        fillers = system.query_fillers if role == "query" else 0
        check_fillers(fillers, chunk_tokens, len(tokenizer.encode(marker)) if marker else 0)


def check_partner(system: System, task: str, config: TrainConfig) -> None:
    """ValueError (one line) unless a partner run is given exactly for the fwfw control, zero-shot,
    and can embed the task at the same blocks."""
    if (system.embed == CONTROL_EMBED) != (system.partner is not None):
        raise ValueError(f"partner: the {CONTROL_EMBED} embed takes a second run (--partner), and only it")
    if system.partner is None:
        return
    if system.finetune_steps:
        raise ValueError(f"embed {CONTROL_EMBED}: a zero-shot control (finetune steps 0)")
    if Path(system.partner).resolve() == Path(system.run).resolve():
        raise ValueError(f"partner: {system.partner} is the run itself; give a second run of the same setting")
    partner = finished_run(system.partner)
    shown = differences({k: v for k, v in partner.to_dict().items() if k != "seed"},
                        {k: v for k, v in config.to_dict().items() if k != "seed"}, SHOWN_DIFFERENCES)
    if shown:
        raise ValueError(f"partner: {system.partner} is not a run of the same setting ({shown}); give another seed's run")
    if sha256_of(Path(system.partner) / MODEL_WEIGHTS) == sha256_of(Path(system.run) / MODEL_WEIGHTS):
        raise ValueError(f"partner: {system.partner} holds the run's own weights; give a second run of the same setting")
    check_blocks(system.blocks, partner)
    check_chunk_tokens(system.chunk_tokens, "fw", partner)
    check_training_data(task, partner, system.partner)


def check_hybrid(system: System) -> None:
    """ValueError (one line) for a rerank depth below 1 or a fusion without a rerank."""
    if system.rerank is not None and not 1 <= system.rerank <= TREC_DEPTH:
        raise ValueError(f"rerank: expected 1..{TREC_DEPTH} of BM25's best documents, got {system.rerank}")
    if system.fuse_from is not None and system.rerank is None:
        raise ValueError("fuse from: a fusion fuses a rerank's candidates; give rerank too")
    if system.fuse_from is not None and not (Path(system.fuse_from) / METRICS_FILE).is_file():
        raise ValueError(f"fuse from: {system.fuse_from} holds no finished retrieval result: run the rerank on the "
                         f"{TUNING_SPLIT} queries first")


def check_training_data(task: str, config: TrainConfig, run: Path) -> None:
    """ValueError (one line) for a run whose training text may hold a wiki-sample task's queries:
    one trained on any corpus but LM_CORPUS."""
    if task in TASKS and config.data != LM_CORPUS:
        raise ValueError(f"task {task}: {run} trained on {config.data}, whose training text may hold the task's "
                         f"queries; the wiki-sample tasks take runs trained on {LM_CORPUS}")


def identity(task: str, split: str, system: System, config: TrainConfig | None) -> dict[str, Any]:
    """What makes two results the same: settings.json's compared fields."""
    fields = {
        "task": task,
        "split": split,
        "system": system.name,
        "embed": system.embed,
        "blocks": None if config is None else check_blocks(system.blocks, config),
        "chunk_tokens": None if config is None else check_chunk_tokens(system.chunk_tokens, system.encoder_embed, config),
        "query_fillers": system.query_fillers,
        "markers": system.markers,
        "pooling": system.pooling,
        "finetune_steps": system.finetune_steps,
        "finetune": dataclasses.asdict(system.finetune_settings()) if system.finetune_steps else None,
        "top_k": TREC_DEPTH,
        "rerank": system.rerank,
        "fusion_weight": None,
        "maxsim_dtype": system.maxsim_dtype,
        "run_weights_sha256": None if system.run is None else sha256_of(Path(system.run) / MODEL_WEIGHTS),
        "partner_weights_sha256": None if system.partner is None else sha256_of(Path(system.partner) / MODEL_WEIGHTS),
    }
    if system.fuse_from is not None:
        fields["fusion_weight"] = fusion_weight(system, task, fields)
    return fields


def fusion_weight(system: System, task: str, fused: Mapping[str, Any]) -> float:
    """The fusion weight tuned on system.fuse_from, a finished rerank-bm25 result of the same system
    (every field of `fused`, the fusion's identity, but its split, system and weight) on the task's dev
    queries; ValueError (one line) for any other folder."""
    source = Path(system.fuse_from)
    settings = read_json(source / SETTINGS_FILE) if (source / SETTINGS_FILE).is_file() else None
    if not (source / METRICS_FILE).is_file() or not isinstance(settings, dict):
        raise ValueError(f"fuse from: {source} holds no finished retrieval result")
    wanted = {**fused, "split": TUNING_SPLIT, "system": RERANK, "fusion_weight": None}
    shown = differences(saved_fields(settings, wanted), wanted, SHOWN_DIFFERENCES)
    if shown:
        raise ValueError(f"fuse from: {source} is not this system's rerank on the dev queries ({shown})")
    weight, _ = tune_weight(read_candidates(source / CANDIDATES_FILE), load_task(task, TUNING_SPLIT).qrels,
                            split=settings["split"])
    return weight


def finished_with(out_dir: Path, wanted: Mapping[str, Any]) -> bool:
    """Whether out_dir holds the finished result `wanted` names; ValueError (one line) when it holds
    another result, or files and no settings.json (never overwritten)."""
    out_dir = Path(out_dir)
    path = out_dir / SETTINGS_FILE
    if not path.is_file():
        others = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
        if others:
            raise ValueError(f"out: {out_dir} holds other files ({', '.join(others[:SHOWN_DIFFERENCES])}) and no "
                             f"retrieval result ({SETTINGS_FILE}): give a new or empty folder")
        return False
    saved = read_json(path)
    shown = differences(saved_fields(saved, wanted) if isinstance(saved, dict) else {}, wanted, SHOWN_DIFFERENCES)
    if shown:
        raise ValueError(f"out: {out_dir} holds the retrieval result of other settings ({shown}); give another --out")
    return (out_dir / METRICS_FILE).is_file()


def saved_fields(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `wanted` in a saved settings.json, a field added since it was written (LATER_FIELDS,
    and finetune.LATER_FIELDS within its fine-tuning's) at its default."""
    fields = {key: saved.get(key, LATER_FIELDS.get(key)) for key in wanted}
    if isinstance(fields.get("finetune"), dict):
        fields["finetune"] = {**FINETUNE_LATER_FIELDS, **fields["finetune"]}
    return fields


def run_retrieval(
    out_dir: Path,
    task: str,
    split: str,
    system: System,
    finetune_dir: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    benchmark: Benchmark | None = None,
) -> Outcome:
    """Evaluate `system` on the split (dev or test) of `task` into out_dir, unless it holds this
    finished result already.

    finetune_dir: where a fine-tuning is saved (default out_dir/finetuned), loaded again when it
    holds the same one; cache_dir: the encoder's fp16 token cache (None: no cache); benchmark: the
    task's split, when the caller has loaded it already."""
    out_dir = Path(out_dir)
    task = canonical_task(task)
    check_split(split)
    config = check_system(system, task)
    wanted = identity(task, split, system, config)
    if finished_with(out_dir, wanted):
        return Outcome(read_json(out_dir / METRICS_FILE), skipped=True)
    check_writable(out_dir, "out: ")
    benchmark = load_task(task, split) if benchmark is None else benchmark
    if system.finetune_steps and not benchmark.train_pairs:
        raise ValueError(f"task {task} has no training pairs to fine-tune on (the wiki-sample tasks have them)")
    run_path = None if system.run is None else str(Path(system.run).resolve())
    atomic_write_json(out_dir / SETTINGS_FILE, {**wanted, "run": run_path})
    started = time.time()
    if system.run is None:
        run, timings = _bm25(benchmark)
    else:
        finetune_dir = out_dir / FINETUNED if finetune_dir is None else finetune_dir
        run, timings = _embedded(benchmark, system, finetune_dir, cache_dir, device, progress, out_dir)
    atomic_write_json(out_dir / TIMINGS_FILE, timings)
    metrics = write_result(
        out_dir, task=task, system=system.name, embed=system.embed, finetune_steps=system.finetune_steps, run=run,
        qrels=benchmark.qrels, n_docs=len(benchmark.corpus), seconds=time.time() - started,
    )
    return Outcome(metrics, skipped=False)


def _bm25(benchmark: Benchmark):
    started = time.time()
    run = bm25_run(benchmark.corpus, benchmark.queries, TREC_DEPTH)
    seconds = time.time() - started
    return run, {"search_seconds": seconds, "seconds_per_query": seconds / len(benchmark.queries)}


def _embedded(benchmark: Benchmark, system: System, finetune_dir: Path, cache_dir: Path | None, device: str,
              progress: bool, out_dir: Path):
    """The run of a system of a run's embeddings, and its timings."""
    ticks = [time.time()]
    if system.finetune_steps:
        encoder = finetune(system.run, benchmark.train_pairs, finetune_dir, system.finetune_settings(),
                           cache_dir=cache_dir, device=device, progress=progress).chunked(system.chunk_tokens)
    elif system.partner is not None:
        encoder = load_paired_encoder(system.run, system.partner, system.blocks, cache_dir, device, progress,
                                      system.chunk_tokens)
    else:
        encoder = load_encoder(system.run, system.embed, system.blocks, cache_dir, device, progress, system.chunk_tokens)
    ticks.append(time.time())
    cached_before = _cache_files(cache_dir)
    documents = _encode(encoder, benchmark.corpus, system.pooling, marker=system.marker("document"))
    corpus_encoded = cache_dir is None or _cache_files(cache_dir) != cached_before
    ticks.append(time.time())
    queries = _encode(encoder, benchmark.queries, system.pooling, system.query_fillers, system.marker("query"))
    ticks.append(time.time())
    dtype, device = MAXSIM_DTYPES[system.maxsim_dtype], str(encoder.device)
    if system.rerank is None:
        run = maxsim_search(queries, documents, TREC_DEPTH, device=device, dtype=dtype)
    else:
        run = _hybrid(benchmark, system, queries, documents, device, dtype, out_dir)
    ticks.append(time.time())
    prepare, corpus, query, search = (b - a for a, b in zip(ticks, ticks[1:]))
    return run, {
        "prepare_seconds": prepare, "encode_corpus_seconds": corpus, "corpus_encoded": corpus_encoded,
        "encode_queries_seconds": query, "search_seconds": search,
        "seconds_per_query": (query + search) / len(benchmark.queries),
    }


def _hybrid(benchmark: Benchmark, system: System, queries: TokenEmbeddings, documents: TokenEmbeddings, device: str,
            dtype: torch.dtype, out_dir: Path) -> dict:
    """The rerank (or fusion) of BM25's system.rerank best documents, its candidates written to out_dir."""
    bm25 = bm25_run(benchmark.corpus, benchmark.queries, system.rerank)
    dense = maxsim_candidates(queries, documents, {qid: list(scores) for qid, scores in bm25.items()}, device, dtype)
    candidates = {qid: {docid: (score, dense[qid][docid]) for docid, score in scores.items()} for qid, scores in bm25.items()}
    write_candidates(out_dir / CANDIDATES_FILE, candidates)
    if system.fuse_from is None:
        return rerank(candidates)
    return fuse(candidates, read_json(out_dir / SETTINGS_FILE)["fusion_weight"])


def _encode(encoder: Encoder, texts: Mapping[str, str], pooling: str | None, fillers: int = 0,
            marker: str | None = None) -> TokenEmbeddings:
    return encoder.encode(texts, fillers, marker) if pooling is None else encoder.encode_pooled(texts, pooling, marker)


def _cache_files(cache_dir: Path | None) -> set[str]:
    return {path.name for path in Path(cache_dir).glob("*.safetensors")} if cache_dir and Path(cache_dir).is_dir() else set()


def read_experiment(out_dir: Path) -> dict[str, Any]:
    """A finished result as one record: metrics.json, settings.json's fields and timings.json."""
    out_dir = Path(out_dir)
    settings = read_json(out_dir / SETTINGS_FILE) if (out_dir / SETTINGS_FILE).is_file() else {}
    timings = read_json(out_dir / TIMINGS_FILE) if (out_dir / TIMINGS_FILE).is_file() else {}
    shown = {key: settings.get(key, LATER_FIELDS.get(key)) for key in ("split", "blocks", "chunk_tokens", "query_fillers",
                                                                     "markers", "pooling", "rerank", "fusion_weight",
                                                                     "maxsim_dtype")}
    return {**shown, "variant": variant(settings), **timings, **read_json(out_dir / METRICS_FILE)}


def variant(settings: Mapping[str, Any]) -> str:
    """How a result's system ran beyond its system, embed, blocks and fine-tuning steps, in words
    ('chunks 127, bm25 negatives, top 100, bf16'; '' for BM25): results compared with each other
    share it."""
    finetune = settings.get("finetune") or {}
    parts = [
        f"chunks {settings['chunk_tokens']}" if settings.get("chunk_tokens") is not None else None,
        f"{settings['query_fillers']} query fillers" if settings.get("query_fillers") else None,
        "markers" if settings.get("markers") else None,
        f"finetune seed {finetune['seed']}" if finetune.get("seed") else None,
        f"{finetune['hard_negatives']} negatives" if finetune.get("hard_negatives") else None,
        f"top {settings['rerank']}" if settings.get("rerank") is not None else None,
        settings.get("maxsim_dtype") if settings.get("maxsim_dtype") not in (None, "fp32") else None,
    ]
    return ", ".join(part for part in parts if part)
