"""Decode throughput on several GPUs: tensor parallelism (transformers' tp_plan="auto") or layers
spread by device_map="auto", fp16 DynamicCache vs DecoQuantCache with the fused attention.

    python -m decoquant.bench.multigpu --mode device_map [--write-reference ref.pt]
    torchrun --nproc-per-node 2 -m decoquant.bench.multigpu --mode tp [--check-reference ref.pt]

The model is a randomly initialised Llama-2-13B-shaped checkpoint (fp16), written once to
--checkpoint (real weights cannot reach the GPU machine). Each layer's cache is filled with random
outlier-heavy K/V of `context` tokens on that layer's device (under tensor parallelism each rank
holds num_key_value_heads / world_size heads and compresses them alone; the config is head-local:
T_S and scales per head), then `steps` greedy decode steps are timed. Peak memory is reported per
GPU. Correctness: the logits of a short real prefill + 8 teacher-forced decode steps through each
cache are saved by the device_map run (one logical model, the single-GPU math) and compared by the
TP run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch

from ..integrations.transformers import cache_kwargs
from .common import fill, timed_steps

LLAMA2_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=32768)
CONFIG = dict(method="decoquant", ts_sharing="head", scale_granularity="token_head")  # head-local


def dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def make_checkpoint(path: Path, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return
    cfg = LlamaConfig(**{**LLAMA2_13B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.float16)
        model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(path)
    del model
    torch.cuda.empty_cache()


def load(path: Path, mode: str):
    from transformers import AutoModelForCausalLM

    if mode == "tp":
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float16)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.float16)
    model.eval()
    return model


def layer_devices(model) -> list[torch.device]:
    return [next(layer.parameters()).device for layer in model.model.layers]


def make_cache(model, kind: str, bits: int):
    import decoquant as dq

    if kind == "fp16":
        from transformers import DynamicCache

        model.set_attn_implementation("sdpa")
        return DynamicCache(config=model.config)
    dq.enable_fused_attention(model)
    return dq.DecoQuantCache.from_model(model, dq.DecoQuantConfig(bits=bits, **CONFIG))


def reset_peaks() -> None:
    for d in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(d)


def peaks(model, mode: str) -> list[float]:
    if mode == "tp":
        return [torch.cuda.max_memory_allocated() / 1e9]
    return [torch.cuda.max_memory_allocated(d) / 1e9 for d in sorted({x.index for x in layer_devices(model)})]


@torch.no_grad()
def decode_ms(model, cache, batch: int, context: int, steps: int) -> float:
    first = layer_devices(model)[0]
    gen = torch.Generator(device=first).manual_seed(7)
    state = {"ids": torch.randint(0, model.config.vocab_size, (batch, 1), device=first, generator=gen),
             "pos": torch.full((batch, 1), context, device=first)}

    def step():
        logits = model(input_ids=state["ids"], **cache_kwargs(cache), position_ids=state["pos"], use_cache=True,
                       logits_to_keep=1).logits
        state.update(ids=logits[:, -1:].argmax(-1).to(first), pos=state["pos"] + 1)

    return timed_steps(step, steps, sync=barrier)


def run(model, mode, world, kind, bits, batch, context, steps) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    label = "fp16" if kind == "fp16" else f"decoquant-{bits}b"
    try:
        cache = make_cache(model, kind, bits)
        fill(cache, model, batch, context, layer_devices(model), model.config.num_key_value_heads // world)
        reset_peaks()
        ms = decode_ms(model, cache, batch, context, steps)
        out = dict(cache=label, batch=batch, context=context, ms_per_step=ms, tokens_per_s=batch * 1000 / ms,
                   peak_gb_per_gpu=peaks(model, mode))
        del cache
    except torch.OutOfMemoryError:
        out = dict(cache=label, batch=batch, context=context, oom=True)
    gc.collect()
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def reference_logits(model, kinds) -> dict:
    """Logits of a 700-token prefill then 8 decode steps fed fixed tokens (teacher forcing, so a
    near-tie in a random model cannot make the runs diverge), through each cache; block 128 and
    residual 128, so the steps read 4 compressed blocks."""
    first = layer_devices(model)[0]
    gen = torch.Generator(device=first).manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 708), device=first, generator=gen)
    out = {}
    for kind, bits in kinds:
        cache = make_cache(model, kind, bits)
        logits = [model(input_ids=ids[:, :700], **cache_kwargs(cache), logits_to_keep=1).logits]
        for t in range(700, 708):
            logits.append(model(input_ids=ids[:, t:t + 1], **cache_kwargs(cache)).logits)
        out["fp16" if kind == "fp16" else f"decoquant-{bits}b"] = torch.cat(logits, 1).float().cpu()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", required=True, choices=("tp", "device_map"))
    p.add_argument("--checkpoint", default="/tmp/llama2-13b-random")
    p.add_argument("--layers", type=int, default=40, help="decoder layers (40 = Llama-2-13B)")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--context", default="4096,16384")
    p.add_argument("--bits", default="4,2")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-batch-context", type=int, default=16384,
                   help="largest batch search at this context (0: skip)")
    p.add_argument("--write-reference", default="", help="save the correctness logits here (device_map mode)")
    p.add_argument("--check-reference", default="", help="compare with logits saved by a device_map run")
    args = p.parse_args(argv)
    rank, world = dist_info()
    if args.mode == "tp":
        torch.distributed.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    elif world != 1:
        raise SystemExit("error: --mode device_map runs as one process (python -m ...), not under torchrun")
    path = Path(args.checkpoint)
    if rank == 0:
        make_checkpoint(path, args.layers)
    barrier()
    model = load(path, args.mode)
    show = rank == 0
    gpus = world if args.mode == "tp" else len({d.index for d in layer_devices(model)})
    if show:
        print(f"# {torch.cuda.get_device_name()} x{gpus}, mode {args.mode}, random Llama-2-13B-shaped model "
              f"({args.layers} layers, fp16); DecoQuant config {CONFIG}", flush=True)
    kinds = [("fp16", 16)] + [("decoquant", int(b)) for b in args.bits.split(",")]
    check = {}
    ref = reference_logits(model, kinds)
    if args.write_reference and show:
        torch.save(ref, args.write_reference)
    if args.check_reference:
        want = torch.load(args.check_reference)
        for name, logits in ref.items():
            w = want[name]
            check[name] = dict(logits_rel_error=float((logits - w).norm() / w.norm()),
                               argmax_agreement=float((logits.argmax(-1) == w.argmax(-1)).float().mean()))
            if name != "fp16":  # what compression itself changes, in the single-model run
                base = want["fp16"]
                check[name]["compression_error"] = float((w - base).norm() / base.norm())
        if show:
            print(f"# vs the device_map (single-model) run: {check}", flush=True)
    rows = []
    run(model, args.mode, world if args.mode == "tp" else 1, "fp16", 16, 1, 1024, 4)  # warm-up
    if show:
        print("| cache | batch | context | ms/step | tokens/s | peak GB per GPU |\n|---|---:|---:|---:|---:|---|",
              flush=True)
    for ctx in [int(c) for c in args.context.split(",")]:
        for batch in [int(b) for b in args.batch.split(",")]:
            for kind, bits in kinds:
                r = run(model, args.mode, world if args.mode == "tp" else 1, kind, bits, batch, ctx, args.steps)
                rows.append(r)
                if show:
                    cells = ("OOM | | " if r.get("oom") else
                             f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} | "
                             + ", ".join(f"{g:.1f}" for g in r["peak_gb_per_gpu"]))
                    print(f"| {r['cache']} | {batch} | {ctx} | {cells} |", flush=True)
    fits = {}
    if args.max_batch_context:
        ctx = args.max_batch_context
        for kind, bits in kinds:
            small = run(model, args.mode, world if args.mode == "tp" else 1, kind, bits, 1, ctx, 2)
            big = run(model, args.mode, world if args.mode == "tp" else 1, kind, bits, 4, ctx, 2)
            if small.get("oom") or big.get("oom"):
                continue
            per_seq = (max(big["peak_gb_per_gpu"]) - max(small["peak_gb_per_gpu"])) / 3
            total = torch.cuda.get_device_properties(0).total_memory / 1e9
            batch = max(1, int((0.95 * total - max(small["peak_gb_per_gpu"])) / per_seq))
            for _ in range(4):
                r = run(model, args.mode, world if args.mode == "tp" else 1, kind, bits, batch, ctx, 4)
                if not r.get("oom"):
                    fits[r["cache"]] = r
                    if show:
                        peak = max(r['peak_gb_per_gpu'])
                        print(f"- {r['cache']}: batch {batch} fits at {ctx} (peak {peak:.1f} GB/GPU, "
                              f"{r['tokens_per_s']:.0f} tokens/s)", flush=True)
                    break
                batch -= max(1, batch // 10)
    if show:
        print(json.dumps({"device": torch.cuda.get_device_name(), "gpus": gpus, "mode": args.mode, "check": check,
                          "rows": rows, "largest_batch": fits}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # TP must reproduce the single-model run up to fp16 reduction order: within 2e-2, or (compressed
    # caches, where a rounding flip moves a code) well inside the change compression itself makes
    ok = all(c["logits_rel_error"] < max(2e-2, 0.5 * c.get("compression_error", 0.0)) for c in check.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
