"""Benchmarks: correctness-gated, measured against baselines from the same run, JSON last line."""
