"""Measuring a compressed model: perplexity with the SparseGPT protocol (:mod:`.perplexity`), also as an `evaluate`
metric (``metrics/sparse_perplexity``)."""
