import json
import threading

import pytest
import requests
import tiktoken

from fwbw.data.corpora import split_wiki_sample, wiki_sample_file
from fwbw.data.tokenizer import load_tokenizer, validate_tokenizer_spec

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
UNICODE_TEXT = "Zoë's café costs 3.50€ — naïve 東京 🙂\n\n\t  tabs,  spaces  <|endoftext|> end"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """About 100 kB of real English: the first few hundred wiki-sample train articles."""
    return split_wiki_sample(json.loads(wiki_sample_file().read_text()))["train"][:250]


def byte_encoding() -> tiktoken.Encoding:
    """A real tiktoken Encoding without merges (one id per byte), built offline."""
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding("bytes", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


def not_called():
    raise AssertionError("train_text was called: the tokenizer was trained again")


@pytest.mark.parametrize("spec", ["gpt2", "bpe:257", "bpe:8192", "bpe:65535"])
def test_validate_accepts(spec):
    validate_tokenizer_spec(spec)


@pytest.mark.parametrize(
    "spec", ["foo", "GPT2", "gpt-2", "bpe", "bpe:", "bpe:256", "bpe:65536", "bpe:8k", "bpe:-300", "bpe:１２３４"]
)
def test_validate_rejects_with_one_line(spec):
    with pytest.raises(ValueError, match=r"^tokenizer: ") as e:
        validate_tokenizer_spec(spec)
    assert "\n" not in str(e.value) and repr(spec) in str(e.value)


def test_bpe_round_trips_and_has_vocab_n(tmp_path, texts):
    tok = load_tokenizer("bpe:512", lambda: texts, tmp_path)
    assert tok.name == "bpe:512" and tok.vocab_size == 512
    assert tok._tok.get_vocab_size() == 512  # enough text for all 256 merges
    whole = "".join(texts)
    ids = tok.encode(whole)
    assert 0 <= min(ids) and max(ids) < 512
    assert len(ids) < len(whole.encode()) / 2  # merges compress English well
    assert tok.decode(ids) == whole
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT  # byte fallback: any text round-trips
    assert tok.encode_batch([whole[:1000], UNICODE_TEXT]) == [tok.encode(whole[:1000]), tok.encode(UNICODE_TEXT)]


def test_bpe_is_cached_and_not_retrained(tmp_path, texts):
    first = load_tokenizer("bpe:300", lambda: texts, tmp_path)
    path = tmp_path / "bpe-300.json"
    mtime = path.stat().st_mtime_ns
    second = load_tokenizer("bpe:300", not_called, tmp_path)
    assert path.stat().st_mtime_ns == mtime
    assert second.encode(texts[0]) == first.encode(texts[0])
    assert [p.name for p in tmp_path.iterdir()] == ["bpe-300.json"]  # no temporary files left
    load_tokenizer("bpe:320", lambda: texts, tmp_path)  # another N is another file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe-300.json", "bpe-320.json"]


def test_bpe_training_is_deterministic(tmp_path, texts):
    load_tokenizer("bpe:400", lambda: texts, tmp_path / "a")
    load_tokenizer("bpe:400", lambda: iter(texts), tmp_path / "b")
    assert (tmp_path / "a" / "bpe-400.json").read_bytes() == (tmp_path / "b" / "bpe-400.json").read_bytes()


def test_load_tokenizer_validates_spec(tmp_path):
    with pytest.raises(ValueError, match="tokenizer: unknown 'bpe8192'"):
        load_tokenizer("bpe8192", not_called, tmp_path)


def test_gpt2_wraps_tiktoken(monkeypatch, tmp_path):
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: byte_encoding())
    tok = load_tokenizer("gpt2", not_called, tmp_path)
    assert tok.name == "gpt2" and tok.vocab_size == 256
    assert tok.encode("hé<|endoftext|>") == list("hé<|endoftext|>".encode())  # special text stays plain
    assert tok.encode_batch(["ab", "c"]) == [[97, 98], [99]]
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT


@pytest.mark.parametrize(
    "error",
    [requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'"), ValueError("Hash mismatch")],
)
def test_gpt2_unavailable_gives_one_clear_line(monkeypatch, tmp_path, error):
    def fail(name):
        raise error

    monkeypatch.setattr(tiktoken, "get_encoding", fail)
    with pytest.raises(RuntimeError) as e:
        load_tokenizer("gpt2", not_called, tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("tokenizer 'gpt2': cannot load")
    assert "TIKTOKEN_CACHE_DIR" in message and "'bpe:N'" in message


def test_gpt2_real_call_loads_or_fails_clearly(tmp_path):
    """Online (or with a filled TIKTOKEN_CACHE_DIR) this loads GPT-2; offline it must fail fast and clearly."""
    outcome: dict = {}

    def attempt():
        try:
            outcome["tok"] = load_tokenizer("gpt2", not_called, tmp_path)
        except Exception as e:  # noqa: BLE001 - the assertions below check which exception
            outcome["error"] = e

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():
        pytest.skip("tiktoken's download neither finished nor failed within 60 s (network blackhole)")
    if "tok" in outcome:
        tok = outcome["tok"]
        assert tok.vocab_size == 50257 and tok.encode("Hello world") == [15496, 995]
    else:
        assert isinstance(outcome["error"], RuntimeError), outcome["error"]
        assert "TIKTOKEN_CACHE_DIR" in str(outcome["error"]) and "\n" not in str(outcome["error"])
