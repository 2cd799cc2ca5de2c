import functools
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from fwbw.data import corpora as data
from fwbw.data.corpora import (
    load_corpus_tokenizer,
    load_token_data,
    split_wiki_sample,
    validate_corpus_spec,
    wiki_sample_file,
)

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# rows as in the hub's raw WikiText: lines ending in "\n", blank lines as empty rows
WIKITEXT_ROWS = {
    "train": ["", " = Alpha = \n", "", " Alpha is the first letter , and a test article .\n", ""],
    "train2": [" = Beta = \n", "", " Beta follows alpha ; both are letters of the Greek alphabet .\n"],
    "validation": ["", " = Gamma = \n", "", " Gamma is the third letter .\n"],
}


@pytest.fixture(scope="module")
def wiki_splits() -> dict[str, list[str]]:
    return split_wiki_sample(json.loads(wiki_sample_file().read_text()))


@pytest.fixture
def text_dir(tmp_path, wiki_splits) -> Path:
    """A text:DIR corpus of about 100 kB of real English."""
    folder = tmp_path / "my corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("".join(wiki_splits["train"][:200]))
    (folder / "valid.txt").write_text("".join(wiki_splits["valid"][:20]))
    return folder


def fail(*args, **kwargs):
    raise AssertionError("this should have come from the cache")


# --- specs and cache dir -------------------------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FWBW_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FWBW_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / ".cache" / "fwbw"


def test_validate_corpus_spec(text_dir):
    for spec in ("wiki-sample", "wikitext-2", "wikitext-103", f"text:{text_dir}"):
        validate_corpus_spec(spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("wikitext", r"^corpus: unknown 'wikitext' \(expected one of wiki-sample, wikitext-2, wikitext-103 or text:DIR\)$"),
        ("text:", r"^corpus: 'text:DIR' needs a directory"),
        ("text:{dir}/nowhere", r"has no train.txt or valid.txt \(text:DIR needs DIR/train.txt and DIR/valid.txt\)$"),
        ("text:{dir}/only_train", r"has no valid.txt \("),
    ],
)
def test_validate_corpus_spec_rejects_with_one_line(tmp_path, spec, message):
    (tmp_path / "only_train").mkdir()
    (tmp_path / "only_train" / "train.txt").write_text("some text\n")
    with pytest.raises(ValueError, match=message):
        validate_corpus_spec(spec.format(dir=tmp_path))


def test_load_token_data_validates_both_specs(tmp_path):
    with pytest.raises(ValueError, match="^corpus: unknown"):
        load_token_data("wiki", "bpe:300", tmp_path)
    with pytest.raises(ValueError, match="^tokenizer: unknown"):
        load_token_data("wiki-sample", "sentencepiece", tmp_path)
    assert not any(tmp_path.iterdir())


# --- wiki-sample -------------------------------------------------------------------------------


def test_wiki_sample_split_is_disjoint_and_sizeable(wiki_splits):
    articles = json.loads(wiki_sample_file().read_text())
    titles = {split: [text.split("\n", 1)[0] for text in texts] for split, texts in wiki_splits.items()}
    assert not set(titles["train"]) & set(titles["valid"])
    assert sorted(titles["train"] + titles["valid"]) == sorted(articles)
    assert 0.03 < len(titles["valid"]) / len(articles) < 0.07
    assert len(titles["train"]) > 9000 and len(titles["valid"]) > 300
    assert sum(map(len, wiki_splits["train"])) > 4_000_000
    first = titles["train"][0]
    assert wiki_splits["train"][0] == f"{first}\n{articles[first]['extract']}\n\n"


def test_wiki_sample_split_ignores_dict_order(wiki_splits):
    articles = json.loads(wiki_sample_file().read_text())
    assert split_wiki_sample(dict(reversed(articles.items()))) == wiki_splits


def test_wiki_sample_split_ignores_hash_seed(wiki_splits):
    code = (
        "import hashlib, json; from fwbw.data.corpora import split_wiki_sample, wiki_sample_file; "
        "s = split_wiki_sample(json.loads(wiki_sample_file().read_text())); "
        "print(hashlib.sha256(''.join(s['valid']).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256("".join(wiki_splits["valid"]).encode()).hexdigest()


def test_wiki_sample_bpe8192_end_to_end(tmp_path, wiki_splits, monkeypatch):
    d = load_token_data("wiki-sample", "bpe:8192", tmp_path, progress=False)
    assert (d.corpus, d.tokenizer, d.vocab_size) == ("wiki-sample", "bpe:8192", 8192)
    assert isinstance(d.train, np.memmap) and d.train.dtype == np.uint16 and d.train.ndim == 1
    assert len(d.train) > 1_000_000 and len(d.valid) > 40_000
    assert int(d.train.max()) < 8192 and int(d.valid.max()) < 8192
    tok = load_corpus_tokenizer("wiki-sample", "bpe:8192", tmp_path)
    assert tok.decode(d.valid.tolist()) == "".join(wiki_splits["valid"])

    monkeypatch.setattr(data, "_write_tokens", fail)
    again = load_token_data("wiki-sample", "bpe:8192", tmp_path, progress=False)
    assert np.array_equal(again.train, d.train) and np.array_equal(again.valid, d.valid)


# --- text:DIR ----------------------------------------------------------------------------------


def test_text_dir_tokens_match_whole_text_encoding(tmp_path, text_dir, monkeypatch, capsys):
    monkeypatch.setattr(data, "CHUNK_CHARS", 100)  # many chunks and batches, to check the cuts
    monkeypatch.setattr(data, "CHUNKS_PER_BATCH", 7)
    d = load_token_data(f"text:{text_dir}", "bpe:300", tmp_path / "cache")
    assert "tokenize text:" in capsys.readouterr().err  # the progress bar
    tok = load_corpus_tokenizer(f"text:{text_dir}", "bpe:300", tmp_path / "cache")
    for split, array in (("train", d.train), ("valid", d.valid)):
        text = (text_dir / f"{split}.txt").read_text()
        assert array.tolist() == tok.encode(text)
        assert tok.decode(array.tolist()) == text
    [folder] = (tmp_path / "cache" / "tokens").iterdir()
    assert folder.name.startswith("text-my_corpus-")
    assert sorted(p.name for p in (folder / "bpe-300").iterdir()) == ["meta.json", "train.bin", "valid.bin"]


def test_text_chunks_cut_only_before_whitespace(monkeypatch):
    monkeypatch.setattr(data, "CHUNK_CHARS", 10)
    pieces = ["Hello, world!\n", "\n", "x" * 25, "  y\tz", "", "\n\nend. "]
    chunks = list(data._text_chunks(pieces))
    assert "".join(chunks) == "".join(pieces)
    assert len(chunks) == 3 and "x" * 25 + "  y" in chunks[1]  # no cut inside a run of non-space
    for left, right in zip(chunks, chunks[1:]):
        assert not left[-1].isspace() and right[0] in " \t\n"


def test_text_dir_cache_reused_and_invalidated_by_edits(tmp_path, text_dir, monkeypatch):
    cache = tmp_path / "cache"
    first = load_token_data(f"text:{text_dir}", "bpe:300", cache, progress=False)
    with monkeypatch.context() as m:
        m.setattr(data, "_write_tokens", fail)
        m.setattr(data, "load_tokenizer", fail)
        again = load_token_data(f"text:{text_dir}/../{text_dir.name}", "bpe:300", cache, progress=False)
    assert np.array_equal(again.train, first.train)

    (text_dir / "valid.txt").write_text("A different validation text.\n")
    edited = load_token_data(f"text:{text_dir}", "bpe:300", cache, progress=False)
    assert np.array_equal(edited.train, first.train) and not np.array_equal(edited.valid, first.valid)
    assert len(list((cache / "tokens").iterdir())) == 2


def test_text_dir_incomplete_cache_is_rebuilt(tmp_path, text_dir):
    first = np.array(load_token_data(f"text:{text_dir}", "bpe:300", tmp_path, progress=False).train)
    [train_bin] = (tmp_path / "tokens").glob("*/bpe-300/train.bin")
    train_bin.write_bytes(train_bin.read_bytes()[:-2])  # e.g. a crash while copying the cache
    again = load_token_data(f"text:{text_dir}", "bpe:300", tmp_path, progress=False)
    assert np.array_equal(again.train, first)


def test_text_dir_with_gpt2(tmp_path, text_dir, monkeypatch):
    ranks = {bytes([i]): i for i in range(256)}  # a real tiktoken Encoding, built offline
    encoding = tiktoken.Encoding("bytes", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)
    d = load_token_data(f"text:{text_dir}", "gpt2", tmp_path, progress=False)
    assert d.vocab_size == 256
    assert d.valid.tobytes()[::2] == (text_dir / "valid.txt").read_bytes()  # uint16 little-endian ids


def test_gpt2_offline_error_reaches_the_caller(tmp_path, text_dir, monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
        load_token_data(f"text:{text_dir}", "gpt2", tmp_path, progress=False)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_text_dir_empty_split(tmp_path, text_dir, split):
    (text_dir / f"{split}.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"^corpus 'text:.*': the {split} split has no text$"):
        load_token_data(f"text:{text_dir}", "bpe:300", tmp_path, progress=False)


def test_text_dir_not_utf8(tmp_path, text_dir):
    (text_dir / "train.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="train.txt is not UTF-8 text"):
        load_token_data(f"text:{text_dir}", "bpe:300", tmp_path, progress=False)


# --- wikitext ----------------------------------------------------------------------------------


def write_parquet(path: Path, rows: list[str], column: str = "text") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: rows}), path)


def build_mirror(root: Path) -> None:
    """Both WikiText configs in the hub's layout, with tiny texts."""
    for name, (config, files) in data.WIKITEXT_FILES.items():
        for i, f in enumerate(files["train"]):
            write_parquet(root / config / f, WIKITEXT_ROWS["train" if i == 0 else "train2"])
        write_parquet(root / config / files["valid"][0], WIKITEXT_ROWS["validation"])


class Mirror:
    """An HTTP server on 127.0.0.1 serving a folder, counting the files it serves."""

    def __init__(self, root: Path):
        self.root, self.requests = root, []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    build_mirror(tmp_path / "mirror")
    server = Mirror(tmp_path / "mirror")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv(data.WIKITEXT_URL_ENV, server.url)
    yield server
    server.server.shutdown()
    server.server.server_close()


def refused_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def wikitext_text(split: str) -> str:
    return "".join(WIKITEXT_ROWS[split])


def test_wikitext_file_names():
    assert data.WIKITEXT_FILES["wikitext-103"] == (
        "wikitext-103-raw-v1",
        {
            "train": ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"],
            "valid": ["validation-00000-of-00001.parquet"],
        },
    )
    assert data.WIKITEXT_URL == "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main"


def test_wikitext_download_and_tokens(tmp_path, mirror):
    cache = tmp_path / "cache"
    d = load_token_data("wikitext-2", "bpe:300", cache, progress=False)
    assert sorted(mirror.requests) == [
        "/wikitext-2-raw-v1/train-00000-of-00001.parquet",
        "/wikitext-2-raw-v1/validation-00000-of-00001.parquet",
    ]
    tok = load_corpus_tokenizer("wikitext-2", "bpe:300", cache)
    assert tok.decode(d.train.tolist()) == wikitext_text("train")
    assert tok.decode(d.valid.tolist()) == wikitext_text("validation")
    manifest = json.loads((cache / "wikitext" / "manifest.json").read_text())
    for rel, digest in manifest.items():
        assert hashlib.sha256((cache / "wikitext" / rel).read_bytes()).hexdigest() == digest
    assert len(manifest) == 2
    assert not list(cache.rglob("*.tmp"))

    # other tokenizer: new tokens from the downloaded files, nothing fetched again
    load_token_data("wikitext-2", "bpe:260", cache, progress=False)
    assert len(mirror.requests) == 2


def test_wikitext_103_concatenates_train_files(tmp_path, mirror):
    d = load_token_data("wikitext-103", "bpe:300", tmp_path, progress=False)
    tok = load_corpus_tokenizer("wikitext-103", "bpe:300", tmp_path)
    assert tok.decode(d.train.tolist()) == wikitext_text("train") + wikitext_text("train2")
    assert len(mirror.requests) == 3


def test_wikitext_corrupted_cache_is_downloaded_again(tmp_path, mirror, capsys):
    first = load_token_data("wikitext-2", "bpe:300", tmp_path, progress=False)
    cached = tmp_path / "wikitext" / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet"
    cached.write_bytes(cached.read_bytes()[:-10] + b"corrupted!")
    again = load_token_data("wikitext-2", "bpe:300", tmp_path, progress=False)
    assert "fails its sha256 check; downloading it again" in capsys.readouterr().err
    assert mirror.requests[-1] == "/wikitext-2-raw-v1/train-00000-of-00001.parquet" and len(mirror.requests) == 3
    assert np.array_equal(again.train, first.train)


def test_wikitext_changed_upstream_file_is_refused(tmp_path, mirror):
    load_token_data("wikitext-2", "bpe:300", tmp_path, progress=False)
    rel = "wikitext-2-raw-v1/train-00000-of-00001.parquet"
    write_parquet(mirror.root / rel, ["something else\n"])
    (tmp_path / "wikitext" / rel).unlink()
    with pytest.raises(RuntimeError, match=r"train-00000-of-00001.parquet: sha256 \w+ differs from \w+ recorded in"):
        load_token_data("wikitext-2", "bpe:300", tmp_path, progress=False)
    assert not (tmp_path / "wikitext" / rel).exists()


@pytest.mark.parametrize("bad", ["garbage", "no_text_column"])
def test_wikitext_download_that_is_not_parquet_text_is_refused(tmp_path, mirror, bad):
    rel = "wikitext-2-raw-v1/validation-00000-of-00001.parquet"
    if bad == "garbage":
        (mirror.root / rel).write_bytes(b"<html>not found</html>")
    else:
        write_parquet(mirror.root / rel, ["a\n"], column="content")
    message = "is not a readable parquet file" if bad == "garbage" else "has no 'text' column"
    with pytest.raises(RuntimeError, match=message):
        load_token_data("wikitext-2", "bpe:300", tmp_path, progress=False)
    assert not (tmp_path / "wikitext" / rel).exists()
    assert rel not in json.loads((tmp_path / "wikitext" / "manifest.json").read_text())


def test_wikitext_offline_error(tmp_path, monkeypatch):
    url = refused_url()
    monkeypatch.setenv(data.WIKITEXT_URL_ENV, url)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with pytest.raises(RuntimeError) as e:
        load_token_data("wikitext-103", "gpt2", tmp_path, progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download {url}/wikitext-103-raw-v1/train-00000-of-00002.parquet (")
    assert "'wiki-sample'" in message and "'text:DIR'" in message
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no partial downloads left


def test_wikitext_files_placed_by_hand_work_offline(tmp_path, monkeypatch):
    build_mirror(tmp_path / "wikitext")  # the cache layout is the hub's layout
    monkeypatch.setenv(data.WIKITEXT_URL_ENV, refused_url())
    d = load_token_data("wikitext-2", "bpe:300", tmp_path, progress=False)
    assert len(d.train) > 0
    assert len(json.loads((tmp_path / "wikitext" / "manifest.json").read_text())) == 2


def test_wikitext_from_file_url(tmp_path, monkeypatch):
    build_mirror(tmp_path / "mirror")
    monkeypatch.setenv(data.WIKITEXT_URL_ENV, (tmp_path / "mirror").as_uri())
    d = load_token_data("wikitext-2", "bpe:300", tmp_path / "cache", progress=False)
    assert len(d.valid) > 0
