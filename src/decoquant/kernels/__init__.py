"""Attention over compressed KV: a pure-torch reference (ground truth) and Triton kernels."""
