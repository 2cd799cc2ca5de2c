"""`fwbw retrieval` and `fwbw retrieval-data`: BM25, one finished run and every finished run of a sweep
evaluated into result directories whose metrics trec_eval's files reproduce, resumed without
encoding again, refused for other settings, and bad input in one line."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_dirs, sentence
from test_retrieval_encoder import finished_runs

from fwbw import cli
from fwbw.cli import main
from fwbw.data.corpora import load_corpus_tokenizer
from fwbw.retrieval import experiment
from fwbw.retrieval.beir import read_beir, write_beir
from fwbw.retrieval.benchmark import Benchmark
from fwbw.retrieval.encoder import MARKERS, Encoder
from fwbw.retrieval.metrics import evaluate, mean_metrics
from fwbw.retrieval.run_files import read_trec_qrels, read_trec_run
from fwbw.study.results import RETRIEVAL_COLUMNS, RETRIEVAL_PHASE
from fwbw.study.retrieval_sweep import Plan, plan_jobs, result_name
from fwbw.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

RESULT_FILES = {"metrics.json", "run.trec", "qrels.trec", "per_query.csv", "settings.json", "timings.json"}


def tiny_benchmark(train_pairs: tuple = ()) -> Benchmark:
    """24 sentences as documents; 6 queries, each the first four words of one of them."""
    rng = random.Random(11)
    corpus = {f"d{i}": sentence(rng) for i in range(24)}
    queries = {f"q{i}": " ".join(corpus[f"d{4 * i}"].split()[:4]) for i in range(6)}
    return Benchmark("tiny", corpus, queries, {f"q{i}": {f"d{4 * i}": 1} for i in range(6)}, train_pairs)


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("beir") / "tiny"
    write_beir({"test": tiny_benchmark()}, folder)
    return folder


@pytest.fixture(scope="module")
def run(finished) -> Path:
    return finished_runs(finished)["plain"]  # depth 3, width 16, p_bw 0.5


@pytest.fixture
def encoded(monkeypatch) -> list[tuple[str, int]]:
    """(direction, number of texts) of every encoding the encoder computes (not read from its cache);
    their framings in encoded.framings."""
    calls = Encodings()
    original = Encoder._encode_direction

    def counting(self, tokens, direction, framing):
        calls.append((direction, len(tokens)))
        calls.framings.append(framing)
        return original(self, tokens, direction, framing)

    monkeypatch.setattr(Encoder, "_encode_direction", counting)
    return calls


class Encodings(list):
    framings: list

    def __init__(self):
        super().__init__()
        self.framings = []


def recomputed(result: Path) -> dict[str, float]:
    return mean_metrics(evaluate(read_trec_run(result / "run.trec"), read_trec_qrels(result / "qrels.trec")))


def metrics_of(result: Path) -> dict:
    return json.loads((result / "metrics.json").read_text())


def assert_metrics_reproduced(result: Path) -> dict:
    metrics = metrics_of(result)
    assert {path.name for path in result.iterdir()} >= RESULT_FILES
    assert recomputed(result) == {name: metrics[name] for name in recomputed(result)}
    return metrics


def test_bm25_end_to_end_then_skipped(beir, tmp_path, capsys):
    out = tmp_path / "bm25"
    command = ["retrieval", "--bm25", "--task", f"beir:{beir}", "--split", "test", "--out", str(out), "--no-progress"]
    assert main(command) == 0
    metrics = assert_metrics_reproduced(out)
    assert {k: metrics[k] for k in ("task", "system", "embed", "finetune_steps", "n_queries", "n_docs")} == {
        "task": f"beir:{beir.resolve()}", "system": "bm25", "embed": None, "finetune_steps": 0, "n_queries": 6,
        "n_docs": 24}
    assert metrics["ndcg_at_10"] > 0.9  # the query's words are its document's first words
    assert json.loads((out / "settings.json").read_text())["split"] == "test"
    assert capsys.readouterr().out.startswith(f"{out}: ndcg_at_10 {metrics['ndcg_at_10']:.4f}  mrr_at_10 ")
    assert main(command) == 0
    assert capsys.readouterr().out.endswith("(6 queries, 24 documents; finished before, skipped)\n")


@pytest.mark.parametrize("pooling, system", [(None, "late-interaction"), ("mean", "single-vector-mean")])
def test_a_run_end_to_end(run, beir, pooling, system, tmp_path):
    out = tmp_path / "result"
    flags = ["--pooling", pooling] if pooling else []
    assert main(["retrieval", str(run), "--task", f"beir:{beir}", "--split", "test", "--embed", "fw", *flags, "--out",
                 str(out), "--no-progress"]) == 0
    metrics = assert_metrics_reproduced(out)
    assert (metrics["system"], metrics["embed"], metrics["n_queries"]) == (system, "fw", 6)
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["run"], settings["blocks"], settings["pooling"]) == (str(run.resolve()), 3, pooling)
    timings = json.loads((out / "timings.json").read_text())
    assert timings["corpus_encoded"] is True
    assert timings["seconds_per_query"] == pytest.approx(
        (timings["encode_queries_seconds"] + timings["search_seconds"]) / 6)
    assert len(list((out / "cache").glob("fw-blocks3-*.safetensors"))) == 2  # the corpus and the queries


def test_a_second_call_encodes_nothing_and_a_shared_cache_encodes_each_direction_once(run, beir, tmp_path, encoded,
                                                                                       monkeypatch):
    cache = tmp_path / "cache"
    base = ["--task", f"beir:{beir}", "--split", "test", "--cache-dir", str(cache), "--no-progress"]
    assert main(["retrieval", str(run), "--embed", "fw", "--out", str(tmp_path / "fw"), *base]) == 0
    assert encoded == [("fw", 24), ("fw", 6)]
    first = (tmp_path / "fw" / "run.trec").read_text()
    with monkeypatch.context() as patch:
        patch.setattr(experiment, "load_encoder", lambda *args: pytest.fail("loaded the run again"))
        assert main(["retrieval", str(run), "--embed", "fw", "--out", str(tmp_path / "fw"), *base]) == 0
    assert len(encoded) == 2  # skipped: nothing loaded or encoded
    assert main(["retrieval", str(run), "--embed", "fwbw", "--out", str(tmp_path / "fwbw"), *base]) == 0
    assert encoded[2:] == [("bw", 24), ("bw", 6)]  # fw read from the cache
    assert json.loads((tmp_path / "fwbw" / "timings.json").read_text())["corpus_encoded"] is True
    assert (tmp_path / "fw" / "run.trec").read_text() == first


def test_the_around_embed_and_query_fillers_end_to_end(run, beir, tmp_path, encoded):
    base = ["--task", f"beir:{beir}", "--split", "test", "--no-progress"]
    assert main(["retrieval", str(run), "--embed", "around", "--out", str(tmp_path / "around"), *base]) == 0
    assert_metrics_reproduced(tmp_path / "around")
    assert main(["retrieval", str(run), "--embed", "fwbw", "--query-fillers", "3", "--out", str(tmp_path / "filled"),
                 *base]) == 0
    metrics = assert_metrics_reproduced(tmp_path / "filled")
    corpus, queries = 24, 6
    filled = [(call, framing) for call, framing in zip(encoded, encoded.framings) if framing.fillers or call[1] == corpus]
    assert {(call, framing.fillers) for call, framing in filled[-4:]} == {
        (("fw", corpus), 0), (("bw", corpus), 0), (("fw", queries), 3), (("bw", queries), 3)}
    assert (metrics["embed"], metrics["n_queries"]) == ("fwbw", 6)
    settings = json.loads((tmp_path / "filled" / "settings.json").read_text())
    assert (settings["query_fillers"], settings["embed"]) == (3, "fwbw")
    assert json.loads((tmp_path / "around" / "settings.json").read_text())["query_fillers"] == 0
    assert main(["retrieval", str(run), "--embed", "fw", "--markers", "--out", str(tmp_path / "marked"), *base]) == 0
    assert_metrics_reproduced(tmp_path / "marked")
    assert json.loads((tmp_path / "marked" / "settings.json").read_text())["markers"] is True
    marked = encoded.framings[-2:]  # the corpus, then the queries, each after its marker
    tokenizer = experiment.load_corpus_tokenizer(TrainConfig.load(run / "config.json").data,
                                                 TrainConfig.load(run / "config.json").tokenizer, progress=False)
    assert [framing.marker for framing in marked] == [tuple(tokenizer.encode(MARKERS[role])) for role in ("document", "query")]


def test_a_result_of_other_settings_or_other_files_are_refused(run, beir, tmp_path, capsys):
    out = tmp_path / "result"
    common = ["--task", f"beir:{beir}", "--split", "test", "--out", str(out), "--no-progress"]
    assert main(["retrieval", str(run), "--embed", "fw", *common]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    capsys.readouterr()
    assert main(["retrieval", str(run), "--embed", "bw", *common]) == 2
    assert capsys.readouterr().err == (f'fwbw retrieval: error: out: {out} holds the retrieval result of other settings '
                                       f'(embed: "fw" -> "bw"); give another --out\n')
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["retrieval", "--bm25", "--task", f"beir:{beir}", "--split", "test", "--out", str(other)]) == 2
    assert capsys.readouterr().err == (f"fwbw retrieval: error: out: {other} holds other files (notes.txt) and no "
                                       "retrieval result (settings.json): give a new or empty folder\n")


def test_fine_tuning_saves_beside_the_result_and_is_reused(run, tmp_path, monkeypatch, encoded):
    pairs = tuple((" ".join(text.split()[:3]), text) for text in tiny_benchmark().corpus.values())
    monkeypatch.setattr(experiment, "load_task", lambda task, split: tiny_benchmark(pairs))
    monkeypatch.setattr(experiment, "check_training_data", lambda *args: None)  # the run trained on text:DIR
    out = tmp_path / "tuned"
    command = ["retrieval", str(run), "--task", "description", "--embed", "fwbw", "--finetune-steps", "2",
               "--finetune-seed", "5", "--hard-negatives", "bm25", "--out", str(out), "--no-progress"]
    assert main(command) == 0
    metrics = assert_metrics_reproduced(out)
    assert (metrics["finetune_steps"], metrics["task"]) == (2, "description")
    tuned = json.loads((out / "finetuned" / "finetune.json").read_text())
    assert {key: tuned["settings"][key] for key in ("steps", "embed", "seed", "hard_negatives")} == {
        "steps": 2, "embed": "fwbw", "seed": 5, "hard_negatives": "bm25"}
    assert tuned["n_pairs"] == 24
    assert json.loads((out / "settings.json").read_text())["finetune"] == tuned["settings"]
    (out / "metrics.json").unlink()  # an interrupted result: evaluated again, the fine-tuning loaded
    monkeypatch.setattr("fwbw.retrieval.finetune._train", lambda *args: pytest.fail("trained again"))
    assert main(command) == 0
    assert metrics_of(out)["ndcg_at_10"] == metrics["ndcg_at_10"]


def fresh_copy(finished, tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    shutil.copytree(finished.out, sweep, ignore=shutil.ignore_patterns("checkpoints", "retrieval*"))
    return sweep


def test_a_sweep_evaluates_every_finished_run_and_bm25_once_resumably(finished, beir, tmp_path, capsys, encoded):
    sweep = fresh_copy(finished, tmp_path)
    runs = run_dirs(sweep)
    unfinished = next(name for name in runs if "-p0-" in name)
    (runs[unfinished] / "status.json").write_text(json.dumps({"status": "running", "error": None}))
    done = sorted(name for name in runs if name != unfinished)
    command = ["retrieval", str(sweep), "--task", f"beir:{beir}", "--split", "test", "--embed", "fw", "fwbw",
               "--no-progress"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert f"left out: {unfinished}: not finished (status running)\n" in printed
    assert printed.endswith(f"retrieval {sweep}: {1 + 2 * len(done)} done, 0 skipped (finished before)\n")
    results = sweep / "retrieval"
    assert sorted(path.name for path in results.iterdir()) == sorted(["bm25", "cache", *done])
    assert [path.name for path in (results / "bm25").iterdir()] == ["beir-tiny-test"]
    for name in done:
        assert sorted(path.name for path in (results / name).iterdir()) == ["beir-tiny-test-fw-ft0", "beir-tiny-test-fwbw-ft0"]
        assert_metrics_reproduced(results / name / "beir-tiny-test-fwbw-ft0")
    table = pd.read_csv(sweep / "retrieval.csv")
    assert list(table.columns) == RETRIEVAL_COLUMNS
    assert len(table) == 1 + 2 * len(done) and set(table.phase) == {RETRIEVAL_PHASE}
    assert sorted(table.run_id.dropna()) == sorted(done * 2)
    for row in table.to_dict("records"):
        metrics = metrics_of(sweep / row["result"])
        assert (row["ndcg_at_10"], row["system"], row["task"], row["split"]) == (
            metrics["ndcg_at_10"], metrics["system"], metrics["task"], "test")
        if row["system"] != "bm25":
            config = TrainConfig.load(sweep / "runs" / row["run_id"] / "config.json")
            assert (row["depth"], row["p_bw"], row["seed"]) == (config.depth, config.p_bw, config.seed)
    assert pd.read_parquet(sweep / "retrieval.parquet").ndcg_at_10.tolist() == table.ndcg_at_10.tolist()
    count = len(encoded)
    assert main(command) == 0
    assert len(encoded) == count
    assert capsys.readouterr().out.endswith(f"retrieval {sweep}: 0 done, {1 + 2 * len(done)} skipped (finished before)\n")
    shutil.rmtree(results)  # the table is rebuilt from the result folders: none, no table
    assert main(["results", str(sweep)]) == 0
    assert not (sweep / "retrieval.csv").exists() and not (sweep / "retrieval.parquet").exists()


def test_a_wiki_task_leaves_out_every_run_trained_on_another_corpus(finished):
    jobs, left_out = plan_jobs(finished.out, Plan("description", "test", ("fw",)))
    assert [job.label for job in jobs] == ["bm25 description test"]
    assert len(left_out) == len(run_dirs(finished.out))
    assert all(line.endswith("the wiki-sample tasks take runs trained on wiki-sample-v2") for line in left_out)


def test_a_plan_evaluates_only_the_runs_of_its_seeds_and_p_bws(finished, beir):
    configs = {name: TrainConfig.load(path / "config.json") for name, path in run_dirs(finished.out).items()}
    for seeds, p_bws in [(None, None), ((101,), None), (None, (0.0,)), ((101,), (0.5,))]:
        jobs, _ = plan_jobs(finished.out, Plan(f"beir:{beir}", "test", ("fw",), seeds=seeds, p_bws=p_bws))
        planned = sorted(job.out_dir.parent.name for job in jobs[1:])  # after BM25
        assert planned == sorted(name for name, config in configs.items()
                                 if (seeds is None or config.seed in seeds) and (p_bws is None or config.p_bw in p_bws))
        assert planned and (seeds is None and p_bws is None or len(planned) < len(configs))


def test_a_sweeps_result_folders_name_the_split_and_the_fine_tuning():
    plan = Plan("ict", "test", finetune_steps=300, finetune_seed=2, pooling="mean", hard_negatives="bm25")
    assert result_name(plan, "fw") == "ict-test-fw-mean-ft300-s2-bm25neg"
    assert result_name(plan, "fw", pooled=False) == "ict-fw-ft300-s2-bm25neg"  # the fine-tuning: shared by splits and poolings
    assert result_name(Plan("ict", "dev"), "fwbw") == "ict-dev-fwbw-ft0"


def test_retrieval_data_exports_a_task_in_beirs_format(beir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["retrieval-data", "--task", f"beir:{beir}", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: 24 documents; test 6 queries, 6 judgements\n"
    back, original = read_beir(out, "test"), read_beir(beir, "test")
    assert (back.corpus, back.queries, back.qrels) == (original.corpus, original.queries, original.qrels)
    assert not (out / "qrels" / "dev.tsv").exists()


def test_the_demo_runs_retrieval_only_when_asked(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "run_sweep", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "retrieve_sweep", lambda sweep, plan, **kwargs: calls.append((sweep, plan)))
    monkeypatch.setattr("fwbw.analysis.report.write_report", lambda sweep, out: out / "report.html")
    monkeypatch.setattr(cli, "build_results", lambda out: None)
    monkeypatch.setattr(cli, "summary_table", lambda table: pd.DataFrame())
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    assert calls == []
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress", "--retrieval"]) == 0
    assert calls == [(tmp_path / "demo", cli.Plan("description", "dev", ("fw", "fwbw")))]


def bad_beir(tmp_path: Path) -> Path:
    folder = tmp_path / "bad"
    write_beir({"test": tiny_benchmark()}, folder)
    (folder / "qrels" / "test.tsv").unlink()
    return folder


@pytest.mark.parametrize(
    "arguments, error",
    [
        (["--bm25", "--task", "nope", "--out", "{tmp}/r"],
         "task: unknown 'nope' (expected one of description, ict, title or beir:DIR)"),
        (["--bm25", "--task", "beir:{tmp}/bad", "--split", "test", "--out", "{tmp}/r"],
         "{tmp}/bad/qrels/test.tsv: missing (a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv)"),
        (["--bm25", "--task", "beir:{beir}", "--out", "{tmp}/r"],
         "{beir}/qrels/dev.tsv: missing: the set has no dev queries, so nothing can be tuned on it (its test only "
         "reports)"),
        (["{beir_run}", "--task", "description", "--out", "{tmp}/r"],
         "task description: {beir_run} trained on {data}, whose training text may hold the task's queries; the "
         "wiki-sample tasks take runs trained on wiki-sample-v2"),
        (["{beir_run}", "--task", "beir:{beir}", "--split", "test", "--finetune-seed", "3", "--out", "{tmp}/r"],
         "finetune seed: a zero-shot system (finetune steps 0) is not fine-tuned"),
        (["--bm25", "--task", "beir:{beir}", "--split", "test", "--hard-negatives", "bm25", "--out", "{tmp}/r"],
         "--bm25 takes no --hard-negatives: BM25 uses no run (a sweep's evaluation includes BM25)"),
        (["{tmp}", "--task", "description", "--out", "{tmp}/r"], "{tmp} is not a run directory (no config.json)"),
        (["{tmp}/untrained", "--task", "description", "--out", "{tmp}/r"],
         "{tmp}/untrained: no trained model (model.safetensors): has the run finished?"),
        (["{run}", "--task", "description", "--out", "{tmp}/r"],
         "{run}: the run's status is failed, not done: it has not finished"),
        (["--task", "description", "--out", "{tmp}/r"], "give a RUN_DIR or a SWEEP_DIR to evaluate, or --bm25"),
        (["--bm25", "--task", "description", "--embed", "fw", "--out", "{tmp}/r"],
         "--bm25 takes no --embed: BM25 uses no run (a sweep's evaluation includes BM25)"),
        (["{sweep}", "--bm25", "--task", "description"],
         "--bm25 takes no RUN_DIR or SWEEP_DIR: BM25 uses no run (a sweep's evaluation includes BM25)"),
        (["{run}", "--task", "description"], "--out: give the folder for the result"),
        (["{run}", "--task", "description", "--embed", "fw", "bw", "--out", "{tmp}/r"],
         "--embed: a run is evaluated with one embed, got fw bw (a sweep takes several)"),
        (["{sweep}", "--task", "description", "--out", "{tmp}/r"],
         "--out: a sweep's results go under {sweep}/retrieval, so give no --out"),
        (["{sweep}", "--task", "beir:{tmp}/bad", "--split", "test"],
         "{tmp}/bad/qrels/test.tsv: missing (a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv)"),
        (["--bm25", "--task", "beir:{beir}", "--split", "test", "--query-fillers", "2", "--out", "{tmp}/r"],
         "--bm25 takes no --query-fillers: BM25 uses no run (a sweep's evaluation includes BM25)"),
        (["{beir_run}", "--task", "beir:{beir}", "--split", "test", "--query-fillers", "2", "--pooling", "mean",
          "--out", "{tmp}/r"], "query fillers: late interaction only (a pooled text is one vector; its fillers would "
         "not add one)"),
        (["{sweep}", "--task", "description", "--query-fillers", "2", "--finetune-steps", "3"],
         "query fillers: zero-shot only (fine-tuning reads its queries without them)"),
        (["{beir_run}", "--task", "beir:{beir}", "--split", "test", "--query-fillers", "-1", "--out", "{tmp}/r"],
         "query fillers: expected 0 or more, got -1"),
        (["--bm25", "--task", "beir:{beir}", "--split", "test", "--markers", "--out", "{tmp}/r"],
         "--bm25 takes no --markers: BM25 uses no run (a sweep's evaluation includes BM25)"),
        (["{beir_run}", "--task", "beir:{beir}", "--split", "test", "--markers", "--chunk-tokens", "3", "--out", "{tmp}/r"],
         "markers: a marker of {marker} tokens leaves chunks of 3 under 2 tokens of the text's own; give chunks of at "
         "least {marker_plus_2}"),
        (["{beir_run}", "--task", "beir:{beir}", "--split", "test", "--embed", "around", "--pooling", "last",
          "--out", "{tmp}/r"], "pooling last: embed around's states never see a whole chunk; pool it by mean"),
        (["{beir_run}", "--task", "beir:{beir}", "--split", "test", "--blocks", "4", "--out", "{tmp}/r"],
         "blocks: the run has 3 blocks, so expected 1..3, got 4"),
        (["{beir_run}", "--task", "beir:{beir}", "--split", "test", "--finetune-steps", "2", "--out", "{tmp}/r"],
         "task beir:{beir} has no training pairs to fine-tune on (the wiki-sample tasks have them)"),
    ],
)
def test_bad_input_is_one_line_and_writes_no_result(arguments, error, finished, run, beir, tmp_path, capsys):
    bad_beir(tmp_path)
    (tmp_path / "untrained").mkdir()
    shutil.copy(run / "config.json", tmp_path / "untrained" / "config.json")
    failed = tmp_path / "failed-run"
    shutil.copytree(run, failed, ignore=shutil.ignore_patterns("checkpoints"))
    (failed / "status.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copy(finished.out / "sweep.json", sweep / "sweep.json")
    config = TrainConfig.load(run / "config.json")
    marker = len(load_corpus_tokenizer(config.data, config.tokenizer, progress=False).encode(MARKERS["query"]))
    values = dict(tmp=tmp_path, run=failed, sweep=sweep, beir=beir.resolve(), beir_run=run, data=config.data,
                  marker=marker, marker_plus_2=marker + 2)
    assert main(["retrieval", *(argument.format(**values) for argument in arguments), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"fwbw retrieval: error: {error.format(**values)}\n"
    assert not (tmp_path / "r").exists()
    assert not (sweep / "retrieval").exists()
