"""Corpora, tokenizers and token windows: everything a run reads, cached on disk."""
