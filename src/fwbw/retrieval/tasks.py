"""Task specs: "description", "ict" or "title" (wiki-sample tasks, fwbw.retrieval.benchmark) or
"beir:DIR" (a BEIR folder on disk, fwbw.retrieval.beir); each asks its queries in split "dev"
(what choices are made on) or "test" (what is reported)."""

from __future__ import annotations

from pathlib import Path

from fwbw.retrieval.beir import beir_splits, read_beir
from fwbw.retrieval.benchmark import SPLITS, TASKS, Benchmark, load_wiki_task

BEIR_PREFIX = "beir:"


def validate_task_spec(spec: str) -> None:
    """Raise ValueError (one line) unless spec names a wiki-sample task or beir:DIR with a DIR."""
    if spec in TASKS:
        return
    if not spec.startswith(BEIR_PREFIX):
        raise ValueError(f"task: unknown {spec!r} (expected one of {', '.join(TASKS)} or beir:DIR)")
    if not spec.removeprefix(BEIR_PREFIX):
        raise ValueError("task: 'beir:DIR' needs a folder, e.g. beir:./scifact")


def load_task(spec: str, split: str) -> Benchmark:
    """The benchmark of one split (dev or test) that a task spec names (named by the spec)."""
    validate_task_spec(spec)
    if spec in TASKS:
        return load_wiki_task(spec, split)
    return read_beir(_folder(spec), split, name=spec)


def task_splits(spec: str) -> tuple[str, ...]:
    """The splits the task has queries of: both for a wiki-sample task, a BEIR folder's qrels' splits."""
    validate_task_spec(spec)
    return SPLITS if spec in TASKS else beir_splits(_folder(spec))


def _folder(spec: str) -> Path:
    return Path(spec.removeprefix(BEIR_PREFIX)).expanduser()
