"""Soak: greedy generation through `DecoQuantCache` to the model's context limit.

    python -m decoquant.bench.soak [--model smollm2-135m] [--bits 4,2] [--tokens 8192] [--every 512]

A real prompt (gensim's Wikipedia text) is prefilled, then tokens are generated greedily, one step at a
time, through `DecoQuantCache.from_model(model, bits=...)` (the default preset) until `--tokens` tokens
are held (SmolLM2: its 8,192-token limit). Every step's logits must be finite. At every `--every` tokens:
the bytes the cache reports (`memory_report()["total"]`) against the byte formula

    sum over compressed layers of  n * block_bytes + (T - n * block_size) * 2 * batch * kv_heads * head_dim * itemsize
    n = max(0, (T - sink_tokens - residual_length) // block_size)

(block_bytes: one compressed block of keys plus one of values, measured once on a block of the same shape),
the fallback and exact block counts, the bytes of every live tensor and the process's resident memory
(measured after returning the allocator's free pages; both must grow by no more than the cache itself plus a
fixed allowance: nothing else may grow with the sequence). CPU decoding reads
the blocks back by decompressing them every step, so a run to 8k tokens takes tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import sys
import time

import torch


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc) after a garbage collection and, with glibc, after returning the
    allocator's free pages (the transient buffers of a decode step grow with the sequence and would otherwise
    stay resident as free heap); the peak where /proc is missing."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor the interpreter can reach (a store that kept copies would show here)."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def block_bytes(cache, layer) -> int:
    """Bytes of one compressed block (keys and values) of this layer's shape, measured on random data."""
    import decoquant as dq

    store = layer.store
    cfg = cache.config
    ref = store._reference()
    b, h, _, d = ref.shape
    x = torch.randn(b, h, cfg.block_size, d, dtype=store.dtype, generator=torch.Generator().manual_seed(0))
    return dq.compress(x, cfg, "key").nbytes + dq.compress(x, cfg, "value").nbytes


def predicted_bytes(cache, block_nbytes: dict[int, int]) -> int:
    """The byte formula above, summed over the compressed layers, plus the exact layers' own tensors."""
    from ..integrations.transformers import DecoQuantLayer

    cfg, total = cache.config, 0
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, DecoQuantLayer):
            total += 2 * layer.keys.numel() * layer.keys.element_size() if layer.is_initialized else 0
            continue
        store = layer.store
        ref = store._reference()
        t = store.length
        n = max(0, (t - cfg.sink_tokens - cfg.residual_length) // cfg.block_size)
        per_token = 2 * ref.shape[0] * ref.shape[1] * ref.shape[3] * ref.element_size()
        total += n * block_nbytes[i] + (t - n * cfg.block_size) * per_token
    return total


def soak(model, tok, bits: int, tokens: int, every: int, prompt_tokens: int = 256, progress=True) -> dict:
    import decoquant as dq
    from ..eval.text import load_text
    from ..integrations.model_config import cache_kwargs

    ids = tok(load_text("gensim-wiki")[:8000], return_tensors="pt").input_ids[:, :prompt_tokens]
    cache = dq.DecoQuantCache.from_model(model, bits=bits)
    rows, start, t0 = [], None, time.time()
    bar = None
    if progress:
        from ..progress import progress as progress_bar

        bar = progress_bar(range(tokens - ids.shape[1]), desc=f"soak {bits}-bit", total=tokens - ids.shape[1])
        bar = bar if hasattr(bar, "update") else None  # no tqdm: no bar
    with torch.no_grad():
        out = model(ids, use_cache=True, **cache_kwargs(cache))
        layers = cache.compressed_layers
        sizes = {i: block_bytes(cache, cache.layers[i]) for i in layers}
        nonfinite_steps = 0
        for _ in range(tokens - ids.shape[1]):
            logits = out.logits[:, -1]
            nonfinite_steps += int(not torch.isfinite(logits).all())
            nxt = logits.argmax(-1, keepdim=True)
            out = model(nxt, use_cache=True, **cache_kwargs(cache))
            if bar is not None:
                bar.update(1)
            held = cache.get_seq_length()
            if held % every == 0 or held == tokens:
                mem = cache.memory_report()
                rss, live = _rss_bytes(), live_tensor_bytes()
                start = start or (held, mem["total"], rss, live)
                rows.append(dict(tokens=held, cache_bytes=mem["total"], predicted_bytes=predicted_bytes(cache, sizes),
                                 dynamic_cache_bytes=mem["dynamic_cache"], fallback_blocks=mem["fallback_blocks"],
                                 exact_blocks=mem["exact_blocks"], rss_bytes=rss, live_tensor_bytes=live,
                                 nonfinite_steps=nonfinite_steps,
                                 seconds=round(time.time() - t0, 1)))
    if bar is not None:
        bar.close()
    last = rows[-1]
    cache_growth = last["cache_bytes"] - start[1]
    rss_growth = last["rss_bytes"] - start[2]
    live_growth = last["live_tensor_bytes"] - start[3]
    return dict(bits=bits, preset=cache.config.preset, rows=rows, block_bytes=sizes[layers[0]],
                finite=nonfinite_steps == 0 and bool(torch.isfinite(out.logits).all()),
                bytes_match=all(r["cache_bytes"] == r["predicted_bytes"] for r in rows),
                cache_growth=cache_growth, rss_growth=rss_growth, live_growth=live_growth)


def _markdown(result: dict) -> str:
    mib = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
    lines = [f"### default preset, {result['bits']}-bit (block bytes {result['block_bytes']})", "",
             "| tokens | cache MiB | formula MiB | DynamicCache MiB | fallback blocks | exact blocks "
             "| live tensors MiB "
             "| RSS MiB | s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['tokens']} | {mib(r['cache_bytes'])} | {mib(r['predicted_bytes'])} | "
                     f"{mib(r['dynamic_cache_bytes'])} | {r['fallback_blocks']} | {r['exact_blocks']} | "
                     f"{mib(r['live_tensor_bytes'])} | {mib(r['rss_bytes'])} | {r['seconds']} |")
    lines += ["", f"finite: {result['finite']}; bytes equal the formula at every row: {result['bytes_match']}; "
              f"growth from the first row: cache {mib(result['cache_growth'])} MiB, live tensors "
              f"{mib(result['live_growth'])} MiB, resident memory {mib(result['rss_growth'])} MiB", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", default="4,2")
    p.add_argument("--tokens", type=int, default=None, help="tokens held at the end (default: the model's limit)")
    p.add_argument("--every", type=int, default=512)
    p.add_argument("--allowance-mib", type=float, default=256.0,
                   help="resident-memory growth allowed beyond the cache's own growth")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from ..integrations.models import load_model

    model, tok = load_model(args.model)
    tokens = args.tokens or model.config.max_position_embeddings
    results, ok = [], True
    for bits in [int(b) for b in args.bits.split(",")]:
        r = soak(model, tok, bits, tokens, args.every)
        allowance = args.allowance_mib * 2**20
        r["memory_within_allowance"] = (r["live_growth"] <= r["cache_growth"] + allowance
                                        and r["rss_growth"] <= r["cache_growth"] + allowance)
        ok &= r["finite"] and r["bytes_match"] and r["memory_within_allowance"]
        results.append(r)
        print(_markdown(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("soak", "passed" if ok else "FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
