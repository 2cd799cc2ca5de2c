"""The systems beside plain MaxSim: BM25's candidates reranked or fused (the fusion weight chosen on dev
queries only), fwbw's matched control fw ⊕ fw of two runs, bf16 similarities, and the bounded token cache."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_dirs, sentence
from test_retrieval_encoder import finished_runs

from fwbw.retrieval.beir import write_beir
from fwbw.retrieval.benchmark import Benchmark
from fwbw.retrieval.bm25 import bm25_run
from fwbw.retrieval.encoder import combine, load_encoder, prune_cache
from fwbw.retrieval.ensemble import load_paired_encoder
from fwbw.retrieval.experiment import System, run_retrieval
from fwbw.retrieval.fusion import read_candidates, tune_weight
from fwbw.retrieval.maxsim import maxsim_search
from fwbw.retrieval.metrics import ranking
from fwbw.retrieval.tasks import load_task
from fwbw.study.retrieval_sweep import Plan, partners, plan_jobs
from fwbw.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")
K = 8


def two_split_benchmarks(shuffled_test: bool = False) -> dict[str, Benchmark]:
    """40 sentences as documents; dev and test each 6 queries, the first four words of a document.
    shuffled_test: the test queries judge other documents relevant (only the test qrels differ)."""
    rng = random.Random(5)
    corpus = {f"d{i}": sentence(rng) for i in range(40)}
    splits = {}
    for split, first in (("dev", 0), ("test", 20)):
        queries = {f"{split}{i}": " ".join(corpus[f"d{first + 3 * i}"].split()[:4]) for i in range(6)}
        relevant = [f"d{first + 3 * ((i + 1) % 6 if shuffled_test and split == 'test' else i)}" for i in range(6)]
        splits[split] = Benchmark("two", corpus, queries, {qid: {docid: 1} for qid, docid in zip(queries, relevant)})
    return splits


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> dict[str, Path]:
    """The BEIR folder, and one whose test qrels alone differ."""
    folders = {}
    for name, shuffled in (("same", False), ("shuffled", True)):
        folders[name] = tmp_path_factory.mktemp("beir") / name
        write_beir(two_split_benchmarks(shuffled), folders[name])
    return folders


@pytest.fixture(scope="module")
def run(finished) -> Path:
    return finished_runs(finished)["plain"]  # depth 3, width 16, p_bw 0.5


def test_a_rerank_orders_bm25_s_candidates_by_their_maxsim_scores(run, beir, tmp_path):
    task = f"beir:{beir['same']}"
    out = tmp_path / "rerank"
    outcome = run_retrieval(out, task, "test", System(run, "fwbw", rerank=K), progress=False)
    assert outcome.metrics["system"] == "rerank-bm25"
    benchmark = load_task(task, "test")
    bm25 = bm25_run(benchmark.corpus, benchmark.queries, K)
    encoder = load_encoder(run, "fwbw", progress=False)
    full = maxsim_search(encoder.encode(benchmark.queries), encoder.encode(benchmark.corpus), 100)
    candidates = read_candidates(out / "candidates.csv")
    assert {qid: set(scores) for qid, scores in candidates.items()} == {qid: set(scores) for qid, scores in bm25.items()}
    for qid, scores in candidates.items():
        for docid, (bm25_score, dense) in scores.items():
            assert bm25_score == pytest.approx(bm25[qid][docid], rel=1e-12)
            assert dense == pytest.approx(full[qid][docid], rel=1e-5)  # the same MaxSim, on the candidates alone
    reranked = {qid: ranking({d: s for d, s in full[qid].items() if d in bm25[qid]}) for qid in bm25}
    written = {}
    for line in (out / "run.trec").read_text().splitlines():
        qid, _, docid, *_ = line.split()
        written.setdefault(qid, []).append(docid)
    assert written == reranked


def fusion_weight_of(run: Path, folder: Path, out: Path) -> tuple[float, Path]:
    task = f"beir:{folder}"
    dev = out / "dev-rerank"
    run_retrieval(dev, task, "dev", System(run, "fw", rerank=K), progress=False)
    fused = out / "test-fusion"
    outcome = run_retrieval(fused, task, "test", System(run, "fw", rerank=K, fuse_from=dev), progress=False)
    assert outcome.metrics["system"] == "fusion-bm25"
    return json.loads((fused / "settings.json").read_text())["fusion_weight"], dev


def test_the_fusion_weight_is_chosen_on_dev_queries_and_no_test_query_changes_it(run, beir, tmp_path):
    weight, dev = fusion_weight_of(run, beir["same"], tmp_path / "same")
    expected, _ = tune_weight(read_candidates(dev / "candidates.csv"), load_task(f"beir:{beir['same']}", "dev").qrels,
                              split="dev")
    assert weight == expected
    other_weight, _ = fusion_weight_of(run, beir["shuffled"], tmp_path / "shuffled")  # only the test qrels differ
    assert other_weight == weight


def test_a_fusion_tuned_on_anything_but_the_system_s_dev_rerank_is_refused(run, beir, tmp_path):
    task = f"beir:{beir['same']}"
    test_rerank = tmp_path / "test-rerank"
    run_retrieval(test_rerank, task, "test", System(run, "fw", rerank=K), progress=False)
    with pytest.raises(ValueError, match=r"^fuse from: .* is not this system's rerank on the dev queries \(split: \"test\" -> \"dev\"\)$"):
        run_retrieval(tmp_path / "fused", task, "test", System(run, "fw", rerank=K, fuse_from=test_rerank), progress=False)
    with pytest.raises(ValueError, match=r"holds no finished retrieval result: run the rerank on the dev queries first$"):
        run_retrieval(tmp_path / "fused2", task, "test", System(run, "fw", rerank=K, fuse_from=tmp_path / "none"),
                      progress=False)
    other_blocks = tmp_path / "dev-rerank-b1"
    run_retrieval(other_blocks, task, "dev", System(run, "fw", blocks=1, rerank=K), progress=False)
    with pytest.raises(ValueError, match=r"is not this system's rerank on the dev queries \(blocks: 1 -> 3\)$"):
        run_retrieval(tmp_path / "fused3", task, "test", System(run, "fw", rerank=K, fuse_from=other_blocks), progress=False)
    with pytest.raises(ValueError, match=r"^rerank: expected 1\.\.100"):
        run_retrieval(tmp_path / "deep", task, "test", System(run, "fw", rerank=0), progress=False)


def same_setting_pair(finished) -> tuple[Path, Path]:
    by_setting = {}
    for run_dir in run_dirs(finished.out).values():
        config = TrainConfig.load(run_dir / "config.json")
        by_setting.setdefault((config.depth, config.p_bw, config.task_tokens), []).append(run_dir)
    first, second = sorted(by_setting[(3, 0.5, False)])
    return first, second


def test_fwfw_is_the_fw_views_of_two_runs_combined_as_fwbw_combines_its_two(finished):
    first, second = same_setting_pair(finished)
    texts = {"a": "The old queen remembered the storm.", "b": "A monk said the harbour master guarded it."}
    paired = load_paired_encoder(first, second, progress=False).encode(texts)
    views = [load_encoder(run, "fw", progress=False).encode(texts).vectors.float() for run in (first, second)]
    assert torch.equal(paired.vectors, combine(views).half())
    assert paired.vectors.shape[1] == 2 * 16  # fwbw's dimensions
    norms = paired.vectors.float().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)


def test_the_fwfw_control_needs_a_second_zero_shot_run(finished, beir, tmp_path):
    first, second = same_setting_pair(finished)
    task = f"beir:{beir['same']}"
    cases = [
        (System(first, "fwfw"), r"^partner: the fwfw embed takes a second run \(--partner\), and only it$"),
        (System(first, "fw", partner=second), r"^partner: the fwfw embed takes a second run"),
        (System(first, "fwfw", partner=first), r"is the run itself; give a second run of the same setting$"),
        (System(first, "fwfw", partner=second, finetune_steps=2), r"^embed fwfw: a zero-shot control"),
    ]
    for system, message in cases:
        with pytest.raises(ValueError, match=message):
            run_retrieval(tmp_path / "x", task, "test", system, progress=False)
    other_setting = next(run for run in run_dirs(finished.out).values()
                         if TrainConfig.load(run / "config.json").depth != TrainConfig.load(first / "config.json").depth)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    for partner, message in ((other_setting, r"is not a run of the same setting \(depth: "), (copy, r"holds the run's own weights")):
        with pytest.raises(ValueError, match=f"^partner: {re.escape(str(partner))} {message}"):
            run_retrieval(tmp_path / "x", task, "test", System(first, "fwfw", partner=partner), progress=False)
    outcome = run_retrieval(tmp_path / "ok", task, "test", System(first, "fwfw", partner=second), progress=False)
    assert outcome.metrics["embed"] == "fwfw"
    settings = json.loads((tmp_path / "ok" / "settings.json").read_text())
    assert settings["partner_weights_sha256"] and settings["partner_weights_sha256"] != settings["run_weights_sha256"]


def test_a_sweep_pairs_each_run_with_the_next_seed_of_its_setting(finished, beir):
    runs = run_dirs(finished.out)
    paired = partners(finished.out)
    seeds = {run_id: TrainConfig.load(path / "config.json") for run_id, path in runs.items()}
    for run_id, partner in paired.items():
        mine, theirs = seeds[run_id], seeds[partner.name]
        assert (mine.depth, mine.p_bw, mine.task_tokens) == (theirs.depth, theirs.p_bw, theirs.task_tokens)
        assert mine.seed != theirs.seed
    assert len(paired) == len(runs) - 1  # the task-token run is alone in its setting
    jobs, left_out = plan_jobs(finished.out, Plan(f"beir:{beir['same']}", "test", embeds=("fwfw",)))
    assert len([job for job in jobs if job.system.partner is not None]) == len(paired)
    assert [line for line in left_out if line.endswith("no fwfw embed: no other run of its setting to pair with")]


def test_bf16_similarities_give_the_same_ndcg_to_3_decimals(run, beir, tmp_path):
    task = f"beir:{beir['same']}"
    metrics = [run_retrieval(tmp_path / dtype, task, "test", System(run, "fwbw", maxsim_dtype=dtype), progress=False).metrics
               for dtype in ("fp32", "bf16")]
    assert round(metrics[0]["ndcg_at_10"], 3) == round(metrics[1]["ndcg_at_10"], 3)
    settings = [json.loads((tmp_path / dtype / "settings.json").read_text())["maxsim_dtype"] for dtype in ("fp32", "bf16")]
    assert settings == ["fp32", "bf16"]


def test_the_token_cache_is_trimmed_least_recently_used_first(tmp_path):
    sizes = {"old.safetensors": 300, "used.safetensors": 300, "new.safetensors": 300}
    for age, (name, size) in enumerate(sizes.items()):
        (tmp_path / name).write_bytes(b"x" * size)
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    os.utime(tmp_path / "used.safetensors", (5000, 5000))  # read since: the most recently used
    assert [path.name for path in prune_cache(tmp_path, 550)] == ["old.safetensors", "new.safetensors"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["used.safetensors"]
    assert prune_cache(tmp_path, 10_000) == []


def test_encoding_builds_no_autograd_graph(run):
    """A graph kept per chunk held every activation of the corpus (22 GB on wiki-sample's 10k articles)."""
    encoder = load_encoder(run, "fwbw", progress=False)
    texts = {"a": "The old queen remembered the storm.", "b": "A monk said the harbour master guarded it."}
    assert not any(view.vectors.requires_grad for view in encoder.view_embeddings(texts))
    assert not encoder.encode(texts).vectors.requires_grad
    assert not encoder.encode_pooled(texts, "mean").vectors.requires_grad


@pytest.mark.parametrize("flags, message", [
    (["--cache-gb", "inf"], "--cache-gb: expected a size in GB above 0, got inf"),
    (["--cache-gb", "-1"], "--cache-gb: expected a size in GB above 0, got -1.0"),
    (["--fusion"], "--fusion: fuses each run's rerank with BM25; give --rerank K too"),
])
def test_bad_sweep_retrieval_flags_are_one_line_before_any_work(finished, flags, message, capsys):
    from fwbw.cli import main

    assert main(["retrieval", str(finished.out), "--task", "description", *flags, "--no-progress"]) == 2
    assert capsys.readouterr().err == f"fwbw retrieval: error: {message}\n"


@pytest.mark.parametrize("size", ["0", "inf"])
def test_a_bad_retrieval_study_cache_size_is_one_line_before_any_work(tmp_path, size, capsys):
    from fwbw.cli import main

    assert main(["retrieval-study", str(tmp_path / "sweep"), "--cache-gb", size, "--no-progress"]) == 2
    assert capsys.readouterr().err == f"fwbw retrieval-study: error: --cache-gb: expected a size in GB above 0, got {float(size)}\n"
    assert not (tmp_path / "sweep").exists()
