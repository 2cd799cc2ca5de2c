"""Golden numbers: the validation losses of one tiny, fully specified run on CPU (fp32, one
thread, no torch.compile) on a corpus this test writes itself, pinned to rel 1e-6.

Any change of these numbers must be conscious: a change to the model, the tasks, the recipe, the
data pipeline, the tokenizer or the sampling that moves them is a change of every result. Whoever
changes them updates the constants below in the same commit and says in its message why they moved
(a deliberate change of method, or a new torch / tokenizers version; then name the versions)."""

from __future__ import annotations

import json
import random

import pytest
from conftest import read_metrics, tiny_config

from fwbw.data.corpora import load_token_data
from fwbw.training.config import RecipeConfig
from fwbw.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = (
    "the a of and to in was he she it that for on with as his her they at by from this had not are but "
    "river stone house garden winter morning letter king queen soldier market bridge road village bell "
    "walked carried found opened closed remembered wrote painted followed waited sold built "
    "old young quiet long small bright cold early late north west"
).split()

TOKENIZER = "bpe:300"

# measured with torch 2.13.0+cpu and tokenizers 0.23.3 on CPU, fp32, one thread (see the module
# docstring before changing them)
TRAIN_TOKENS, VALID_TOKENS = 13533, 2736
STEPS = [5, 10, 13, 16, 18]
FW_LOSSES = [5.082436561584473, 4.027032852172852, 3.6271865367889404, 3.3605082035064697, 3.217844247817993]
BW_LOSSES = [5.237051963806152, 4.312051296234131, 3.873084545135498, 3.7076051235198975, 3.6419174671173096]
TRAIN_LOSSES = [5.619097518920898, 4.730203342437744, 3.969457467397054, 3.59636789560318, 3.5324061810970306]


def golden_text(rng: random.Random, words: int) -> str:
    """Sentences of 4 to 12 words from WORDS, five to a line."""
    lines, sentences, count = [], [], 0
    while count < words:
        length = rng.randint(4, 12)
        sentence = " ".join(rng.choice(WORDS) for _ in range(length))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        count += length
        if len(sentences) == 5:
            lines.append(" ".join(sentences))
            sentences = []
    lines.append(" ".join(sentences))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def golden_corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("golden")
    folder = root / "text"
    folder.mkdir()
    rng = random.Random(2024)
    (folder / "train.txt").write_text(golden_text(rng, 4000))
    (folder / "valid.txt").write_text(golden_text(rng, 800))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FWBW_CACHE", str(root / "cache"))
        yield f"text:{folder}"


def golden_config(data: str):
    return tiny_config(
        data=data, tokenizer=TOKENIZER, depth=2, width=32, seq_len=32, p_bw=0.5, seed=100,
        train_tokens=6400, eval_every_epochs=0.09, eval_tokens=1024, checkpoint_every_steps=1000,
        dtype="fp32", device="cpu", compile=False, threads=1,
        recipe=RecipeConfig(tokens_per_microbatch=256, seq_len_growth_steps=4, lr_scale=0.05, accum_max=2.0),
    )


def test_golden_run(tmp_path, golden_corpus):
    data = load_token_data(golden_corpus, TOKENIZER, progress=False)
    summary = train(golden_config(golden_corpus), tmp_path / "run", progress=False)
    metrics = read_metrics(tmp_path / "run")
    measured = {name: [record[key] for record in metrics] for name, key in
                (("STEPS", "step"), ("FW_LOSSES", "fw_loss"), ("BW_LOSSES", "bw_loss"), ("TRAIN_LOSSES", "train_loss"))}
    print(f"train tokens {len(data.train)}, valid tokens {len(data.valid)}")
    for name, values in measured.items():
        print(f"{name} = [{', '.join(repr(v) for v in values)}]")

    assert (len(data.train), len(data.valid)) == (TRAIN_TOKENS, VALID_TOKENS)  # the corpus and its BPE
    assert measured["STEPS"] == STEPS
    assert measured["FW_LOSSES"] == pytest.approx(FW_LOSSES, rel=1e-6, abs=1e-7)
    assert measured["BW_LOSSES"] == pytest.approx(BW_LOSSES, rel=1e-6, abs=1e-7)
    assert measured["TRAIN_LOSSES"] == pytest.approx(TRAIN_LOSSES, rel=1e-6, abs=1e-7)

    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["final_val_loss_fw"] == pytest.approx(FW_LOSSES[-1], rel=1e-6, abs=1e-7)
    for key in ("fwbw_version", "git_commit", "torch_version"):
        assert isinstance(saved[key], str) and saved[key], key
    assert saved["threads"] == 1
    assert saved["compiled"] is False
    assert saved["device"] == "cpu"
    assert saved["dtype"] == "fp32"
    assert saved == summary
