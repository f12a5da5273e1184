"""`decoquant eval`, the main job: the selected tasks on one model, one report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import BITS, DecoQuantConfig
from .common import (CACHE_METHODS, _args_dict, _cache_fields, _load_model, _method_configs, _parse_list, _perplexities,
                     _presets, _progress, _text)

TASKS = ("perplexity", "lambada", "lambada-openai", "icl", "reconstruction", "needle", "multikey",
         "passkey")
RETRIEVAL_TASKS = {  # task: (report heading, what the prompts are)
    "needle": ("Needle in a haystack", "a 7-digit 'special magic number' for a city hidden in the text at each depth"),
    "multikey": ("Multi-key needle in a haystack",
                 "RULER's multi-key variant: {n} such needles for different cities at random depths, the one at "
                 "each depth asked for"),
    "passkey": ("Passkey retrieval", "KIVI's passkey prompt (filler lines, a 5-digit pass key at each depth)"),
}


def _accuracy_configs(methods: list[str], bits: list[int], layout: str, presets: list[str] = ("paper",)) -> list:
    """`_method_configs` for the accuracy tasks: the paper preset in `layout`, the others in the group layout."""
    return [c.replace(layout=layout) if c is not None and c.preset == "paper" else c
            for c in _method_configs(methods, bits, {}, presets)]


def _smoothquant_scales(model, tok, args) -> dict:
    """SmoothQuant's channel divisors, calibrated on WikiText-2 validation (never evaluated here)."""
    from ..eval.smoothquant import smoothing_scales
    from ..eval.text import wikitext2_validation

    ids = tok(wikitext2_validation(args.data_dir), return_tensors="pt").input_ids
    return smoothing_scales(model, ids, alpha=0.5, window=512, max_windows=8)


def _reconstruction_sections(model, ids, configs, args) -> tuple[list[str], dict]:
    """The reconstruction table, value-range table and (optionally) the PNG plots."""
    from ..eval.analysis import error_sweep, sites_configs, two_site_tensors, value_ranges, range_table
    from ..eval.capture import capture_kv
    from ..eval.reconstruction import evaluate_config, format_table

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
        from ..eval.plots import plot_densities, plot_error_vs, plot_layer_errors

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


def _retrieval_sections(model, tok, configs, text: str, args, tasks: list[str]) -> tuple[list[str], dict]:
    """Needle, multi-key needle and passkey: accuracy tables per prompt length and a depth x length heatmap PNG
    per cache."""
    from ..eval.report import retrieval_table
    from ..eval.retrieval import MULTIKEY_NEEDLES, context_limit, run_retrieval, task_prompts

    lengths = [int(n) for n in args.lengths.split(",") if n]
    depths = [float(d) for d in args.depths.split(",") if d]
    if not lengths or min(lengths) < 64 or not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--lengths must be token counts >= 64 and --depths fractions in [0, 1]; got "
                         f"{args.lengths!r} and {args.depths!r}")
    limit = context_limit(model)
    sections, payload, out = [], {}, Path(args.out or "decoquant-results")
    for task in [t for t in RETRIEVAL_TASKS if t in tasks]:
        prompts = task_prompts(tok, task, lengths, depths, text, args.data_dir, limit)
        results = run_retrieval(model, tok, prompts, configs, args.prefill_chunk,
                                progress=lambda it, t=task: _progress(it, t))
        heading, what = RETRIEVAL_TASKS[task]
        what = (what.format(n=MULTIKEY_NEEDLES)
                + ("; rows of length " + ", ".join(str(p.length) for p in prompts if p.task == "passkey-file")
                   + " are KIVI's own prompts fitted to the model's context" if any(p.task == "passkey-file"
                                                                                       for p in prompts) else ""))
        sections += [f"## {heading}",
                     f"{what}; the context prefilled in chunks of {args.prefill_chunk} through the cache (older tokens "
                     f"compressed before the question arrives), then the question, the answer decoded greedily; exact "
                     f"match over depths {depths}. Prompt lengths are clipped to the model's context ({limit}).",
                     retrieval_table(results)]
        if args.plots:
            from ..eval.plots import plot_retrieval_heatmap

            out.mkdir(parents=True, exist_ok=True)
            pngs = [plot_retrieval_heatmap([r for r in results if r.label == label and r.task == task],
                                           out / f"{task}_{label}.png", f"{args.model} {task}: {label}")
                    for label in dict.fromkeys(r.label for r in results)]
            sections.append("Heatmaps: " + ", ".join(f"![{p.stem}]({p.name})" for p in pngs))
        payload[task] = [r.__dict__ for r in results]
    return sections, payload


def cmd_eval(args: argparse.Namespace) -> int:
    """The main job: the selected tasks on one model, one report."""
    import torch

    from ..eval.report import icl_table, lambada_table, perplexity_table, write_report

    tasks = _parse_list(args.tasks, TASKS)
    bits = _parse_list(args.bits, BITS, int)
    methods = _parse_list(args.methods, ["fp16", *CACHE_METHODS])
    acc_methods = _parse_list(args.accuracy_methods, ["fp16", "rtn", "kivi", "rotation", "decoquant", "smoothquant"])
    weight_bits = _parse_list(args.weight_bits, BITS, int)
    presets = _presets(args)
    shots = [int(s) for s in args.shots.split(",") if s]
    configs = _method_configs(methods, bits, _cache_fields(args), presets)
    if any(t in tasks for t in ("lambada", "lambada-openai", "icl")) and args.data_dir is None:
        raise ValueError("the lambada and icl tasks need --data-dir (a folder with lambada/ and the ICL sets)")
    source, text = _text(args)  # checked before the model loads
    datasets = []
    if "icl" in tasks:
        from ..eval.data import icl_split, icl_task

        datasets = [icl_task(d) for d in args.icl_datasets.split(",") if d]
        for d in datasets:  # check the files before the model loads
            for split in ("train", "test"):
                icl_split(args.data_dir, d, split)
    model, tok = _load_model(args)
    ids = tok(text, return_tensors="pt").input_ids
    sections = [f"# decoquant eval: {args.model} ({args.dtype})"]
    payload: dict = {"args": _args_dict(args), "torch": torch.__version__}
    if "perplexity" in tasks:
        ppl = _perplexities(model, ids, args, configs)
        sections += [
            "## Perplexity through the cache",
            f"Text: {source}, {ppl[0].windows * args.window} tokens ({ppl[0].windows} windows of {args.window}, fed "
            f"in chunks of {args.chunk} through the cache; block_size={args.block_size}, residual_length="
            f"{args.residual_length}, sink_tokens={args.sink_tokens}); the model in {args.dtype}, fp16 = its "
            f"uncompressed cache. decoquant = presets {args.preset}. KL = KL divergence of the next-token distribution "
            "to fp16's, mean over predicted tokens and 99th percentile. Bytes/token count exact tokens as fp16.",
            perplexity_table(ppl)]
        payload["perplexity"] = [r.__dict__ for r in ppl]
    for variant in ("paper", "openai"):
        if ("lambada" if variant == "paper" else "lambada-openai") not in tasks:
            continue
        from ..eval.lambada import lambada

        layout = "channel" if variant == "paper" else "group"
        plain = [m for m in acc_methods if m != "smoothquant"]
        acc_configs = _accuracy_configs(plain, bits, layout, presets)
        prog = lambda it: _progress(it, f"lambada-{variant}")  # noqa: E731
        smoothing = _smoothquant_scales(model, tok, args) if "smoothquant" in acc_methods else None

        def run(cfgs, wb=None, smooth=None):
            return lambada(model, tok, args.data_dir, variant, cfgs, weight_bits=wb, limit=args.lambada_limit,
                           progress=prog, smoothing=smooth)

        smooth_rows = lambda widths: [DecoQuantConfig(method="rtn", bits=b) for b in widths]  # noqa: E731
        results = run(acc_configs)
        if smoothing is not None:
            results += run(smooth_rows(bits), None, smoothing)
        for wb in weight_bits:
            both = [m for m in ("rtn", "decoquant") if m in plain]
            results += run(_accuracy_configs(both, [wb], layout, presets), wb)
            if smoothing is not None:
                results += run(smooth_rows([wb]), wb, smoothing)
        what = ("last-token accuracy on the validation passages (the paper's Table 2 protocol)" if variant == "paper"
                else "last-word accuracy on the OpenAI test set (lm-eval's lambada_openai scoring)")
        if smoothing is not None:
            what += ("; SmoothQuant (alpha 0.5) = per-token RTN of k/s and v/s with channel scales s calibrated on "
                     "WikiText-2's validation split (SmoothQuant needs data, DecoQuant does not)")
        sections += [f"## LAMBADA ({variant})",
                     f"{what}; first {results[0].total} passages. Key/value projection outputs fake-quantized over "
                     f"the whole sequence (keys before RoPE), every layer; DecoQuant = presets {args.preset} "
                     f"(the paper's in the {layout} layout, others in the group layout). "
                     "W-A rows with W < 16 also quantize the k_proj/v_proj weights with per-channel RTN.",
                     lambada_table(results)]
        payload[f"lambada_{variant}"] = [r.__dict__ for r in results]
    if "icl" in tasks:
        from ..eval.icl import icl_accuracy

        acc_configs = _accuracy_configs([m for m in acc_methods if m != "smoothquant"], bits, "group", presets)
        seeds = tuple(int(s) for s in args.seeds.split(","))
        results = [r for k in shots for d in _progress(datasets, f"icl {k}-shot")
                   for r in icl_accuracy(model, tok, args.data_dir, d, k, acc_configs, seeds, args.icl_limit)]
        sections += ["## In-context learning",
                     f"{args.icl_limit} test records per dataset (fixed draw), demonstrations drawn with seeds "
                     f"{list(seeds)}; the demonstrations' KV cache (every layer) is compressed with the packed codec "
                     f"(DecoQuant = presets {args.preset}, group layout, one block); options scored by mean token "
                     "NLL with contextual calibration.", icl_table(results)]
        payload["icl"] = [r.__dict__ for r in results]
    if any(t in RETRIEVAL_TASKS for t in tasks):
        extra_sections, extra = _retrieval_sections(model, tok, configs, text, args, tasks)
        sections += extra_sections
        payload.update(extra)
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
