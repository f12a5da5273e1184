"""The `decoquant` command line. Each subcommand builds its inputs and calls one library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import BITS, METHODS


def _progress(iterable, desc: str, total: int | None = None):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False)


def _parse_list(text: str, allowed, cast=str) -> list:
    values = [cast(v) for v in text.split(",") if v]
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SystemExit(f"error: {bad} not allowed; choose from {list(allowed)}")
    return values


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in alias (smollm2-135m, gemma3-270m), a local transformers folder, or a hub id")
    p.add_argument("--data-dir", default=None,
                   help="folder laid out like the shared data folder (wikitext2/wiki.test.raw, lambada/, ...); "
                        "without it the text is the Wikipedia articles shipped in gensim's test data")
    p.add_argument("--out", default=None, help="write the JSON results and a markdown report to this folder")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line at the end")


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .config import DecoQuantConfig
    from .eval.capture import capture_kv
    from .eval.reconstruction import evaluate_config, format_table
    from .eval.text import load_text
    from .integrations.models import load_model

    bits = _parse_list(args.bits, BITS, int)
    methods = _parse_list(args.methods, [m for m in METHODS if m != "none"])
    model, tok = load_model(args.model)
    text = load_text("wikitext2" if args.data_dir else "gensim-wiki", args.data_dir)
    ids = tok(text[: args.tokens * 12], return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"error: the text gives only {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    kv = capture_kv(model, ids)
    configs = [DecoQuantConfig(method=m, bits=b, preset="paper" if m == "decoquant" else None)
               for b in bits for m in methods]
    rows = [evaluate_config(kv, c) for c in _progress(configs, "codecs")]
    layers, (k0, _) = len(kv), kv[0]
    header = (f"Reconstruction of real post-RoPE KV: {args.model}, {ids.shape[1]} tokens, {layers} layers, "
              f"{k0.shape[1]} kv heads x head_dim {k0.shape[3]} (mean relative Frobenius error over layers)")
    table = format_table(rows)
    print(header)
    print(table)
    if args.out:
        from .eval.report import write_report

        payload = {"model": args.model, "tokens": int(ids.shape[1]), "layers": layers,
                   "rows": [r.__dict__ for r in rows], "torch": torch.__version__}
        write_report(args.out, "reconstruction", f"{header}\n\n{table}\n", payload)
    if args.json:
        print(json.dumps({"rows": [{k: v for k, v in r.__dict__.items() if not k.startswith("per_layer")}
                                   for r in rows]}))
    return 0


def _method_configs(methods: list[str], bits: list[int], fields: dict, preset: str = "paper") -> list:
    """fp16 (None = transformers' DynamicCache) and one config per method and bit width."""
    from .config import DecoQuantConfig

    out = [None] if "fp16" in methods else []
    for b in bits:
        for m in methods:
            if m == "fp16":
                continue
            extra = {"preset": preset} if m == "decoquant" else {}
            out.append(DecoQuantConfig(method=m, bits=b, **extra, **fields))
    return out


def _text(args) -> tuple[str, str]:
    """(source name, text); checked before the model loads so a bad data folder fails fast."""
    from .eval.text import load_text

    source = "wikitext2" if args.data_dir else "gensim-wiki"
    return source, load_text(source, args.data_dir)


def _perplexities(model, ids, args, configs) -> list:
    from .eval.perplexity import perplexity

    return [perplexity(model, ids, cfg, window=args.window, chunk=args.chunk, max_windows=args.max_windows,
                       progress=lambda it: _progress(it, "windows"))
            for cfg in _progress(configs, "caches")]


def _cache_fields(args) -> dict:
    return {"block_size": args.block_size, "residual_length": args.residual_length, "sink_tokens": args.sink_tokens}


def _run_perplexities(args: argparse.Namespace):
    """Shared by `perplexity` and `eval`: (configs, source, model, token ids, perplexity results)."""
    from .integrations.models import load_model

    bits = _parse_list(args.bits, BITS, int)
    methods = _parse_list(args.methods, ["fp16", "rtn", "kivi", "rotation", "decoquant"])
    configs = _method_configs(methods, bits, _cache_fields(args), args.preset)
    source, text = _text(args)
    model, tok = load_model(args.model)
    ids = tok(text, return_tensors="pt").input_ids
    return configs, source, model, ids, _perplexities(model, ids, args, configs)


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .eval.report import perplexity_table, write_report

    _, source, _, _, results = _run_perplexities(args)
    header = (f"Perplexity through the cache: {args.model}, {source}, {results[0].windows} windows of {args.window} "
              f"tokens fed in chunks of {args.chunk}; block_size={args.block_size}, residual_length="
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


TASKS = ("perplexity", "lambada", "lambada-openai", "icl", "reconstruction")


def _accuracy_configs(methods: list[str], bits: list[int], layout: str, preset: str = "paper") -> list:
    """fp16 (None) and one config per method and bit width; decoquant = `preset` (the paper's in `layout`)."""
    from .config import DecoQuantConfig

    out = [None] if "fp16" in methods else []
    for b in bits:
        for m in methods:
            if m != "fp16":
                extra = {"preset": preset, **({"layout": layout} if preset == "paper" else {})} if m == "decoquant" else {}
                out.append(DecoQuantConfig(method=m, bits=b, **extra))
    return out


def _reconstruction_sections(model, ids, configs, args) -> tuple[list[str], dict]:
    """The reconstruction table, value-range table and (optionally) the PNG plots."""
    from .eval.analysis import error_sweep, sites_configs, two_site_tensors, value_ranges, range_table
    from .eval.capture import capture_kv
    from .eval.reconstruction import evaluate_config, format_table

    kv = capture_kv(model, ids[:, : args.window])
    recon = [evaluate_config(kv, c) for c in _progress([c for c in configs if c is not None], "reconstruction")]
    mid = len(kv) // 2
    ranges = value_ranges(kv, layers=[0, mid, len(kv) - 1])
    sections = [f"## KV reconstruction (first window, {kv[0][0].shape[2]} tokens, {len(kv)} layers, post-RoPE)",
                format_table(recon),
                "Value ranges of the paper's group-layout decomposition (M = 16-channel chunks = T_L @ T_S; "
                "max abs / IQR is how far the extremes sit from the bulk, lower is easier for RTN):",
                range_table(ranges)]
    payload = {"reconstruction": [r.__dict__ for r in recon], "value_ranges": [r.__dict__ for r in ranges]}
    if args.plots:
        from .eval.plots import plot_densities, plot_error_vs, plot_layer_errors

        from .config import DecoQuantConfig

        out = Path(args.out or "decoquant-results")
        out.mkdir(parents=True, exist_ok=True)
        sweep = error_sweep(kv, [DecoQuantConfig(method=m, bits=b, **({"preset": "paper"} if m == "decoquant" else {}))
                                 for m in ("rtn", "decoquant", "kivi", "rotation") for b in (2, 3, 4, 8)])
        sites = error_sweep(kv, sites_configs())
        m, t_l, t_s = two_site_tensors(kv[mid][0])
        pngs = [plot_layer_errors(recon, out / "recon_layers.png", f"{args.model}: per-layer error"),
                plot_densities(m, t_l, t_s, out / "densities.png", f"{args.model}: layer {mid} keys"),
                plot_error_vs(sweep, "bits", out / "error_vs_bits.png", f"{args.model}: error vs bits"),
                plot_error_vs(sweep, "effective_bits", out / "error_vs_effective_bits.png",
                              f"{args.model}: error vs effective bits (metadata included)"),
                plot_error_vs(sites, "num_sites", out / "error_vs_sites.png",
                              f"{args.model}: DecoQuant error vs number of local tensors", group="bits")]
        sections.append("Plots: " + ", ".join(f"![{p.stem}]({p.name})" for p in pngs))
        payload["error_sweep"], payload["sites_sweep"] = sweep, sites
    return sections, payload


def cmd_eval(args: argparse.Namespace) -> int:
    """The main job: the selected tasks on one model, one report."""
    import torch

    from .eval.report import icl_table, lambada_table, perplexity_table, write_report
    from .integrations.models import load_model

    tasks = _parse_list(args.tasks, TASKS)
    bits = _parse_list(args.bits, BITS, int)
    methods = _parse_list(args.methods, ["fp16", "rtn", "kivi", "rotation", "decoquant"])
    acc_methods = _parse_list(args.accuracy_methods, ["fp16", "rtn", "kivi", "rotation", "decoquant"])
    weight_bits = _parse_list(args.weight_bits, BITS, int)
    shots = [int(s) for s in args.shots.split(",") if s]
    configs = _method_configs(methods, bits, _cache_fields(args), args.preset)
    if any(t in tasks for t in ("lambada", "lambada-openai", "icl")) and args.data_dir is None:
        raise ValueError("the lambada and icl tasks need --data-dir (a folder with lambada/ and the ICL sets)")
    source, text = _text(args)  # checked before the model loads
    datasets = []
    if "icl" in tasks:
        from .eval.data import icl_split, icl_task

        datasets = [icl_task(d) for d in args.icl_datasets.split(",") if d]
        for d in datasets:
            icl_split(args.data_dir, d, "train"), icl_split(args.data_dir, d, "test")
    model, tok = load_model(args.model)
    ids = tok(text, return_tensors="pt").input_ids
    sections = [f"# decoquant eval: {args.model}"]
    payload: dict = {"args": _args_dict(args), "torch": torch.__version__}
    if "perplexity" in tasks:
        ppl = _perplexities(model, ids, args, configs)
        sections += [
            "## Perplexity through the cache",
            f"Text: {source}, {ppl[0].windows * args.window} tokens ({ppl[0].windows} windows of {args.window}, fed "
            f"in chunks of {args.chunk} through the cache; block_size={args.block_size}, residual_length="
            f"{args.residual_length}, sink_tokens={args.sink_tokens}). decoquant = preset {args.preset}. Bytes/token "
            "count exact tokens as fp16.", perplexity_table(ppl)]
        payload["perplexity"] = [r.__dict__ for r in ppl]
    for variant in ("paper", "openai"):
        if ("lambada" if variant == "paper" else "lambada-openai") not in tasks:
            continue
        from .eval.lambada import lambada

        layout = "channel" if variant == "paper" else "group"
        acc_configs = _accuracy_configs(acc_methods, bits, layout, args.preset)
        prog = lambda it: _progress(it, f"lambada-{variant}")  # noqa: E731
        results = lambada(model, tok, args.data_dir, variant, acc_configs, limit=args.lambada_limit, progress=prog)
        for wb in weight_bits:
            wa = _accuracy_configs([m for m in ("rtn", "decoquant") if m in acc_methods], [wb], layout, args.preset)
            results += lambada(model, tok, args.data_dir, variant, wa, weight_bits=wb, limit=args.lambada_limit,
                               progress=prog)
        what = ("last-token accuracy on the validation passages (the paper's Table 2 protocol)" if variant == "paper"
                else "last-word accuracy on the OpenAI test set (lm-eval's lambada_openai scoring)")
        sections += [f"## LAMBADA ({variant})",
                     f"{what}; first {results[0].total} passages. Key/value projection outputs fake-quantized over "
                     f"the whole sequence (keys before RoPE), every layer; DecoQuant = preset {args.preset} "
                     f"({layout if args.preset == 'paper' else 'group'} layout). "
                     "W-A rows with W < 16 also quantize the k_proj/v_proj weights with per-channel RTN.",
                     lambada_table(results)]
        payload[f"lambada_{variant}"] = [r.__dict__ for r in results]
    if "icl" in tasks:
        from .eval.icl import icl_accuracy

        acc_configs = _accuracy_configs(acc_methods, bits, "group", args.preset)
        seeds = tuple(int(s) for s in args.seeds.split(","))
        results = [r for k in shots for d in _progress(datasets, f"icl {k}-shot")
                   for r in icl_accuracy(model, tok, args.data_dir, d, k, acc_configs, seeds, args.icl_limit)]
        sections += ["## In-context learning",
                     f"{args.icl_limit} test records per dataset (fixed draw), demonstrations drawn with seeds "
                     f"{list(seeds)}; the demonstrations' KV cache (every layer) is compressed with the packed codec "
                     f"(DecoQuant = preset {args.preset}, group layout, one block); options scored by mean token NLL with "
                     "contextual calibration.", icl_table(results)]
        payload["icl"] = [r.__dict__ for r in results]
    if "reconstruction" in tasks:
        extra_sections, extra = _reconstruction_sections(model, ids, configs, args)
        sections += extra_sections
        payload.update(extra)
    sections.append(f"Command: `decoquant eval {' '.join(args.argv)}`".rstrip())
    markdown = "\n\n".join(sections) + "\n"
    print(markdown)
    write_report(args.out or "decoquant-results", "eval", markdown, payload)
    print(f"report: {Path(args.out or 'decoquant-results') / 'eval.md'} (and eval.json)", file=sys.stderr)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Quality per effective bit: many codec settings through the real cache, with the frontier."""
    from .eval.report import write_report
    from .eval.sweep import budget_table, matched_budgets, run_sweep, sweep_grid, sweep_table
    from .integrations.models import load_model

    bits = _parse_list(args.bits, BITS, int)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    configs = sweep_grid(bits, args.grid, args.block_size)
    configs = [c.replace(residual_length=args.residual_length, sink_tokens=args.sink_tokens) for c in configs]
    source, text = _text(args)
    model, tok = load_model(args.model)
    ids = tok(text, return_tensors="pt").input_ids
    base, points = run_sweep(model, ids, configs, args.window, args.chunk, args.max_windows,
                             progress=lambda it: _progress(it, "settings"))
    out = Path(args.out or "decoquant-results")
    sections = [f"# decoquant sweep: {args.model}",
                f"Perplexity through the cache on {source} ({args.max_windows} windows of {args.window}, chunks of "
                f"{args.chunk}; block_size={args.block_size}, residual_length={args.residual_length}, sink_tokens="
                f"{args.sink_tokens}); fp16 perplexity {base:.3f}. Effective bits = stored bits per element of the "
                "compressed blocks, metadata included. * = on the Pareto frontier.",
                sweep_table(points), "## Best setting of each method at matched budgets",
                budget_table(matched_budgets(points, budgets))]
    if args.plots:
        from .eval.plots import plot_frontier

        out.mkdir(parents=True, exist_ok=True)
        png = plot_frontier([{"method": p.method, "bits": p.effective_bits, "delta_pct": p.delta_pct} for p in points],
                            out / "frontier.png", f"{args.model}: perplexity delta vs effective bits")
        sections.append(f"![frontier]({png.name})")
    sections.append(f"Command: `decoquant sweep {' '.join(args.argv)}`".rstrip())
    markdown = "\n\n".join(sections) + "\n"
    print(markdown)
    write_report(out, "sweep", markdown, {"args": _args_dict(args), "fp16_perplexity": base,
                                          "points": [p.__dict__ for p in points]})
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """WxA16: perplexity with every decoder Linear weight quantized (KV cache left exact)."""
    from .eval.perplexity import perplexity
    from .eval.report import write_report
    from .integrations.models import load_model
    from .weights import quantize_weights

    bits = _parse_list(args.bits, BITS, int)
    methods = _parse_list(args.methods, ["rtn", "decoquant"])
    source, text = _text(args)
    model, tok = load_model(args.model)
    ids = tok(text, return_tensors="pt").input_ids
    run = lambda m: perplexity(m, ids, None, args.window, args.chunk, args.max_windows)  # noqa: E731
    base = run(model)
    rows = [{"weights": "fp16", "perplexity": base.perplexity, "delta_pct": 0.0, "memory": None}]
    for b in bits:
        for method in _progress(methods, f"{b}-bit weights"):
            model, _ = load_model(args.model)  # a fresh copy: quantization is in place
            mem = quantize_weights(model, method, b, group_size=args.group_size, symmetric=not args.asymmetric)
            r = run(model)
            rows.append({"weights": f"{method}-{b}b", "perplexity": r.perplexity,
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
        f"exact, KV cache exact); {'asymmetric' if args.asymmetric else 'symmetric'} RTN, DecoQuant with "
        f"g={args.group_size}. Perplexity on {source}, {base.windows} windows of {args.window}.",
        "\n".join(lines), f"Command: `decoquant weights {' '.join(args.argv)}`".rstrip()]) + "\n"
    print(markdown)
    if args.out:
        write_report(args.out, "weights", markdown, {"args": _args_dict(args), "rows": rows})
    return 0


def _args_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _add_cache_args(p: argparse.ArgumentParser, max_windows: int | None) -> None:
    p.add_argument("--methods", default="fp16,rtn,kivi,rotation,decoquant",
                   help="comma-separated from fp16,rtn,kivi,rotation,decoquant (decoquant = --preset)")
    p.add_argument("--preset", default="paper", choices=("paper", "kv-split"),
                   help="DecoQuant's recipe: the paper's (default) or kv-split (best of our sweep)")
    p.add_argument("--bits", default="4,2", help="comma-separated bit widths from 2,3,4,8")
    p.add_argument("--window", type=int, default=1024, help="tokens per evaluation window (fresh cache each)")
    p.add_argument("--chunk", type=int, default=128, help="tokens fed per forward call")
    p.add_argument("--max-windows", type=int, default=max_windows,
                   help=f"evaluate at most this many windows (default: {max_windows or 'all'})")
    p.add_argument("--block-size", type=int, default=128, help="tokens per compressed block")
    p.add_argument("--residual-length", type=int, default=128, help="recent tokens kept exact")
    p.add_argument("--sink-tokens", type=int, default=0, help="first tokens kept exact")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decoquant", description="DecoQuant KV-cache compression tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reconstruct", help="compress real KV captured from a model and print the error table",
                       description="Capture the post-RoPE KV cache of a real model on real text, compress every "
                                   "layer with each method and bit width, and print the mean relative error "
                                   "and the effective bits per element (metadata included).")
    _add_model_args(p)
    p.add_argument("--tokens", type=int, default=1024, help="tokens of text to capture (default 1024)")
    p.add_argument("--bits", default="2,3,4,8", help="comma-separated bit widths from 2,3,4,8")
    p.add_argument("--methods", default="rtn,decoquant,kivi,rotation",
                   help="comma-separated methods from rtn,decoquant,kivi,rotation (decoquant = paper preset)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("eval", help="the main job: perplexity through the cache, the paper's tasks, one report",
                       description="Run a real model (default: SmolLM2-135M from its pip package) on real text "
                                   "through DecoQuantCache for each method and bit width and compress its captured "
                                   "KV (default tasks); with --tasks and --data-dir also LAMBADA (paper protocol and "
                                   "lm-eval style) and in-context learning. Prints the tables and writes eval.md, "
                                   "eval.json and PNG plots to --out.")
    _add_model_args(p)
    _add_cache_args(p, max_windows=8)
    p.add_argument("--tasks", default="perplexity,reconstruction",
                   help=f"comma-separated from {','.join(TASKS)} (lambada and icl need --data-dir)")
    p.add_argument("--accuracy-methods", default="fp16,rtn,decoquant",
                   help="methods for the lambada and icl tasks (default: the paper's rows fp16,rtn,decoquant)")
    p.add_argument("--weight-bits", default="",
                   help="also run LAMBADA with k_proj/v_proj weights per-channel RTN at these widths, KV at the "
                        "same width (the paper's W&A rows), e.g. 8,4,2")
    p.add_argument("--lambada-limit", type=int, default=500, help="LAMBADA passages to score (default 500)")
    p.add_argument("--icl-datasets", default="ag_news,subj,mr,boolq,rte",
                   help="comma-separated from ag_news,subj,mr,boolq,rte,sst2")
    p.add_argument("--shots", default="2,10", help="comma-separated demonstration counts (default 2,10)")
    p.add_argument("--icl-limit", type=int, default=100, help="test records per ICL dataset (default 100)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds for drawing demonstrations")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write PNG plots of the reconstruction analysis next to the report (needs matplotlib)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="quality vs effective bits for many codec settings, with the Pareto frontier",
                       description="Run fp16 and a grid of codec settings (rtn, rotation, KIVI at groups 32/64/128, "
                                   "DecoQuant variants: T_S per layer or head, scale granularity, symmetric or not) "
                                   "through DecoQuantCache; print perplexity delta vs effective bits, the frontier and "
                                   "the best setting of each method at matched budgets; write sweep.md/.json/frontier.png.")
    _add_model_args(p)
    p.add_argument("--bits", default="2,3,4", help="comma-separated code widths from 2,3,4,8")
    p.add_argument("--grid", default="quick", help="quick (curated DecoQuant variants) or full (every combination)")
    p.add_argument("--budgets", default="2.5,3,4.5", help="effective-bit budgets for the matched comparison")
    p.add_argument("--window", type=int, default=1024, help="tokens per evaluation window")
    p.add_argument("--chunk", type=int, default=128, help="tokens fed per forward call")
    p.add_argument("--max-windows", type=int, default=4, help="windows per setting (default 4)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per compressed block")
    p.add_argument("--residual-length", type=int, default=128, help="recent tokens kept exact")
    p.add_argument("--sink-tokens", type=int, default=0, help="first tokens kept exact")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write frontier.png")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("weights", help="WxA16: perplexity with the decoder's Linear weights quantized",
                       description="Quantize every Linear weight inside the decoder layers (per-output-channel RTN "
                                   "or DecoQuant's MPO with a shared g x g fp16 T_S), store packed codes and run "
                                   "with on-the-fly dequantization; print perplexity and weight memory.")
    _add_model_args(p)
    p.add_argument("--methods", default="rtn,decoquant", help="comma-separated from rtn,decoquant")
    p.add_argument("--bits", default="8,4", help="comma-separated weight widths from 2,3,4,8")
    p.add_argument("--group-size", type=int, default=16, help="DecoQuant's chunk width g (must divide in_features)")
    p.add_argument("--asymmetric", action="store_true", help="min/max quantizer with zero point for both methods")
    p.add_argument("--window", type=int, default=1024, help="tokens per evaluation window")
    p.add_argument("--chunk", type=int, default=1024, help="tokens fed per forward call")
    p.add_argument("--max-windows", type=int, default=8, help="windows to evaluate (default 8)")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("perplexity", help="perplexity through the real compressed cache",
                       description="Feed text through DecoQuantCache in chunks (past tokens really compressed, as "
                                   "in generation) and report perplexity and cache bytes per token for each method.")
    _add_model_args(p)
    _add_cache_args(p, max_windows=None)
    p.set_defaults(func=cmd_perplexity)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv[1:])
    try:
        return args.func(args)
    except ValueError as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
