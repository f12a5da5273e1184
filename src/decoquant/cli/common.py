"""Shared pieces of the `decoquant` commands: argument groups, list parsing, the text source and the
perplexity runs (configs per method: `eval.job`)."""

from __future__ import annotations

import argparse
import sys

from ..config import BITS, METHODS
from ..options import PRESETS
from ..eval.job import method_configs, perplexities

CACHE_METHODS = tuple(m for m in METHODS if m != "none")  # what --methods takes besides fp16
DEFAULT_METHODS = "fp16,rtn,kivi,rotation,decoquant"  # the main job's caches (turboquant on request)


def _parse_list(text: str, allowed, cast=str) -> list:
    values = [cast(v) for v in text.split(",") if v]
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SystemExit(f"error: {bad} not allowed; choose from {list(allowed)}")
    return values


DTYPES = ("float32", "bfloat16", "float16")


def _add_dtype_arg(p: argparse.ArgumentParser, default: str = "float32") -> None:
    p.add_argument("--dtype", default=default, choices=DTYPES,
                   help=f"the model's weights and activations (default {default}; bfloat16 is 2-3x faster on CPUs "
                        "with bf16 instructions and is what GPUs serve; the KV cache then holds bfloat16)")


def _cpu_has_bf16() -> bool | None:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX; Linux), None where it cannot tell."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return None
    if not flags:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _load_model(args: argparse.Namespace):
    """(model, tokenizer) of --model in --dtype; a note on stderr where bfloat16 would run emulated on the CPU."""
    import torch

    from ..integrations.models import load_model

    if args.dtype == "bfloat16" and not torch.cuda.is_available() and _cpu_has_bf16() is False:
        print("note: this CPU has no bfloat16 instructions (avx512_bf16 / amx_bf16), so bfloat16 runs emulated; "
              "--dtype float32 is faster here (about 1.8x on a 2-core AVX2 machine)", file=sys.stderr)
    return load_model(args.model, dtype=getattr(torch, args.dtype))


def _add_model_args(p: argparse.ArgumentParser, dtype: str = "float32") -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in alias (smollm2-135m, gemma3-270m), a local transformers folder, or a hub id")
    _add_dtype_arg(p, dtype)
    p.add_argument("--data-dir", default=None,
                   help="folder laid out like the shared data folder (wikitext2/wiki.test.raw, lambada/, ...); "
                        "without it the text is the Wikipedia articles shipped in gensim's test data")
    p.add_argument("--out", default=None, help="write the JSON results and a markdown report to this folder")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line at the end")


PRESET_CHOICES = tuple(p for p in PRESETS if p is not None)
KIVI_GROUPS = (16, 32, 64, 128)


def _presets(args: argparse.Namespace) -> list[str]:
    return _parse_list(args.preset, PRESET_CHOICES)


def _text(args) -> tuple[str, str]:
    """(source name, text); checked before the model loads so a bad data folder fails fast."""
    from ..eval.text import load_text

    source = "wikitext2" if args.data_dir else "gensim-wiki"
    return source, load_text(source, args.data_dir)


def _cache_fields(args) -> dict:
    return {"block_size": args.block_size, "residual_length": args.residual_length, "sink_tokens": args.sink_tokens}


def _parse_widths(text: str) -> list:
    """`--bits` of the quality commands: widths from BITS, or key:value pairs such as 3:2 (3-bit keys, 2-bit
    values) -> ints and (key bits, value bits) tuples."""
    out = []
    for item in (v for v in text.split(",") if v):
        parts = item.split(":")
        try:
            widths = tuple(int(p) for p in parts)
        except ValueError:
            widths = ()
        if len(widths) not in (1, 2) or any(w not in BITS for w in widths):
            raise SystemExit(f"error: --bits {item!r} not allowed; choose widths from {list(BITS)} or key:value "
                             "pairs of them such as 3:2")
        out.append(widths[0] if len(widths) == 1 else widths)
    return out


def _configs(args: argparse.Namespace) -> list:
    """The caches that `--methods`, `--bits`, `--preset`, `--turboquant-outliers`, `--kivi-groups` and `--kivi-clip`
    ask for (the one reading of them, for `perplexity` and every task of `eval`)."""
    bits = _parse_widths(args.bits)
    methods = _parse_list(args.methods, ["fp16", *CACHE_METHODS])
    return method_configs(methods, bits, _cache_fields(args), _presets(args), args.turboquant_outliers,
                          args.kivi_clip, _parse_list(args.kivi_groups, KIVI_GROUPS, int))


def _run_perplexities(args: argparse.Namespace):
    """Shared by `perplexity` and `eval`: (configs, source, model, token ids, perplexity results)."""
    configs = _configs(args)
    source, text = _text(args)
    model, tok = _load_model(args)
    ids = tok(text, return_tensors="pt").input_ids
    return configs, source, model, ids, perplexities(model, ids, configs, args.window, args.chunk, args.max_windows)



def _args_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _add_cache_args(p: argparse.ArgumentParser, max_windows: int | None) -> None:
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated from {','.join(('fp16',) + CACHE_METHODS)} (decoquant = --preset)")
    p.add_argument("--preset", default="paper,channel64-token",
                   help=f"DecoQuant's recipes, comma-separated from {', '.join(PRESET_CHOICES)} (default: the "
                        "paper's and the frontier's choice)")
    p.add_argument("--bits", default="4,2", help="comma-separated bit widths from 2,3,4,8, or key:value pairs of "
                                                 "them (3:2 = 3-bit keys, 2-bit values)")
    p.add_argument("--turboquant-outliers", type=int, default=0,
                   help="with turboquant at 2 or 3 bits: also run it with this many outlier channels per head at "
                        "one more bit (the paper's split: 32 of 128)")
    p.add_argument("--kivi-groups", default="32", help=f"KIVI's group sizes, comma-separated from "
                                                       f"{','.join(map(str, KIVI_GROUPS))}")
    p.add_argument("--kivi-clip", action="store_true",
                   help="also run KIVI with the key range search (clip_keys), as the channel64-clip preset does")
    _add_window_args(p, max_windows)


def _add_window_args(p: argparse.ArgumentParser, max_windows: int | None) -> None:
    """How text is fed through the cache, and the cache's block layout."""
    p.add_argument("--window", type=int, default=1024, help="tokens per evaluation window (fresh cache each)")
    p.add_argument("--chunk", type=int, default=128, help="tokens fed per forward call")
    p.add_argument("--max-windows", type=int, default=max_windows,
                   help=f"evaluate at most this many windows (default: {max_windows or 'all'})")
    p.add_argument("--block-size", type=int, default=128, help="tokens per compressed block")
    p.add_argument("--residual-length", type=int, default=128, help="recent tokens kept exact")
    p.add_argument("--sink-tokens", type=int, default=0, help="first tokens kept exact")
