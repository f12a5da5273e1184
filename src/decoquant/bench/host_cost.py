"""Host time of one eager fused decode call, and where it goes: the whole call, then our own Python alone (the
Triton kernels replaced by no-ops), next to fp16 SDPA's eager call on the same shape.

    python -m decoquant.bench.host_cost [--kv-heads 1,8,32] [--batch 1] [--context 4096] [--bits 4] [--window 260]

At small shapes an eager call is bound by the host, not the GPU (`kernel_decode` without `--cuda-graph`); a model
run eagerly pays it once per layer per step, a CUDA-graph step (`decoquant.generate`, `GraphDecoder`) not at all.
Each variant is timed on the host over `--calls` calls after a warm-up; the GPU work per call is shorter than the
host's, so the queue never backs up. "Triton's launcher" is the difference of the two times. `--python-only`
times our Python alone, on CPU tensors, on any machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

# the modules and names of every kernel a fused decode call launches
_KERNELS = (("decode_attention", "_decode_blocks_kernel"), ("decode_rows", "_decode_rows_kernel"),
            ("merge", "_window_kernel"), ("merge", "_merge_kernel"))


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](*args)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def no_launches():
    """Every decode kernel replaced by a no-op for the duration (our own Python then runs alone)."""
    import importlib

    saved = []
    for module, name in _KERNELS:
        mod = importlib.import_module(f"decoquant.kernels.triton.{module}")
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, _NoLaunch())
    try:
        yield
    finally:
        for mod, name, kernel in saved:
            setattr(mod, name, kernel)


def host_us(fn, calls: int, warmup: int = 50) -> float:
    """Host microseconds per call of `fn` (the GPU's queue drained before and after)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    sync()
    return 1e6 * elapsed / calls


def run_case(batch, kv_heads, q_heads, context, head_dim, bits, window, preset, fuse_window, device, calls,
             python_only=False) -> dict:
    import torch.nn.functional as F

    from decoquant.kernels.attention import decode_attention
    from decoquant.kernels.triton.launch import choose_kernel

    from .kernel_decode import launch_label, random_packed

    k, v = random_packed(batch, kv_heads, context, head_dim, bits, 128, device, seed=context, preset=preset)
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(batch, q_heads, head_dim, device=device, generator=gen, dtype=torch.float16)
    wk, wv = (torch.randn(batch, kv_heads, window, head_dim, device=device, generator=gen, dtype=torch.float16)
              for _ in range(2))
    win = dict(window_k=wk, window_v=wv) if window else {}
    fused = lambda: decode_attention(q, k, v, head_dim ** -0.5, backend="triton", fuse_window=fuse_window,  # noqa: E731
                                     **win)
    kernel = choose_kernel(q_heads, k, v)
    label = launch_label(kernel, window, fuse_window)
    row = dict(batch=batch, kv_heads=kv_heads, q_heads=q_heads, context=context, head_dim=head_dim, bits=bits,
               window=window, preset=preset, kernel=label, calls=calls,
               launches=3 if window and label == kernel else 2)  # blocks (+ window) + merge
    if not python_only:
        k16 = torch.randn(batch, kv_heads, context + window, head_dim, device=device, dtype=torch.float16)
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k16, k16, enable_gqa=q_heads != kv_heads)  # noqa: E731
        row.update(host_us=host_us(fused, calls), sdpa_host_us=host_us(sdpa, calls))
    with no_launches():
        row["python_us"] = host_us(fused, calls)
    if not python_only:
        row["launcher_us"] = row["host_us"] - row["python_us"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1")
    p.add_argument("--kv-heads", default="1,8,32")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bits", type=int, default=4, choices=(2, 4))
    p.add_argument("--window", type=int, default=260, help="fp16 tokens after the blocks (a static store's ~260)")
    p.add_argument("--preset", default="channel64-token", choices=("paper", "channel64-token"))
    p.add_argument("--calls", type=int, default=400, help="timed calls per variant")
    p.add_argument("--python-only", action="store_true",
                   help="time our Python alone (kernels replaced by no-ops), on CPU tensors without a GPU")
    args = p.parse_args(argv)
    if args.window < 0 or args.calls < 1:
        p.error(f"--window must be >= 0 and --calls >= 1, got {args.window} and {args.calls}")
    if args.context % 128:
        p.error(f"--context must be a multiple of the block size 128, got {args.context}")
    if not args.python_only and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (or --python-only)")
    device = torch.device("cpu" if args.python_only else "cuda")
    name = "CPU, our Python only" if args.python_only else torch.cuda.get_device_name()
    print(f"# {name}  eager host time per fused decode call (us), {args.preset}, {args.bits}-bit, "
          f"window {args.window}")
    print("| batch | kv heads | context | kernel | host us | our Python us | Triton's launcher us | SDPA host us |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    rows = []
    for batch in (int(x) for x in args.batch.split(",")):
        for kvh in (int(x) for x in args.kv_heads.split(",")):
            for fuse in (True, False):  # the window in the tensor-core kernel's launch (the default), or not
                r = run_case(batch, kvh, args.q_heads, args.context, args.head_dim, args.bits, args.window,
                             args.preset, fuse, device, args.calls, args.python_only)
                if not fuse and r["kernel"] == "rows":
                    continue  # the rows kernel attends the window in its own launch either way
                rows.append(r)
                cell = lambda key: f"{r[key]:.1f}" if key in r else "-"  # noqa: E731
                print(f"| {batch} | {kvh} | {args.context} | {r['kernel']} ({r['launches']} launches) | "
                      f"{cell('host_us')} | {cell('python_us')} | {cell('launcher_us')} | {cell('sdpa_host_us')} |",
                      flush=True)
    print(json.dumps({"device": name, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
