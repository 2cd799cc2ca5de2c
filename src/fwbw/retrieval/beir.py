"""Benchmarks in BEIR's folder format, written and read.

  corpus.jsonl     {"_id": docid, "title": ..., "text": ...} per line
  queries.jsonl    {"_id": qid, "text": ...} per line
  qrels/dev.tsv    "query-id<TAB>corpus-id<TAB>score" header, then one judgement per line: the dev
  qrels/test.tsv   queries' (what choices are made on) and the test queries' (what is reported)

A document's text is "title\ntext" when its title is not empty, else its text; a benchmark's
titled documents (Benchmark.titles) are written so. A score is any integer, as BEIR reads it (>= 1:
relevant). Only the queries that the split's qrels judge are read (a BEIR queries file may hold
others). BEIR's evaluator drops a retrieved document whose id is the query's, so a benchmark whose
query ids are also document ids is not written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from fwbw.files import atomic_write_text, read_jsonl_numbered, read_text
from fwbw.retrieval.benchmark import SPLITS, Benchmark, check_id, check_split

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_HEADER = "query-id\tcorpus-id\tscore"
_LAYOUT = f"a BEIR folder holds {CORPUS_FILE}, {QUERIES_FILE} and qrels/<split>.tsv"


def qrels_file(split: str) -> str:
    return f"qrels/{split}.tsv"


def beir_splits(folder: Path) -> tuple[str, ...]:
    """The splits whose qrels the folder holds."""
    return tuple(split for split in SPLITS if (Path(folder) / qrels_file(split)).is_file())


def write_beir(splits: Mapping[str, Benchmark], out_dir: Path) -> None:
    """Write the corpus, the queries of every split and each split's qrels (not the training pairs)
    under out_dir; the splits ({split: benchmark}) share one corpus.

    Each file is written whole or not at all; the qrels go last, so a folder whose writing stopped
    midway fails to read instead of mixing two benchmarks.
    """
    out_dir = Path(out_dir)
    first = _check_writable(splits)
    for split in SPLITS:
        (out_dir / qrels_file(split)).unlink(missing_ok=True)
    documents = ({"_id": docid, **_title_and_text(first, docid)} for docid in first.corpus)
    atomic_write_text(out_dir / CORPUS_FILE, _jsonl(documents))
    queries = ({"_id": qid, "text": text} for benchmark in splits.values() for qid, text in benchmark.queries.items())
    atomic_write_text(out_dir / QUERIES_FILE, _jsonl(queries))
    for split, benchmark in splits.items():
        rows = [f"{qid}\t{docid}\t{rel}" for qid, judged in benchmark.qrels.items() for docid, rel in judged.items()]
        atomic_write_text(out_dir / qrels_file(split), "\n".join([QRELS_HEADER, *rows]) + "\n")


def _check_writable(splits: Mapping[str, Benchmark]) -> Benchmark:
    """The first split's benchmark; ValueError (one line) unless the splits share one corpus and no
    query id is another query's or a document's."""
    if not splits:
        raise ValueError("BEIR export: no split to write")
    for split in splits:
        check_split(split)
    first = next(iter(splits.values()))
    if any((b.corpus, b.titles) != (first.corpus, first.titles) for b in splits.values()):
        raise ValueError("BEIR export: the splits differ in their corpus; a folder holds one")
    taken = set(first.corpus)
    for qid in (qid for benchmark in splits.values() for qid in benchmark.queries):
        if qid in taken:
            raise ValueError(f"BEIR export: query id {qid!r} is also a document's or another query's id "
                             "(BEIR's evaluator drops a document whose id is the query's)")
        taken.add(qid)
    return first


def _title_and_text(benchmark: Benchmark, docid: str) -> dict[str, str]:
    """A document's title and the text after it (its whole text when it has no title)."""
    text, title = benchmark.corpus[docid], benchmark.titles.get(docid, "")
    if title and not text.startswith(f"{title}\n"):
        raise ValueError(f"BEIR export: document {docid!r} does not start with its title {title!r}")
    return {"title": title, "text": text.removeprefix(f"{title}\n") if title else text}


def _jsonl(records) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def read_beir(folder: Path, split: str, name: str | None = None) -> Benchmark:
    """The benchmark of one split (dev or test) in a BEIR folder (named `name`, else "beir:FOLDER"),
    without training pairs.

    Raises ValueError (one line, naming the file and line) for a missing file, a line that is not
    JSON or lacks a field, a repeated id, or a judgement of an unknown query or document.
    """
    folder = Path(folder)
    check_split(split)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder ({_LAYOUT})")
    if split == "dev" and not (folder / qrels_file(split)).is_file():
        raise ValueError(f"{folder / qrels_file(split)}: missing: the set has no dev queries, so nothing can be "
                         "tuned on it (its test only reports)")
    corpus = _read_records(folder / CORPUS_FILE, "text", optional=("title",))
    documents = {docid: f"{title}\n{text}" if title else text for docid, (text, title) in corpus.items()}
    questions = {qid: text for qid, (text,) in _read_records(folder / QUERIES_FILE, "text").items()}
    qrels = _read_qrels(folder / qrels_file(split), questions, documents)
    queries = {qid: text for qid, text in questions.items() if qid in qrels}
    titles = {docid: title for docid, (_, title) in corpus.items() if title}
    return Benchmark(name or f"beir:{folder}", documents, queries, {qid: qrels[qid] for qid in queries}, (), titles)


def _read_records(path: Path, required: str, optional: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """{_id: (required field, optional fields ("" when absent))} of a BEIR jsonl file."""
    _require_file(path)
    records: dict[str, tuple[str, ...]] = {}
    for line, record in read_jsonl_numbered(path):
        where = f"{path} line {line}"
        if not isinstance(record, dict) or "_id" not in record:
            raise ValueError(f"{where}: not an object with an _id")
        key = check_id(record["_id"], f"{where} _id")
        if key in records:
            raise ValueError(f"{where}: _id {key!r} repeats an earlier line's")
        if not isinstance(record.get(required), str):
            raise ValueError(f"{where}: {required!r} is missing or not a string")
        extras = tuple(record.get(name) or "" for name in optional)
        if not all(isinstance(extra, str) for extra in extras):
            raise ValueError(f"{where}: {', '.join(optional)} must be a string")
        records[key] = (record[required], *extras)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _read_qrels(path: Path, queries: dict[str, str], documents: dict[str, str]) -> dict[str, dict[str, int]]:
    _require_file(path)
    lines = read_text(path).splitlines()
    if not lines or lines[0].strip() != QRELS_HEADER:
        raise ValueError(f"{path} line 1: expected the header {QRELS_HEADER!r}")
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        fields = line.split("\t")
        if len(fields) != 3 or not re.fullmatch(r"-?[0-9]+", fields[2].strip()):
            raise ValueError(f"{where}: expected query-id, corpus-id and an integer score, tab-separated")
        qid, docid, score = fields[0].strip(), fields[1].strip(), int(fields[2])
        if qid not in queries:
            raise ValueError(f"{where}: query {qid!r} is not in {QUERIES_FILE}")
        if docid not in documents:
            raise ValueError(f"{where}: document {docid!r} is not in {CORPUS_FILE}")
        if docid in qrels.setdefault(qid, {}):
            raise ValueError(f"{where}: query {qid!r} and document {docid!r} are judged twice")
        qrels[qid][docid] = score
    if not qrels:
        raise ValueError(f"{path}: no judgements")
    return qrels


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{path}: missing ({_LAYOUT})")
