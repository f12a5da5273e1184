"""End-to-end decode throughput of a randomly initialised model of a real shape (`--shape`: Llama-2-7B, MHA;
Llama-3-8B and Qwen2.5-7B, GQA), fp16 weights.

    python -m decoquant.bench.e2e_decode [--shape llama3-8b] [--batch 1,8,32] [--context 4096,16384] [--cuda-graph]

Caches compared, all driven by the model's own forward:
- fp16:     transformers' DynamicCache, SDPA attention (which expands GQA keys/values with `repeat_kv`);
- fp16 enable_gqa (GQA shapes): the same cache, SDPA over the unexpanded kv heads (`shapes.sdpa_gqa_forward`),
            the fastest fp16 baseline for the shape;
- decoquant: DecoQuantCache (paper preset, 4 or 2 bits, block 128, residual 128) with the fused
            attention kernel (`decoquant.enable_fused_attention`);
- QuantizedCache-<backend>: transformers' QuantizedCache (HQQ or quanto, whichever is installed;
            `--quantized-cache`), SDPA attention over the fp16 K/V it rebuilds every step.
With --cuda-graph, two more rows per shape, each decode step replayed from one captured CUDA graph
(`decoquant.GraphDecoder`): "fp16 graph" (transformers' StaticCache, SDPA) and "decoquant graph" (the
DecoQuantCache made static; its block compressions run between replays and are timed).
The prompt KV is random (a real prefill of 32 x 16k tokens on a random model measures nothing
more): each layer's cache is filled with random outlier-heavy K/V of `context` tokens (the DecoQuant
cache compresses it block by block exactly as a prefill would), then `steps` greedy decode steps are
timed with CUDA events. `steps` is a whole number of block cycles (a multiple of the block size, 128): every
layer then compresses blocks at its steady rate, one per 128 steps, wherever the cycle starts (fewer steps
either miss the compression or count it several times over: with 4 sink tokens the first compression comes 4
steps after a 16k fill, without sinks 128 steps after). Peak memory is torch's max allocated during the decode
steps. Before timing, one decode step of the fused cache is checked against the same cache decoded by the torch
reference path (logits relative error). Rows that do not fit report OOM.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from ..config import DecoQuantConfig
from ..integrations.transformers import cache_kwargs
from .common import fill, timed_steps
from .shapes import SDPA_GQA, SHAPES, llama_config, register_sdpa_gqa


def random_model(layers: int, device, shape: str = "llama2-7b"):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape, layers)).half()
    model.eval()
    return model


@torch.no_grad()
def decode(model, cache, batch, context, steps, device):
    state = {"ids": torch.randint(0, model.config.vocab_size, (batch, 1), device=device),
             "pos": torch.full((batch, 1), context, device=device), "logits": None}

    def step():
        logits = model(input_ids=state["ids"], **cache_kwargs(cache), position_ids=state["pos"], use_cache=True,
                       logits_to_keep=1).logits
        state.update(ids=logits[:, -1:].argmax(-1), pos=state["pos"] + 1, logits=logits)

    return timed_steps(step, steps), state["logits"]


@torch.no_grad()
def decode_graphed(model, cache, batch, context, steps, device):
    """Like `decode`, each step replayed from a CUDA graph: step 1 warms up eagerly, step 2 captures."""
    from decoquant.integrations.graph_decode import GraphDecoder

    ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    decoder = GraphDecoder(model, cache, ids, context, steps + 2, cuda_graph=True)
    return timed_steps(decoder.step, steps), decoder.logits


QUANTIZED_BACKENDS = ("hqq", "quanto")
STEPS = DecoQuantConfig.block_size  # timed decode steps: one block cycle of the caches here (their block size)


def label(kind: str, bits: int, graph: bool = False) -> str:
    if graph:
        return label(kind, bits) + " graph"
    if kind == "fp16":
        return "fp16"
    if kind == "fp16-gqa":
        return "fp16 enable_gqa"
    if kind in QUANTIZED_BACKENDS:
        return f"QuantizedCache-{kind}-{bits}b"
    preset = _preset(kind)
    return f"decoquant-{bits}b" if preset == "paper" else f"decoquant-{preset}-{bits}b"


def _preset(kind: str) -> str:
    """"decoquant" (the paper preset) or "decoquant:<preset>"."""
    return kind.partition(":")[2] or "paper"


def decoquant_config(kind: str, bits: int):
    """The cache config of a decoquant kind; the frontier presets come with 4 sink tokens, as in
    `DecoQuantCache.from_model`'s default."""
    import decoquant as dq

    preset = _preset(kind)
    return dq.DecoQuantConfig(preset=preset, bits=bits, sink_tokens=0 if preset == "paper" else 4)


def available_backends() -> list[str]:
    """transformers' QuantizedCache backends whose package is installed."""
    import importlib.util

    found = ["hqq"] if importlib.util.find_spec("hqq") else []
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        found.append("quanto")
    return found


def run(kind, bits, batch, context, steps, model, device, graph=False):
    import decoquant as dq

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if kind in ("fp16", "fp16-gqa"):
        from transformers import DynamicCache, StaticCache

        if kind == "fp16-gqa":
            register_sdpa_gqa()
        model.set_attn_implementation(SDPA_GQA if kind == "fp16-gqa" else "sdpa")
        # fixed addresses for the graph: transformers' StaticCache
        cache = (StaticCache(config=model.config, max_cache_len=context + steps + 2) if graph
                 else DynamicCache(config=model.config))
    elif kind in QUANTIZED_BACKENDS:  # transformers' QuantizedCache: rebuilds fp16 K/V every step
        from transformers import QuantizedCache

        model.set_attn_implementation("sdpa")
        axis = 1 if kind == "hqq" else 0  # each backend's supported axis (transformers' documented setting)
        cache = QuantizedCache(kind, model.config, nbits=bits, axis_key=axis, axis_value=axis, q_group_size=64,
                               residual_length=128)
    else:
        dq.enable_fused_attention(model)
        cache = dq.DecoQuantCache(decoquant_config(kind, bits), model.config)
        assert cache.fused
    fill(cache, model, batch, context, [device] * model.config.num_hidden_layers)
    if hasattr(cache, "nbytes"):
        cache_bytes = cache.nbytes()
    elif kind in ("fp16", "fp16-gqa"):
        cache_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    else:
        cache_bytes = float("nan")  # the backend's packed tensors are opaque; peak memory tells
    torch.cuda.reset_peak_memory_stats()
    ms, _ = (decode_graphed if graph else decode)(model, cache, batch, context, steps, device)
    if graph and hasattr(cache, "nbytes"):
        cache_bytes = cache.nbytes()  # static: the capacity reserved for the steps
    peak = torch.cuda.max_memory_allocated()
    del cache
    return dict(cache=label(kind, bits, graph), batch=batch, context=context, ms_per_step=ms,
                tokens_per_s=batch * 1000 / ms, peak_gb=peak / 1e9, cache_gb=cache_bytes / 1e9)


@torch.no_grad()
def check_fused(model, device, bits=4, batch=2, context=1024, kind="decoquant"):
    """Logits of one decode step: fused kernel vs the torch reference over the same compressed cache."""
    import decoquant as dq
    import decoquant.integrations.attention as attention

    dq.enable_fused_attention(model)
    cache = dq.DecoQuantCache(decoquant_config(kind, bits), model.config)
    fill(cache, model, batch, context, [device] * model.config.num_hidden_layers)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    pos = torch.full((batch, 1), context, device=device)
    outs = {}
    original = attention.decode_attention
    for backend in ("triton", "torch"):
        attention.decode_attention = lambda *a, _b=backend, **k: original(*a, **{**k, "backend": _b})
        for layer in cache.layers:  # forget the step's token so both runs see the same state
            layer.crop(-1) if layer.get_seq_length() > context else None
        outs[backend] = model(input_ids=ids, **cache_kwargs(cache), position_ids=pos, logits_to_keep=1).logits.float()
    attention.decode_attention = original
    return float((outs["triton"] - outs["torch"]).norm() / outs["torch"].norm())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--context", default="4096,16384")
    p.add_argument("--bits", default="4,2")
    p.add_argument("--presets", default="paper", help="DecoQuant presets to run (paper; the others with 4 sinks)")
    p.add_argument("--steps", type=int, default=STEPS,
                   help=f"timed decode steps, a multiple of {STEPS} (whole block cycles, see above)")
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES),
                   help="model shape: llama2-7b (MHA), llama3-8b (32 query / 8 kv heads), qwen2.5-7b (28 / 4)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-2-7B)")
    p.add_argument("--max-batch-context", type=int, default=16384,
                   help="find the largest batch that fits at this context (0: skip)")
    p.add_argument("--quantized-cache", default="auto",
                   help="transformers QuantizedCache backends to compare (hqq,quanto; auto = those installed; "
                        "'' = none)")
    p.add_argument("--prefill", default="", help="only measure prefill cost at these contexts (e.g. 4096,16384)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="add fp16 (StaticCache) and DecoQuantCache rows whose decode steps replay a CUDA graph")
    p.add_argument("--skip-eager", action="store_true", help="with --cuda-graph: only the graph rows")
    args = p.parse_args(argv)
    if args.steps < 1 or args.steps % STEPS:
        p.error(f"--steps={args.steps}: the decode steps must be a positive multiple of {STEPS}, the block size, so "
                "that every layer compresses its blocks at the steady rate (one per block of steps)")
    device = torch.device("cuda")
    model = random_model(args.layers, device, args.shape)
    if args.prefill:
        print("| prefill tokens | preset | overlap | DynamicCache ms | DecoQuantCache ms (4-bit, compression "
              "included) | overhead | same blocks |")
        print("|---:|---|---:|---:|---:|---:|---|")
        from .prefill import prefill_cost

        rows = prefill_cost(model, device, [int(c) for c in args.prefill.split(",")],
                            [p for p in args.presets.split(",") if p])
        print(json.dumps({"device": torch.cuda.get_device_name(), "prefill": rows}))
        return 0 if all(r["same_blocks"] for r in rows) else 1
    presets = [p for p in args.presets.split(",") if p]
    errs = {p: check_fused(model, device, kind="decoquant" if p == "paper" else f"decoquant:{p}") for p in presets}
    err = max(errs.values())
    print(f"# {torch.cuda.get_device_name()}, random {args.shape}-shaped model ({args.layers} layers, fp16); "
          "fused vs reference logits rel. error " + ", ".join(f"{p} {e:.1e}" for p, e in errs.items()))
    ok = err < 2e-2
    rows = []
    run("fp16", 16, 1, 1024, 8, model, device)  # warm-up: CUDA context, SDPA kernels, allocator
    bits = [int(b) for b in args.bits.split(",")]
    backends = (available_backends() if args.quantized_cache == "auto"
                else [b for b in args.quantized_cache.split(",") if b])
    print(f"# transformers' QuantizedCache backends: {backends or 'none installed'}")
    print("| cache | batch | context | ms/step | tokens/s | peak GB | cache GB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gqa = model.config.num_key_value_heads < model.config.num_attention_heads
    kinds = ([("fp16", 16)] + [("fp16-gqa", 16)] * gqa
             + [("decoquant" if p == "paper" else f"decoquant:{p}", b) for p in presets for b in bits]
             + [(q, b) for q in backends for b in bits])
    runs = [] if args.skip_eager else [(kind, bits, False) for kind, bits in kinds]
    if args.cuda_graph:
        runs += [(kind, bits, True) for kind, bits in kinds if kind not in QUANTIZED_BACKENDS]
    for ctx in [int(c) for c in args.context.split(",")]:
        for batch in [int(b) for b in args.batch.split(",")]:
            for kind, bits, graph in runs:
                try:
                    r = run(kind, bits, batch, ctx, args.steps, model, device, graph)
                except torch.OutOfMemoryError:
                    r = dict(cache=label(kind, bits, graph), batch=batch, context=ctx, oom=True)
                    print(f"| {r['cache']} | {batch} | {ctx} | OOM | | | |", flush=True)
                    rows.append(r)
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                rows.append(r)
                print(f"| {r['cache']} | {batch} | {ctx} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} | "
                      f"{r['peak_gb']:.1f} | {r['cache_gb']:.2f} |", flush=True)
    fits = {}
    if args.max_batch_context:
        ctx = args.max_batch_context
        print(f"\nLargest batch that fits at context {ctx} (predicted from cache bytes per sequence, then run):")
        for kind, bits in kinds:
            if kind in QUANTIZED_BACKENDS:
                continue  # its cache bytes are opaque; see the table above
            probe = run(kind, bits, 1, ctx, 2, model, device)
            free = torch.cuda.get_device_properties(device).total_memory - (probe["peak_gb"] - probe["cache_gb"]) * 1e9
            batch = max(1, int(0.97 * free / (probe["cache_gb"] * 1e9)))
            for _ in range(4):
                try:
                    r = run(kind, bits, batch, ctx, 4, model, device)
                    fits[probe["cache"]] = r
                    print(f"- {probe['cache']}: batch {batch} fits (peak {r['peak_gb']:.1f} GB, "
                          f"{r['tokens_per_s']:.0f} tokens/s)", flush=True)
                    break
                except torch.OutOfMemoryError:
                    gc.collect()
                    torch.cuda.empty_cache()
                    batch -= max(1, batch // 16)
    print(json.dumps({"device": torch.cuda.get_device_name(), "shape": args.shape, "fused_logits_rel_error": err,
                      "correct": ok,
                      "rows": rows, "largest_batch": fits}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
