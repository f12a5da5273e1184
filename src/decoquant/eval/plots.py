"""PNG plots of the evaluation results (matplotlib, imported lazily; `pip install decoquant[plots]`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'decoquant[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_layer_errors(rows, path: Path, title: str) -> Path:
    """Per-layer relative error of K and V, one line per reconstruction row."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, attr, kind in ((axes[0], "per_layer_key", "keys"), (axes[1], "per_layer_value", "values")):
        for r in rows:
            ax.plot(getattr(r, attr), marker=".", label=r.label)
        ax.set_title(f"{kind}")
        ax.set_xlabel("layer")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative Frobenius error")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_densities(m: torch.Tensor, t_l: torch.Tensor, t_s: torch.Tensor, path: Path, title: str) -> Path:
    """Value densities of the matrix vs T_L vs T_S (the paper's Fig. 1), each on its own axis,
    with its 4-bit symmetric quantization step marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, t, name in zip(axes, (m, t_l, t_s), ("matrix (16-channel chunks)", "T_L (quantized)", "T_S (fp16)")):
        v = t.flatten().float()
        if v.numel() > 500_000:
            v = v[:: v.numel() // 500_000 + 1]
        ax.hist(v.numpy(), bins=int(min(200, max(20, v.numel() // 10))), density=True, color="tab:blue", alpha=0.8)
        ax.set_yscale("log")
        step = float(v.abs().max()) / 7
        ax.set_title(f"{name}\nrange [{float(t.min()):.2f}, {float(t.max()):.2f}], 4-bit step {step:.3g}", fontsize=9)
        ax.set_xlabel("value")
    axes[0].set_ylabel("density (log)")
    fig.suptitle(title, fontsize=10, y=1.06)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_error_vs(rows: Sequence[dict], x: str, path: Path, title: str, group: str = "method") -> Path:
    """Relative error of keys and values against `x` ("bits", "effective_bits" or "num_sites"),
    one line per value of `group`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, kind in ((axes[0], "key"), (axes[1], "value")):
        for name in dict.fromkeys(r[group] for r in rows):
            pts = sorted((r[x], r[f"{kind}_error"]) for r in rows if r[group] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(name))
        ax.set_title(f"{kind}s")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative Frobenius error")
    axes[1].legend(fontsize=8, title=group.replace("_", " "))
    fig.suptitle(title, fontsize=10)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_frontier(points: Sequence[dict], path: Path, title: str, y: str = "delta_pct", linthresh: float = 1.0) -> Path:
    """Quality delta vs effective bits per element, one marker style per method; lower-left is better.
    The y axis is symlog, linear within +-linthresh."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for method in dict.fromkeys(p["method"] for p in points):
        pts = [p for p in points if p["method"] == method]
        ax.scatter([p["bits"] for p in pts], [p[y] for p in pts], label=method, s=22)
    ax.set_xlabel("effective bits per element (metadata included)")
    ax.set_ylabel(y.replace("_", " "))
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_retrieval_heatmap(results: Sequence, path: Path, title: str) -> Path:
    """Needle-in-a-haystack heatmap of one cache: depth (rows) x prompt length (columns), green = retrieved."""
    plt = _pyplot()
    lengths = sorted({r.length for r in results})
    depths = sorted({round(r.depth, 2) for r in results})
    grid = torch.full((len(depths), len(lengths)), float("nan"))
    for r in results:
        i, j = depths.index(round(r.depth, 2)), lengths.index(r.length)
        prev = grid[i, j]
        grid[i, j] = float(r.correct) if torch.isnan(prev) else (prev + float(r.correct)) / 2
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2, 0.45 * len(depths) + 1.6))
    ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("depth of the fact")
    ax.set_title(title, fontsize=10)
    path = _save(fig, path)
    plt.close(fig)
    return path
