"""The around embed (the fw state before each token and the bw state after it), query fillers and
markers (fwbw.retrieval.encoder), in a result's settings and a sweep's folder names
(fwbw.retrieval.experiment, fwbw.study.retrieval_sweep)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_retrieval_encoder import PREFIX, SHARED_PREFIX, finished_runs, vectors_of

from fwbw.files import atomic_write_json
from fwbw.retrieval.encoder import FILLER_TEXT, MARKERS, check_fillers, filler_id, load_encoder
from fwbw.retrieval.experiment import System, check_system, finished_with, identity, variant
from fwbw.study.retrieval_sweep import Plan, result_name

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

TASK = "beir:/nowhere/tiny"  # a task every run may take; none of these tests loads it
QUERIES = {"a": PREFIX, "b": "A monk said the harbour master guarded it."}


@pytest.fixture(scope="module")
def runs(finished) -> dict[str, Path]:
    return finished_runs(finished)


def states(encoder, sequence: list[int], direction: str) -> torch.Tensor:
    """Unit hidden states [len(sequence), width] of one pass over exactly `sequence`."""
    with torch.no_grad():
        return F.normalize(encoder.model.hidden(torch.tensor([sequence]), direction)[0].float(), dim=-1)


def markers(encoder) -> tuple[list[int], list[int]]:
    config = encoder.model.config
    return ([config.fw_token_id], [config.bw_token_id]) if config.task_tokens else ([], [])


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
def test_around_is_the_fw_state_before_each_token_and_the_bw_state_after_it(runs, name):
    encoder = load_encoder(runs[name], "around", progress=False)
    ids = encoder.tokenize({"a": PREFIX})[0]
    fw_marker, bw_marker = markers(encoder)
    fw = states(encoder, [*fw_marker, *ids], "fw")  # row t + len(fw_marker): token t's
    bw = states(encoder, [*ids, *bw_marker], "bw")  # row t: token t's; row len(ids): the bw marker's
    zero = torch.zeros(1, fw.shape[1])
    before = torch.cat([zero, fw[: len(ids) - 1]]) if not fw_marker else fw[: len(ids)]
    after = torch.cat([bw[1 : len(ids)], zero]) if not bw_marker else bw[1 : len(ids) + 1]
    expected = torch.cat([before, after], dim=1) / math.sqrt(2)
    torch.testing.assert_close(vectors_of(encoder.encode({"a": PREFIX}), "a"), expected, atol=1e-3, rtol=0)
    assert expected[0, : fw.shape[1]].abs().sum() > 0 if fw_marker else expected[0, : fw.shape[1]].abs().sum() == 0


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
def test_around_never_sees_the_token_it_embeds(runs, name):
    """Two texts that differ in one token only: the around vector of that token is the same in both,
    those of its neighbours are not (each has read it)."""
    encoder = load_encoder(runs[name], "around", progress=False)
    ids = encoder.tokenize({"a": PREFIX})[0]
    changed = [*ids]
    where = len(ids) // 2
    changed[where] = (ids[where] + 1) % encoder.model.config.vocab_size
    texts = {"one": encoder.tokenizer.decode(ids), "two": encoder.tokenizer.decode(changed)}
    assert encoder.tokenize(texts) == [ids, changed]
    embeddings = encoder.encode(texts)
    one, two = vectors_of(embeddings, "one"), vectors_of(embeddings, "two")
    torch.testing.assert_close(one[where], two[where], atol=1e-3, rtol=0)
    for neighbour in (where - 1, where + 1):
        assert (one[neighbour] - two[neighbour]).abs().max() > 0.01
    fwbw = load_encoder(runs[name], "fwbw", progress=False).encode(texts)
    assert (vectors_of(fwbw, "one")[where] - vectors_of(fwbw, "two")[where]).abs().max() > 0.01  # fwbw reads it


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
def test_query_fillers_follow_a_fw_query_and_precede_a_bw_one_paired_by_their_distance_from_it(runs, name):
    encoder = load_encoder(runs[name], "fwbw", progress=False)
    fillers, filler = 3, filler_id(encoder.tokenizer)
    ids = encoder.tokenize({"a": PREFIX})[0]
    fw_marker, bw_marker = markers(encoder)
    fw = states(encoder, [*fw_marker, *ids, *[filler] * fillers], "fw")[len(fw_marker) :]
    bw = states(encoder, [*[filler] * fillers, *ids, *bw_marker], "bw")[: fillers + len(ids)]
    bw_in_order = torch.cat([bw[fillers:], bw[:fillers].flip(0)])  # the text's tokens, then fillers nearest first
    expected = torch.cat([fw, bw_in_order], dim=1) / math.sqrt(2)
    embeddings = encoder.encode({"a": PREFIX}, fillers)
    assert embeddings.lengths.tolist() == [len(ids) + fillers]
    torch.testing.assert_close(vectors_of(embeddings, "a"), expected, atol=1e-3, rtol=0)
    # the text's own tokens keep the vectors they have without fillers: neither pass reads its fillers first
    torch.testing.assert_close(vectors_of(embeddings, "a")[: len(ids)], vectors_of(encoder.encode({"a": PREFIX}), "a"),
                               atol=1e-3, rtol=0)


def test_every_filler_has_read_the_whole_query(runs):
    """A query changed at its far end (the first token for fw, the last for bw) changes every filler
    (by little in this tiny model); changed at its near end, every filler too, but not at all the
    token vectors that cannot have read the change."""
    fillers = 2
    fw, bw = (load_encoder(runs["plain"], embed, progress=False) for embed in ("fw", "bw"))
    ids = fw.tokenize({"a": PREFIX})[0]
    vocab = fw.model.config.vocab_size
    first, last = [(ids[0] + 1) % vocab, *ids[1:]], [*ids[:-1], (ids[-1] + 1) % vocab]
    texts = {name: fw.tokenizer.decode(tokens) for name, tokens in (("same", ids), ("first", first), ("last", last))}
    assert fw.tokenize(texts) == [ids, first, last]
    for encoder, far, near, unseen in ((fw, "first", "last", slice(0, len(ids) - 1)), (bw, "last", "first", slice(1, len(ids)))):
        embeddings = encoder.encode(texts, fillers)
        far_change, near_change = ((vectors_of(embeddings, "same") - vectors_of(embeddings, changed)).abs().amax(dim=1)
                                   for changed in (far, near))
        assert far_change[len(ids) :].min() > 0 and near_change[len(ids) :].min() > 0
        assert near_change[unseen].max() == 0


def test_a_query_with_fillers_is_chunked_so_that_chunk_and_fillers_fit_where_a_chunk_did(runs):
    encoder = load_encoder(runs["plain"], "fw", chunk_tokens=6, progress=False)
    ids = encoder.tokenize({"a": PREFIX})[0]
    assert len(ids) > 6
    embeddings = encoder.encode({"a": PREFIX}, 2)  # chunks of 4 tokens, each with its 2 fillers
    starts = list(range(0, len(ids) - 4, 2)) + [len(ids) - 4]
    assert embeddings.lengths.tolist() == [len(set(starts)) * 6]
    with pytest.raises(ValueError, match="^query fillers: expected 0..4 \\(chunks of 6 tokens keep at least 2 of the "
                                         "text's own\\), got 5$"):
        encoder.encode({"a": PREFIX}, 5)
    assert check_fillers(0, 2) == 0


def test_queries_with_fillers_are_cached_apart_from_those_without(runs, tmp_path):
    encoder = load_encoder(runs["plain"], "fw", cache_dir=tmp_path, progress=False)
    plain, filled = encoder.encode(SHARED_PREFIX), encoder.encode(SHARED_PREFIX, 2)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert torch.equal(encoder.encode(SHARED_PREFIX, 2).vectors, filled.vectors)  # read back from the cache
    assert int(filled.lengths.sum()) == int(plain.lengths.sum()) + 2 * len(SHARED_PREFIX)


def test_the_filler_is_one_token_of_the_run_s_tokenizer(runs):
    encoder = load_encoder(runs["plain"], "fw", progress=False)
    assert encoder.tokenizer.encode(FILLER_TEXT) == [filler_id(encoder.tokenizer)]

    class Splitting:
        def encode(self, text):
            return [1, 2]

    with pytest.raises(ValueError, match="^query fillers: the run's tokenizer reads the filler '\\\\n' as 2 tokens, not one$"):
        filler_id(Splitting())


@pytest.mark.parametrize(
    "system, message",
    [
        (dict(embed="fw", query_fillers=2, finetune_steps=5), "query fillers: zero-shot only"),
        (dict(embed="fw", query_fillers=2, pooling="mean"), "query fillers: late interaction only"),
        (dict(embed="around", pooling="last"), "pooling last: embed around's states never see a whole chunk"),
        (dict(embed="fw", query_fillers=-1), "query fillers: expected 0.."),
    ],
)
def test_systems_that_cannot_use_fillers_or_the_around_embed_are_one_line(runs, system, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        check_system(System(runs["plain"], **system), TASK)


def test_bm25_takes_no_query_fillers():
    with pytest.raises(ValueError, match="^bm25 takes no query fillers"):
        check_system(System(query_fillers=2), TASK)


def test_the_around_embed_pools_by_mean(runs):
    encoder = load_encoder(runs["plain"], "around", progress=False)
    pooled = encoder.encode_pooled(QUERIES, "mean")
    assert pooled.lengths.tolist() == [1, 1]
    views = encoder.view_embeddings(QUERIES)
    for text_id in QUERIES:  # each view's token vectors averaged and normalised, then combined
        means = [F.normalize(vectors_of(view, text_id).mean(dim=0), dim=0) for view in views]
        torch.testing.assert_close(vectors_of(pooled, text_id)[0], torch.cat(means) / math.sqrt(2), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="^pooling last: embed around's"):
        load_encoder(runs["plain"], "around", progress=False).encode_pooled(QUERIES, "last")


def test_fillers_are_part_of_a_result_s_settings_and_a_result_from_before_them_had_none(runs, tmp_path):
    config = check_system(System(runs["plain"], "fw"), TASK)
    wanted = identity(TASK, "dev", System(runs["plain"], "fw"), config)
    assert wanted["query_fillers"] == 0
    before = {key: value for key, value in wanted.items() if key != "query_fillers"}  # written before fillers existed
    atomic_write_json(tmp_path / "settings.json", before)
    (tmp_path / "metrics.json").write_text("{}")
    assert finished_with(tmp_path, wanted)
    filled = identity(TASK, "dev", System(runs["plain"], "fw", query_fillers=4), config)
    with pytest.raises(ValueError, match="holds the retrieval result of other settings \\(query_fillers"):
        finished_with(tmp_path, filled)
    assert variant({**filled, "chunk_tokens": 12}) == "chunks 12, 4 query fillers"
    assert json.loads((tmp_path / "settings.json").read_text()) == before


def test_a_sweep_names_a_result_with_fillers_apart():
    plan = Plan("description", "dev", query_fillers=4)
    assert result_name(plan, "fwbw") == "description-dev-fwbw-qf4-ft0"
    assert result_name(Plan("description", "dev"), "fwbw") == "description-dev-fwbw-ft0"


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
def test_a_marker_is_read_first_by_either_pass_and_its_states_are_not_embedded(runs, name):
    encoder = load_encoder(runs[name], "fwbw", progress=False)
    ids = encoder.tokenize({"a": PREFIX})[0]
    marker = encoder.tokenizer.encode(MARKERS["query"])
    fw_marker, bw_marker = markers(encoder)
    fw = states(encoder, [*fw_marker, *marker, *ids], "fw")[len(fw_marker) + len(marker) :]
    bw = states(encoder, [*ids, *marker, *bw_marker], "bw")[: len(ids)]
    embeddings = encoder.encode({"a": PREFIX}, marker=MARKERS["query"])
    assert embeddings.lengths.tolist() == [len(ids)]
    torch.testing.assert_close(vectors_of(embeddings, "a"), torch.cat([fw, bw], dim=1) / math.sqrt(2), atol=1e-3, rtol=0)
    plain, document = (vectors_of(encoder.encode({"a": PREFIX}, marker=text), "a") for text in (None, MARKERS["document"]))
    for other in (plain, document):  # each token's state knows which side of the search it is on
        assert (vectors_of(embeddings, "a") - other).abs().amax(dim=1).min() > 0


def test_a_marker_and_fillers_share_a_chunk_with_the_text(runs, tmp_path):
    marker = len(load_encoder(runs["plain"], "fw", progress=False).tokenizer.encode(MARKERS["query"]))
    chunk_tokens, room = marker + 2 + 4, 4  # 2 fillers, 4 of the text's own tokens
    encoder = load_encoder(runs["plain"], "fw", chunk_tokens=chunk_tokens, cache_dir=tmp_path, progress=False)
    ids = encoder.tokenize({"a": PREFIX})[0]
    assert len(ids) > room
    embeddings = encoder.encode({"a": PREFIX}, 2, MARKERS["query"])
    starts = sorted({*range(0, len(ids) - room, room // 2), len(ids) - room})
    assert embeddings.lengths.tolist() == [len(starts) * (room + 2)]
    with pytest.raises(ValueError, match=f"^query fillers: expected 0..4 \\(chunks of {chunk_tokens} tokens keep at "
                                         f"least 2 of the text's own beside a marker of {marker}\\), got 5$"):
        encoder.encode({"a": PREFIX}, 5, MARKERS["query"])
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    encoder.encode({"a": PREFIX}, 2)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # without the marker: cached apart


def test_fine_tuning_embeds_a_text_s_first_chunk_after_its_marker_as_the_search_does(runs):
    marker = len(load_encoder(runs["plain"], "fw", progress=False).tokenizer.encode(MARKERS["document"]))
    encoder = load_encoder(runs["plain"], "fwbw", chunk_tokens=marker + 5, progress=False)
    vectors, mask = encoder.embed_batch([PREFIX], MARKERS["document"])
    assert int(mask.sum()) == 5
    first_chunk = encoder.encode({"a": encoder.tokenizer.decode(encoder.tokenize({"a": PREFIX})[0][:5])},
                                 marker=MARKERS["document"])
    torch.testing.assert_close(vectors[0].detach(), vectors_of(first_chunk, "a"), atol=1e-3, rtol=0)


def test_markers_are_part_of_a_result_s_settings_and_a_sweep_s_folder_names(runs):
    config = check_system(System(runs["plain"], "fw"), TASK)
    marked = identity(TASK, "dev", System(runs["plain"], "fw", markers=True), config)
    assert marked["markers"] is True and variant(marked) == "chunks 32, markers"
    tuned = identity(TASK, "dev", System(runs["plain"], "fw", finetune_steps=3, markers=True), config)
    assert tuned["finetune"]["markers"] is True
    plan = Plan("description", "dev", markers=True, finetune_steps=3)
    assert result_name(plan, "fw") == "description-dev-fw-mk-ft3"
    assert result_name(plan, "fw", pooled=False) == "description-fw-mk-ft3"
    with pytest.raises(ValueError, match="^bm25 takes no markers"):
        check_system(System(markers=True), TASK)


@pytest.mark.parametrize("name", ["plain", "task_tokens"])
@pytest.mark.parametrize("embed, fillers, marker", [("around", 0, None), ("fwbw", 3, None), ("around", 2, "query"),
                                                    ("echo", 2, "document"), ("bw", 0, "query")])
def test_texts_of_different_lengths_in_one_batch_embed_as_each_alone(runs, name, embed, fillers, marker):
    """Padding (fw rows on the right, bw rows on the left) never reaches a vector, a shifted state
    at a chunk's edge included."""
    encoder = load_encoder(runs[name], embed, progress=False)
    texts = {"short": "The miller", **QUERIES, "mid": "Then the harbour master said"}
    marker = MARKERS[marker] if marker else None
    together = encoder.encode(texts, fillers, marker)
    for text_id, text in texts.items():
        alone = encoder.encode({text_id: text}, fillers, marker)
        torch.testing.assert_close(vectors_of(together, text_id), vectors_of(alone, text_id), atol=1e-3, rtol=0)
    assert len({len(ids) for ids in encoder.tokenize(texts)}) >= 3  # padded in the batch
