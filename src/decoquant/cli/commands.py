"""The `reconstruct`, `perplexity`, `sweep` and `weights` commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import BITS, METHODS
from ..progress import progress
from .common import _args_dict, _load_model, _parse_list, _run_perplexities, _text

def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from ..config import DecoQuantConfig
    from ..eval.capture import capture_kv
    from ..eval.reconstruction import evaluate_config, format_table
    from ..eval.text import load_text

    bits = _parse_list(args.bits, BITS, int)
    methods = _parse_list(args.methods, [m for m in METHODS if m != "none"])
    model, tok = _load_model(args)
    text = load_text("wikitext2" if args.data_dir else "gensim-wiki", args.data_dir)
    ids = tok(text[: args.tokens * 12], return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"error: the text gives only {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    kv = capture_kv(model, ids)
    configs = [DecoQuantConfig(method=m, bits=b, preset="paper" if m == "decoquant" else None)
               for b in bits for m in methods]
    rows = [evaluate_config(kv, c) for c in progress(configs, "codecs")]
    layers, (k0, _) = len(kv), kv[0]
    header = (f"Reconstruction of real post-RoPE KV: {args.model}, {ids.shape[1]} tokens, {layers} layers, "
              f"{k0.shape[1]} kv heads x head_dim {k0.shape[3]} (mean relative Frobenius error over layers)")
    table = format_table(rows)
    print(header)
    print(table)
    if args.out:
        from ..eval.report import write_report

        payload = {"model": args.model, "tokens": int(ids.shape[1]), "layers": layers,
                   "rows": [r.__dict__ for r in rows], "torch": torch.__version__}
        write_report(args.out, "reconstruction", f"{header}\n\n{table}\n", payload)
    if args.json:
        print(json.dumps({"rows": [{k: v for k, v in r.__dict__.items() if not k.startswith("per_layer")}
                                   for r in rows]}))
    return 0



def cmd_perplexity(args: argparse.Namespace) -> int:
    from ..eval.report import perplexity_table, write_report

    _, source, _, _, results = _run_perplexities(args)
    header = (f"Perplexity through the cache: {args.model} ({args.dtype}), {source}, {results[0].windows} windows of "
              f"{args.window} tokens fed in chunks of {args.chunk}; block_size={args.block_size}, residual_length="
              f"{args.residual_length}, sink_tokens={args.sink_tokens}")
    table = perplexity_table(results)
    print(header)
    print(table)
    if args.out:
        write_report(args.out, "perplexity", f"{header}\n\n{table}\n",
                     {"args": _args_dict(args), "results": [r.__dict__ for r in results]})
    if args.json:
        print(json.dumps([r.__dict__ for r in results]))
    return 0



def cmd_sweep(args: argparse.Namespace) -> int:
    """Quality per effective bit: many codec settings through the real cache, with the frontier."""
    from ..eval.report import write_report
    from ..eval.sweep import budget_table, matched_budgets, run_sweep, sweep_grid, sweep_table

    bits = _parse_list(args.bits, BITS, int)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    if args.lambada_limit and args.data_dir is None:
        raise ValueError("--lambada-limit needs --data-dir (a folder with lambada/)")
    configs = sweep_grid(bits, args.grid, args.block_size)
    configs = [c.replace(residual_length=args.residual_length, sink_tokens=args.sink_tokens) for c in configs]
    source, text = _text(args)
    model, tok = _load_model(args)
    ids = tok(text, return_tensors="pt").input_ids
    base, points = run_sweep(model, ids, configs, args.window, args.chunk, args.max_windows,
                             progress=lambda it: progress(it, "windows x settings"))
    lambada_note = ""
    if args.lambada_limit:
        from ..eval.data import lambada_passages
        from ..eval.lambada import lambada_items
        from ..eval.sweep import add_lambada

        items = lambada_items(tok, lambada_passages(args.data_dir, "paper")[:args.lambada_limit], "paper")
        acc = add_lambada(model, items, points, progress=lambda it: progress(it, "lambada"))
        lambada_note = (f" LAMBADA delta = last-token accuracy on the first {len(items)} validation passages minus "
                        f"fp16's ({100 * acc:.1f}%), in points; k_proj/v_proj outputs fake-quantized over each "
                        "passage (the paper's protocol, group layout, no window or sinks).")
    out = Path(args.out or "decoquant-results")
    sections = [f"# decoquant sweep: {args.model}",
                f"Perplexity through the cache on {source} ({args.max_windows} windows of {args.window}, chunks of "
                f"{args.chunk}; block_size={args.block_size}, residual_length={args.residual_length}, sink_tokens="
                f"{args.sink_tokens}); fp16 perplexity {base:.3f}. Effective bits = stored bits per element older than "
                "the residual window: compressed blocks with their metadata, and fp16 sink tokens. KL = KL divergence "
                "of the next-token distribution to fp16's (mean over predicted tokens and 99th percentile). * = on "
                "the Pareto frontier of perplexity delta." + lambada_note,
                sweep_table(points), "## Best setting of each method at matched budgets",
                budget_table(matched_budgets(points, budgets))]
    if args.plots:
        from ..eval.plots import plot_frontier

        out.mkdir(parents=True, exist_ok=True)
        png = plot_frontier([{"method": p.method, "bits": p.effective_bits, "delta_pct": p.delta_pct} for p in points],
                            out / "frontier.png", f"{args.model}: perplexity delta vs effective bits")
        sections.append(f"![frontier]({png.name})")
        png = plot_frontier([{"method": p.method, "bits": p.effective_bits, "kl_mean": p.kl_mean} for p in points],
                            out / "frontier_kl.png", f"{args.model}: KL divergence to fp16 vs effective bits",
                            y="kl_mean", linthresh=1e-3)
        sections.append(f"![KL frontier]({png.name})")
        if args.lambada_limit:
            loss = [{"method": p.method, "bits": p.effective_bits, "accuracy_loss_points": -p.lambada_delta}
                    for p in points]
            png = plot_frontier(loss, out / "frontier_lambada.png",
                                f"{args.model}: LAMBADA accuracy loss (points) vs effective bits",
                                y="accuracy_loss_points")
            sections.append(f"![LAMBADA frontier]({png.name})")
    sections.append(f"Command: `decoquant sweep {' '.join(args.argv)}`".rstrip())
    markdown = "\n\n".join(sections) + "\n"
    print(markdown)
    write_report(out, "sweep", markdown, {"args": _args_dict(args), "fp16_perplexity": base,
                                          "points": [p.__dict__ for p in points]})
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """WxA16: perplexity with every decoder Linear weight quantized (KV cache left exact)."""
    from ..eval.perplexity import perplexity
    from ..eval.report import write_report
    from ..weights import default_symmetric, quantize_weights

    bits = _parse_list(args.bits, BITS, int)
    methods = _parse_list(args.methods, [f"{m}{v}" for m in ("rtn", "decoquant") for v in ("", "-sym", "-asym")])
    source, text = _text(args)
    model, tok = _load_model(args)
    ids = tok(text, return_tensors="pt").input_ids
    run = lambda m: perplexity(m, ids, None, args.window, args.chunk, args.max_windows)  # noqa: E731
    base = run(model)
    rows = [{"weights": "fp16", "perplexity": base.perplexity, "delta_pct": 0.0, "memory": None}]
    for b in bits:
        for method in progress(methods, f"{b}-bit weights"):
            model, _ = _load_model(args)  # a fresh copy: quantization is in place
            base_method, _, variant = method.partition("-")
            symmetric = default_symmetric(base_method) if not variant else variant == "sym"
            mem = quantize_weights(model, base_method, b, group_size=args.group_size, symmetric=symmetric)
            r = run(model)
            label = f"{base_method}-{'sym' if symmetric else 'asym'}-{b}b"
            rows.append({"weights": label, "perplexity": r.perplexity,
                         "delta_pct": 100 * (r.perplexity / base.perplexity - 1), "memory": mem})
    lines = ["| weights | perplexity | delta vs fp16 | Linear weight MB | vs fp16 | bits/weight |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = r["memory"]
        cells = (f"{mem['quantized_bytes'] / 2**20:.1f} | {mem['ratio']:.3f}x | {mem['bits_per_weight']:.3f}" if mem
                 else "- | 1.000x | 16")
        lines.append(f"| {r['weights']} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f}% | {cells} |")
    markdown = "\n\n".join([
        f"# decoquant weights: {args.model}",
        f"WxA16: every Linear inside the decoder layers quantized per output channel (embeddings and LM head "
        f"exact, KV cache exact); sym = absmax scale, asym = min/max scale and zero point; DecoQuant with "
        f"g={args.group_size} (one g x g fp16 T_S per matrix). Perplexity on {source}, {base.windows} windows of "
        f"{args.window}.",
        "\n".join(lines), f"Command: `decoquant weights {' '.join(args.argv)}`".rstrip()]) + "\n"
    print(markdown)
    if args.out:
        write_report(args.out, "weights", markdown, {"args": _args_dict(args), "rows": rows})
    return 0
