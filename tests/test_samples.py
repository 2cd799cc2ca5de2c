"""Samples of a finished run (fwbw.study.samples)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TOKENIZER, base_config

from fwbw.cli import main
from fwbw.data.corpora import load_corpus_tokenizer, load_token_data
from fwbw.model.generate import continue_tokens
from fwbw.study.samples import PROMPT_TOKENS, prompt_starts, write_samples
from fwbw.study.sweep_dir import RUNS
from fwbw.training import checkpoint, run_dir
from fwbw.training.trainer import train

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, cache_env, one_thread):
    """{name: run directory} of two tiny finished runs: the plain one and one with task tokens
    and the leaking legacy-flip bw mask."""
    root = tmp_path_factory.mktemp("samples")
    configs = {
        "plain": base_config(corpus, seq_len=16),
        "leaking": base_config(corpus, seq_len=16, task_tokens=True, bw_mask="legacy-flip"),
    }
    for name, config in configs.items():
        train(config, root / name, progress=False)
    return {name: root / name for name in configs}


@pytest.fixture(scope="module")
def valid(corpus, cache_env):
    return load_token_data(corpus.spec, TOKENIZER, progress=False).valid


@pytest.fixture(scope="module")
def tokenizer(corpus, cache_env):
    return load_corpus_tokenizer(corpus.spec, TOKENIZER, progress=False)


def test_prompt_starts_are_evenly_spaced_with_room_on_both_sides():
    # 100 - 16 - 2 * 24 + 1 = 37 possible starts from 24 on; the middles of three equal parts
    assert prompt_starts(100, 3, 16, 24) == [30, 42, 54]
    assert prompt_starts(42, 2, 1, 20) == [20, 21]  # distinct prompts
    with pytest.raises(ValueError, match="^samples: the validation split has 41 tokens, too few for 2 prompts of 1 "
                       "tokens with 20 on each side$"):
        prompt_starts(41, 2, 1, 20)


def test_samples_continue_held_out_prompts_both_ways(trained, valid, tokenizer):
    run = trained["plain"]
    samples = write_samples(run, prompts=3, new_tokens=NEW_TOKENS)
    assert json.loads((run / run_dir.SAMPLES).read_text()) == samples
    assert {key: samples[key] for key in samples if key != "samples"} == {
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "decoding": "greedy",
        "bw_mask": "causal", "task_tokens": False,
    }
    starts = prompt_starts(len(valid), 3, PROMPT_TOKENS, NEW_TOKENS)
    assert [sample["position"] for sample in samples["samples"]] == starts
    model = checkpoint.load_model(run)
    for sample, start in zip(samples["samples"], starts):
        prompt = valid[start : start + PROMPT_TOKENS].tolist()
        assert sample["prompt_ids"] == prompt
        assert sample["fw_ids"] == continue_tokens(model, prompt, "fw", NEW_TOKENS)
        assert sample["bw_ids"] == continue_tokens(model, prompt, "bw", NEW_TOKENS)
        for key in ("prompt", "fw", "bw"):
            assert sample[key] == tokenizer.decode(sample[f"{key}_ids"])
        assert sample["bw"] + sample["prompt"] + sample["fw"] == tokenizer.decode(
            sample["bw_ids"] + prompt + sample["fw_ids"]
        )
        assert sample["held_out_before"] == tokenizer.decode(valid[start - NEW_TOKENS : start].tolist())
        after = start + PROMPT_TOKENS
        assert sample["held_out_after"] == tokenizer.decode(valid[after : after + NEW_TOKENS].tolist())


def test_samples_are_deterministic(trained):
    run = trained["plain"]
    write_samples(run, prompts=2, new_tokens=8)
    first = (run / run_dir.SAMPLES).read_bytes()
    write_samples(run, prompts=2, new_tokens=8)
    assert (run / run_dir.SAMPLES).read_bytes() == first
    assert len(json.loads(first)["samples"]) == 2


def test_a_leaking_bw_mask_gets_no_bw_samples(trained, valid):
    samples = write_samples(trained["leaking"], prompts=1, new_tokens=4)
    # task tokens: the prompt leaves one of the 16 positions to the marker
    assert (samples["bw_mask"], samples["task_tokens"], samples["prompt_tokens"]) == ("legacy-flip", True, 15)
    (sample,) = samples["samples"]
    assert (sample["bw"], sample["bw_ids"]) == (None, None)
    assert len(sample["fw_ids"]) == 4
    assert sample["prompt_ids"] == valid[sample["position"] : sample["position"] + 15].tolist()


def test_unfinished_or_missing_runs_are_refused(trained, tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path} is not a run directory \\(no config.json\\)$"):
        write_samples(tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / run_dir.CONFIG).write_text((trained["plain"] / run_dir.CONFIG).read_text())
    with pytest.raises(ValueError, match="no trained model \\(model.safetensors\\): has the run finished\\?"):
        write_samples(unfinished)
    with pytest.raises(ValueError, match="too few for 100000 prompts"):
        write_samples(trained["plain"], prompts=100_000)
    assert not (unfinished / run_dir.SAMPLES).exists()


def test_every_sweep_run_writes_its_samples(finished):
    """A sweep's runs are sampled as they finish: greedy, three prompts, 24 tokens each way."""
    runs = sorted((finished.out / RUNS).iterdir())
    assert len(runs) == len(finished.outcome) == 9
    for run in runs:
        samples = json.loads((run / run_dir.SAMPLES).read_text())
        assert (samples["decoding"], samples["new_tokens"], len(samples["samples"])) == ("greedy", NEW_TOKENS, 3)
        model = checkpoint.load_model(run)
        first = samples["samples"][0]
        assert first["fw_ids"] == continue_tokens(model, first["prompt_ids"], "fw", NEW_TOKENS)


@pytest.mark.parametrize("name", ["plain", "leaking"])
def test_cli_prints_the_prompts_and_continuations(trained, capsys, name):
    run = trained[name]
    assert main(["samples", str(run), "--prompts", "2", "--new-tokens", "5"]) == 0
    samples = json.loads((run / run_dir.SAMPLES).read_text())
    assert (samples["new_tokens"], len(samples["samples"])) == (5, 2)
    expected = []
    for i, sample in enumerate(samples["samples"], start=1):
        expected += [f"sample {i} (validation token {sample['position']}):",
                     "  bw      " + ("none: the bw mask reads its own labels" if name == "leaking" else json.dumps(sample["bw"])),
                     f"  prompt  {json.dumps(sample['prompt'])}", f"  fw      {json.dumps(sample['fw'])}"]
    assert capsys.readouterr().out.splitlines() == expected


@pytest.mark.parametrize("case, argv, message", [
    ("empty", [], "{run} is not a run directory (no config.json)"),
    ("unfinished", [], "{run}: no trained model (model.safetensors): has the run finished?"),
    ("unfinished", ["--prompts", "0"], "{run}: no trained model (model.safetensors): has the run finished?"),
    ("finished", ["--prompts", "0"], "samples: need prompts >= 1 and new_tokens >= 0, got 0 and 24"),
])
def test_cli_refuses_bad_runs_in_one_line(trained, tmp_path, capsys, case, argv, message):
    run = tmp_path / case
    if case == "finished":
        shutil.copytree(trained["plain"], run)
        (run / run_dir.SAMPLES).unlink(missing_ok=True)
    else:
        run.mkdir()
    if case == "unfinished":
        (run / run_dir.CONFIG).write_text((trained["plain"] / run_dir.CONFIG).read_text())
    assert main(["samples", str(run), *argv]) == 2
    assert capsys.readouterr().err == f"fwbw samples: error: {message.format(run=run)}\n"
    assert not (run / run_dir.SAMPLES).exists()
