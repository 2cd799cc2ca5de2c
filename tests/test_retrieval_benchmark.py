"""Retrieval benchmarks: the wiki-sample tasks (queries only from validation articles, training
pairs only from training ones), BEIR folders written and read back, and task specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fwbw.data.corpora import is_valid_article, wiki_sample_file
from fwbw.files import read_json
from fwbw.retrieval.beir import read_beir, write_beir
from fwbw.retrieval.benchmark import Benchmark, build_benchmark, split_sentences
from fwbw.retrieval.tasks import load_task, validate_task_spec

BIRDS = "Birds fly south. They eat seeds. Dr. Smith counted them in 1990."
ARTICLES = {  # "Article 2", "Article 22" and "Article 44" are validation articles, the rest training
    "Article 1": {"extract": "One sentence here. Another follows. A third ends it.", "description": "Family of birds"},
    "Article 2": {"extract": BIRDS, "description": "family of birds"},
    "Article 22": {"extract": "Only one sentence.", "description": "Family of birds"},
    "Article 3": {"extract": "A. B. Jones painted it. It hangs in Paris. It is large. People like it.", "description": "Painting"},
    "Article 4": {"extract": "Short. Text.", "description": ""},
    "Article 44": {"extract": "Python is a language.\nIt was made by Guido. It is popular!", "description": "Programming language"},
}
ORDER = ["Article_1", "Article_2", "Article_22", "Article_3", "Article_4", "Article_44"]
VALID = {"Article 2", "Article 22", "Article 44"}


def full_text(title: str) -> str:
    return f"{title}\n{ARTICLES[title]['extract']}"


def test_the_fixture_splits_as_intended():
    assert {title for title in ARTICLES if is_valid_article(title)} == VALID


def test_description_asks_each_shared_description_once_and_marks_all_its_articles_relevant():
    bench = build_benchmark("description", ARTICLES)
    assert bench.name == "description"
    assert list(bench.corpus) == ORDER
    assert bench.corpus == {title.replace(" ", "_"): full_text(title) for title in ARTICLES}
    assert bench.queries == {"Article_2": "family of birds", "Article_44": "Programming language"}
    assert bench.qrels == {
        "Article_2": {"Article_1": 1, "Article_2": 1, "Article_22": 1},  # case-insensitive, training articles too
        "Article_44": {"Article_44": 1},
    }
    # Article 1's description is asked, Article 4 has none: one training pair is left
    assert bench.train_pairs == (("Painting", full_text("Article 3")),)


def test_ict_removes_the_query_sentence_from_its_document_only():
    bench = build_benchmark("ict", ARTICLES)
    assert bench.queries == {"Article_2": "Birds fly south.", "Article_44": "Python is a language."}  # chosen by title hash
    assert bench.qrels == {"Article_2": {"Article_2": 1}, "Article_44": {"Article_44": 1}}
    assert bench.corpus["Article_2"] == "Article 2\nThey eat seeds. Dr. Smith counted them in 1990."
    assert bench.corpus["Article_44"] == "Article 44\nIt was made by Guido. It is popular!"
    assert bench.corpus["Article_22"] == full_text("Article 22")  # one sentence: no query, whole document
    assert bench.corpus["Article_1"] == full_text("Article 1")  # training articles keep their sentences
    queries, positives = zip(*bench.train_pairs)
    assert queries == ("Another follows.", "It is large.")  # Articles 1 and 3; Article 4 has 2 sentences
    assert positives == ("Article 1\nOne sentence here. A third ends it.", "Article 3\nA. B. Jones painted it. It hangs in Paris. People like it.")


def test_title_queries_every_validation_article_against_extracts_alone():
    bench = build_benchmark("title", ARTICLES)
    assert bench.queries == {"Article_2": "Article 2", "Article_22": "Article 22", "Article_44": "Article 44"}
    assert bench.corpus == {title.replace(" ", "_"): ARTICLES[title]["extract"] for title in ARTICLES}
    assert bench.train_pairs == tuple((t, ARTICLES[t]["extract"]) for t in ("Article 1", "Article 3", "Article 4"))


@pytest.mark.parametrize(
    "text, sentences",
    [
        (BIRDS, ["Birds fly south. ", "They eat seeds. ", "Dr. Smith counted them in 1990."]),
        ("J. R. R. Tolkien wrote. The U.S. Army (est. 1775) won.", ["J. R. R. Tolkien wrote. ", "The U.S. Army (est. 1775) won."]),
        ('He said "Go." Then left.\n\n1990 was a year? Yes', ['He said "Go." ', "Then left.\n\n", "1990 was a year? ", "Yes"]),
        ("It grew 3.5 times. then more", ["It grew 3.5 times. then more"]),
        ("", []),
    ],
)
def test_sentences_end_at_stops_before_a_capital_unless_an_abbreviation_precedes(text, sentences):
    assert split_sentences(text) == sentences
    assert "".join(split_sentences(text)) == text


def test_the_wiki_sample_tasks_keep_evaluation_and_training_apart():
    articles = read_json(wiki_sample_file())
    for task, n_queries, n_pairs in [("description", 496, 9192), ("ict", 360, 7009)]:
        bench = build_benchmark(task, articles)
        assert (len(bench.corpus), len(bench.queries), len(bench.train_pairs)) == (10033, n_queries, n_pairs)
        assert all(is_valid_article(articles[qid.replace("_", " ")]["title"]) for qid in bench.queries)
        assert not set(bench.queries.values()) & {query for query, _ in bench.train_pairs}
        relevant = {bench.corpus[docid] for judged in bench.qrels.values() for docid in judged}
        assert not relevant & {positive for _, positive in bench.train_pairs}


def test_an_unknown_task_is_refused_in_one_line():
    with pytest.raises(ValueError, match="task: unknown 'titles' .expected one of description, ict, title or beir:DIR"):
        validate_task_spec("titles")
    with pytest.raises(ValueError, match="'beir:DIR' needs a folder"):
        load_task("beir:")
    with pytest.raises(ValueError, match="'titles' is not a wiki-sample task"):
        build_benchmark("titles", ARTICLES)


# --- BEIR folders ----------------------------------------------------------------------------


def test_a_benchmark_written_as_beir_reads_back_without_its_training_pairs(tmp_path):
    bench = build_benchmark("description", ARTICLES)
    write_beir(bench, tmp_path / "out")
    assert (tmp_path / "out/qrels/test.tsv").read_text().splitlines()[:2] == [
        "query-id\tcorpus-id\tscore",
        "Article_2\tArticle_1\t1",
    ]
    first = json.loads((tmp_path / "out/corpus.jsonl").read_text().splitlines()[0])
    assert first == {"_id": "Article_1", "title": "", "text": full_text("Article 1")}
    back = read_beir(tmp_path / "out", name="description")
    assert back == Benchmark(bench.name, bench.corpus, bench.queries, bench.qrels)
    assert list(back.corpus) == ORDER


def write_folder(folder: Path, corpus: str, queries: str, qrels: str) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(corpus)
    (folder / "queries.jsonl").write_text(queries)
    (folder / "qrels/test.tsv").write_text(qrels)
    return folder


CORPUS = '{"_id": "d1", "title": "Aspirin", "text": "A drug."}\n\n{"_id": 2, "text": "No title."}\n'
QUERIES = '{"_id": "q1", "text": "what is aspirin"}\n{"_id": "q2", "text": "not judged"}\n{"_id": "q3", "text": "x"}\n'
QRELS = "query-id\tcorpus-id\tscore\nq3\td1\t0\nq1\td1\t2\nq1\t2\t1\n"


def test_a_beir_folder_on_disk_is_read_as_a_task(tmp_path):
    folder = write_folder(tmp_path / "scifact", CORPUS, QUERIES, QRELS)
    bench = load_task(f"beir:{folder}")
    assert bench.name == f"beir:{folder}"
    assert bench.corpus == {"d1": "Aspirin\nA drug.", "2": "No title."}
    assert bench.queries == {"q1": "what is aspirin", "q3": "x"}  # q2 has no judgement; file order kept
    assert bench.qrels == {"q1": {"d1": 2, "2": 1}, "q3": {"d1": 0}}
    assert bench.train_pairs == ()


@pytest.mark.parametrize(
    "corpus, queries, qrels, message",
    [
        (CORPUS + "{oops\n", QUERIES, QRELS, r"corpus.jsonl: not valid JSON .* at line 4"),
        (CORPUS + '{"text": "x"}\n', QUERIES, QRELS, r"corpus.jsonl line 4: not an object with an _id"),
        (CORPUS + '{"_id": "d1", "text": "x"}\n', QUERIES, QRELS, r"corpus.jsonl line 4: _id 'd1' repeats"),
        (CORPUS + '{"_id": "d 9", "text": "x"}\n', QUERIES, QRELS, r"corpus.jsonl line 4 _id: 'd 9' is not an id"),
        (CORPUS + '{"_id": "d9", "text": 5}\n', QUERIES, QRELS, r"corpus.jsonl line 4: 'text' is missing or not a string"),
        (CORPUS + '{"_id": "d9", "text": "x", "title": 5}\n', QUERIES, QRELS, r"corpus.jsonl line 4: title must be a string"),
        ("\n", QUERIES, QRELS, r"corpus.jsonl: no records"),
        (CORPUS, '{"_id": "q1"}\n', QRELS, r"queries.jsonl line 1: 'text' is missing"),
        (CORPUS, QUERIES, QRELS + "q9\td1\t1\n", r"test.tsv line 5: query 'q9' is not in queries.jsonl"),
        (CORPUS, QUERIES, QRELS + "q1\td9\t1\n", r"test.tsv line 5: document 'd9' is not in corpus.jsonl"),
        (CORPUS, QUERIES, QRELS + "q1\td1\t1\n", r"test.tsv line 5: query 'q1' and document 'd1' are judged twice"),
        (CORPUS, QUERIES, QRELS + "q1\td1\t1.5\n", r"test.tsv line 5: expected query-id, corpus-id and an integer score >= 0, tab-separated"),
        (CORPUS, QUERIES, QRELS + "q1 d1 1\n", r"test.tsv line 5: expected query-id, corpus-id and an integer score >= 0, tab-separated"),
        (CORPUS, QUERIES, "q1\td1\t1\n", r"test.tsv line 1: expected the header"),
        (CORPUS, QUERIES, "query-id\tcorpus-id\tscore\n", r"test.tsv: no judgements"),
    ],
)
def test_a_malformed_beir_folder_names_the_file_and_line(tmp_path, corpus, queries, qrels, message):
    folder = write_folder(tmp_path / "bad", corpus, queries, qrels)
    with pytest.raises(ValueError, match=message):
        read_beir(folder)


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
def test_a_beir_folder_missing_a_file_is_refused(tmp_path, missing):
    folder = write_folder(tmp_path / "bad", CORPUS, QUERIES, QRELS)
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=f"{missing}: missing .a BEIR folder holds corpus.jsonl, queries.jsonl"):
        read_beir(folder)
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        read_beir(tmp_path / "nowhere")
