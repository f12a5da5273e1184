"""Value-range analysis of the decomposition (the paper's IQR table and Fig. 1) and error sweeps
(Fig. 4: error vs bits and vs number of local tensors), on captured KV. Plots live in `plots`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import DecoQuantConfig
from .reconstruction import evaluate_config


def two_site_tensors(x: torch.Tensor, group_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, H, T, D] of one layer -> (M, T_L, T_S) of the paper's group layout, batch row 0:
    M = the (H*T*D/g) x g matrix of g-channel chunks, M = T_L @ T_S with T_L = U sqrt(S), T_S = sqrt(S) V^T."""
    m = x[0].double().reshape(-1, group_size)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s.sqrt()
    return m, u * root, root[:, None] * vh


@dataclass
class RangeStats:
    layer: int
    kind: str
    tensor: str  # "matrix", "T_L" or "T_S"
    numel: int
    min: float
    max: float
    iqr: float  # 75th - 25th percentile
    absmax_over_iqr: float  # how far the extremes sit from the bulk: lower = easier to quantize


def range_stats(t: torch.Tensor, layer: int, kind: str, name: str) -> RangeStats:
    v = t.flatten().float()
    if v.numel() > 2_000_000:  # quantiles on a fixed strided subsample
        v = v[:: v.numel() // 2_000_000 + 1]
    q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75])).tolist()
    iqr = q3 - q1
    return RangeStats(layer, kind, name, t.numel(), float(t.min()), float(t.max()), iqr,
                      float(t.abs().max()) / max(iqr, 1e-30))


def value_ranges(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], layers: Sequence[int] | None = None,
                 group_size: int = 16) -> list[RangeStats]:
    """Range statistics of the matrix, T_L and T_S for keys and values of the chosen layers."""
    out = []
    for i in layers if layers is not None else range(len(kv)):
        for kind, x in zip(("key", "value"), kv[i]):
            m, t_l, t_s = two_site_tensors(x, group_size)
            out += [range_stats(t, i, kind, n) for t, n in ((m, "matrix"), (t_l, "T_L"), (t_s, "T_S"))]
    return out


def range_table(stats: Sequence[RangeStats]) -> str:
    lines = ["| layer | kind | tensor | elements | min | max | IQR | max abs / IQR |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for s in stats:
        lines.append(f"| {s.layer} | {s.kind} | {s.tensor} | {s.numel} | {s.min:.3f} | {s.max:.3f} | "
                     f"{s.iqr:.4f} | {s.absmax_over_iqr:.1f} |")
    return "\n".join(lines)


def error_sweep(kv, configs: Sequence[DecoQuantConfig]) -> list[dict]:
    """Mean relative K/V error and effective bits per config (rows for the Fig. 4 plots)."""
    rows = []
    for c in configs:
        r = evaluate_config(kv, c)
        rows.append({"label": r.label, "method": c.method, "bits": c.bits, "num_sites": c.num_sites,
                     "key_error": r.key_error, "value_error": r.value_error, "effective_bits": r.effective_bits})
    return rows


def sites_configs(bits: Sequence[int] = (2, 3, 4, 8)) -> list[DecoQuantConfig]:
    return [DecoQuantConfig(method="decoquant", bits=b, num_sites=n) for b in bits for n in (2, 3, 4)]
