"""Retrieval: benchmarks (wiki-sample tasks and BEIR folders), BM25, late-interaction retrieval with
a trained run's token embeddings, the metrics, and the result files."""
