"""Evaluation: text sources, KV capture, reconstruction analysis, perplexity."""
