"""Quality-per-bit sweeps: run many codec settings through the real cache and find the frontier.

Every point is (effective bits per element of the compressed blocks, metadata included; quality
delta vs fp16). A point is on the Pareto frontier when no other point has both fewer bits and a
lower delta. `matched_budgets` answers "at about B bits, which setting of each method is best?".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

from ..config import DecoQuantConfig

GRIDS = ("presets", "quick", "full")


def _decoquant_variants(bits: int, block_size: int, grid: str) -> list[DecoQuantConfig]:
    """The presets, then (T_S sharing, key granularity, value granularity, symmetric) combinations."""
    out = [DecoQuantConfig(method="decoquant", bits=bits, preset=p, block_size=block_size)
           for p in ("paper", "kv-split", "channel64-token") if p != "channel64-token" or block_size % 64 == 0]
    if block_size % 32 == 0:  # keys per channel over 32-token groups: more metadata, finer key scales
        out.append(DecoQuantConfig(method="decoquant", bits=bits, scale_granularity="channel", quant_group_size=32,
                                   value_scale_granularity="token", symmetric=False))
    if grid == "presets":
        return out
    grans = ("token", "token_head", "channel")
    if grid == "full":
        space = [(ts, k, v, sym) for ts, k, v, sym in itertools.product(("layer", "head"), grans, grans, (True, False))]
    else:
        space = [("layer", "token", "token", False), ("layer", "token_head", "token_head", False),
                 ("layer", "channel", "channel", False), ("head", "channel", "channel", False),
                 ("layer", "channel", "channel", True)]
    for ts, key_gran, value_gran, sym in space:
        out.append(DecoQuantConfig(method="decoquant", bits=bits, ts_sharing=ts, scale_granularity=key_gran,
                                   value_scale_granularity=value_gran, symmetric=sym, quant_group_size=block_size))
    return out


def sweep_grid(bits: Sequence[int] = (2, 3, 4), grid: str = "quick", block_size: int = 128) -> list[DecoQuantConfig]:
    """Baselines (rtn, rotation, KIVI at groups 32/64/128) and DecoQuant variants at each width:
    "presets" = the presets and 32-token key groups, "quick" adds a curated set of granularities,
    "full" every combination. DecoQuant's "channel" scales of those variants are per T_L column
    over one block (quant_group_size = block_size)."""
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r} is not supported; allowed values: {GRIDS}")
    configs = []
    for b in bits:
        configs += [DecoQuantConfig(method="rtn", bits=b), DecoQuantConfig(method="rotation", bits=b)]
        configs += [DecoQuantConfig(method="kivi", bits=b, quant_group_size=g) for g in (32, 64, 128)]
        configs += _decoquant_variants(b, block_size, grid)
    return [c.replace(block_size=block_size) for c in configs]


def describe(config: DecoQuantConfig) -> str:
    """A label that tells the sweep's DecoQuant variants apart."""
    if config.method != "decoquant" or config.preset is not None:
        return config.label()
    sym = "sym" if config.is_symmetric else "asym"
    grans = config.granularity("key")
    if grans in ("channel", "group") and config.quant_group_size != config.block_size:
        grans += str(config.quant_group_size)
    if config.granularity("value") != grans:
        grans += f"/v{config.granularity('value')}"
    return f"decoquant-{grans}-{sym}-ts{config.ts_sharing}-{config.bits}b"


@dataclass
class SweepPoint:
    label: str
    method: str
    bits: int
    effective_bits: float  # stored bits per element older than the window: blocks (metadata included), fp16 sinks
    quality: float  # perplexity (lower is better)
    delta_pct: float  # vs fp16, in percent
    frontier: bool = False
    config: dict | None = None
    lambada_delta: float | None = None  # LAMBADA accuracy minus fp16's, points (paper protocol), if run
    kl_mean: float = 0.0  # KL divergence to fp16's next-token distribution, mean over predicted tokens
    kl_p99: float = 0.0  # its 99th percentile
    delta_se_pct: float = float("nan")  # standard error of delta_pct over the windows (paired with fp16's)


def mark_frontier(points: Sequence[SweepPoint]) -> None:
    """Flag the points that no other point beats on both effective bits and delta."""
    for p in points:
        p.frontier = not any(q is not p and q.effective_bits <= p.effective_bits and q.delta_pct <= p.delta_pct
                             and (q.effective_bits < p.effective_bits or q.delta_pct < p.delta_pct) for q in points)


def matched_budgets(points: Sequence[SweepPoint], budgets: Sequence[float], slack: float = 0.05) -> list[dict]:
    """For each budget, the best (lowest delta) point of each method within budget + slack bits."""
    rows = []
    for budget in budgets:
        row = {"budget": budget}
        for method in dict.fromkeys(p.method for p in points):
            fits = [p for p in points if p.method == method and p.effective_bits <= budget + slack]
            row[method] = min(fits, key=lambda p: p.delta_pct) if fits else None
        rows.append(row)
    return rows


def sweep_table(points: Sequence[SweepPoint]) -> str:
    acc = any(p.lambada_delta is not None for p in points)
    lines = ["| setting | bits | effective bits | perplexity | delta vs fp16 | ± s.e. | KL mean | KL p99 | frontier |"
             + (" LAMBADA delta |" if acc else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|:---:|" + ("---:|" if acc else "")]
    for p in sorted(points, key=lambda p: (p.effective_bits, p.delta_pct)):
        extra = "" if not acc else (" - |" if p.lambada_delta is None else f" {p.lambada_delta:+.1f} |")
        se = "-" if math.isnan(p.delta_se_pct) else f"{p.delta_se_pct:.2f}%"
        lines.append(f"| {p.label} | {p.bits} | {p.effective_bits:.3f} | {p.quality:.3f} | {p.delta_pct:+.2f}% | "
                     f"{se} | {p.kl_mean:.4f} | {p.kl_p99:.3f} | {'*' if p.frontier else ''} |" + extra)
    return "\n".join(lines)


def budget_table(rows: Sequence[dict]) -> str:
    methods = [k for k in rows[0] if k != "budget"] if rows else []
    lines = ["| budget (bits) | " + " | ".join(methods) + " |", "|---:|" + "---|" * len(methods)]
    for row in rows:
        cells = [f"{row[m].delta_pct:+.2f}% ({row[m].label}, {row[m].effective_bits:.2f})" if row[m] else "-"
                 for m in methods]
        lines.append(f"| {row['budget']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_lambada(model, items, points: Sequence[SweepPoint], progress=None) -> float:
    """LAMBADA accuracy (the paper's projection protocol) of every point's config, as a delta in
    points against fp16 on the same items; returns fp16's accuracy."""
    from .lambada import lambada_accuracy

    base = lambada_accuracy(model, items, None).accuracy
    for p in (progress(points) if progress else points):
        p.lambada_delta = 100 * (lambada_accuracy(model, items, DecoQuantConfig.from_dict(p.config)).accuracy - base)
    return base


def run_sweep(model, ids, configs: Sequence[DecoQuantConfig], window: int, chunk: int, max_windows: int | None,
              progress=None) -> tuple[float, list[SweepPoint]]:
    """Perplexity and KL divergence through the cache for fp16 and every config: (fp16 perplexity, points).
    progress: wraps the iterable of (window, cache) steps."""
    from .perplexity import perplexities

    for c in configs:
        if window < c.block_size + c.residual_length + chunk:
            raise ValueError(f"window={window} is too short: with block_size={c.block_size}, residual_length="
                             f"{c.residual_length} and chunk={chunk} no token would read a compressed block; "
                             f"use window >= {c.block_size + c.residual_length + chunk}")
    results = perplexities(model, ids, [None, *configs], window, chunk, max_windows, progress)
    base = results[0].perplexity
    points = [SweepPoint(describe(c), c.method, c.bits, r.history_bits, r.perplexity, 100 * (r.perplexity / base - 1),
                         config=c.to_dict(), kl_mean=r.kl_mean, kl_p99=r.kl_p99, delta_se_pct=r.delta_se_pct)
              for c, r in zip(configs, results[1:])]
    mark_frontier(points)
    return base, points
