"""Left padding: hand each forward's 2-D attention_mask to the empty DecoQuantCache it is given."""

from __future__ import annotations


def _padding_hook(module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if callable(getattr(cache, "set_padding", None)) and cache.get_seq_length() == 0:
        cache.set_padding(kwargs.get("attention_mask"))


def track_padding(model) -> None:
    """Make every forward of `model` hand its 2-D attention_mask to the empty DecoQuantCache it is given
    (`DecoQuantCache.set_padding`), once per model."""
    if not getattr(model, "_decoquant_padding_hook", False):
        model.register_forward_pre_hook(_padding_hook, with_kwargs=True)
        model._decoquant_padding_hook = True
