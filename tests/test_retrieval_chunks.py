"""Long texts in overlapping chunks, and echo embeddings (fwbw.retrieval.encoder), in a result's
settings and a sweep's folder names (fwbw.retrieval.experiment, fwbw.study.retrieval_sweep)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_retrieval_encoder import LONG, PREFIX, SHARED_PREFIX, finished_runs, vectors_of

from fwbw.files import atomic_write_json
from fwbw.model.tasks import task_batch
from fwbw.retrieval.encoder import (
    TokenEmbeddings,
    chunk_starts,
    combine,
    load_encoder,
    text_chunks,
    token_states,
)
from fwbw.retrieval.experiment import System, check_system, finished_with, identity
from fwbw.retrieval.maxsim import maxsim_search
from fwbw.study.retrieval_sweep import Plan, plan_jobs, result_name
from fwbw.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

TASK = "beir:/nowhere/tiny"  # a task every run may take; none of these tests loads it
ENDING = "A small fox ignored the silver bell."  # words the long texts below have only at their end


@pytest.fixture(scope="module")
def runs(finished) -> dict[str, Path]:
    return finished_runs(finished)


def context_of(run: Path) -> int:
    """The text tokens one pass of the run takes: its context less a task marker's position."""
    config = TrainConfig.load(run / "config.json")
    return config.seq_len - int(config.task_tokens)


def text_of_length(encoder, length: int) -> str:
    """The shortest start of LONG's text that is `length` tokens long."""
    text = LONG["long"]
    found = next((text[:end] for end in range(1, len(text)) if len(encoder.tokenizer.encode(text[:end])) == length), None)
    assert found is not None, f"no start of LONG has {length} tokens"
    return found


def test_chunks_start_every_half_chunk_and_the_last_ends_at_the_text_s_end():
    assert chunk_starts(10, 4) == [0, 2, 4, 6]
    assert chunk_starts(9, 4) == [0, 2, 4, 5]  # the last one starts closer, to end at the text's end
    assert chunk_starts(7, 5) == [0, 2]  # an odd length: half a chunk rounded down
    assert chunk_starts(6, 2) == [0, 1, 2, 3, 4]
    assert chunk_starts(5, 4) == [0, 1]
    assert chunk_starts(4, 4) == [0] and chunk_starts(3, 4) == [0]  # a text that fits is one chunk
    assert text_chunks(list(range(10)), 4) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert text_chunks(list(range(9)), 4) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [5, 6, 7, 8]]
    assert text_chunks([7, 8, 9], 4) == [[7, 8, 9]]


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
def test_a_text_of_exactly_the_context_is_one_chunk_and_one_more_token_makes_two(runs, name):
    encoder = load_encoder(runs[name], "fw", progress=False)
    context = context_of(runs[name])
    texts = {"fits": text_of_length(encoder, context), "over": text_of_length(encoder, context + 1)}
    embeddings = encoder.encode(texts)
    assert embeddings.lengths.tolist() == [context, 2 * context]  # "over": tokens 0..C-1 and 1..C
    fits, over = encoder.tokenize(texts)
    expected, _ = token_states(encoder.model, [fits], "fw")
    torch.testing.assert_close(vectors_of(embeddings, "fits"), expected[0], atol=1e-3, rtol=0)
    expected, _ = token_states(encoder.model, [over[1:]], "fw")
    torch.testing.assert_close(vectors_of(embeddings, "over")[context:], expected[0], atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "name, embed, chunk_tokens",
    [("plain", "fwbw", None), ("plain", "fwbw", 10), ("plain", "echo", None), ("task_tokens", "fwbw", None),
     ("task_tokens", "echo", 7)],
)
def test_a_long_text_holds_every_chunk_s_vectors_each_encoded_alone(runs, name, embed, chunk_tokens):
    encoder = load_encoder(runs[name], embed, chunk_tokens=chunk_tokens, progress=False)
    texts = {**LONG, "short": PREFIX}
    embeddings = encoder.encode(texts)  # one batch: chunks of both texts, padded
    for text_id, ids in zip(texts, encoder.tokenize(texts)):
        chunks = text_chunks(ids, encoder.chunk_tokens)
        alone = [combine([token_states(encoder.model, [chunk], view)[0][0] for view in encoder.views]) for chunk in chunks]
        torch.testing.assert_close(vectors_of(embeddings, text_id), torch.cat(alone).detach(), atol=1e-3, rtol=0)
    assert len(text_chunks(encoder.tokenize(LONG)[0], encoder.chunk_tokens)) > 10


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
def test_maxsim_finds_words_that_only_a_long_document_s_last_chunk_holds(runs, name):
    """The document ends with the query's tokens, so the bw states of its last chunk's end are the
    query's own: every query token finds itself (cosine 1). The first chunk, all that the
    document's truncation to the context kept, scores lower."""
    encoder = load_encoder(runs[name], "bw", progress=False)
    document = f"{LONG['long']}\n{ENDING}"
    query_ids, document_ids = encoder.tokenize({"query": ENDING, "document": document})
    assert document_ids[-len(query_ids):] == query_ids and len(document_ids) > 3 * encoder.chunk_tokens
    query = encoder.encode({"query": ENDING})
    chunked = encoder.encode({"chunked": document})
    first_chunk = vectors_of(chunked, "chunked")[: encoder.chunk_tokens].half()
    documents = TokenEmbeddings(("chunked", "truncated"), torch.cat([chunked.vectors, first_chunk]),
                                torch.tensor([len(chunked.vectors), encoder.chunk_tokens]))
    scores = maxsim_search(query, documents, k=2)["query"]
    assert list(scores) == ["chunked", "truncated"]
    assert scores["chunked"] == pytest.approx(len(query_ids), abs=0.01)
    assert scores["truncated"] < len(query_ids) - 1


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
def test_echo_vectors_are_the_fw_states_of_the_second_copy_of_the_chunk(runs, name):
    """Through model.hidden with the inputs training builds (fwbw.model.tasks) for the chunk read twice."""
    encoder = load_encoder(runs[name], "echo", progress=False)
    config = encoder.model.config
    assert encoder.chunk_tokens == context_of(runs[name]) // 2  # both copies fit the context
    texts = {**SHARED_PREFIX, **LONG}
    embeddings = encoder.encode(texts)
    for text_id, ids in zip(texts, encoder.tokenize(texts)):
        expected = []
        for chunk in text_chunks(ids, encoder.chunk_tokens):
            inputs, _ = task_batch(torch.tensor([[*chunk, *chunk, 0]]), "fw", config)
            hidden = F.normalize(encoder.model.hidden(inputs, "fw")[0].detach(), dim=-1)
            second = int(config.task_tokens) + len(chunk)
            expected.append(hidden[second : second + len(chunk)])
        torch.testing.assert_close(vectors_of(embeddings, text_id), torch.cat(expected), atol=1e-3, rtol=0)


def test_an_echo_vector_has_seen_the_whole_text_and_a_fw_vector_only_what_came_before(runs):
    """Two texts that differ in their last token only: their first fw vectors are equal, their first
    echo vectors not (the second copy's first token follows the first copy's last). In these tiny
    models a token's own embedding dominates its state, so the difference is small, but far above
    fp16's rounding (its step is 2.4e-4 at 0.5)."""
    texts = {"period": "Fox.", "exclaimed": "Fox!"}
    fw, echo = (load_encoder(runs["plain"], embed, progress=False) for embed in ("fw", "echo"))
    one, two = fw.tokenize(texts)
    assert one[:-1] == two[:-1] and one[-1] != two[-1] and len(one) <= echo.chunk_tokens
    fw_vectors, echo_vectors = fw.encode(texts), echo.encode(texts)
    torch.testing.assert_close(vectors_of(fw_vectors, "period")[:-1], vectors_of(fw_vectors, "exclaimed")[:-1],
                               atol=1e-4, rtol=0)
    assert (vectors_of(echo_vectors, "period")[0] - vectors_of(echo_vectors, "exclaimed")[0]).abs().max() > 0.005


@pytest.mark.parametrize("embed", ["fwbw", "echo"])
def test_fine_tuning_s_batches_embed_a_text_s_first_chunk(runs, embed):
    encoder = load_encoder(runs["plain"], embed, progress=False)
    texts = {**LONG, "short": PREFIX}
    vectors, mask = encoder.embed_batch(list(texts.values()))
    embeddings = encoder.encode(texts)
    assert mask.sum(dim=1).tolist() == [encoder.chunk_tokens, len(encoder.tokenize({"short": PREFIX})[0])]
    torch.testing.assert_close(vectors[0].detach(), vectors_of(embeddings, "long")[: encoder.chunk_tokens], atol=1e-3, rtol=0)
    torch.testing.assert_close(vectors[1, : int(mask[1].sum())].detach(), vectors_of(embeddings, "short"), atol=1e-3, rtol=0)


def test_pooled_vectors_of_a_chunked_text(runs):
    """mean: over every chunk's vectors; last: the last chunk's last token (fw, echo), the first
    chunk's first token (bw)."""
    for embed in ("fw", "bw", "echo"):
        encoder = load_encoder(runs["plain"], embed, progress=False)
        tokens = vectors_of(encoder.encode(LONG), "long")
        assert len(tokens) > 2 * encoder.chunk_tokens
        last, mean = (encoder.encode_pooled(LONG, pooling).vectors[0].float() for pooling in ("last", "mean"))
        torch.testing.assert_close(last, tokens[0 if embed == "bw" else -1], atol=1e-3, rtol=0)
        torch.testing.assert_close(mean, F.normalize(tokens.mean(dim=0), dim=0), atol=1e-3, rtol=0)


def test_chunk_lengths_are_refused_outside_2_to_what_fits_the_context(runs, tmp_path):
    plain, task_tokens = runs["plain"], runs["task_tokens"]
    with pytest.raises(ValueError, match=r"^chunk tokens: expected 2..32 \(the run's context of 32 tokens\), got 33$"):
        load_encoder(plain, "fw", chunk_tokens=33)
    with pytest.raises(ValueError, match=r"^chunk tokens: expected 2..31 \(the run's context of 31 tokens\), got 1$"):
        load_encoder(task_tokens, "fwbw", chunk_tokens=1)
    with pytest.raises(ValueError, match=r"^chunk tokens: expected 2..15 \(embed echo reads each chunk 2 times within "
                                         r"the run's context of 31 tokens\), got 16$"):
        load_encoder(task_tokens, "echo", chunk_tokens=16)
    encoder = load_encoder(plain, "echo", chunk_tokens=16, progress=False)
    assert (encoder.chunk_tokens, encoder.chunked(5).chunk_tokens, encoder.chunked(None).chunk_tokens) == (16, 5, 16)
    with pytest.raises(ValueError, match=r"^chunk tokens: expected 2..16 \(embed echo"):
        encoder.chunked(17)


def test_echo_reads_only_fw_so_a_leaking_run_has_it(runs, tmp_path):
    leaking = tmp_path / "leaking"
    shutil.copytree(runs["plain"], leaking)
    config = json.loads((leaking / "config.json").read_text())
    (leaking / "config.json").write_text(json.dumps({**config, "bw_mask": "legacy-flip"}))
    echo = load_encoder(leaking, "echo", progress=False).encode(SHARED_PREFIX)
    assert torch.equal(echo.vectors, load_encoder(runs["plain"], "echo", progress=False).encode(SHARED_PREFIX).vectors)


def test_the_cache_keys_views_and_chunk_lengths_apart(runs, tmp_path, monkeypatch):
    texts = {**SHARED_PREFIX, **LONG}
    encoders = {(embed, chunk_tokens): load_encoder(runs["plain"], embed, cache_dir=tmp_path, chunk_tokens=chunk_tokens,
                                                    progress=False)
                for embed, chunk_tokens in (("fw", None), ("echo", None), ("fw", 16), ("fw", 8))}
    encoded = {key: encoder.encode(texts).vectors for key, encoder in encoders.items()}
    assert sorted(path.name.split("-")[0] for path in tmp_path.iterdir()) == ["echo", "fw", "fw", "fw"]  # one file each
    assert not torch.equal(encoded["fw", None], encoded["echo", None])
    assert len(encoded["fw", 8]) > len(encoded["fw", 16]) > len(encoded["fw", None])

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    for (embed, chunk_tokens), vectors in encoded.items():
        again = load_encoder(runs["plain"], embed, cache_dir=tmp_path, chunk_tokens=chunk_tokens, progress=False)
        monkeypatch.setattr(again.model, "hidden", no_model)
        assert torch.equal(again.encode(texts).vectors, vectors)


def test_a_result_records_its_chunk_length(runs, tmp_path):
    plain, context = runs["plain"], context_of(runs["plain"])
    chunk_length = {(embed, chunk_tokens): identity(TASK, "test", System(plain, embed, chunk_tokens=chunk_tokens),
                                                    check_system(System(plain, embed), TASK))["chunk_tokens"]
                    for embed, chunk_tokens in (("fw", None), ("echo", None), ("fwbw", 8))}
    assert chunk_length == {("fw", None): context, ("echo", None): context // 2, ("fwbw", 8): 8}
    assert identity(TASK, "test", System(), None)["chunk_tokens"] is None
    with pytest.raises(ValueError, match="^bm25 takes no chunk_tokens: those choose a run's embeddings$"):
        check_system(System(chunk_tokens=8), TASK)
    with pytest.raises(ValueError, match=r"^chunk tokens: expected 2..16 \(embed echo"):
        check_system(System(plain, "echo", chunk_tokens=17), TASK)
    # a result from before chunking, which cut texts to the context, is another result
    wanted = identity(TASK, "test", System(plain, "fw"), check_system(System(plain, "fw"), TASK))
    atomic_write_json(tmp_path / "settings.json", {key: value for key, value in wanted.items() if key != "chunk_tokens"})
    with pytest.raises(ValueError, match=rf"other settings \(chunk_tokens: null -> {context}\)"):
        finished_with(tmp_path, wanted)


def test_a_sweep_names_a_given_chunk_length_and_leaves_out_an_echo_it_does_not_fit(finished):
    plan = Plan("ict", "test", chunk_tokens=16, pooling="mean")
    assert result_name(plan, "fw") == "ict-test-fw-c16-mean-ft0"
    assert result_name(plan, "fw", pooled=False) == "ict-fw-ft0"  # the fine-tuning: shared by chunk lengths
    assert result_name(Plan("ict", "test"), "echo") == "ict-test-echo-ft0"  # the default: no -c
    jobs, left_out = plan_jobs(finished.out, Plan(TASK, "test", ("fw", "echo"), chunk_tokens=16))
    runs = finished_runs(finished)
    by_run = {job.system.run.name: job for job in jobs if job.system.run is not None and job.system.embed == "echo"}
    assert runs["plain"].name in by_run and runs["task_tokens"].name not in by_run  # 16 > 31 // 2
    assert by_run[runs["plain"].name].out_dir.name == "beir-tiny-test-echo-c16-ft0"
    assert left_out == [f"{runs['task_tokens'].name}: no echo embed: chunk tokens: expected 2..15 (embed echo reads "
                        "each chunk 2 times within the run's context of 31 tokens), got 16"]
