"""Late-interaction token embeddings of a finished run (fwbw.retrieval.encoder)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_dirs

from fwbw.model.tasks import task_batch
from fwbw.retrieval.encoder import TokenEmbeddings, chunk_starts, load_encoder, text_chunks
from fwbw.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

PREFIX = "The old queen remembered"
SUFFIX = "the harbour master guarded it."
# the same first words with different endings (fw), the same last words after different starts (bw)
SHARED_PREFIX = {"short": PREFIX, "end_one": f"{PREFIX} the storm.", "end_two": f"{PREFIX} a small fox."}
SHARED_SUFFIX = {"start_one": f"A monk said {SUFFIX}", "start_two": f"Then {SUFFIX}"}
LONG = {"long": " ".join([PREFIX] * 20)}


def finished_runs(finished) -> dict[str, Path]:
    """Two of the finished sweep's runs: "plain", of depth 3 and width 16, trained fw and bw
    without task tokens, and "task_tokens", of depth 2 and width 32."""
    found = {}
    for run in run_dirs(finished.out).values():
        config = TrainConfig.load(run / "config.json")
        if config.task_tokens:
            found["task_tokens"] = run
        elif config.depth == 3 and config.p_bw > 0:
            found.setdefault("plain", run)
    assert set(found) == {"plain", "task_tokens"}
    return found


@pytest.fixture(scope="module")
def runs(finished) -> dict[str, Path]:
    return finished_runs(finished)


def vectors_of(embeddings: TokenEmbeddings, text_id: str) -> torch.Tensor:
    i = embeddings.ids.index(text_id)
    start = int(embeddings.offsets[i])
    return embeddings.vectors[start : start + int(embeddings.lengths[i])].float()


def shared_length(a: list[int], b: list[int]) -> int:
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
def test_a_fw_token_embedding_never_sees_later_tokens(runs, name):
    encoder = load_encoder(runs[name], "fw", progress=False)
    tokens = dict(zip(SHARED_PREFIX, encoder.tokenize(SHARED_PREFIX)))
    assert max(map(len, tokens.values())) < 31  # none is cut to the context
    shared = shared_length(tokens["end_one"], tokens["end_two"])
    assert shared == len(tokens["short"]) >= 6  # the endings start at the same token
    embeddings = encoder.encode(SHARED_PREFIX)  # one batch: the shorter texts are padded
    one, two, short = (vectors_of(embeddings, key) for key in ("end_one", "end_two", "short"))
    torch.testing.assert_close(one[:shared], two[:shared], atol=1e-3, rtol=0)
    torch.testing.assert_close(one[:shared], short, atol=1e-3, rtol=0)
    assert (one[shared] - two[shared]).abs().max() > 0.01  # where the texts differ, so do the embeddings


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
def test_a_bw_token_embedding_never_sees_earlier_tokens(runs, name):
    encoder = load_encoder(runs[name], "bw", progress=False)
    one, two = (list(reversed(ids)) for ids in encoder.tokenize(SHARED_SUFFIX))
    assert max(len(one), len(two)) < 31  # neither is cut to the context
    shared = shared_length(one, two)
    assert shared >= 6
    embeddings = encoder.encode(SHARED_SUFFIX)
    one, two = vectors_of(embeddings, "start_one"), vectors_of(embeddings, "start_two")
    torch.testing.assert_close(one[-shared:], two[-shared:], atol=1e-3, rtol=0)
    assert (one[-shared - 1] - two[-shared - 1]).abs().max() > 0.01


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
@pytest.mark.parametrize("direction", ["fw", "bw"])
def test_embeddings_are_the_direction_s_pass_over_the_text_with_training_s_task_tokens(runs, name, direction):
    """Each chunk alone, through model.hidden with the inputs training builds (fwbw.model.tasks),
    gives what the padded batches gave."""
    encoder = load_encoder(runs[name], direction, progress=False)
    texts = {**SHARED_PREFIX, **LONG}
    embeddings = encoder.encode(texts)
    config = encoder.model.config
    for text_id, ids in zip(texts, encoder.tokenize(texts)):
        expected = []
        for chunk in text_chunks(ids, encoder.chunk_tokens):
            # the window whose task inputs are the chunk (after the fw marker, before the bw marker)
            window = torch.tensor([[*chunk, 0]] if direction == "fw" else [[0, *chunk]])
            inputs, _ = task_batch(window, direction, config)
            hidden = F.normalize(encoder.model.hidden(inputs, direction)[0].detach(), dim=-1)
            expected.append(hidden[1:] if config.task_tokens and direction == "fw" else hidden[: len(chunk)])
        torch.testing.assert_close(vectors_of(embeddings, text_id), torch.cat(expected), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
def test_a_text_longer_than_the_run_s_context_is_embedded_in_overlapping_chunks(runs, name):
    """Chunks of the context's length, each half a chunk after the one before, the last ending at
    the text's end: a text's vectors are all its chunks' tokens, overlapping ones twice."""
    encoder = load_encoder(runs[name], "fw", progress=False)
    config = TrainConfig.load(runs[name] / "config.json")
    context = config.seq_len - int(config.task_tokens)
    length = len(encoder.tokenizer.encode(LONG["long"]))
    assert length > 2 * config.seq_len and encoder.chunk_tokens == context
    starts = chunk_starts(length, context)
    assert starts[:3] == [0, context // 2, 2 * (context // 2)] and starts[-1] == length - context
    lengths = encoder.encode({**LONG, "short": PREFIX}).lengths.tolist()
    assert lengths == [context * len(starts), len(encoder.tokenizer.encode(PREFIX))]


def test_fwbw_is_the_scaled_concatenation_and_every_embedding_a_unit_vector(runs):
    texts = {**SHARED_PREFIX, **SHARED_SUFFIX}
    fw, bw, fwbw = (load_encoder(runs["plain"], embed, progress=False).encode(texts) for embed in ("fw", "bw", "fwbw"))
    assert fw.vectors.dtype == torch.float16 and fw.vectors.shape[1] == 16 and fwbw.vectors.shape[1] == 32
    assert torch.equal(fw.lengths, fwbw.lengths) and fw.ids == fwbw.ids == tuple(texts)
    expected = torch.cat([fw.vectors.float(), bw.vectors.float()], dim=1) / math.sqrt(2)
    torch.testing.assert_close(fwbw.vectors.float(), expected, atol=1e-3, rtol=0)
    for embeddings in (fw, bw, fwbw):
        torch.testing.assert_close(embeddings.vectors.float().norm(dim=1), torch.ones(len(embeddings.vectors)), atol=2e-3, rtol=0)


def test_last_token_vectors_are_the_states_that_saw_the_whole_text(runs):
    """fw: the last position; bw: the first. The mean: the normalised mean of the token vectors."""
    texts = {**SHARED_PREFIX, **SHARED_SUFFIX}
    fw, bw, fwbw = (load_encoder(runs["plain"], embed, progress=False) for embed in ("fw", "bw", "fwbw"))
    fw_tokens, bw_tokens = fw.encode(texts), bw.encode(texts)
    fw_last, bw_last, fwbw_last = (encoder.encode_pooled(texts, "last") for encoder in (fw, bw, fwbw))
    fw_mean = fw.encode_pooled(texts, "mean")
    assert fw_last.lengths.tolist() == [1] * len(texts) and fw_last.ids == tuple(texts)
    for i, text_id in enumerate(texts):
        torch.testing.assert_close(fw_last.vectors[i].float(), vectors_of(fw_tokens, text_id)[-1], atol=1e-3, rtol=0)
        torch.testing.assert_close(bw_last.vectors[i].float(), vectors_of(bw_tokens, text_id)[0], atol=1e-3, rtol=0)
        concatenated = torch.cat([fw_last.vectors[i], bw_last.vectors[i]]).float() / math.sqrt(2)
        torch.testing.assert_close(fwbw_last.vectors[i].float(), concatenated, atol=1e-3, rtol=0)
        mean = F.normalize(vectors_of(fw_tokens, text_id).mean(dim=0), dim=0)
        torch.testing.assert_close(fw_mean.vectors[i].float(), mean, atol=1e-3, rtol=0)
        # the other end (what "last" would mean for the wrong direction) is another vector
        assert (bw_last.vectors[i].float() - vectors_of(bw_tokens, text_id)[-1]).abs().max() > 0.05
        assert (fw_last.vectors[i].float() - vectors_of(fw_tokens, text_id)[0]).abs().max() > 0.05
    with pytest.raises(ValueError, match="^pooling: expected one of mean, last, got 'max'$"):
        fw.encode_pooled(texts, "max")


def test_a_chosen_block_embeds_the_truncated_model(runs):
    encoder = load_encoder(runs["plain"], "fw", blocks=1, progress=False)
    full = load_encoder(runs["plain"], "fw", progress=False)
    assert encoder.model.config.depth == 1 and encoder.blocks == 1 and full.blocks == 3
    text = {"one": SHARED_PREFIX["end_one"]}
    [ids] = encoder.tokenize(text)
    expected = F.normalize(full.model.truncated(1).hidden(torch.tensor([ids]), "fw")[0].detach(), dim=-1)
    torch.testing.assert_close(vectors_of(encoder.encode(text), "one"), expected, atol=1e-3, rtol=0)
    assert (vectors_of(full.encode(text), "one") - expected).abs().max() > 0.01
    with pytest.raises(ValueError, match="^blocks: the run has 3 blocks, so expected 1..3, got 4$"):
        load_encoder(runs["plain"], "fw", blocks=4, progress=False)


def test_the_cache_is_reused_and_keyed_by_content(runs, tmp_path, monkeypatch):
    texts = {**SHARED_PREFIX, **SHARED_SUFFIX}
    first = load_encoder(runs["plain"], "fwbw", cache_dir=tmp_path, progress=False).encode(texts)
    assert sorted(path.name.split("-")[0] for path in tmp_path.iterdir()) == ["bw", "fw"]  # one file per direction

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    again = load_encoder(runs["plain"], "fwbw", cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(again.model, "hidden", no_model)
    assert torch.equal(again.encode(texts).vectors, first.vectors)
    renamed = {f"other-{key}": text for key, text in texts.items()}  # ids are not part of the key
    assert torch.equal(again.encode(renamed).vectors, first.vectors)
    fw_only = load_encoder(runs["plain"], "fw", cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(fw_only.model, "hidden", no_model)
    assert torch.equal(fw_only.encode(texts).vectors, load_encoder(runs["plain"], "fw", progress=False).encode(texts).vectors)
    with pytest.raises(AssertionError, match="the model ran"):  # other texts are encoded
        again.encode({"new": "A small fox ignored the silver bell."})
    other_block = load_encoder(runs["plain"], "fw", blocks=2, cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(other_block.model, "hidden", no_model)
    with pytest.raises(AssertionError, match="the model ran"):  # and so are another block's states
        other_block.encode(texts)


def test_an_unreadable_cache_file_is_encoded_again(runs, tmp_path):
    texts = dict(SHARED_PREFIX)
    expected = load_encoder(runs["plain"], "fw", cache_dir=tmp_path, progress=False).encode(texts)
    [cache_file] = tmp_path.iterdir()
    cache_file.write_bytes(b"not a safetensors file")
    assert torch.equal(load_encoder(runs["plain"], "fw", cache_dir=tmp_path, progress=False).encode(texts).vectors, expected.vectors)
    assert cache_file.stat().st_size > 100  # rewritten


def test_a_directory_that_is_not_a_finished_run_is_one_line(runs, tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path} is not a run directory \\(no config.json\\)$"):
        load_encoder(tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs["plain"] / "config.json", unfinished)
    with pytest.raises(ValueError, match=f"^{unfinished}: no trained model \\(model.safetensors\\): has the run finished\\?$"):
        load_encoder(unfinished)


def test_an_unknown_embed_and_a_bw_embed_of_a_leaking_run_are_refused(runs, tmp_path):
    with pytest.raises(ValueError, match="^embed: expected one of fw, bw, fwbw, echo, around, got 'both'$"):
        load_encoder(runs["plain"], "both")
    leaking = tmp_path / "leaking"
    shutil.copytree(runs["plain"], leaking)
    config = json.loads((leaking / "config.json").read_text())
    (leaking / "config.json").write_text(json.dumps({**config, "bw_mask": "legacy-flip"}))
    for embed in ("bw", "fwbw", "around"):
        with pytest.raises(ValueError, match=f"^embed {embed}: the run's bw mask legacy-flip lets every position"):
            load_encoder(leaking, embed)
    fw = load_encoder(leaking, "fw", progress=False).encode(SHARED_PREFIX)
    assert torch.equal(fw.vectors, load_encoder(runs["plain"], "fw", progress=False).encode(SHARED_PREFIX).vectors)


def test_an_empty_text_is_one_line(runs):
    with pytest.raises(ValueError, match="^text 'blank' is empty: it has no tokens to embed$"):
        load_encoder(runs["plain"], "fw", progress=False).encode({"a": PREFIX, "blank": ""})
