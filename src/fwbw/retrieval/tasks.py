"""Task specs: "description", "ict" or "title" (wiki-sample tasks, fwbw.retrieval.benchmark) or
"beir:DIR" (a BEIR folder on disk, fwbw.retrieval.beir)."""

from __future__ import annotations

from pathlib import Path

from fwbw.retrieval.beir import read_beir
from fwbw.retrieval.benchmark import TASKS, Benchmark, load_wiki_task

BEIR_PREFIX = "beir:"


def validate_task_spec(spec: str) -> None:
    """Raise ValueError (one line) unless spec names a wiki-sample task or beir:DIR with a DIR."""
    if spec in TASKS:
        return
    if not spec.startswith(BEIR_PREFIX):
        raise ValueError(f"task: unknown {spec!r} (expected one of {', '.join(TASKS)} or beir:DIR)")
    if not spec.removeprefix(BEIR_PREFIX):
        raise ValueError("task: 'beir:DIR' needs a folder, e.g. beir:./scifact")


def load_task(spec: str) -> Benchmark:
    """The benchmark a task spec names (named by the spec)."""
    validate_task_spec(spec)
    if spec in TASKS:
        return load_wiki_task(spec)
    return read_beir(Path(spec.removeprefix(BEIR_PREFIX)).expanduser(), name=spec)
