"""Retrieval benchmarks built from wiki-sample's articles (title, extract, description).

Every article is one document, in title order; its docid is its title with spaces as underscores,
as in a Wikipedia address ("2001:_A_Space_Odyssey"). The tasks follow the LM's splits of
wiki-sample-v2 (fwbw.data.corpora.wiki_sample_split): queries come only from its validation
articles (split "dev") or its test articles (split "test"), training pairs (query, positive
document) only from its training articles, so contrastive fine-tuning never sees an evaluated
query or its document, and a choice made on dev never sees a test query. The corpus is the
held-out articles alone (validation and test: 2,031 of wiki-sample-v2's 10,033), so every
document, like every relevant one, is text no run trained on: a model cannot find the relevant
document by its being unfamiliar. A query's qid is "q-" and the docid of the article it comes from,
so no qid is a docid (BEIR's evaluator drops a retrieved document whose id is the query's). The
corpus and the training pairs are the same for both splits.

Tasks:
  description  query = the article's short description ("Family of birds"); every held-out article
               with the same description (compared case-insensitively) is relevant, and one query is asked
               per distinct description, by the first validation or test article that has it (in
               title order), in that article's split. Articles without a description give no query;
               training articles whose description is asked give no training pair. Documents are
               "title\nextract".
  ict          inverse cloze (Lee et al. 2019): query = one sentence of the extract of an article
               with at least 3 sentences, chosen by a hash of the title; that article's document
               loses the sentence. Documents are the extract alone: the title, which many of the
               sentences name, would give the query's article away.
  title        query = the title; every document is the extract alone (a sanity task).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fwbw.data.corpora import wiki_sample_file, wiki_sample_split
from fwbw.files import read_json
from fwbw.retrieval.metrics import Qrels
from fwbw.schema import is_integer

TASKS = ("description", "ict", "title")
LM_CORPUS = "wiki-sample-v2"  # the corpus whose splits the tasks follow, and the only one their runs may train on
QUERY_SPLITS = {"dev": "valid", "test": "test"}  # a task's query split -> the LM's split its queries come from
SPLITS = tuple(QUERY_SPLITS)
QUERY_PREFIX = "q-"
ICT_MIN_SENTENCES = 3

# a sentence ends at . ! or ? (and any closing quotes or brackets), then whitespace, then a capital,
# a digit or an opening quote or bracket; unless the word before the stop is an abbreviation
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr prof gen col lt mt no vs est ca approx vol pp fig".split())


@dataclass(frozen=True)
class Benchmark:
    name: str
    corpus: dict[str, str]  # docid -> document text, in corpus order
    queries: dict[str, str]  # qid -> query text, for the qids of the qrels, in their order
    qrels: Qrels  # qid -> {docid: relevance}, relevance an int (>= 1 is relevant)
    train_pairs: tuple[tuple[str, str], ...] = ()  # (query, positive document text)
    titles: dict[str, str] = field(default_factory=dict)  # docid -> the title its text starts with, if any


@dataclass(frozen=True)
class _Example:
    """What an article contributes as a query: the query and the article's document beside it."""

    query: str
    document: str


@dataclass(frozen=True)
class _Task:
    example: Callable[[dict], _Example | None]  # None: the article gives no query or training pair
    document: Callable[[dict], str]  # the article's document when it gives no query
    group: Callable[[dict], str]  # the articles of one group are all relevant to its query
    titled: bool  # whether every document starts with its title line


def article_docid(title: str) -> str:
    return re.sub(r"\s", "_", title)


def check_id(value: object, what: str) -> str:
    """An id as a string; ValueError unless it is a non-empty string (or int) without whitespace,
    as run files (qid Q0 docid rank score system) need."""
    if is_integer(value):
        value = str(value)
    if not isinstance(value, str) or not value or re.search(r"\s", value):
        raise ValueError(f"{what}: {value!r} is not an id (a non-empty string without whitespace)")
    return value


def query_id(title: str) -> str:
    return QUERY_PREFIX + article_docid(title)


def lm_split(title: str) -> str:
    """The split of the LM's corpus (LM_CORPUS) that holds the article: train, valid or test."""
    return wiki_sample_split(title, LM_CORPUS)


def load_wiki_task(task: str, split: str) -> Benchmark:
    """The task's queries of one split (dev or test) over wiki-sample's held-out articles."""
    return build_benchmark(task, read_json(wiki_sample_file()), split)


def build_benchmark(task: str, articles: Mapping[str, Mapping[str, str]], split: str) -> Benchmark:
    """The task's queries of one split over articles {title: {"extract": ..., "description": ...}}
    (wiki-sample's layout)."""
    if task not in TASKS:
        raise ValueError(f"{task!r} is not a wiki-sample task ({', '.join(TASKS)})")
    check_split(split)
    spec = _TASKS[task]
    records = {title: {**articles[title], "title": title} for title in sorted(articles)}
    examples = {title: spec.example(record) for title, record in records.items()}
    groups: dict[str, list[str]] = {}
    for title, record in records.items():
        groups.setdefault(spec.group(record), []).append(title)
    asked = {}  # group -> the validation or test article whose example is the group's query
    for title, example in examples.items():
        if example is not None and lm_split(title) != "train":
            asked.setdefault(spec.group(records[title]), title)
    askers = set(asked.values())
    held_out = [title for title in records if lm_split(title) != "train"]
    corpus = {
        article_docid(title): examples[title].document if title in askers else spec.document(records[title])
        for title in held_out
    }
    if len(corpus) < len(held_out):
        raise ValueError(f"task {task}: two titles give the same docid")
    train_pairs = tuple(
        (example.query, example.document)
        for title, example in examples.items()
        if example is not None and lm_split(title) == "train" and spec.group(records[title]) not in asked
    )
    chosen = {group: title for group, title in asked.items() if lm_split(title) == QUERY_SPLITS[split]}
    return Benchmark(
        name=task,
        corpus=corpus,
        queries={query_id(title): examples[title].query for title in chosen.values()},
        qrels={query_id(title): {docid: 1 for docid in map(article_docid, groups[g]) if docid in corpus}
               for g, title in chosen.items()},
        train_pairs=train_pairs,
        titles={article_docid(title): title for title in held_out} if spec.titled else {},
    )


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")


def split_sentences(text: str) -> list[str]:
    """The text cut into sentences, each with the whitespace that follows it, so that the pieces
    join back into the text."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        words = text[start : match.start()].split()
        if words and _is_abbreviation(words[-1]):
            continue
        pieces.append(text[start : match.end()])
        start = match.end()
    return [*pieces, text[start:]] if text[start:] else pieces


def _is_abbreviation(word: str) -> bool:
    """An initial ("J", "U.S") or a title such as "Dr" before a full stop."""
    last = word.split(".")[-1].lstrip("\"'“‘([")
    return len(last) == 1 and last.isalpha() or last.lower() in _ABBREVIATIONS


def _full_text(article: Mapping[str, str]) -> str:
    return f"{article['title']}\n{article['extract']}"


def _extract(article: Mapping[str, str]) -> str:
    return article["extract"]


def _description_example(article: Mapping[str, str]) -> _Example | None:
    description = article.get("description", "").strip()
    return _Example(description, _full_text(article)) if description else None


def _ict_example(article: Mapping[str, str]) -> _Example | None:
    sentences = split_sentences(article["extract"].strip())
    if len(sentences) < ICT_MIN_SENTENCES:
        return None
    digest = hashlib.sha256(f"ict:{article['title']}".encode()).digest()
    chosen = int.from_bytes(digest[:8], "big") % len(sentences)
    rest = "".join(sentences[:chosen] + sentences[chosen + 1 :]).strip()
    return _Example(sentences[chosen].strip(), rest)


def _title_example(article: Mapping[str, str]) -> _Example:
    return _Example(article["title"], _extract(article))


def _title_of(article: Mapping[str, str]) -> str:
    return article["title"]


_TASKS = {
    "description": _Task(
        _description_example, _full_text, lambda article: article.get("description", "").strip().casefold(), True
    ),
    "ict": _Task(_ict_example, _extract, _title_of, False),
    "title": _Task(_title_example, _extract, _title_of, False),
}
