"""The `generate` command: a prompt in, text out, through the compressed cache, with tokens/s and the
memory report."""

from __future__ import annotations

import argparse
import sys
import time

from ..config import BITS, METHODS
from ..options import DEFAULT_PRESET
from .common import PRESET_CHOICES, _add_dtype_arg, _load_model


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt through the compressed cache",
                       description="Generate a continuation of a prompt (an argument, or stdin when absent or '-') "
                                   "through DecoQuantCache (default: the channel64-token preset at 4 bits, 4 exact "
                                   "sink tokens), then print tokens/s and the cache's memory report to stderr.")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt; read from stdin when absent or '-'")
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in alias (smollm2-135m, gemma3-270m), a local transformers folder, or a hub id")
    _add_dtype_arg(p)
    p.add_argument("--method", default="decoquant", choices=METHODS + ("fp16",),
                   help="codec (fp16 = transformers' DynamicCache, for comparison)")
    p.add_argument("--bits", type=int, default=4, choices=BITS)
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESET_CHOICES + ("none",),
                   help="DecoQuant's recipe (method decoquant only; none = the plain config fields)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=None, help="tokens per compressed block (default 128)")
    p.add_argument("--residual-length", type=int, default=None, help="recent tokens kept exact (default 128)")
    p.add_argument("--sink-tokens", type=int, default=None, help="first tokens kept exact (default 4)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.set_defaults(func=cmd_generate)


def build_cache(model, args: argparse.Namespace):
    """The cache the options ask for: DynamicCache for fp16, else DecoQuantCache.from_model."""
    if args.method == "fp16":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    from ..integrations.transformers import DecoQuantCache

    fields = {k: getattr(args, k) for k in ("block_size", "residual_length", "sink_tokens")
              if getattr(args, k) is not None}
    fields["method"], fields["bits"] = args.method, args.bits
    if args.method == "decoquant":
        fields["preset"] = None if args.preset == "none" else args.preset
    return DecoQuantCache.from_model(model, **fields)


def memory_lines(cache) -> list[str]:
    """The report printed after generation, one line per figure."""
    if not hasattr(cache, "memory_report"):
        return [f"cache: transformers DynamicCache, {cache.get_seq_length()} tokens"]
    mem = cache.memory_report()
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    lines = [f"cache: {cache.config.label()}, {cache.get_seq_length()} tokens held",
             f"  compressed blocks {mib(mem['compressed_blocks'])}, exact tokens {mib(mem['exact_tokens'])} "
             f"(sinks, window, padding, sliding layers), total {mib(mem['total'])}",
             f"  DynamicCache would hold {mib(mem['dynamic_cache'])} (fp16 equivalent {mib(mem['fp16_equivalent'])})"]
    if mem["compressed_blocks"] == 0:
        cfg = cache.config
        lines.append(f"  no block compressed yet: the first block of {cfg.block_size} tokens is compressed once "
                     f"{cfg.sink_tokens + cfg.residual_length + cfg.block_size} tokens are held "
                     "(sink_tokens + residual_length + block_size)")
    if mem["fallback_blocks"] or mem["exact_blocks"]:
        lines.append(f"  {mem['fallback_blocks']} blocks stored with the T_S = I fallback, "
                     f"{mem['exact_blocks']} with rows kept exact (NaN/Inf)")
    return lines


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..integrations.model_config import cache_kwargs

    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise ValueError("the prompt is empty: pass it as an argument or on stdin")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tok = _load_model(args)
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tok(prompt, return_tensors="pt")
    cache = build_cache(model, args)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tok.pad_token_id)
    if args.sample:
        torch.manual_seed(args.seed)
        options.update(temperature=args.temperature, top_p=args.top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    if args.stream:
        from transformers import TextStreamer

        options["streamer"] = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **options, **cache_kwargs(cache))
    seconds = time.perf_counter() - start
    new = out[0, inputs.input_ids.shape[1]:]
    if not args.stream:
        print(tok.decode(new, skip_special_tokens=True))
    print(f"{len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tokens/s, prompt "
          f"{inputs.input_ids.shape[1]} tokens, prefill included)", file=sys.stderr)
    for line in memory_lines(cache):
        print(line, file=sys.stderr)
    return 0
