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
    "test": ["", " = Delta = \n", "", " Delta is the fourth letter .\n"],
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
    for spec in ("wiki-sample", "wiki-sample-v2", "wikitext-2", "wikitext-103", f"text:{text_dir}"):
        validate_corpus_spec(spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "wikitext",
            r"^corpus: unknown 'wikitext' \(expected one of wiki-sample, wiki-sample-v2, wikitext-2, "
            r"wikitext-103 or text:DIR\)$",
        ),
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
        write_parquet(root / config / files["test"][0], WIKITEXT_ROWS["test"])


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
            "test": ["test-00000-of-00001.parquet"],
        },
    )
    assert data.WIKITEXT_FILES["wikitext-2"][1]["test"] == ["test-00000-of-00001.parquet"]
    assert data.WIKITEXT_URL == "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main"


def test_wikitext_download_and_tokens(tmp_path, mirror):
    cache = tmp_path / "cache"
    d = load_token_data("wikitext-2", "bpe:300", cache, progress=False)
    assert sorted(mirror.requests) == [
        "/wikitext-2-raw-v1/test-00000-of-00001.parquet",
        "/wikitext-2-raw-v1/train-00000-of-00001.parquet",
        "/wikitext-2-raw-v1/validation-00000-of-00001.parquet",
    ]
    tok = load_corpus_tokenizer("wikitext-2", "bpe:300", cache)
    assert tok.decode(d.train.tolist()) == wikitext_text("train")
    assert tok.decode(d.valid.tolist()) == wikitext_text("validation")
    assert tok.decode(d.test.tolist()) == wikitext_text("test")
    assert d.train_documents == 1
    manifest = json.loads((cache / "wikitext" / "manifest.json").read_text())
    for rel, digest in manifest.items():
        assert hashlib.sha256((cache / "wikitext" / rel).read_bytes()).hexdigest() == digest
    assert len(manifest) == 3
    assert not list(cache.rglob("*.tmp"))

    # other tokenizer: new tokens from the downloaded files, nothing fetched again
    load_token_data("wikitext-2", "bpe:260", cache, progress=False)
    assert len(mirror.requests) == 3


def test_wikitext_103_concatenates_train_files(tmp_path, mirror):
    d = load_token_data("wikitext-103", "bpe:300", tmp_path, progress=False)
    tok = load_corpus_tokenizer("wikitext-103", "bpe:300", tmp_path)
    assert tok.decode(d.train.tolist()) == wikitext_text("train") + wikitext_text("train2")
    assert d.train_documents == 2
    assert len(mirror.requests) == 4


def test_wikitext_corrupted_cache_is_downloaded_again(tmp_path, mirror, capsys):
    first = load_token_data("wikitext-2", "bpe:300", tmp_path, progress=False)
    cached = tmp_path / "wikitext" / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet"
    cached.write_bytes(cached.read_bytes()[:-10] + b"corrupted!")
    again = load_token_data("wikitext-2", "bpe:300", tmp_path, progress=False)
    assert "fails its sha256 check; downloading it again" in capsys.readouterr().err
    assert mirror.requests[-1] == "/wikitext-2-raw-v1/train-00000-of-00001.parquet" and len(mirror.requests) == 4
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
    assert len(json.loads((tmp_path / "wikitext" / "manifest.json").read_text())) == 3


def test_wikitext_from_file_url(tmp_path, monkeypatch):
    build_mirror(tmp_path / "mirror")
    monkeypatch.setenv(data.WIKITEXT_URL_ENV, (tmp_path / "mirror").as_uri())
    d = load_token_data("wikitext-2", "bpe:300", tmp_path / "cache", progress=False)
    assert len(d.valid) > 0


# --- test splits -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def articles() -> dict[str, dict[str, str]]:
    return json.loads(wiki_sample_file().read_text())


def titles_of(texts: list[str]) -> list[str]:
    return [text.split("\n", 1)[0] for text in texts]


def test_wiki_sample_v2_splits_articles_80_10_10(articles):
    splits = split_wiki_sample(articles, "wiki-sample-v2")
    titles = {split: titles_of(texts) for split, texts in splits.items()}
    assert {split: len(t) for split, t in titles.items()} == {"train": 8002, "valid": 1035, "test": 996}
    assert sorted(titles["train"] + titles["valid"] + titles["test"]) == sorted(articles)  # disjoint, all
    for split, share in (("train", 0.8), ("valid", 0.1), ("test", 0.1)):
        assert abs(len(titles[split]) / len(articles) - share) < 0.02
    fractions = {split: [data._stable_fraction(title) for title in t] for split, t in titles.items()}
    assert max(fractions["valid"]) < 0.1 <= min(fractions["test"]) and max(fractions["test"]) < 0.2
    assert min(fractions["train"]) >= 0.2


def test_wiki_sample_v1_is_unchanged(articles, wiki_splits, tmp_path):
    assert set(wiki_splits) == {"train", "valid"}
    assert set(titles_of(wiki_splits["valid"])) == {t for t in articles if data._stable_fraction(t) < 0.05}
    assert (len(wiki_splits["train"]), len(wiki_splits["valid"])) == (9520, 513)
    digest = data._digest(data.sha256_of(wiki_sample_file()))
    assert data._open_corpus("wiki-sample", tmp_path, False).key == f"wiki-sample-{digest}"
    assert data._open_corpus("wiki-sample-v2", tmp_path, False).key == f"wiki-sample-v2-{digest}"


def test_wiki_sample_v2_end_to_end(tmp_path, articles):
    d = load_token_data("wiki-sample-v2", "bpe:2048", tmp_path, progress=False)
    splits = split_wiki_sample(articles, "wiki-sample-v2")
    tok = load_corpus_tokenizer("wiki-sample-v2", "bpe:2048", tmp_path)
    assert tok.decode(d.valid.tolist()) == "".join(splits["valid"])
    assert tok.decode(d.test.tolist()) == "".join(splits["test"])
    assert (len(d.train), len(d.valid), len(d.test), d.train_documents) == (1_320_024, 169_634, 163_595, 8002)
    [folder] = (tmp_path / "tokens").glob("wiki-sample-v2-*/bpe-2048")
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["test_tokens"], meta["train_documents"]) == (163_595, 8002)


def test_text_dir_test_split_is_optional(tmp_path, text_dir, wiki_splits, monkeypatch):
    cache = tmp_path / "cache"
    without = load_token_data(f"text:{text_dir}", "bpe:300", cache, progress=False)
    assert without.test is None
    [folder] = (cache / "tokens").glob("*/bpe-300")
    assert json.loads((folder / "meta.json").read_text())["test_tokens"] is None

    (text_dir / "test.txt").write_text("".join(wiki_splits["valid"][20:30]))
    trained_on = []
    real = data.load_tokenizer

    def spy(spec, text, folder):
        trained_on.append(text())
        return real(spec, text, folder)

    monkeypatch.setattr(data, "load_tokenizer", spy)
    d = load_token_data(f"text:{text_dir}", "bpe:300", cache, progress=False)
    tok = load_corpus_tokenizer(f"text:{text_dir}", "bpe:300", cache)
    assert tok.decode(d.test.tolist()) == (text_dir / "test.txt").read_text()
    assert "".join(trained_on[0]) == (text_dir / "train.txt").read_text()  # the train split only
    assert len(list((cache / "tokens").iterdir())) == 2  # test.txt gave the corpus a new key
    [new] = [f for f in (cache / "tokens").glob("*/bpe-300") if f != folder]
    assert sorted(p.name for p in new.iterdir()) == ["meta.json", "test.bin", "train.bin", "valid.bin"]


def test_cache_from_before_test_splits_loads_without_tokenizing(tmp_path, text_dir, monkeypatch):
    first = load_token_data(f"text:{text_dir}", "bpe:300", tmp_path, progress=False)
    [meta_path] = (tmp_path / "tokens").glob("*/bpe-300/meta.json")
    meta = json.loads(meta_path.read_text())
    old = {k: v for k, v in meta.items() if k not in ("test_tokens", "train_documents")}
    meta_path.write_text(json.dumps(old))
    monkeypatch.setattr(data, "_write_tokens", fail)
    monkeypatch.setattr(data, "load_tokenizer", fail)
    again = load_token_data(f"text:{text_dir}", "bpe:300", tmp_path, progress=False)
    assert np.array_equal(again.train, first.train) and again.test is None
    assert again.train_documents == first.train_documents == 200  # its 200 articles are paragraphs
    assert json.loads(meta_path.read_text()) == {**old, "train_documents": 200}


def test_wikitext_downloads_from_before_test_splits_are_kept(tmp_path, mirror):
    config, files = data.WIKITEXT_FILES["wikitext-2"]
    for split, rows in (("train", "train"), ("valid", "validation")):
        write_parquet(tmp_path / "wikitext" / config / files[split][0], WIKITEXT_ROWS[rows])
    load_token_data("wikitext-2", "bpe:300", tmp_path, progress=False)  # records the placed files
    assert mirror.requests == ["/wikitext-2-raw-v1/test-00000-of-00001.parquet"]
    assert len(json.loads((tmp_path / "wikitext" / "manifest.json").read_text())) == 3


# --- training subsets --------------------------------------------------------------------------


@pytest.fixture
def small_wiki(tmp_path, articles, monkeypatch) -> list[str]:
    """wiki-sample-v2 over its first 400 articles by title; returns the train split's texts."""
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps({title: articles[title] for title in sorted(articles)[:400]}))
    monkeypatch.setattr(data, "wiki_sample_file", lambda: path)
    return split_wiki_sample(json.loads(path.read_text()), "wiki-sample-v2")["train"]


def test_subsets_are_nested_whole_articles(tmp_path, small_wiki):
    cache = tmp_path / "cache"
    tok = load_corpus_tokenizer("wiki-sample-v2", "bpe:300", cache)
    full = load_token_data("wiki-sample-v2", "bpe:300", cache, progress=False)
    assert full.train_documents == len(small_wiki) == 306
    kept, sizes = {}, []
    for fraction in (1 / 8, 1 / 4, 1 / 2, 1.0):
        d = load_token_data("wiki-sample-v2", "bpe:300", cache, progress=False, train_fraction=fraction)
        text = tok.decode(d.train.tolist())
        kept[fraction] = [article for article in small_wiki if article in text]  # whole articles only
        assert "".join(kept[fraction]) == text
        assert d.train_documents == len(kept[fraction])
        assert np.array_equal(d.valid, full.valid) and np.array_equal(d.test, full.test)
        sizes.append(len(d.train))
    assert [len(k) for k in kept.values()] == [46, 81, 152, 306]
    assert set(kept[1 / 8]) < set(kept[1 / 4]) < set(kept[1 / 2]) < set(kept[1.0])
    assert sizes == [15_595, 28_374, 52_307, 105_284] == sorted(sizes) and sizes[-1] == len(full.train)
    other = load_token_data("wiki-sample-v2", "bpe:300", cache, progress=False, train_fraction=1 / 8, subset_seed=1)
    other_kept = [a for a in small_wiki if a in tok.decode(other.train.tolist())]
    assert other.train_documents == len(other_kept) and set(other_kept) != set(kept[1 / 8])
    folders = sorted(p.name for p in next((cache / "tokens").iterdir()).glob("bpe-300/*") if p.is_dir())
    assert folders == ["subset-0.125-seed0", "subset-0.125-seed1", "subset-0.25-seed0", "subset-0.5-seed0"]


def test_subset_of_one_is_the_whole_corpus_and_its_cache(tmp_path, text_dir, monkeypatch):
    full = load_token_data(f"text:{text_dir}", "bpe:300", tmp_path, progress=False)
    monkeypatch.setattr(data, "_write_tokens", fail)
    again = load_token_data(f"text:{text_dir}", "bpe:300", tmp_path, progress=False, train_fraction=1, subset_seed=5)
    assert again.train.filename == full.train.filename


def test_wikitext_subset_keeps_whole_articles(tmp_path, mirror):
    tok_data = {seed: load_token_data("wikitext-103", "bpe:300", tmp_path, progress=False, train_fraction=0.5,
                                      subset_seed=seed) for seed in (0, 3)}
    tok = load_corpus_tokenizer("wikitext-103", "bpe:300", tmp_path)
    assert tok.decode(tok_data[0].train.tolist()) == wikitext_text("train")  # Alpha only
    assert tok.decode(tok_data[3].train.tolist()) == wikitext_text("train2")  # Beta only
    assert tok_data[0].train_documents == tok_data[3].train_documents == 1


def test_wikitext_articles_start_at_top_level_headings():
    rows = [" Before any heading\n", " = A = \n", " = = Sub = = \n", "x\n", " = B = \n", " = A = \n", "y\n"]
    assert data._wikitext_articles(rows) == [("", 0, 1), ("A", 1, 4), ("B", 4, 5), ("A\n2", 5, 7)]


def test_text_dir_documents_are_paragraphs():
    lines = ["\n", "a\n", "b\n", "\n", "\n", "c\n", "\n"]
    documents = data._paragraphs(lines)
    assert [(d.start, d.stop) for d in documents] == [(0, 5), (5, 7)]
    assert documents[1].key == "1:" + hashlib.sha256(b"c\n\n").hexdigest()


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan")])
def test_bad_train_fraction_is_refused(tmp_path, fraction):
    with pytest.raises(ValueError, match=rf"^train_fraction must be in \(0, 1\], got {fraction}$"):
        load_token_data("wiki-sample", "bpe:300", tmp_path, train_fraction=fraction)
    assert not any(tmp_path.iterdir())


def test_empty_subset_is_refused(tmp_path, mirror):
    message = (r"^corpus 'wikitext-2': train_fraction 0.1 with subset_seed 0 keeps none of its 1 training "
               r"documents$")
    with pytest.raises(ValueError, match=message):
        load_token_data("wikitext-2", "bpe:300", tmp_path, progress=False, train_fraction=0.1)
