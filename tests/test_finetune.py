"""Contrastive fine-tuning of a run's token embeddings (fwbw.retrieval.finetune)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import sentence
from test_retrieval_encoder import finished_runs

from fwbw.retrieval import finetune as finetune_module
from fwbw.retrieval.encoder import load_encoder
from fwbw.retrieval.finetune import (
    FinetuneSettings,
    false_negatives,
    finetune,
    infonce_loss,
    load_finetuned,
    pair_batches,
)
from fwbw.schema import ConfigError

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

FEW_STEPS = FinetuneSettings(embed="fwbw", steps=4, batch_size=8, lr=1e-3, dim=24, seed=3)


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
                                  "temperature": 0.05, "dim": 24, "seed": 3}
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
    assert embeddings.vectors.shape == (len(zero_shot.vectors), 24) and embeddings.vectors.dtype == torch.float16
    assert torch.equal(embeddings.lengths, zero_shot.lengths) and embeddings.ids == zero_shot.ids
    torch.testing.assert_close(embeddings.vectors.float().norm(dim=1), torch.ones(len(embeddings.vectors)), atol=2e-3, rtol=0)
    pooled = encoder.encode_pooled(texts, "last")
    assert pooled.vectors.shape == (8, 24) and pooled.lengths.tolist() == [1] * 8
    reloaded = load_finetuned(tmp_path / "finetuned", progress=False)
    assert torch.equal(reloaded.encode(texts).vectors, embeddings.vectors)


def test_fine_tuning_is_deterministic_with_a_seed(run, pairs, tmp_path):
    settings = FinetuneSettings(embed="fw", steps=2, batch_size=4, dim=8, seed=1)
    for name in ("a", "b"):
        finetune(run, pairs, tmp_path / name, settings, progress=False)
    finetune(run, pairs, tmp_path / "other_seed", FinetuneSettings(embed="fw", steps=2, batch_size=4, dim=8, seed=2), progress=False)
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
    more_steps = FinetuneSettings(embed="fwbw", steps=5, batch_size=8, lr=1e-3, dim=24, seed=3)
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
    with pytest.raises(ValueError, match="^hard negatives: expected one per pair \\(8\\), got 1$"):
        finetune(run, pairs, tmp_path / "out", FEW_STEPS, hard_negatives=["x"], progress=False)
    with pytest.raises(ValueError, match="^fine-tuning needs at least one \\(query, document\\) pair$"):
        finetune(run, [], tmp_path / "out", FEW_STEPS, progress=False)
    with pytest.raises(ValueError, match="^blocks: the run has 3 blocks, so expected 1..3, got 7$"):
        finetune(run, pairs, tmp_path / "out", FinetuneSettings(blocks=7), progress=False)
    with pytest.raises(ConfigError, match="^batch_size: must be >= 2 \\(in-batch negatives\\), got 1$"):
        FinetuneSettings(batch_size=1)
    with pytest.raises(ConfigError, match="^temperature: must be > 0, got 0.0$"):
        FinetuneSettings(temperature=0.0)
    with pytest.raises(ValueError, match=f"^{tmp_path} holds no finished fine-tuning \\(no finetune.json\\)$"):
        load_finetuned(tmp_path)
    assert not (tmp_path / "out").exists()
