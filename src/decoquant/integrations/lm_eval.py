"""lm-evaluation-harness: a `decoquant` model, lm-eval's `HFLM` with its KV cache compressed.

lm-eval scores loglikelihood requests with one forward and no cache, where a compressed cache would change
nothing. This model feeds every scoring forward in chunks of `chunk` tokens through a fresh `DecoQuantCache`
(as `decoquant perplexity` does: later chunks read the earlier ones back from compressed blocks) and builds a
fresh cache for every generation request. Importing this module registers the model (`pip install
'decoquant[lm-eval]'`); `decoquant lm-eval ...` runs lm-eval's own command line with it registered.

    lm_eval --model decoquant --model_args pretrained=smollm2-135m,method=kivi,bits=2 --tasks ...
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..config import DecoQuantConfig
from ..options import DEFAULT_PRESET, DEFAULT_SINK_TOKENS
from .model_config import cache_kwargs

# the cache's options a model_args string may set, with their types (everything else goes to HFLM)
CACHE_OPTIONS = {"method": str, "bits": int, "preset": str, "block_size": int, "residual_length": int,
                 "sink_tokens": int, "group_size": int, "quant_group_size": int}


def cache_config(**options) -> DecoQuantConfig:
    """The DecoQuantConfig a model_args string asks for: decoquant's default (the channel64-token preset with
    4 sink tokens, as `DecoQuantCache.from_model`) or another method's own defaults with 4 sink tokens.
    lm-eval reads `none` as None, so method=None means the method "none"."""
    unknown = sorted(set(options) - set(CACHE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown cache options {unknown}; allowed: {sorted(CACHE_OPTIONS)}")
    fields = {k: CACHE_OPTIONS[k](v) for k, v in options.items() if v is not None}
    fields["method"] = "none" if "method" in options and options["method"] is None else str(
        options.get("method", "decoquant"))
    fields.setdefault("sink_tokens", DEFAULT_SINK_TOKENS)
    if fields["method"] == "decoquant" and "preset" not in options:
        fields["preset"] = DEFAULT_PRESET
    return DecoQuantConfig(**fields)


@register_model("decoquant")
class DecoQuantLM(HFLM):
    """HFLM whose forwards go through a compressed KV cache. pretrained: a built-in alias (smollm2-135m,
    gemma3-270m), a local folder or a hub id; chunk: tokens per scoring forward; the cache's options are
    CACHE_OPTIONS; everything else is HFLM's."""

    def __init__(self, pretrained: str = "smollm2-135m", chunk: int = 128, **kwargs):
        from .models import resolve_model_path

        options = {k: kwargs.pop(k) for k in list(kwargs) if k in CACHE_OPTIONS}
        self.cache_config = cache_config(**options)
        if int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = int(chunk)
        if isinstance(pretrained, str):
            pretrained = resolve_model_path(pretrained)
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, **kwargs)
        from .padding import track_padding

        track_padding(self.model)  # left-padded generation batches: pads and first real tokens stay exact

    def new_cache(self):
        from .transformers import DecoQuantCache

        return DecoQuantCache(self.cache_config, self.model.config)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if attn_mask is not None or labels is not None:  # encoder-decoder models: no KV cache to compress
            return super()._model_call(inps, attn_mask, labels)
        cache, out = self.new_cache(), []
        with torch.no_grad():
            for start in range(0, inps.shape[1], self.chunk):
                out.append(self.model(input_ids=inps[:, start:start + self.chunk], use_cache=True,
                                      **cache_kwargs(cache)).logits)
        return torch.cat(out, dim=1)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        return super()._model_generate(context, max_length, stop, **generation_kwargs,
                                       **cache_kwargs(self.new_cache()))
