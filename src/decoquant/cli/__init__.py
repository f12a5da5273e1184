"""The `decoquant` command line. Each subcommand builds its inputs and calls library functions."""

from __future__ import annotations

import argparse
import sys

from .commands import cmd_perplexity, cmd_reconstruct, cmd_sweep, cmd_weights
from .common import _add_cache_args, _add_model_args, _add_window_args
from .evaluate import TASKS, cmd_eval
from .generate import add_generate_parser


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
    _add_model_args(p, dtype="bfloat16")
    _add_cache_args(p, max_windows=8)
    p.add_argument("--tasks", default="perplexity,reconstruction",
                   help=f"comma-separated from {','.join(TASKS)} (lambada and icl need --data-dir)")
    p.add_argument("--accuracy-methods", default="fp16,rtn,decoquant",
                   help="methods for the lambada and icl tasks (default: the paper's rows fp16,rtn,decoquant; "
                        "smoothquant adds calibrated SmoothQuant rows to LAMBADA)")
    p.add_argument("--weight-bits", default="",
                   help="also run LAMBADA with k_proj/v_proj weights per-channel RTN at these widths, KV at the "
                        "same width (the paper's W&A rows), e.g. 8,4,2")
    p.add_argument("--lambada-limit", type=int, default=500, help="LAMBADA passages to score (default 500)")
    p.add_argument("--icl-datasets", default="ag_news,subj,mr,boolq,rte",
                   help="comma-separated from ag_news,subj,mr,boolq,rte,sst2")
    p.add_argument("--shots", default="2,10", help="comma-separated demonstration counts (default 2,10)")
    p.add_argument("--icl-limit", type=int, default=100, help="test records per ICL dataset (default 100)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds for drawing demonstrations")
    p.add_argument("--lengths", default="1024,2048,4096,8192",
                   help="retrieval tasks (needle, multikey, passkey): prompt lengths in tokens (clipped to the "
                        "model's context)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="retrieval tasks: depths of the fact asked for, 0 = start")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="retrieval tasks: tokens per prefill forward (older chunks are read back compressed)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write PNG plots of the reconstruction analysis next to the report (needs matplotlib)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="quality vs effective bits for many codec settings, with the Pareto frontier",
                       description="Run fp16 and a grid of codec settings (rtn, rotation, KIVI at groups 32/64/128, "
                                   "DecoQuant variants: T_S per layer or head, scale granularity, symmetric or not) "
                                   "through DecoQuantCache; print perplexity delta vs effective bits, the frontier and "
                                   "the best setting of each method at matched budgets; write "
                                   "sweep.md/.json/frontier.png.")
    _add_model_args(p)
    p.add_argument("--bits", default="2,3,4", help="comma-separated code widths from 2,3,4,8")
    p.add_argument("--grid", default="quick", help="presets (baselines and DecoQuant presets), quick (+ curated "
                                                   "variants) or full (every combination)")
    p.add_argument("--budgets", default="2.5,3,4.5", help="effective-bit budgets for the matched comparison")
    p.add_argument("--lambada-limit", type=int, default=0,
                   help="also score every setting on this many LAMBADA validation passages (paper protocol; needs "
                        "--data-dir; 0 = skip)")
    _add_window_args(p, max_windows=4)
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write frontier.png")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("weights", help="WxA16: perplexity with the decoder's Linear weights quantized",
                       description="Quantize every Linear weight inside the decoder layers (per-output-channel RTN "
                                   "or DecoQuant's MPO with a shared g x g fp16 T_S), store packed codes and run "
                                   "with on-the-fly dequantization; print perplexity and weight memory.")
    _add_model_args(p)
    p.add_argument("--methods", default="rtn,rtn-asym,decoquant",
                   help="comma-separated from rtn, decoquant, and their quantizer variants rtn-sym, rtn-asym, "
                        "decoquant-sym, decoquant-asym (plain names use the method's default: RTN symmetric, "
                        "DecoQuant asymmetric)")
    p.add_argument("--bits", default="8,4", help="comma-separated weight widths from 2,3,4,8")
    p.add_argument("--group-size", type=int, default=32, help="DecoQuant's chunk width g (must divide in_features)")
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
    add_generate_parser(sub)
    sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's command line with the decoquant model "
                   "registered (--model decoquant --model_args pretrained=smollm2-135m,method=kivi,bits=2; "
                   "--data-dir adds offline tasks such as lambada_openai_local)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's
        from .lm_eval import run_lm_eval

        try:
            return run_lm_eval(argv[1:])
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    args.argv = list(argv[1:])
    try:
        return args.func(args)
    except ValueError as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
