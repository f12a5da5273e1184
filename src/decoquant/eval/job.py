"""The main job's tasks (`decoquant eval`): each runs its caches on one model and returns its report sections
(markdown) and its JSON payload. The command line parses, checks its inputs, calls these and prints."""

from __future__ import annotations

from pathlib import Path

from ..config import DecoQuantConfig
from ..progress import progress

TASKS = ("perplexity", "lambada", "lambada-openai", "icl", "reconstruction", "needle", "multikey", "passkey")
RETRIEVAL_TASKS = {  # task: (report heading, what the prompts are)
    "needle": ("Needle in a haystack", "a 7-digit 'special magic number' for a city hidden in the text at each depth"),
    "multikey": ("Multi-key needle in a haystack",
                 "RULER's multi-key variant: {n} such needles for different cities at random depths, the one at "
                 "each depth asked for"),
    "passkey": ("Passkey retrieval", "KIVI's passkey prompt (filler lines, a 5-digit pass key at each depth)"),
}
Sections = tuple[list[str], dict]


def method_configs(methods: list[str], bits: list[int], fields: dict, presets: list[str] = ("paper",),
                   turboquant_outliers: int = 0, kivi_clip: bool = False, kivi_groups: list[int] = (32,)) -> list:
    """fp16 (None = transformers' DynamicCache) and one config per method and bit width (DecoQuant: one per
    preset; TurboQuant also with `turboquant_outliers` outlier channels where the width takes them, 2 and 3
    bits; KIVI: one per group of `kivi_groups`, each also with `clip_keys` where `kivi_clip`). A width may be a
    (key bits, value bits) pair."""
    out = [None] if "fp16" in methods else []
    for width in bits:
        b, vb = width if isinstance(width, tuple) else (width, None)
        for m in methods:
            if m == "fp16":
                continue
            extras = [{}]
            if m == "decoquant":
                extras = [{"preset": p} for p in presets]
            elif m == "turboquant" and turboquant_outliers and b in (2, 3) and vb in (None, 2, 3):
                extras.append({"outlier_channels": turboquant_outliers})
            elif m == "kivi":
                extras = [{"quant_group_size": g, "clip_keys": c} for g in kivi_groups
                          for c in ((False, True) if kivi_clip else (False,))]
            for extra in extras:
                out.append(DecoQuantConfig(method=m, bits=b, value_bits=vb, **extra, **fields))
    return out


def accuracy_configs(methods: list[str], bits: list[int], layout: str, presets: list[str] = ("paper",)) -> list:
    """`method_configs` for the accuracy tasks: the paper preset in `layout`, the others in the group layout."""
    return [c.replace(layout=layout) if c is not None and c.preset == "paper" else c
            for c in method_configs(methods, bits, {}, presets)]


def perplexities(model, ids, configs: list, window: int, chunk: int, max_windows: int | None) -> list:
    """Perplexity and KL divergence through each cache (`perplexity.perplexities`), with a progress bar."""
    from .perplexity import perplexities as run

    return run(model, ids, configs, window=window, chunk=chunk, max_windows=max_windows,
               progress=lambda it: progress(it, "windows x caches"))


def perplexity_section(model, ids, configs: list, source: str, window: int, chunk: int, max_windows: int | None,
                       dtype: str, presets: list[str], fields: dict) -> Sections:
    """Perplexity through the caches (`fields`: the cache fields every config was given)."""
    from .report import perplexity_table

    ppl = perplexities(model, ids, configs, window, chunk, max_windows)
    layout = ", ".join(f"{k}={v}" for k, v in fields.items())
    return ["## Perplexity through the cache",
            f"Text: {source}, {ppl[0].windows * window} tokens ({ppl[0].windows} windows of {window}, fed in chunks "
            f"of {chunk} through the cache; {layout}); the model in {dtype}, fp16 = its uncompressed cache. "
            f"decoquant = presets {','.join(presets)}. KL = KL divergence of the next-token distribution to fp16's, "
            "mean over predicted tokens and 99th percentile. Bytes/token count exact tokens as fp16.",
            perplexity_table(ppl)], {"perplexity": [r.__dict__ for r in ppl]}


def _smoothquant_scales(model, tok, data_dir) -> dict:
    """SmoothQuant's channel divisors, calibrated on WikiText-2 validation (never evaluated here)."""
    from .smoothquant import smoothing_scales
    from .text import wikitext2_validation

    ids = tok(wikitext2_validation(data_dir), return_tensors="pt").input_ids
    return smoothing_scales(model, ids, alpha=0.5, window=512, max_windows=8)


def lambada_section(model, tok, data_dir, variant: str, methods: list[str], bits: list[int], presets: list[str],
                    weight_bits: list[int], limit: int) -> Sections:
    """LAMBADA, `variant` "paper" (the paper's Table 2 protocol, channel layout) or "openai" (lm-eval's scoring):
    every method (`smoothquant` included, calibrated on WikiText-2) at `bits`, then the W&A rows."""
    from .lambada import lambada
    from .report import lambada_table

    layout = "channel" if variant == "paper" else "group"
    plain = [m for m in methods if m != "smoothquant"]
    smoothing = _smoothquant_scales(model, tok, data_dir) if "smoothquant" in methods else None

    def run(cfgs, wb=None, smooth=None):
        return lambada(model, tok, data_dir, variant, cfgs, weight_bits=wb, limit=limit,
                       progress=lambda it: progress(it, f"lambada-{variant}"), smoothing=smooth)

    def smooth_rows(widths):
        return [DecoQuantConfig(method="rtn", bits=b) for b in widths]

    results = run(accuracy_configs(plain, bits, layout, presets))
    if smoothing is not None:
        results += run(smooth_rows(bits), None, smoothing)
    for wb in weight_bits:
        results += run(accuracy_configs([m for m in ("rtn", "decoquant") if m in plain], [wb], layout, presets), wb)
        if smoothing is not None:
            results += run(smooth_rows([wb]), wb, smoothing)
    what = ("last-token accuracy on the validation passages (the paper's Table 2 protocol)" if variant == "paper"
            else "last-word accuracy on the OpenAI test set (lm-eval's lambada_openai scoring)")
    if smoothing is not None:
        what += ("; SmoothQuant (alpha 0.5) = per-token RTN of k/s and v/s with channel scales s calibrated on "
                 "WikiText-2's validation split (SmoothQuant needs data, DecoQuant does not)")
    return [f"## LAMBADA ({variant})",
            f"{what}; first {results[0].total} passages. Key/value projection outputs fake-quantized over the whole "
            f"sequence (keys before RoPE), every layer; DecoQuant = presets {','.join(presets)} (the paper's in the "
            f"{layout} layout, others in the group layout). W-A rows with W < 16 also quantize the k_proj/v_proj "
            "weights with per-channel RTN.",
            lambada_table(results)], {f"lambada_{variant}": [r.__dict__ for r in results]}


def icl_section(model, tok, data_dir, datasets: list, shots: list[int], methods: list[str], bits: list[int],
                presets: list[str], seeds: tuple[int, ...], limit: int) -> Sections:
    """In-context learning: every dataset at every demonstration count, the demonstrations' cache compressed."""
    from .icl import icl_accuracy
    from .report import icl_table

    configs = accuracy_configs([m for m in methods if m != "smoothquant"], bits, "group", presets)
    results = [r for k in shots for d in progress(datasets, f"icl {k}-shot")
               for r in icl_accuracy(model, tok, data_dir, d, k, configs, seeds, limit)]
    return ["## In-context learning",
            f"{limit} test records per dataset (fixed draw), demonstrations drawn with seeds {list(seeds)}; the "
            f"demonstrations' KV cache (every layer) is compressed with the packed codec (DecoQuant = presets "
            f"{','.join(presets)}, group layout, one block); options scored by mean token NLL with contextual "
            "calibration.", icl_table(results)], {"icl": [r.__dict__ for r in results]}


def retrieval_sections(model, tok, configs: list, text: str, data_dir, tasks: list[str], lengths: list[int],
                       depths: list[float], prefill_chunk: int, plots: Path | None, name: str) -> Sections:
    """Needle, multi-key needle and passkey: accuracy tables per prompt length and (into `plots`) a depth x
    length heatmap PNG per cache."""
    from .report import retrieval_table
    from .retrieval import MULTIKEY_NEEDLES, context_limit, run_retrieval, task_prompts

    if not lengths or min(lengths) < 64 or not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"lengths must be token counts >= 64 and depths fractions in [0, 1]; got {lengths} and "
                         f"{depths}")
    limit = context_limit(model)
    sections, payload = [], {}
    for task in [t for t in RETRIEVAL_TASKS if t in tasks]:
        prompts = task_prompts(tok, task, lengths, depths, text, data_dir, limit)
        results = run_retrieval(model, tok, prompts, configs, prefill_chunk,
                                progress=lambda it, t=task: progress(it, t))
        heading, what = RETRIEVAL_TASKS[task]
        what = what.format(n=MULTIKEY_NEEDLES)
        fitted = [str(p.length) for p in prompts if p.task == "passkey-file"]
        if fitted:
            what += f"; rows of length {', '.join(fitted)} are KIVI's own prompts fitted to the model's context"
        sections += [f"## {heading}",
                     f"{what}; the context prefilled in chunks of {prefill_chunk} through the cache (older tokens "
                     f"compressed before the question arrives), then the question, the answer decoded greedily; exact "
                     f"match over depths {depths}. Prompt lengths are clipped to the model's context ({limit}).",
                     retrieval_table(results)]
        if plots is not None:
            from .plots import plot_retrieval_heatmap

            plots.mkdir(parents=True, exist_ok=True)
            pngs = [plot_retrieval_heatmap([r for r in results if r.label == label and r.task == task],
                                           plots / f"{task}_{label}.png", f"{name} {task}: {label}")
                    for label in dict.fromkeys(r.label for r in results)]
            sections.append("Heatmaps: " + ", ".join(f"![{p.stem}]({p.name})" for p in pngs))
        payload[task] = [r.__dict__ for r in results]
    return sections, payload


def reconstruction_sections(model, ids, configs: list, window: int, plots: Path | None, name: str) -> Sections:
    """The reconstruction table, value-range table and (into `plots`) the PNG plots."""
    from .analysis import error_sweep, range_table, sites_configs, two_site_tensors, value_ranges
    from .capture import capture_kv
    from .reconstruction import evaluate_config, format_table

    kv = capture_kv(model, ids[:, :window])
    recon = [evaluate_config(kv, c) for c in progress([c for c in configs if c is not None], "reconstruction")]
    mid = len(kv) // 2
    ranges = value_ranges(kv, layers=[0, mid, len(kv) - 1])
    sections = [f"## KV reconstruction (first window, {kv[0][0].shape[2]} tokens, {len(kv)} layers, post-RoPE)",
                format_table(recon),
                "Value ranges of the paper's group-layout decomposition (M = 16-channel chunks = T_L @ T_S; "
                "max abs / IQR is how far the extremes sit from the bulk, lower is easier for RTN):",
                range_table(ranges)]
    payload = {"reconstruction": [r.__dict__ for r in recon], "value_ranges": [r.__dict__ for r in ranges]}
    if plots is not None:
        from .plots import plot_densities, plot_error_vs, plot_layer_errors

        plots.mkdir(parents=True, exist_ok=True)
        sweep = error_sweep(kv, [DecoQuantConfig(method=m, bits=b, **({"preset": "paper"} if m == "decoquant" else {}))
                                 for m in ("rtn", "decoquant", "kivi", "rotation") for b in (2, 3, 4, 8)])
        sites = error_sweep(kv, sites_configs())
        m, t_l, t_s = two_site_tensors(kv[mid][0])
        pngs = [plot_layer_errors(recon, plots / "recon_layers.png", f"{name}: per-layer error"),
                plot_densities(m, t_l, t_s, plots / "densities.png", f"{name}: layer {mid} keys"),
                plot_error_vs(sweep, "bits", plots / "error_vs_bits.png", f"{name}: error vs bits"),
                plot_error_vs(sweep, "effective_bits", plots / "error_vs_effective_bits.png",
                              f"{name}: error vs effective bits (metadata included)"),
                plot_error_vs(sites, "num_sites", plots / "error_vs_sites.png",
                              f"{name}: DecoQuant error vs number of local tensors", group="bits")]
        sections.append("Plots: " + ", ".join(f"![{p.stem}]({p.name})" for p in pngs))
        payload["error_sweep"], payload["sites_sweep"] = sweep, sites
    return sections, payload
