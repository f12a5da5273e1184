"""Reconstruction analysis on captured KV: relative Frobenius error and effective bits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..api import compress, decompress
from ..config import DecoQuantConfig


@dataclass
class ReconstructionRow:
    label: str
    method: str
    bits: int
    key_error: float  # mean over layers of ||K_hat - K||_F / ||K||_F
    value_error: float
    effective_bits: float  # stored bits per element, K and V together, metadata included
    exact_blocks: int
    per_layer_key: list[float]
    per_layer_value: list[float]


def relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    x = x.double()
    return float((x_hat.double() - x).norm() / x.norm().clamp_min(1e-30))


def evaluate_config(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], config: DecoQuantConfig) -> ReconstructionRow:
    """Compress every layer's K and V with `config` (packed path) and measure the error."""
    k_err, v_err, nbytes, numel, exact = [], [], 0, 0, 0
    for keys, values in kv:
        for kind, x, errs in (("key", keys, k_err), ("value", values, v_err)):
            c = compress(x, config, kind)
            errs.append(relative_error(decompress(c), x))
            nbytes, numel, exact = nbytes + c.nbytes, numel + c.numel, exact + c.num_exact
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return ReconstructionRow(config.label(), config.method, config.bits, mean(k_err), mean(v_err),
                             8.0 * nbytes / numel, exact, k_err, v_err)


def default_configs(bits: Iterable[int] = (2, 3, 4, 8)) -> list[DecoQuantConfig]:
    out = []
    for b in bits:
        out += [DecoQuantConfig(method="rtn", bits=b),
                DecoQuantConfig(method="decoquant", bits=b, preset="paper"),
                DecoQuantConfig(method="kivi", bits=b),
                DecoQuantConfig(method="rotation", bits=b)]
    return out


def format_table(rows: Sequence[ReconstructionRow]) -> str:
    lines = ["| method | bits | rel. error K | rel. error V | effective bits | exact blocks |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.bits} | {r.key_error:.4f} | {r.value_error:.4f} | "
                     f"{r.effective_bits:.3f} | {r.exact_blocks} |")
    return "\n".join(lines)
