"""Adapters to outside libraries (transformers). The only place that knows their versions."""
