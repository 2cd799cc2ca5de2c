"""Shared fixtures.

- tiny_data / tiny_config: an in-memory synthetic token stream and a tiny run config;
- corpus / base_config: a small English-like text:DIR corpus with its BPE cache, built once;
- finished: a tiny sweep trained once, read by the layer-cut, results and rerun tests.
Modules that train on the corpus use `pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from slurm_cluster import slurm_cluster  # noqa: F401  (the private SLURM cluster fixture of test_slurm_real.py)

from fwbw.data.corpora import TokenData, load_token_data
from fwbw.study import sweep_dir
from fwbw.study.sweep import SweepSpec, run_sweep
from fwbw.training.config import RecipeConfig, TrainConfig


def synthetic_stream(rng: np.random.Generator, length: int, vocab: int) -> np.ndarray:
    """x[t+1] = (5 x[t] + 3) mod vocab, with a random token 10% of the time: the map is a
    bijection, so the stream is about equally predictable forwards and backwards."""
    tokens = np.empty(length, dtype=np.uint16)
    tokens[0] = 0
    jumps = rng.random(length) < 0.1
    random_tokens = rng.integers(0, vocab, length)
    for t in range(1, length):
        tokens[t] = random_tokens[t] if jumps[t] else (5 * int(tokens[t - 1]) + 3) % vocab
    return tokens


def synthetic_tokens(seed: int = 0, vocab: int = 64, train_len: int = 40_000) -> TokenData:
    rng = np.random.default_rng(seed)
    return TokenData(synthetic_stream(rng, train_len, vocab), synthetic_stream(rng, 4096, vocab), vocab, "synthetic", "none")


@pytest.fixture
def tiny_data() -> TokenData:
    return synthetic_tokens()


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        depth=2,
        width=32,
        seq_len=32,
        p_bw=0.5,
        train_tokens=12_000,
        eval_every_epochs=0.05,
        eval_tokens=2048,
        dtype="fp32",
        checkpoint_every_steps=4,
        # hlb-gpt's lr formula explodes for a 20k-parameter model: scale it down
        recipe=RecipeConfig(tokens_per_microbatch=512, seq_len_growth_steps=4, lr_scale=0.02),
    )
    values.update(overrides)
    return TrainConfig(**values)


TOKENIZER = "bpe:300"


RECIPE = dict(tokens_per_microbatch=256, lr_scale=0.05, accum_max=2.0)


RECIPE_TOML = "[recipe]\nlr_scale = 0.05\naccum_max = 2.0\n"


SUBJECTS = ["the miller", "a tired soldier", "the old queen", "my brother", "the river pilot", "a quiet monk",
            "the young painter", "our neighbour", "the baker's daughter", "a travelling merchant", "the harbour master",
            "a small fox", "the village priest", "her grandmother", "the stone mason"]


VERBS = ["carried", "remembered", "sold", "painted", "followed", "repaired", "visited", "described", "guarded",
         "discovered", "borrowed", "burned", "measured", "ignored", "praised"]


OBJECTS = ["a wooden boat", "the northern bridge", "an iron key", "the empty market", "a letter from the king",
           "the tallest tower", "a basket of apples", "the frozen lake", "an old map", "the silver bell",
           "a broken cart", "the long road to the coast", "a jar of honey", "the winter garden"]


ENDINGS = ["before the storm", "in the early morning", "after the long war", "near the western gate",
           "with great care", "for three days", "at the end of summer", "under a pale moon", "without a word"]


LINKS = ["and then", "but later", "because", "while", "so that"]


def sentence(rng: random.Random) -> str:
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.5:
        words += f" {rng.choice(ENDINGS)}"
    if rng.random() < 0.3:
        words += f", {rng.choice(LINKS)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.1:
        words += f" in {rng.randint(1100, 1900)}"
    return words[0].upper() + words[1:] + "."


def english_like_text(rng: random.Random, chars: int) -> str:
    paragraphs, size = [], 0
    while size < chars:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(2, 6))) + "\n"
        if rng.random() < 0.15:
            paragraph = f"= {rng.choice(OBJECTS).title()} =\n" + paragraph
        paragraphs.append(paragraph)
        size += len(paragraph)
    return "".join(paragraphs)


@dataclass(frozen=True)
class Corpus:
    folder: Path
    cache: Path
    recipe_toml: Path

    @property
    def spec(self) -> str:
        return f"text:{self.folder}"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """A ~45 KB text:DIR corpus, its BPE and token cache built once for the whole module."""
    root = tmp_path_factory.mktemp("sweep-corpus")
    folder = root / "text"
    folder.mkdir()
    rng = random.Random(1234)
    (folder / "train.txt").write_text(english_like_text(rng, 40_000))
    (folder / "valid.txt").write_text(english_like_text(rng, 5_000))
    recipe_toml = root / "recipe.toml"
    recipe_toml.write_text(RECIPE_TOML)
    found = Corpus(folder, root / "cache", recipe_toml)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FWBW_CACHE", str(found.cache))
        data = load_token_data(found.spec, TOKENIZER, progress=False)
    assert len(data.train) > 15_000 and len(data.valid) > 1_500
    return found


@pytest.fixture(scope="module")
def cache_env(corpus):
    """Every test of this module (and its subprocesses) uses the module's cache, never ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FWBW_CACHE", str(corpus.cache))
        yield


@pytest.fixture(scope="module")
def one_thread():
    with single_thread():
        yield


@contextlib.contextmanager
def single_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    waiting threads slow them down several times; the subprocesses also use one thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def base_config(corpus: Corpus, **overrides) -> TrainConfig:
    values = dict(
        data=corpus.spec, tokenizer=TOKENIZER, depth=1, width=16, train_tokens=4096, eval_tokens=1024,
        checkpoint_every_steps=3, device="cpu", recipe=RecipeConfig(**RECIPE),
    )
    return tiny_config(**{**values, **overrides})


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


def run_dirs(out: Path) -> dict[str, Path]:
    return {path.name: path for path in sorted((Path(out) / sweep_dir.RUNS).iterdir()) if path.is_dir()}


def assert_steps_strictly_increase(run_dir: Path) -> None:
    steps = [record["step"] for record in read_metrics(run_dir)]
    assert steps, f"{run_dir.name} has no metrics"
    assert all(a < b for a, b in zip(steps, steps[1:])), f"{run_dir.name}: steps {steps}"


KEY = ["run_id", "phase", "step", "direction", "blocks_remaining"]


SUBPROCESS_TIMEOUT = 180


def assert_no_duplicate_rows(table: pd.DataFrame) -> None:
    duplicated = table[table.duplicated(KEY, keep=False)]
    assert duplicated.empty, f"duplicate rows:\n{duplicated[KEY]}"


def subprocess_env() -> dict[str, str]:
    # one thread per worker: two workers share a 2-core machine; every compared sweep uses the same
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def sweep_command(corpus: Corpus, out: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "fwbw.cli", "sweep",
        "--config", str(corpus.recipe_toml),
        "--data", corpus.spec, "--tokenizer", TOKENIZER,
        "--depths", "1", "--widths", "16", "32", "--p-bw", "0", "0.5", "--seeds", "1",
        "--seq-len", "32", "--eval-every", "0.1", "--eval-tokens", "1024",
        "--tokens-per-microbatch", "256", "--checkpoint-every", "3", "--device", "cpu", "--dtype", "fp32",
        "--out", str(out), "--no-progress", *flags,
    ]


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=log.parent, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT)


def wait_for(process: subprocess.Popen, log: Path, timeout: float = SUBPROCESS_TIMEOUT) -> str:
    """The process's output once it ends; the test fails, naming it, if it runs past `timeout` seconds."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"{' '.join(map(str, process.args[:5]))} did not finish in {timeout} s:\n{log.read_text()}")
    return log.read_text()


def finish(process: subprocess.Popen, log: Path) -> str:
    output = wait_for(process, log)
    assert process.returncode == 0, output
    return output


@dataclass(frozen=True)
class FinishedSweep:
    out: Path
    spec: SweepSpec
    outcome: dict[str, str]


@pytest.fixture(scope="session")
def finished(tmp_path_factory, corpus) -> FinishedSweep:
    """Nine tiny runs trained in-process: depth 1 and 3 x p_bw 0 and 0.5 x 2 seeds, and one
    extra depth-2 run with task tokens and bw_mode 'either'."""
    extra = base_config(corpus, depth=2, width=32, task_tokens=True, bw_mode="either", p_bw=0.5, seed=7)
    spec = SweepSpec(depths=(1, 3), widths=(16,), p_bws=(0.0, 0.5), seeds=2, base=base_config(corpus),
                     extra_runs=(extra,))
    out = tmp_path_factory.mktemp("finished") / "grid"
    with single_thread():
        outcome = run_sweep(spec, out, progress=False)
    return FinishedSweep(out, spec, outcome)


@pytest.fixture
def train_flags(corpus) -> list[str]:
    """`fwbw train` flags for a one-block run on the corpus that takes about a second."""
    return ["--data", corpus.spec, "--tokenizer", TOKENIZER, "--depth", "1", "--width", "16", "--seq-len", "16",
            "--p-bw", "0.5", "--train-tokens", "3000", "--eval-tokens", "512", "--eval-every", "0.02",
            "--tokens-per-microbatch", "256", "--checkpoint-every", "3", "--dtype", "fp32", "--device", "cpu",
            "--no-progress"]
