"""Contrastive fine-tuning of a run's token embeddings (fwbw.retrieval.finetune)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import sentence
from test_retrieval_encoder import finished_runs

from fwbw.retrieval import finetune as finetune_module
from fwbw.retrieval.encoder import MARKERS, combine, load_encoder
from fwbw.retrieval.finetune import (
    FinetuneSettings,
    bm25_hard_negatives,
    false_negatives,
    finetune,
    infonce_loss,
    initial_projection,
    load_finetuned,
    pair_batches,
)
from fwbw.retrieval.maxsim import maxsim_matrix
from fwbw.schema import ConfigError

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

FEW_STEPS = FinetuneSettings(embed="fwbw", steps=4, batch_size=8, lr=1e-3, dim=40, seed=3)  # fwbw: 2 x width 16


@pytest.fixture(scope="module")
def run(finished) -> Path:
    return finished_runs(finished)["plain"]


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    """(the first three words of a sentence, the sentence)."""
    rng = random.Random(5)
    sentences = [sentence(rng) for _ in range(8)]
    return [(" ".join(text.split()[:3]), text) for text in sentences]


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_few_steps_lower_the_loss_on_the_training_batch_and_leave_the_run_untouched(run, pairs, tmp_path):
    before = files_of(run)
    encoder = finetune(run, pairs, tmp_path / "finetuned", FEW_STEPS, progress=False)
    assert files_of(run) == before  # the LM's weights byte for byte, and no file added
    assert sorted(files_of(tmp_path / "finetuned")) == [
        "finetune.json", "model.safetensors", "model_config.json", "projection.safetensors"]
    record = json.loads((tmp_path / "finetuned" / "finetune.json").read_text())
    assert record["settings"] == {"embed": "fwbw", "blocks": None, "steps": 4, "batch_size": 8, "lr": 1e-3,
                                  "temperature": 0.05, "dim": 40, "seed": 3, "hard_negatives": None, "markers": False}
    assert record["run"] == str(run.resolve()) and record["n_pairs"] == 8 and len(record["losses"]) == 4
    # every step's batch is all 8 pairs, so the first loss is the untrained model's on that batch
    queries, documents = zip(*pairs)
    with torch.no_grad():
        after = infonce_loss(encoder, queries, documents, FEW_STEPS.temperature).item()
    assert after < record["losses"][0] - 0.1
    assert record["losses"][0] < math.log(8)  # the zero-shot embeddings already find some positives


def test_the_fine_tuned_encoder_is_used_like_the_zero_shot_one(run, pairs, tmp_path):
    encoder = finetune(run, pairs, tmp_path / "finetuned", FEW_STEPS, progress=False)
    texts = {f"d{i}": document for i, (_, document) in enumerate(pairs)}
    embeddings = encoder.encode(texts)
    zero_shot = load_encoder(run, "fwbw", progress=False).encode(texts)
    assert embeddings.vectors.shape == (len(zero_shot.vectors), 40) and embeddings.vectors.dtype == torch.float16
    assert torch.equal(embeddings.lengths, zero_shot.lengths) and embeddings.ids == zero_shot.ids
    torch.testing.assert_close(embeddings.vectors.float().norm(dim=1), torch.ones(len(embeddings.vectors)), atol=2e-3, rtol=0)
    pooled = encoder.encode_pooled(texts, "last")
    assert pooled.vectors.shape == (8, 40) and pooled.lengths.tolist() == [1] * 8
    reloaded = load_finetuned(tmp_path / "finetuned", progress=False)
    assert torch.equal(reloaded.encode(texts).vectors, embeddings.vectors)


def test_fine_tuning_is_deterministic_with_a_seed(run, pairs, tmp_path):
    settings = FinetuneSettings(embed="fw", steps=2, batch_size=4, seed=1)
    for name in ("a", "b"):
        finetune(run, pairs, tmp_path / name, settings, progress=False)
    finetune(run, pairs, tmp_path / "other_seed", FinetuneSettings(embed="fw", steps=2, batch_size=4, seed=2), progress=False)
    a, b, other = (files_of(tmp_path / name) for name in ("a", "b", "other_seed"))
    for name in ("model.safetensors", "projection.safetensors"):
        assert a[name] == b[name] and a[name] != other[name]


def test_a_finished_fine_tuning_is_loaded_and_another_one_refused(run, pairs, tmp_path, monkeypatch):
    first = finetune(run, pairs, tmp_path / "finetuned", FEW_STEPS, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(finetune_module, "_train", no_training)
    again = finetune(run, pairs, tmp_path / "finetuned", FEW_STEPS, progress=False)
    texts = {"q": pairs[0][0]}
    assert torch.equal(again.encode(texts).vectors, first.encode(texts).vectors)
    before = files_of(tmp_path / "finetuned")
    more_steps = FinetuneSettings(embed="fwbw", steps=5, batch_size=8, lr=1e-3, dim=40, seed=3)
    with pytest.raises(ValueError, match=f"^finetune out: {tmp_path / 'finetuned'} holds another fine-tuning "
                       "\\(settings.steps: 4 -> 5\\); give another folder$"):
        finetune(run, pairs, tmp_path / "finetuned", more_steps, progress=False)
    with pytest.raises(ValueError, match="holds another fine-tuning \\(pairs_sha256: "):
        finetune(run, pairs[:-1], tmp_path / "finetuned", FEW_STEPS, progress=False)
    assert files_of(tmp_path / "finetuned") == before
    with pytest.raises(AssertionError, match="trained again"):  # elsewhere it trains
        finetune(run, pairs, tmp_path / "elsewhere", more_steps, progress=False)


def test_the_loss_is_the_softmax_of_mean_maxsim_over_the_temperature(run):
    """Query i's logit for candidate j: the mean over i's tokens of the best cosine with j's tokens,
    divided by the temperature; another pair's positive with query i's text is left out."""
    encoder = load_encoder(run, "fwbw", progress=False)
    queries = ["the miller sold", "the miller sold", "a small fox"]
    documents = ["The miller sold a wooden boat.", "The miller sold an old map.", "A small fox ignored the silver bell."]
    negatives = ["The stone mason measured the frozen lake.", "Our neighbour praised a jar of honey.", "My brother burned a broken cart."]
    temperature = 0.1
    vectors = {text: encoder.embed_batch([text])[0][0].detach() for text in [*queries, *documents, *negatives]}
    candidates = [*documents, *negatives]
    expected = 0.0
    for i, query in enumerate(queries):
        logits = torch.tensor([
            (vectors[query] @ vectors[candidate].T).amax(dim=1).mean() / temperature for candidate in candidates
        ])
        kept = [j for j in range(len(candidates)) if not (j != i and j < 3 and queries[j] == query)]
        expected -= torch.log_softmax(logits[kept], dim=0)[kept.index(i)].item() / len(queries)
    with torch.no_grad():
        loss = infonce_loss(encoder, queries, documents, temperature, negatives).item()
        without_negatives = infonce_loss(encoder, queries, documents, temperature).item()
    assert loss == pytest.approx(expected, abs=1e-5)
    assert without_negatives < loss  # more candidates: a larger normaliser


def test_false_negatives_are_other_positives_of_the_same_query_or_document():
    queries = ["q", "q", "r", "s"]
    documents = ["a", "b", "c", "a"]
    candidates = [*documents, "c", "x"]  # hard negatives: one equals pair 2's positive
    assert false_negatives(queries, documents, candidates).int().tolist() == [
        [0, 1, 0, 1, 0, 0],  # same query as pair 1; pair 3's positive is its own document
        [1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0],  # the hard negative is its positive
        [1, 0, 0, 0, 0, 0],
    ]


def test_bm25_hard_negatives_are_the_best_ranked_training_documents_that_are_no_positive():
    pairs = [("red cats", "Cats are red animals."), ("red cats", "Red cats sleep."), ("blue dogs", "Blue dogs run."),
             ("red fish", "Fish swim in red water.")]
    assert bm25_hard_negatives(pairs) == [
        "Fish swim in red water.", "Fish swim in red water.",  # "red": the best document of no "red cats" pair
        "Cats are red animals.",  # BM25 finds no other: the first document that is no positive
        "Red cats sleep.",  # "red": of the two others, the shorter scores higher
    ]
    with pytest.raises(ValueError, match="^hard negatives: every document is a positive of the query 'q'$"):
        bm25_hard_negatives([("q", "A text."), ("q", "B text.")])


def test_fine_tuning_with_hard_negatives_gives_each_batch_its_pairs_negatives(run, pairs, tmp_path, monkeypatch):
    seen = []

    def spy(encoder, queries, documents, temperature, negatives=(), markers=False):
        seen.append(list(negatives))
        return infonce_loss(encoder, queries, documents, temperature, negatives, markers)

    monkeypatch.setattr(finetune_module, "infonce_loss", spy)
    settings = FinetuneSettings(embed="fw", steps=1, batch_size=8, hard_negatives="bm25")
    finetune(run, pairs, tmp_path / "tuned", settings, progress=False)
    assert sorted(seen[0]) == sorted(bm25_hard_negatives(pairs))  # the one batch holds every pair
    assert json.loads((tmp_path / "tuned" / "finetune.json").read_text())["settings"]["hard_negatives"] == "bm25"


def test_fine_tuning_with_markers_reads_each_text_after_its_role_s_marker(run, pairs, tmp_path, monkeypatch):
    read = []
    original = finetune_module.Encoder.embed_batch

    def spy(encoder, texts, marker=None):
        read.append((tuple(texts), marker))
        return original(encoder, texts, marker)

    monkeypatch.setattr(finetune_module.Encoder, "embed_batch", spy)
    finetune(run, pairs, tmp_path / "tuned", FinetuneSettings(embed="fw", steps=1, batch_size=8, markers=True),
             progress=False)
    queries, documents = zip(*pairs)
    assert [(sorted(texts), marker) for texts, marker in read] == [(sorted(queries), MARKERS["query"]),
                                                                   (sorted(documents), MARKERS["document"])]
    record = json.loads((tmp_path / "tuned" / "finetune.json").read_text())
    assert record["settings"]["markers"] is True


def test_a_fine_tuning_from_before_markers_existed_is_one_without_them(run, pairs, tmp_path, monkeypatch):
    finetune(run, pairs, tmp_path / "tuned", FEW_STEPS, progress=False)
    record = json.loads((tmp_path / "tuned" / "finetune.json").read_text())
    del record["settings"]["markers"]
    (tmp_path / "tuned" / "finetune.json").write_text(json.dumps(record))
    monkeypatch.setattr(finetune_module, "_train", lambda *args: pytest.fail("trained again"))
    finetune(run, pairs, tmp_path / "tuned", FEW_STEPS, progress=False)  # loaded: the same fine-tuning
    with pytest.raises(ValueError, match="holds another fine-tuning \\(settings.markers: false -> true\\)"):
        finetune(run, pairs, tmp_path / "tuned", dataclasses.replace(FEW_STEPS, markers=True), progress=False)


def test_batches_are_epochs_of_a_seeded_shuffle():
    batches = pair_batches(5, 2, 5, seed=0)
    assert len(batches) == 5 and all(len(batch) == 2 for batch in batches)
    for epoch in (batches[0:2], batches[2:4]):
        assert len(set(epoch[0] + epoch[1])) == 4  # distinct pairs; the fifth waits for the next epoch
    assert batches == pair_batches(5, 2, 5, seed=0) != pair_batches(5, 2, 5, seed=1)
    assert [sorted(batch) for batch in pair_batches(3, 8, 2, seed=0)] == [[0, 1, 2], [0, 1, 2]]


def test_bad_input_fails_in_one_line_before_any_work(run, pairs, tmp_path):
    with pytest.raises(ValueError, match=f"^finetune out: {run} is the run's own directory; give a folder of its own$"):
        finetune(run, pairs, run, FEW_STEPS, progress=False)
    with pytest.raises(ValueError, match=f"^{tmp_path} is not a run directory \\(no config.json\\)$"):
        finetune(tmp_path, pairs, tmp_path / "out", FEW_STEPS, progress=False)
    with pytest.raises(ConfigError, match="^hard_negatives: must be one of None, bm25, got 'tfidf'$"):
        FinetuneSettings(hard_negatives="tfidf")
    with pytest.raises(ValueError, match="^fine-tuning needs at least one \\(query, document\\) pair$"):
        finetune(run, [], tmp_path / "out", FEW_STEPS, progress=False)
    with pytest.raises(ValueError, match="^blocks: the run has 3 blocks, so expected 1..3, got 7$"):
        finetune(run, pairs, tmp_path / "out", FinetuneSettings(blocks=7), progress=False)
    with pytest.raises(ValueError, match="^dim: the embed has 32 dimensions, so a projection to 24 could not start "
                                         "lossless; give at least that or none$"):
        finetune(run, pairs, tmp_path / "out", FinetuneSettings(dim=24), progress=False)
    with pytest.raises(ConfigError, match="^batch_size: must be >= 2 \\(in-batch negatives\\), got 1$"):
        FinetuneSettings(batch_size=1)
    with pytest.raises(ConfigError, match="^temperature: must be > 0, got 0.0$"):
        FinetuneSettings(temperature=0.0)
    with pytest.raises(ValueError, match=f"^{tmp_path} holds no finished fine-tuning \\(no finetune.json\\)$"):
        load_finetuned(tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dim", [None, 300])
def test_the_projection_starts_lossless_so_maxsim_ranks_fwbw_as_without_it(dim):
    """fw and bw token vectors of width 128 joined (256 dimensions; a random 2:1 map to 128 reorders
    them): the initial projection keeps the joined vectors whole, so every query ranks the documents
    as the plain fwbw embedding does."""
    generator = torch.Generator().manual_seed(0)

    def directions(texts: int, tokens: int) -> list[torch.Tensor]:
        return [F.normalize(torch.randn(texts, tokens, 128, generator=generator), dim=-1) for _ in ("fw", "bw")]

    queries, documents = directions(6, 4), directions(40, 9)
    projection = initial_projection(256, dim)
    with torch.no_grad():
        projected = maxsim_matrix(combine(queries, projection), combine(documents, projection))
    plain = maxsim_matrix(combine(queries), combine(documents))
    assert torch.equal(projected.argsort(dim=1, stable=True), plain.argsort(dim=1, stable=True))
    torch.testing.assert_close(projected, plain)
