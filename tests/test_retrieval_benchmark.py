"""Retrieval benchmarks: the wiki-sample tasks (dev queries only from the LM's validation articles,
test queries only from its test articles, training pairs only from its training ones), BEIR folders
written and read back (and scored by BEIR's evaluator's rule), and task specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fwbw.data.corpora import wiki_sample_file
from fwbw.files import read_json
from fwbw.retrieval.beir import read_beir, write_beir
from fwbw.retrieval.benchmark import Benchmark, build_benchmark, lm_split, split_sentences
from fwbw.retrieval.bm25 import bm25_run
from fwbw.retrieval.metrics import evaluate, mean_metrics
from fwbw.retrieval.tasks import load_task, validate_task_spec

BIRDS = "Birds fly south. They eat seeds. Dr. Smith counted them in 1990."
ARTICLES = {  # by wiki-sample-v2's split: see test_the_fixture_splits_as_intended
    "Article 1": {"extract": "One sentence here. Another follows. A third ends it.", "description": "Family of birds"},
    "Article 2": {"extract": BIRDS, "description": "family of birds"},
    "Article 22": {"extract": "Only one sentence.", "description": "Family of birds"},
    "Article 3": {"extract": "A. B. Jones painted it. It hangs in Paris. It is large. People like it.", "description": "Painting"},
    "Article 4": {"extract": "Short. Text.", "description": ""},
    "Article 44": {"extract": "Python is a language.\nIt was made by Guido. It is popular!", "description": "Programming language"},
    "Article 9": {"extract": "Sparrows are small. They live in towns. Many nest in roofs.", "description": "Family of birds"},
    "Article 19": {"extract": "Rome was founded long ago.", "description": "Ancient city"},
}
HELD_OUT = ["Article 19", "Article 2", "Article 22", "Article 44", "Article 9"]  # the corpus, in title order
SPLITS = {"Article 2": "valid", "Article 22": "valid", "Article 44": "valid", "Article 9": "test", "Article 19": "test"}


def full_text(title: str) -> str:
    return f"{title}\n{ARTICLES[title]['extract']}"


def test_the_fixture_splits_as_intended():
    assert {title: lm_split(title) for title in ARTICLES} == {title: SPLITS.get(title, "train") for title in ARTICLES}


def test_description_asks_each_shared_description_once_and_marks_all_its_articles_relevant():
    dev, test = (build_benchmark("description", ARTICLES, split) for split in ("dev", "test"))
    assert dev.name == "description"
    assert list(dev.corpus) == [title.replace(" ", "_") for title in HELD_OUT]  # no training article
    assert dev.corpus == test.corpus == {title.replace(" ", "_"): full_text(title) for title in HELD_OUT}
    assert dev.titles == {title.replace(" ", "_"): title for title in HELD_OUT}
    assert dev.queries == {"q-Article_2": "family of birds", "q-Article_44": "Programming language"}
    assert dev.qrels == {  # case-insensitive; test articles too, training ones (Article 1) not in the corpus
        "q-Article_2": {"Article_2": 1, "Article_22": 1, "Article_9": 1},
        "q-Article_44": {"Article_44": 1},
    }
    # Article 9's description is asked on dev already: one test query
    assert (test.queries, test.qrels) == ({"q-Article_19": "Ancient city"}, {"q-Article_19": {"Article_19": 1}})
    # Article 1's description is asked, Article 4 has none: one training pair is left
    assert dev.train_pairs == test.train_pairs == (("Painting", full_text("Article 3")),)


def test_ict_removes_the_query_sentence_from_its_document_only_and_every_title():
    dev, test = (build_benchmark("ict", ARTICLES, split) for split in ("dev", "test"))
    assert dev.queries == {"q-Article_2": "Birds fly south.", "q-Article_44": "Python is a language."}  # chosen by title hash
    assert dev.qrels == {"q-Article_2": {"Article_2": 1}, "q-Article_44": {"Article_44": 1}}
    assert (test.queries, test.qrels) == ({"q-Article_9": "They live in towns."}, {"q-Article_9": {"Article_9": 1}})
    assert dev.corpus == test.corpus
    assert dev.corpus["Article_2"] == "They eat seeds. Dr. Smith counted them in 1990."
    assert dev.corpus["Article_44"] == "It was made by Guido. It is popular!"
    assert dev.corpus["Article_9"] == "Sparrows are small. Many nest in roofs."
    assert dev.corpus["Article_22"] == ARTICLES["Article 22"]["extract"]  # one sentence: no query, whole extract
    assert "Article_1" not in dev.corpus  # training articles give training pairs only
    assert dev.titles == {}
    queries, positives = zip(*dev.train_pairs)
    assert queries == ("Another follows.", "It is large.")  # Articles 1 and 3; Article 4 has 2 sentences
    assert positives == ("One sentence here. A third ends it.", "A. B. Jones painted it. It hangs in Paris. People like it.")
    assert test.train_pairs == dev.train_pairs


def test_title_queries_every_validation_or_test_article_against_extracts_alone():
    dev, test = (build_benchmark("title", ARTICLES, split) for split in ("dev", "test"))
    assert dev.queries == {"q-Article_2": "Article 2", "q-Article_22": "Article 22", "q-Article_44": "Article 44"}
    assert test.queries == {"q-Article_19": "Article 19", "q-Article_9": "Article 9"}
    assert dev.corpus == {title.replace(" ", "_"): ARTICLES[title]["extract"] for title in HELD_OUT}
    assert dev.train_pairs == tuple((t, ARTICLES[t]["extract"]) for t in ("Article 1", "Article 3", "Article 4"))


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


def test_the_wiki_sample_tasks_keep_dev_test_and_training_apart():
    articles = read_json(wiki_sample_file())
    titles = {title.replace(" ", "_"): title for title in articles}
    for task, n_dev, n_test, n_pairs in [("description", 985, 956, 7517), ("ict", 746, 741, 5882)]:
        dev, test = (build_benchmark(task, articles, split) for split in ("dev", "test"))
        assert (len(dev.corpus), len(dev.queries), len(test.queries), len(dev.train_pairs)) == (2031, n_dev, n_test, n_pairs)
        assert {lm_split(titles[docid]) for docid in dev.corpus} == {"valid", "test"}  # held-out articles alone
        assert (dev.corpus, dev.train_pairs) == (test.corpus, test.train_pairs)
        assert {lm_split(titles[qid.removeprefix("q-")]) for qid in dev.queries} == {"valid"}
        assert {lm_split(titles[qid.removeprefix("q-")]) for qid in test.queries} == {"test"}
        assert not set(dev.queries) & set(dev.corpus) and not set(test.queries) & set(test.corpus)
        asked = [*dev.queries.values(), *test.queries.values()]
        assert len(set(asked)) == len(asked) and not set(asked) & {query for query, _ in dev.train_pairs}
        relevant = {dev.corpus[docid] for qrels in (dev.qrels, test.qrels) for judged in qrels.values() for docid in judged}
        assert not relevant & {positive for _, positive in dev.train_pairs}


def test_an_unknown_task_is_refused_in_one_line():
    with pytest.raises(ValueError, match="task: unknown 'titles' .expected one of description, ict, title or beir:DIR"):
        validate_task_spec("titles")
    with pytest.raises(ValueError, match="'beir:DIR' needs a folder"):
        load_task("beir:", "test")
    with pytest.raises(ValueError, match="'titles' is not a wiki-sample task"):
        build_benchmark("titles", ARTICLES, "dev")
    with pytest.raises(ValueError, match="^split: expected one of dev, test, got 'valid'$"):
        build_benchmark("title", ARTICLES, "valid")


# --- BEIR folders ----------------------------------------------------------------------------


def test_a_benchmark_written_as_beir_reads_back_without_its_training_pairs(tmp_path):
    splits = {split: build_benchmark("description", ARTICLES, split) for split in ("dev", "test")}
    write_beir(splits, tmp_path / "out")
    header = "query-id\tcorpus-id\tscore"
    assert (tmp_path / "out/qrels/dev.tsv").read_text().splitlines()[:2] == [header, "q-Article_2\tArticle_2\t1"]
    assert (tmp_path / "out/qrels/test.tsv").read_text().splitlines() == [header, "q-Article_19\tArticle_19\t1"]
    first = json.loads((tmp_path / "out/corpus.jsonl").read_text().splitlines()[0])
    assert first == {"_id": "Article_19", "title": "Article 19", "text": ARTICLES["Article 19"]["extract"]}
    for split, bench in splits.items():
        back = read_beir(tmp_path / "out", split, name="description")
        assert back == Benchmark(bench.name, bench.corpus, bench.queries, bench.qrels, (), bench.titles)
        assert list(back.corpus) == [title.replace(" ", "_") for title in HELD_OUT]


def beir_evaluated(run: dict) -> dict:
    """The run as BEIR's EvaluateRetrieval scores it by default (ignore_identical_ids=True): each
    retrieved document whose id is the query's is dropped first."""
    return {qid: {docid: score for docid, score in scores.items() if docid != qid} for qid, scores in run.items()}


def ndcg(run: dict, qrels: dict) -> float:
    return mean_metrics(evaluate(run, qrels))["ndcg_at_10"]


@pytest.mark.parametrize("task", ["description", "ict", "title"])
def test_beirs_evaluator_rule_leaves_an_exported_tasks_scores_unchanged(tmp_path, task):
    """No exported query id is a document's, so BM25's nDCG@10, and a perfect run's, are the same
    under BEIR's rule (before, every query's id was its article's and BEIR dropped it)."""
    write_beir({split: build_benchmark(task, ARTICLES, split) for split in ("dev", "test")}, tmp_path / task)
    bm25_ndcg = {}
    for split in ("dev", "test"):
        bench = read_beir(tmp_path / task, split)
        perfect = {qid: dict.fromkeys(judged, 1.0) for qid, judged in bench.qrels.items()}
        bm25 = bm25_run(bench.corpus, bench.queries)
        assert ndcg(perfect, bench.qrels) == ndcg(beir_evaluated(perfect), bench.qrels) == 1
        bm25_ndcg[split] = ndcg(bm25, bench.qrels)
        assert ndcg(beir_evaluated(bm25), bench.qrels) == bm25_ndcg[split]
    if task == "description":  # BM25 ranks both dev queries' own articles first: BEIR dropped them before
        assert bm25_ndcg["dev"] > 0.5


def test_a_benchmark_sharing_ids_between_queries_and_documents_is_not_exported(tmp_path):
    shared = Benchmark("x", {"a": "A text.", "b": "B text."}, {"a": "a query"}, {"a": {"a": 1}})
    with pytest.raises(ValueError, match="^BEIR export: query id 'a' is also a document's or another query's id"):
        write_beir({"test": shared}, tmp_path / "out")
    with pytest.raises(ValueError, match="^BEIR export: the splits differ in their corpus; a folder holds one$"):
        write_beir({"dev": build_benchmark("ict", ARTICLES, "dev"), "test": build_benchmark("title", ARTICLES, "test")},
                   tmp_path / "out")
    assert not (tmp_path / "out").exists()


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
    folder = write_folder(tmp_path / "scifact", CORPUS, QUERIES, QRELS + "q3\t2\t-1\n")
    bench = load_task(f"beir:{folder}", "test")
    assert bench.name == f"beir:{folder}"
    assert bench.corpus == {"d1": "Aspirin\nA drug.", "2": "No title."}
    assert bench.titles == {"d1": "Aspirin"}
    assert bench.queries == {"q1": "what is aspirin", "q3": "x"}  # q2 has no judgement; file order kept
    assert bench.qrels == {"q1": {"d1": 2, "2": 1}, "q3": {"d1": 0, "2": -1}}  # any integer grade, as BEIR reads
    assert bench.train_pairs == ()


def test_a_beir_folders_dev_qrels_give_its_dev_split_and_without_them_nothing_is_tuned(tmp_path):
    folder = write_folder(tmp_path / "scifact", CORPUS, QUERIES, QRELS)
    with pytest.raises(ValueError, match=f"^{folder}/qrels/dev.tsv: missing: the set has no dev queries, so nothing "
                                         "can be tuned on it .its test only reports.$"):
        load_task(f"beir:{folder}", "dev")
    (folder / "qrels/dev.tsv").write_text("query-id\tcorpus-id\tscore\nq2\t2\t1\n")
    assert load_task(f"beir:{folder}", "dev").qrels == {"q2": {"2": 1}}


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
        (CORPUS, QUERIES, QRELS + "q1\td1\t1.5\n", r"test.tsv line 5: expected query-id, corpus-id and an integer score, tab-separated"),
        (CORPUS, QUERIES, QRELS + "q1 d1 1\n", r"test.tsv line 5: expected query-id, corpus-id and an integer score, tab-separated"),
        (CORPUS, QUERIES, "q1\td1\t1\n", r"test.tsv line 1: expected the header"),
        (CORPUS, QUERIES, "query-id\tcorpus-id\tscore\n", r"test.tsv: no judgements"),
    ],
)
def test_a_malformed_beir_folder_names_the_file_and_line(tmp_path, corpus, queries, qrels, message):
    folder = write_folder(tmp_path / "bad", corpus, queries, qrels)
    with pytest.raises(ValueError, match=message):
        read_beir(folder, "test")


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
def test_a_beir_folder_missing_a_file_is_refused(tmp_path, missing):
    folder = write_folder(tmp_path / "bad", CORPUS, QUERIES, QRELS)
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=f"{missing}: missing .a BEIR folder holds corpus.jsonl, queries.jsonl"):
        read_beir(folder, "test")
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        read_beir(tmp_path / "nowhere", "test")
