"""One retrieval experiment: one system evaluated on one task into a result directory, resumably.

Systems (System.name):
  bm25                  fwbw.retrieval.bm25, Anserini's setting (k1 0.9, b 0.4)
  late-interaction      a finished run's token embeddings (embed fw | bw | fwbw, optionally after its
                        first `blocks` blocks; fwbw.retrieval.encoder) scored by MaxSim
  single-vector-mean    one vector per text from the same states, mean-pooled or the last token's
  single-vector-last    (encoder.POOLINGS), scored by their cosine
A run's system is zero-shot, or with finetune_steps > 0 first fine-tuned (seeded by finetune_seed,
with BM25 hard negatives or none) on the benchmark's training pairs (fwbw.retrieval.finetune) into
its own folder. Each query keeps its TREC_DEPTH best documents. A task is evaluated on one split of
its queries: dev, what choices are made on, or test, what is reported. The wiki-sample tasks take
only runs trained on the corpus whose splits they follow (benchmark.LM_CORPUS): any other's
training text may hold their queries.

A result directory holds run_files' files (metrics.json written last: a finished result) and
  settings.json   what the result is of, written before any work: task, split, system, embed,
                  blocks, pooling, finetune_steps and settings, the run's weights' sha256 (and, not
                  compared, the run's path)
  timings.json    seconds to load or fine-tune the encoder, to encode the corpus (corpus_encoded:
                  false when every direction came from the token cache) and the queries, to search,
                  and per query (encoding the query and searching); BM25's: to index and search, and
                  that per query
A directory whose metrics.json exists for the same settings is skipped; one that holds another
result, or other files and no settings.json, is refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwbw.files import atomic_write_json, read_json, sha256_of
from fwbw.retrieval.benchmark import LM_CORPUS, TASKS, Benchmark, check_split
from fwbw.retrieval.bm25 import bm25_run
from fwbw.retrieval.encoder import (
    POOLINGS,
    Encoder,
    TokenEmbeddings,
    check_blocks,
    check_embed,
    load_encoder,
)
from fwbw.retrieval.finetune import FinetuneSettings, finetune
from fwbw.retrieval.maxsim import maxsim_search
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


@dataclass(frozen=True)
class System:
    """What retrieves: BM25 (run None), or a finished run's embeddings (see the module docstring)."""

    run: Path | None = None
    embed: str | None = None  # fw | bw | fwbw, for a run
    blocks: int | None = None  # None: every block
    pooling: str | None = None  # None: late interaction over every token
    finetune_steps: int = 0
    finetune_seed: int = 0
    hard_negatives: str | None = None  # None, or "bm25"

    @property
    def name(self) -> str:
        if self.run is None:
            return BM25
        return LATE_INTERACTION if self.pooling is None else f"{SINGLE_VECTOR}-{self.pooling}"

    def finetune_settings(self) -> FinetuneSettings:
        return FinetuneSettings(embed=self.embed, blocks=self.blocks, steps=self.finetune_steps, seed=self.finetune_seed,
                                hard_negatives=self.hard_negatives)


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
    if system.pooling is not None and system.pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {', '.join(POOLINGS)}, got {system.pooling!r}")
    if system.run is None:
        given = [name for name in ("embed", "blocks", "pooling") if getattr(system, name) is not None]
        if given or system.finetune_steps:
            raise ValueError(f"bm25 takes no {', '.join(given) or 'fine-tuning'}: those choose a run's embeddings")
        return None
    config = finished_run(system.run)
    if system.embed is None:
        raise ValueError("embed: a run's system needs one of fw, bw, fwbw")
    check_embed(system.embed, config)
    check_blocks(system.blocks, config)
    check_training_data(task, config, system.run)
    return config


def check_training_data(task: str, config: TrainConfig, run: Path) -> None:
    """ValueError (one line) for a run whose training text may hold a wiki-sample task's queries:
    one trained on any corpus but LM_CORPUS."""
    if task in TASKS and config.data != LM_CORPUS:
        raise ValueError(f"task {task}: {run} trained on {config.data}, whose training text may hold the task's "
                         f"queries; the wiki-sample tasks take runs trained on {LM_CORPUS}")


def identity(task: str, split: str, system: System, config: TrainConfig | None) -> dict[str, Any]:
    """What makes two results the same: settings.json's compared fields."""
    return {
        "task": task,
        "split": split,
        "system": system.name,
        "embed": system.embed,
        "blocks": None if config is None else check_blocks(system.blocks, config),
        "pooling": system.pooling,
        "finetune_steps": system.finetune_steps,
        "finetune": dataclasses.asdict(system.finetune_settings()) if system.finetune_steps else None,
        "top_k": TREC_DEPTH,
        "run_weights_sha256": None if system.run is None else sha256_of(Path(system.run) / MODEL_WEIGHTS),
    }


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
    shown = differences({key: saved.get(key) for key in wanted} if isinstance(saved, dict) else {}, wanted,
                        SHOWN_DIFFERENCES)
    if shown:
        raise ValueError(f"out: {out_dir} holds the retrieval result of other settings ({shown}); give another --out")
    return (out_dir / METRICS_FILE).is_file()


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
        run, timings = _embedded(benchmark, system, finetune_dir, cache_dir, device, progress)
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
              progress: bool):
    """The run of a system of a run's embeddings, and its timings."""
    ticks = [time.time()]
    if system.finetune_steps:
        encoder = finetune(system.run, benchmark.train_pairs, finetune_dir, system.finetune_settings(),
                           cache_dir=cache_dir, device=device, progress=progress)
    else:
        encoder = load_encoder(system.run, system.embed, system.blocks, cache_dir, device, progress)
    ticks.append(time.time())
    cached_before = _cache_files(cache_dir)
    documents = _encode(encoder, benchmark.corpus, system.pooling)
    corpus_encoded = cache_dir is None or _cache_files(cache_dir) != cached_before
    ticks.append(time.time())
    queries = _encode(encoder, benchmark.queries, system.pooling)
    ticks.append(time.time())
    run = maxsim_search(queries, documents, TREC_DEPTH, device=str(encoder.device))
    ticks.append(time.time())
    prepare, corpus, query, search = (b - a for a, b in zip(ticks, ticks[1:]))
    return run, {
        "prepare_seconds": prepare, "encode_corpus_seconds": corpus, "corpus_encoded": corpus_encoded,
        "encode_queries_seconds": query, "search_seconds": search,
        "seconds_per_query": (query + search) / len(benchmark.queries),
    }


def _encode(encoder: Encoder, texts: Mapping[str, str], pooling: str | None) -> TokenEmbeddings:
    return encoder.encode(texts) if pooling is None else encoder.encode_pooled(texts, pooling)


def _cache_files(cache_dir: Path | None) -> set[str]:
    return {path.name for path in Path(cache_dir).glob("*.safetensors")} if cache_dir and Path(cache_dir).is_dir() else set()


def read_experiment(out_dir: Path) -> dict[str, Any]:
    """A finished result as one record: metrics.json, settings.json's fields and timings.json."""
    out_dir = Path(out_dir)
    settings = read_json(out_dir / SETTINGS_FILE) if (out_dir / SETTINGS_FILE).is_file() else {}
    timings = read_json(out_dir / TIMINGS_FILE) if (out_dir / TIMINGS_FILE).is_file() else {}
    shown = {key: settings.get(key) for key in ("split", "blocks", "pooling")}
    return {**shown, **timings, **read_json(out_dir / METRICS_FILE)}
