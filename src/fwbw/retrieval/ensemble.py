"""The matched control of the fwbw embed: fw ⊕ fw, the fw views of two runs of one setting.

fwbw concatenates two views of one model (its fw and its bw pass): twice the passes and twice the
dimensions of fw. A better score for fwbw than for fw could come from that alone, from an ensemble of
two views, rather than from a view that has read the text's other side. The control has the same
cost and size and only fw views: the fw pass of the run and that of a second run of the same
setting (another seed), combined as fwbw combines its views (encoder.combine: [a; b] / sqrt(2), a
unit vector whose dot product with another is the mean of the two fw cosines). Both runs must
tokenize alike (corpus, tokenizer) and read chunks of the same length.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fwbw.retrieval.encoder import Encoder, TokenEmbeddings, combine_views, load_encoder, pool_views

CONTROL_EMBED = "fwfw"
SHARED = ("data", "tokenizer")  # what the two runs' configs must share to embed the same tokens


class PairedEncoder:
    """fw ⊕ fw of two runs' zero-shot encoders (the module docstring)."""

    def __init__(self, first: Encoder, second: Encoder):
        for encoder in (first, second):
            if encoder.embed != "fw" or encoder.projection is not None:
                raise ValueError(f"embed {CONTROL_EMBED}: combines two zero-shot fw encoders, got {encoder.embed}")
        differing = [name for name in SHARED if getattr(first.config, name) != getattr(second.config, name)]
        if differing or first.chunk_tokens != second.chunk_tokens:
            what = differing[0] if differing else "chunk tokens"
            raise ValueError(f"embed {CONTROL_EMBED}: the two runs differ in {what}, so they would not embed the same tokens")
        self.first, self.second = first, second
        self.device = first.device

    def encode(self, texts: Mapping[str, str], fillers: int = 0, marker: str | None = None) -> TokenEmbeddings:
        return combine_views(self._views(texts, fillers, marker), None, self.device)

    def encode_pooled(self, texts: Mapping[str, str], pooling: str, marker: str | None = None) -> TokenEmbeddings:
        return pool_views(self._views(texts, marker=marker), ("fw", "fw"), pooling, None, self.device)

    def _views(self, texts: Mapping[str, str], fillers: int = 0, marker: str | None = None) -> list[TokenEmbeddings]:
        return [*self.first.view_embeddings(texts, fillers, marker), *self.second.view_embeddings(texts, fillers, marker)]


def load_paired_encoder(run_dir: Path, partner: Path, blocks: int | None = None, cache_dir: Path | None = None,
                        device: str = "auto", progress: bool = True, chunk_tokens: int | None = None) -> PairedEncoder:
    """fw ⊕ fw of two finished runs, each after its first `blocks` blocks."""
    first, second = (load_encoder(run, "fw", blocks, cache_dir, device, progress, chunk_tokens) for run in (run_dir, partner))
    return PairedEncoder(first, second)
