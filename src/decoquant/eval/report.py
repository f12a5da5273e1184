"""Markdown tables and atomic report files for the evaluation commands."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from .perplexity import PerplexityResult


def perplexity_table(results: Sequence[PerplexityResult]) -> str:
    """One row per cache; deltas against the first row when it is the fp16 baseline, with their standard error over
    the windows (paired: every cache reads the same windows)."""
    base = results[0].perplexity if results and results[0].label == "fp16" else None
    lines = ["| cache | perplexity | delta vs fp16 | ± s.e. | KL mean | KL p99 | bytes/token | vs fp16 cache "
             "| block bits/elem |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        delta = f"{100 * (r.perplexity / base - 1):+.2f}%" if base else "-"
        bits = "-" if math.isnan(r.block_bits) else f"{r.block_bits:.3f}"
        se = f"{r.delta_se_pct:.2f}%" if base and r.label != "fp16" and not math.isnan(r.delta_se_pct) else "-"
        lines.append(f"| {r.label} | {r.perplexity:.3f} | {delta} | {se} | {r.kl_mean:.4f} | {r.kl_p99:.3f} | "
                     f"{r.bytes_per_token:.0f} | "
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


def _method_name(label: str) -> str:
    for prefix, name in (("fp16", "FP16"), ("rtn", "RTN"), ("decoquant", "DecoQuant"), ("kivi", "KIVI"),
                         ("rotation", "rotation+RTN"), ("turboquant", "TurboQuant"), ("smoothquant", "SmoothQuant")):
        if label.startswith(prefix):
            return f"{name} ({label})" if prefix in ("decoquant", "kivi") else name
    return label


def _act_bits(label: str) -> str:
    return "16" if label == "fp16" else label.rsplit("-", 1)[-1].rstrip("b")


def lambada_table(results) -> str:
    """The paper's Table 2 shape: one row per (weight bits - KV bits, method)."""
    lines = ["| #Bits (W-A) | method | accuracy | correct / total |", "|---|---|---:|---:|"]
    for r in results:
        w = 16 if r.weight_bits is None else r.weight_bits
        lines.append(f"| {w}-{_act_bits(r.label)} | {_method_name(r.label)} | {100 * r.accuracy:.1f} | "
                     f"{r.correct} / {r.total} |")
    return "\n".join(lines)


def icl_table(results) -> str:
    """The paper's Table 3 shape: rows (shots, bits, method), columns the datasets and their average
    (accuracy with contextual calibration; raw average in the last column)."""
    tasks = list(dict.fromkeys(r.task for r in results))
    rows: dict[tuple, dict] = {}
    for r in results:
        rows.setdefault((r.shots, r.label), {})[r.task] = r
    lines = ["| shots | #Bits | method | " + " | ".join(tasks) + " | Avg | Avg (uncalibrated) | demo bits/elem |",
             "|---:|---|---|" + "---:|" * (len(tasks) + 3)]
    for (shots, label), by_task in rows.items():
        accs = [by_task[t].accuracy for t in tasks if t in by_task]
        raws = [by_task[t].raw_accuracy for t in tasks if t in by_task]
        bits = [by_task[t].demo_bits for t in tasks if t in by_task]
        cells = " | ".join(f"{100 * by_task[t].accuracy:.1f}" if t in by_task else "-" for t in tasks)
        lines.append(f"| {shots} | {_act_bits(label)} | {_method_name(label)} | {cells} | "
                     f"{100 * sum(accs) / len(accs):.1f} | {100 * sum(raws) / len(raws):.1f} | "
                     f"{sum(bits) / len(bits):.2f} |")
    return "\n".join(lines)


def retrieval_table(results: Sequence) -> str:
    """Accuracy (exact match, %) per cache and prompt length over the depths, and over everything."""
    lengths = sorted({r.length for r in results})
    labels = list(dict.fromkeys(r.label for r in results))
    lines = ["| cache | " + " | ".join(f"{n} tokens" for n in lengths) + " | all |",
             "|---|" + "---:|" * (len(lengths) + 1)]
    for label in labels:
        mine = [r for r in results if r.label == label]
        cells = []
        for n in lengths:
            at = [r.correct for r in mine if r.length == n]
            cells.append(f"{100 * sum(at) / len(at):.0f}%" if at else "-")
        overall = 100 * sum(r.correct for r in mine) / len(mine)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {overall:.0f}% |")
    return "\n".join(lines)
