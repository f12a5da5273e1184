"""The paper's accuracy protocol: fake-quantize the key and value projection outputs.

DecoQuant's LAMBADA table (Table 2) did not run a cache: it quantized the outputs of every layer's
`k_proj` and `v_proj` over the whole sequence (keys before RoPE), one matrix per layer with all
heads concatenated, and for its W&A rows also quantized the `k_proj` / `v_proj` weights with
per-output-channel RTN. `quantized_projections` reproduces that with forward hooks; every batch row
is quantized on its own (no padding ever enters a scale or a decomposition).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..api import fake_quantize
from ..config import DecoQuantConfig
from ..quant import fake_quantize as rtn_fake_quantize


def kv_projections(model) -> list[tuple[str, torch.nn.Linear, str]]:
    """(module name, module, "key"|"value") of every attention layer's k_proj / v_proj."""
    found = []
    for name, module in model.named_modules():
        for suffix, kind in (("k_proj", "key"), ("v_proj", "value")):
            if name.endswith(f"self_attn.{suffix}") and isinstance(module, torch.nn.Linear):
                found.append((name, module, kind))
    if not found:
        raise ValueError(f"{type(model).__name__} has no '*.self_attn.k_proj' / 'v_proj' Linear modules; the "
                         "projection protocol supports Llama-, Mistral-, Qwen- and Gemma-style attention")
    return found


def _head_dim(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None)
    return int(head_dim or cfg.hidden_size // cfg.num_attention_heads)


def quantize_projection_output(y: torch.Tensor, config: DecoQuantConfig, kind: str, head_dim: int,
                               smooth: torch.Tensor | None = None) -> torch.Tensor:
    """y [batch, tokens, kv_heads * head_dim] -> the same, fake-quantized per batch row over all tokens.
    smooth [kv_heads * head_dim]: SmoothQuant's channel divisors (y / s is quantized, then times s)."""
    if smooth is not None:
        return quantize_projection_output(y / smooth, config, kind, head_dim) * smooth
    b, t, d = y.shape
    x = y.view(b, t, d // head_dim, head_dim).transpose(1, 2)  # [B, H, T, hd]
    return fake_quantize(x, config, kind).transpose(1, 2).reshape(b, t, d)


def rtn_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric absmax RTN of a Linear weight [out, in] (the paper's W baseline)."""
    return rtn_fake_quantize(weight, bits, (-1,), symmetric=True).to(weight.dtype)


@contextlib.contextmanager
def quantized_projections(model, config: DecoQuantConfig | None, weight_bits: int | None = None,
                          smoothing: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block, k_proj/v_proj outputs are fake-quantized with `config` (None: left exact) and,
    if `weight_bits` is set, their weights are per-channel RTN at that width. Restored on exit.
    smoothing: {module name: channel divisors} from `smoothquant.smoothing_scales` (SmoothQuant)."""
    if config is None and weight_bits is None:
        yield
        return
    projections = kv_projections(model)
    head_dim = _head_dim(model)
    if config is not None:
        config.check_head_dim(head_dim)
    handles, saved = [], []
    try:
        for name, module, kind in projections:
            if weight_bits is not None:
                saved.append((module, module.weight.data))
                module.weight.data = rtn_weight(module.weight.data, weight_bits)
            if config is not None:
                smooth = None if smoothing is None else smoothing[name]
                hook = (lambda kind_, s_: lambda _m, _i, out: quantize_projection_output(
                    out, config, kind_, head_dim, s_))(kind, smooth)
                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for module, weight in saved:
            module.weight.data = weight
