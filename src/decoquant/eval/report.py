"""Markdown tables and atomic report files for the evaluation commands."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from .perplexity import PerplexityResult


def perplexity_table(results: Sequence[PerplexityResult]) -> str:
    """One row per cache; deltas against the first row when it is the fp16 baseline."""
    base = results[0].perplexity if results and results[0].label == "fp16" else None
    lines = ["| cache | perplexity | delta vs fp16 | bytes/token | vs fp16 cache | block bits/elem |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        delta = f"{100 * (r.perplexity / base - 1):+.2f}%" if base else "-"
        bits = "-" if math.isnan(r.block_bits) else f"{r.block_bits:.3f}"
        lines.append(f"| {r.label} | {r.perplexity:.3f} | {delta} | {r.bytes_per_token:.0f} | "
                     f"{r.bytes_per_token / r.fp16_bytes_per_token:.3f}x | {bits} |")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so an interrupted run leaves no half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(out: str | Path, name: str, markdown: str, payload: dict) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{name}.json", json.dumps(payload, indent=1, default=str))
    write_atomic(folder / f"{name}.md", markdown)
