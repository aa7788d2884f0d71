"""Evaluation: generation with a KV cache, the paper's 11 benchmarks, the results table."""
