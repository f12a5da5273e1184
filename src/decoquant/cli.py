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


def _method_configs(methods: list[str], bits: list[int], fields: dict) -> list:
    """fp16 (None = transformers' DynamicCache) and one config per method and bit width."""
    from .config import DecoQuantConfig

    out = [None] if "fp16" in methods else []
    for b in bits:
        for m in methods:
            if m == "fp16":
                continue
            extra = {"preset": "paper"} if m == "decoquant" else {}
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
    configs = _method_configs(methods, bits, _cache_fields(args))
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


def cmd_eval(args: argparse.Namespace) -> int:
    """The main job: perplexity through the cache and KV reconstruction, one report."""
    import torch

    from .eval.capture import capture_kv
    from .eval.reconstruction import evaluate_config, format_table
    from .eval.report import perplexity_table, write_report

    configs, source, model, ids, ppl = _run_perplexities(args)
    kv = capture_kv(model, ids[:, : args.window])
    recon = [evaluate_config(kv, c) for c in _progress([c for c in configs if c is not None], "reconstruction")]
    n_tokens = ppl[0].windows * args.window
    sections = [
        f"# decoquant eval: {args.model}",
        f"Text: {source}, {n_tokens} tokens ({ppl[0].windows} windows of {args.window}, fed in chunks of "
        f"{args.chunk} through the cache; block_size={args.block_size}, residual_length={args.residual_length}, "
        f"sink_tokens={args.sink_tokens}). decoquant = the paper preset. Bytes/token count exact tokens as fp16.",
        "## Perplexity through the cache", perplexity_table(ppl),
        f"## KV reconstruction (first window, {kv[0][0].shape[2]} tokens, {len(kv)} layers, post-RoPE)",
        format_table(recon),
        f"Command: `decoquant eval {' '.join(args.argv)}`".rstrip(),
    ]
    markdown = "\n\n".join(sections) + "\n"
    print(markdown)
    write_report(args.out or "decoquant-results", "eval", markdown,
                 {"args": _args_dict(args), "perplexity": [r.__dict__ for r in ppl],
                  "reconstruction": [r.__dict__ for r in recon], "torch": torch.__version__})
    print(f"report: {Path(args.out or 'decoquant-results') / 'eval.md'} (and eval.json)", file=sys.stderr)
    return 0


def _args_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _add_cache_args(p: argparse.ArgumentParser, max_windows: int | None) -> None:
    p.add_argument("--methods", default="fp16,rtn,kivi,rotation,decoquant",
                   help="comma-separated from fp16,rtn,kivi,rotation,decoquant (decoquant = paper preset)")
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

    p = sub.add_parser("eval", help="the main job: perplexity through the cache and KV reconstruction, one report",
                       description="Run a real model (default: SmolLM2-135M from its pip package) on real text "
                                   "through DecoQuantCache for each method and bit width, then compress its captured "
                                   "KV; print the tables and write eval.md and eval.json to --out.")
    _add_model_args(p)
    _add_cache_args(p, max_windows=8)
    p.set_defaults(func=cmd_eval)

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
