"""Block compression of one layer's prefill K/V on one GPU: the kernel route against the torch route.

    python -m decoquant.bench.compress [--context 4096,16384] [--kv-heads 32,8] [--presets paper,channel64-token]

Kernel route (`backend="triton"`): a Gram kernel reading K/V in fp16, the float64 g x g eigenproblems, one
kernel from fp16 K/V to packed codes and scales. Torch route (`backend="torch"`): float32 copies, Gram
products, T_L = M W in memory, quantize_kv, pack_codes. For each row, K and V [1, kv_heads, context, 128]
fp16 with outlier channels are cut into blocks and folded into the batch dim, as the cache compresses a
prefill; time per layer (K and V), GB/s of fp16 K/V read, next to a copy of the same K/V from the same
run. A row reports times only if the kernel route reconstructs K and V as well as the torch route
(relative error within 2% of it).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


def _error(x: torch.Tensor, c) -> float:
    import decoquant as dq

    return float((dq.decompress(c).float() - x.float()).norm() / x.float().norm())


def bench_row(preset: str, bits: int, kv_heads: int, context: int, block: int, device) -> dict:
    import decoquant as dq
    from triton.testing import do_bench

    cfg = dq.DecoQuantConfig(preset=preset, bits=bits, block_size=block)
    gen = torch.Generator(device=device).manual_seed(context + kv_heads)
    n = context // block
    kv = torch.randn(2, n, kv_heads, block, 128, device=device, generator=gen, dtype=torch.float16)
    kv[0, ..., 5] *= 20
    kv[0, ..., 67] += 8
    kv[1, ..., 9] *= 4
    run = {backend: (lambda b=backend: (dq.compress(kv[0], cfg, "key", b), dq.compress(kv[1], cfg, "value", b)))
           for backend in ("triton", "torch")}
    errors = {b: [_error(x, c) for x, c in zip(kv, f())] for b, f in run.items()}
    ok = all(e <= 1.02 * r + 1e-4 for e, r in zip(errors["triton"], errors["torch"]))
    row = dict(preset=preset, bits=bits, kv_heads=kv_heads, context=context, block_size=block, correct=ok,
               error_kernel=errors["triton"], error_torch=errors["torch"])
    if ok:
        dst = torch.empty_like(kv)
        copy_ms = do_bench(lambda: dst.copy_(kv), warmup=10, rep=100, return_mode="median")
        ms = {b: do_bench(f, warmup=3, rep=50, return_mode="median") for b, f in run.items()}
        row.update(kernel_ms=ms["triton"], torch_ms=ms["torch"], copy_ms=copy_ms,
                   kernel_gbps=kv.numel() * 2 / (ms["triton"] * 1e6))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", default="4096,16384")
    p.add_argument("--kv-heads", default="32,8")
    p.add_argument("--presets", default="paper,channel64-token")
    p.add_argument("--bits", default="4,2")
    p.add_argument("--block-size", type=int, default=128)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    rows = []
    print("| preset | bits | kv heads | context | kernel route ms | torch route ms | speedup | fp16 K/V copy ms | "
          "kernel GB/s | rel. error K/V kernel (torch) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset, bits, heads, ctx in itertools.product(args.presets.split(","), ints(args.bits),
                                                      ints(args.kv_heads), ints(args.context)):
        r = bench_row(preset, bits, heads, ctx, args.block_size, device)
        rows.append(r)
        err = "{:.4f}/{:.4f} ({:.4f}/{:.4f})".format(*r["error_kernel"], *r["error_torch"])
        if r["correct"]:
            print(f"| {preset} | {bits} | {heads} | {ctx} | {r['kernel_ms']:.3f} | {r['torch_ms']:.3f} | "
                  f"{r['torch_ms'] / r['kernel_ms']:.1f}x | {r['copy_ms']:.3f} | {r['kernel_gbps']:.0f} | {err} |",
                  flush=True)
        else:
            print(f"| {preset} | {bits} | {heads} | {ctx} | FAILED correctness | | | | | {err} |", flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
