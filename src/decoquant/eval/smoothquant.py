"""SmoothQuant (alpha 0.5) for the key/value projection outputs: the paper's W&A baseline.

SmoothQuant moves quantization difficulty between the two operands of a product with per-channel
scales s: X W = (X / s)(s W). For the KV cache the products are q . k (keys; partner: the query
channels) and p V W_o (values; partner: the o_proj weight columns each value channel feeds). With
calibrated channel maxima, s_j = max|k_j|^alpha / max|q_j|^(1 - alpha) (values: max|v_j|^alpha /
max|W_o[:, j]|^(1 - alpha)); the cache then stores RTN(k / s) and the partner absorbs s. Key scales
are tied across the rotary pairs (j, j + head_dim / 2), so the division commutes with RoPE as it must
in a real deployment. Unlike DecoQuant, this needs calibration text: `smoothing_scales` runs it
on a split that is not evaluated (the CLI uses WikiText-2's validation split).
"""

from __future__ import annotations

import torch

from .projection import _head_dim, kv_projections


def _channel_absmax(model, ids: torch.Tensor, names: list[str], window: int,
                    max_windows: int) -> dict[str, torch.Tensor]:
    """Per-output-channel max |y| of the named Linear modules over the calibration windows."""
    modules = dict(model.named_modules())
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_m, _i, out):
            m = out.detach().abs().float().reshape(-1, out.shape[-1]).amax(0)
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            n = max(1, min(max_windows, ids.shape[1] // window))
            for w in range(n):
                model(input_ids=ids[:, w * window:(w + 1) * window].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def smoothing_scales(model, ids: torch.Tensor, alpha: float = 0.5, window: int = 512,
                     max_windows: int = 8) -> dict[str, torch.Tensor]:
    """{k_proj/v_proj module name: s [kv_heads * head_dim]} from calibration token ids [1, N]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must lie in [0, 1]")
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"calibration ids must be [1, tokens] with at least 2 tokens, got {tuple(ids.shape)}")
    projections = kv_projections(model)
    modules = dict(model.named_modules())
    head_dim = _head_dim(model)
    q_names = {n: n[: -len("k_proj")] + "q_proj" for n, _, kind in projections if kind == "key"}
    o_names = {n: n[: -len("v_proj")] + "o_proj" for n, _, kind in projections if kind == "value"}
    missing = [m for m in list(q_names.values()) + list(o_names.values()) if m not in modules]
    if missing:
        raise ValueError(f"SmoothQuant needs each layer's q_proj and o_proj next to k_proj/v_proj; missing "
                         f"{missing[:3]}")
    stats = _channel_absmax(model, ids, [n for n, _, _ in projections] + list(q_names.values()), window, max_windows)
    out = {}
    eps = 1e-5
    for name, module, kind in projections:
        act = stats[name].clamp_min(eps)
        kv_heads = act.numel() // head_dim
        if kind == "key":
            partner = stats[q_names[name]].reshape(-1, head_dim)  # [q_heads, head_dim]
        else:  # the o_proj input columns each value channel feeds, one per query head
            partner = modules[o_names[name]].weight.detach().abs().float().amax(0).reshape(-1, head_dim)
        group = partner.shape[0] // kv_heads
        partner = partner.reshape(kv_heads, group, head_dim).amax(1).reshape(-1).clamp_min(eps)
        s = act.pow(alpha) / partner.pow(1 - alpha)
        if kind == "key":  # tie the rotary pairs (j, j + head_dim/2): RoPE must commute with the scaling
            half = s.reshape(kv_heads, 2, head_dim // 2)
            s = half.amax(1, keepdim=True).expand_as(half).reshape(-1)
        out[name] = s.clamp_min(eps).to(module.weight.device)
    return out
