"""Tokenizers: GPT-2's BPE (via tiktoken) or a byte-level BPE trained on the corpus.

Specs:
  "gpt2"   tiktoken's "gpt2" encoding, 50257 ids; needs its BPE files (downloaded once, then cached
           by tiktoken in $TIKTOKEN_CACHE_DIR).
  "bpe:N"  a byte-level BPE with N ids (257 <= N <= 65535), trained with Hugging Face `tokenizers`
           on the corpus's train split and cached as JSON. It has no special tokens: ids are 0..N-1.
           All 256 bytes are in its alphabet, so it encodes any text and decodes it back exactly.

Every tokenizer here has at most 65536 ids, so token arrays fit in uint16.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fwbw.files import atomic_write

BPE_MIN_VOCAB = 257  # 256 byte tokens plus at least one merge
BPE_MAX_VOCAB = 65535
GPT2_VOCAB = 50257


class Tokenizer(Protocol):
    name: str  # the spec string, e.g. "gpt2" or "bpe:8192"
    vocab_size: int  # every id the tokenizer emits is < vocab_size

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class TiktokenTokenizer:
    def __init__(self, name: str, encoding: tiktoken.Encoding):
        self.name = name
        self.vocab_size = encoding.n_vocab
        self._enc = encoding

    # encode_ordinary: text such as "<|endoftext|>" is encoded as plain text, never as a special id
    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


class BPETokenizer:
    def __init__(self, name: str, vocab_size: int, tokenizer: HFTokenizer):
        self.name = name
        # the spec's N, even if a small training text gave fewer merges (ids stay < N either way)
        self.vocab_size = vocab_size
        self._tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def validate_tokenizer_spec(spec: str) -> None:
    """Raise ValueError (one line) unless spec is "gpt2" or "bpe:N" with N in range."""
    if spec == "gpt2":
        return
    if not spec.startswith("bpe:"):
        raise ValueError(f"tokenizer: unknown {spec!r} (expected 'gpt2' or 'bpe:N')")
    n = spec.removeprefix("bpe:")
    if not re.fullmatch(r"[0-9]+", n) or not BPE_MIN_VOCAB <= int(n) <= BPE_MAX_VOCAB:
        raise ValueError(
            f"tokenizer: {spec!r} needs an integer vocabulary size N with "
            f"{BPE_MIN_VOCAB} <= N <= {BPE_MAX_VOCAB} in 'bpe:N'"
        )


def vocab_size_of(spec: str) -> int:
    """The vocabulary size a spec will have, without loading or training anything."""
    validate_tokenizer_spec(spec)
    return GPT2_VOCAB if spec == "gpt2" else int(spec.removeprefix("bpe:"))


def load_tokenizer(spec: str, train_text: Callable[[], Iterable[str]], cache_dir: Path) -> Tokenizer:
    """Load the tokenizer named by spec.

    For "bpe:N", cache_dir must be specific to one corpus: the trained tokenizer is stored there as
    bpe-N.json and reused on later calls; train_text is called (and the BPE trained) only when that
    file does not exist yet. "gpt2" ignores both arguments.
    """
    validate_tokenizer_spec(spec)
    if spec == "gpt2":
        return _load_gpt2()
    vocab_size = int(spec.removeprefix("bpe:"))
    path = Path(cache_dir) / f"bpe-{vocab_size}.json"
    if not path.exists():
        atomic_write(path, lambda tmp: _train_bpe(vocab_size, train_text()).save(str(tmp)))
    return BPETokenizer(spec, vocab_size, HFTokenizer.from_file(str(path)))


def _load_gpt2() -> TiktokenTokenizer:
    try:
        encoding = tiktoken.get_encoding("gpt2")
    # tiktoken raises requests' ConnectionError (an OSError) offline, ValueError on a bad download
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RuntimeError(
            "tokenizer 'gpt2': cannot load tiktoken's GPT-2 BPE files (no network?): "
            f"{reason}. Fix: set TIKTOKEN_CACHE_DIR to a directory holding tiktoken's cached files "
            "(fetch them once on a machine with network, with the same TIKTOKEN_CACHE_DIR), "
            "or use a 'bpe:N' tokenizer"
        ) from e
    return TiktokenTokenizer("gpt2", encoding)


def _train_bpe(vocab_size: int, texts: Iterable[str]) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok
