"""Kernel-level decode attention: fused DecoQuant kernel vs fp16 SDPA, on one GPU.

    python -m decoquant.bench.kernel_decode [--batch 1,8,32] [--kv-heads 8,32] [--context 4096,16384,32768]

For each shape: random fp16 K/V with outlier channels are compressed block by block (`--preset`, default the paper's),
the fused kernel reads the packed blocks, and torch's scaled_dot_product_attention reads the fp16
K/V that the blocks decode to (so both attend over the same values). With `--window W`, both also attend W more
fp16 tokens after the blocks, as a decode step attends a cache's exact sinks and recent tokens (a static store
holds ~260 at its full capacity with the default preset, 4 sinks + 128 + 127 + the new one).
A row reports a speedup only if the kernel matches SDPA (relative error < 1e-2). Bandwidth = bytes read +
written / time, next to a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


def copy_bandwidth(device, nbytes: int = 2 << 30) -> float:
    from triton.testing import do_bench

    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def random_packed(batch, kv_heads, tokens, head_dim, bits, block_size, device, seed, preset="paper", value_bits=None):
    """Compressed blocks of random outlier-heavy KV, built in chunks of blocks to bound memory."""
    import decoquant as dq
    from decoquant.buffer import PackedKVBuffer

    cfg = dq.DecoQuantConfig(preset=preset, bits=bits, value_bits=value_bits, block_size=block_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    n_blocks = tokens // block_size
    k_buf, v_buf = PackedKVBuffer(), PackedKVBuffer()
    per_call = max(1, 4096 // block_size)
    for first in range(0, n_blocks, per_call):
        nb = min(per_call, n_blocks - first)
        # nb blocks folded into the batch dim (block-major), as the cache compresses a prefill
        x = torch.randn(2, nb * batch, kv_heads, block_size, head_dim, device=device, generator=gen,
                        dtype=torch.float16)
        x[0, ..., 5] *= 20
        x[0, ..., head_dim // 2 + 3] += 8
        k_buf.append(dq.compress(x[0], cfg, "key"), nb)
        v_buf.append(dq.compress(x[1], cfg, "value"), nb)
    return k_buf.view(), v_buf.view()


def dequantize_fp16(p, chunk: int = 1) -> torch.Tensor:
    from decoquant.kernels.layout import PackedKV
    from decoquant.kernels.reference import dequantize_packed

    outs = []
    for b in range(0, p.codes.shape[0], chunk):
        sl = slice(b, b + chunk)
        outs.append(dequantize_packed(PackedKV(p.codes[sl], p.scales[sl], p.ts[sl], p.bits, p.block_size,
                                               p.group_size, None if p.zeros is None else p.zeros[sl],
                                               p.channel_group)).half())
    return torch.cat(outs)


def to_pages(k, v, preset: str, device, seed: int):
    """The same blocks in a paged engine's layout (`integrations.vllm.pages`): one uint8 page per (sequence, block)
    holding that block of every kv head, keys' and values' fields in the page bytes, the pages in shuffled order ->
    (keys, values as paged PackedKV views into the pages, block table int32 [B, NB])."""
    import decoquant as dq
    from decoquant.integrations.vllm.pages import PageFormat

    b, h, t, _ = k.codes.shape
    size, nb = k.block_size, t // k.block_size
    d = k.codes.shape[-1] * 8 // k.bits
    cfg = dq.DecoQuantConfig(preset=preset, bits=k.bits, value_bits=v.bits, block_size=size, residual_length=size)
    fmt = PageFormat(cfg, h, d, torch.float16)
    pages = torch.zeros(b * nb, fmt.page_bytes, dtype=torch.uint8, device=device)
    order = torch.randperm(b * nb, generator=torch.Generator().manual_seed(seed)).to(device)
    views = fmt.packed(pages)
    for dense, paged in zip((k, v), views):
        def blocks(x, rows):  # [B, H, NB * rows, ...] -> [B * NB, H, rows, ...]
            x = x.reshape(b, x.shape[1], nb, rows, *x.shape[3:])
            return x.transpose(1, 2).reshape(b * nb, x.shape[1], rows, *x.shape[4:])
        paged.codes[order] = blocks(dense.codes, size)
        rows = size // dense.channel_group if dense.channel_group else size
        paged.scales[order] = blocks(dense.scales, rows)
        if dense.zeros is not None:
            paged.zeros[order] = blocks(dense.zeros, rows)
        paged.ts[order] = dense.ts.transpose(1, 2).reshape(b * nb, -1, 1, *dense.ts.shape[-2:])
    return views[0], views[1], order.view(b, nb).to(torch.int32)


def launch_label(kernel: str, window: int, fuse_window: bool) -> str:
    """The kernel column: "mma+window" where the tensor-core kernel attends the window in its own launch."""
    return "mma+window" if kernel == "mma" and window and fuse_window else kernel


def graph_replay(fn):
    """`fn` captured in a CUDA graph: replaying it times the GPU work without the host's launch cost
    (what a server that captures its decode step sees)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_case(batch, kv_heads, q_heads, tokens, head_dim, bits, block_size, device, peak_bw, preset="paper",
             cuda_graph=False, paged=False, value_bits=None, window=0, **kernel_options):
    import torch.nn.functional as F
    from triton.testing import do_bench

    from decoquant.kernels.attention import decode_attention

    k, v = random_packed(batch, kv_heads, tokens, head_dim, bits, block_size, device, seed=tokens + bits, preset=preset,
                         value_bits=value_bits)
    q = torch.randn(batch, q_heads, head_dim, device=device, dtype=torch.float16)
    scale = head_dim ** -0.5
    k16, v16 = dequantize_fp16(k), dequantize_fp16(v)
    wk = torch.randn(batch, kv_heads, window, head_dim, device=device, dtype=torch.float16)
    wk[..., 5] *= 20
    wv = torch.randn_like(wk)
    if window:  # fp16 SDPA reads one cache of blocks + window, as a static fp16 cache holds it
        k16, v16 = torch.cat([k16, wk], 2), torch.cat([v16, wv], 2)
    sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k16, v16, scale=scale,  # noqa: E731
                                                  enable_gqa=q_heads != kv_heads)
    win = dict(window_k=wk, window_v=wv) if window else {}
    fused = lambda: decode_attention(q, k, v, scale, backend="triton", **win, **kernel_options)  # noqa: E731
    ref = sdpa()[:, :, 0].float()
    out = fused()
    err = float((out - ref).norm() / ref.norm())
    ok = err < 1e-2
    extra = {}
    if paged:  # the same blocks as pages, read through a block table by the same kernel
        kp, vp, table = to_pages(k, v, preset, device, seed=tokens)
        paged_fn = lambda: decode_attention(q, kp, vp, scale, block_table=table, backend="triton",  # noqa: E731
                                            **win, **kernel_options)
        paged_err = float((paged_fn() - ref).norm() / ref.norm())
        ok = ok and paged_err < 1e-2
        extra = dict(paged_rel_error=paged_err)
    if cuda_graph:  # all replayed from graphs: GPU time only
        sdpa, fused = graph_replay(sdpa), graph_replay(fused)
        if paged:
            paged_fn = graph_replay(paged_fn)
    t_sdpa = do_bench(sdpa, warmup=25, rep=100, return_mode="median")
    t_fused = do_bench(fused, warmup=25, rep=100, return_mode="median")
    io = q.numel() * 2 + batch * q_heads * head_dim * 2
    bytes_fp16 = k16.numel() * 2 * 2 + io
    bytes_fused = k.nbytes + v.nbytes + wk.numel() * 2 * 2 + io  # the paged kernel reads the same bytes
    if paged:
        t_paged = do_bench(paged_fn, warmup=25, rep=100, return_mode="median")
        extra.update(paged_ms=t_paged, paged_speedup=(t_sdpa / t_paged) if ok else None,
                     paged_pct_copy=100 * bytes_fused / (t_paged * 1e-3) / peak_bw)
    from decoquant.kernels.triton.launch import choose_kernel

    kernel = launch_label(choose_kernel(q_heads, k, v, kernel_options.get("low_precision", True),
                                        kernel_options.get("kernel", "auto")), window,
                          kernel_options.get("fuse_window", True))
    ceiling = bytes_fp16 / bytes_fused  # the bandwidth ceiling of the speedup: 16 / b_eff
    row = dict(batch=batch, kv_heads=kv_heads, q_heads=q_heads, context=tokens, head_dim=head_dim, bits=bits,
               value_bits=v.bits, window=window,
               block_size=block_size, kernel=kernel, cuda_graph=cuda_graph, rel_error=err, correct=ok,
               sdpa_ms=t_sdpa, fused_ms=t_fused,
               speedup=(t_sdpa / t_fused) if ok else None,
               sdpa_gbps=bytes_fp16 / t_sdpa / 1e6, fused_gbps=bytes_fused / t_fused / 1e6,
               sdpa_pct_copy=100 * bytes_fp16 / (t_sdpa * 1e-3) / peak_bw,
               fused_pct_copy=100 * bytes_fused / (t_fused * 1e-3) / peak_bw,
               bytes_fp16=bytes_fp16, bytes_fused=bytes_fused, ceiling=ceiling,
               pct_ceiling=100 * t_sdpa / t_fused / ceiling if ok else None, **extra)
    return row


def run_dequant_case(batch, kv_heads, tokens, head_dim, bits, block_size, device, peak_bw):
    """Dequantize kernel (Triton) vs the torch reference on the same packed keys."""
    from triton.testing import do_bench

    from decoquant.kernels.attention import dequantize

    k, _ = random_packed(batch, kv_heads, tokens, head_dim, bits, block_size, device, seed=tokens + bits)
    tri = lambda: dequantize(k, torch.float16, backend="triton")  # noqa: E731
    ref = lambda: dequantize(k, torch.float16, backend="torch")  # noqa: E731
    want = ref()
    err = float((tri().float() - want.float()).norm() / want.float().norm())
    t_tri = do_bench(tri, warmup=10, rep=50, return_mode="median")
    t_ref = do_bench(ref, warmup=10, rep=50, return_mode="median")
    io = k.nbytes + want.numel() * 2  # packed read + fp16 write
    return dict(batch=batch, kv_heads=kv_heads, context=tokens, bits=bits, rel_error=err, correct=err < 1e-3,
                triton_ms=t_tri, torch_ms=t_ref, speedup=t_ref / t_tri if err < 1e-3 else None,
                triton_pct_copy=100 * io / (t_tri * 1e-3) / peak_bw)


def shapes(args, max_gb: float):
    """(bits, kv heads, batch, context) of the grid, in table order (bits: "4" or key:value widths "3:2", as
    (key bits, value bits)), skipping shapes whose one fp16
    [batch, kv heads, context, head_dim] tensor exceeds `max_gb` GB."""
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    from ..cli.common import _parse_widths  # the quality commands' --bits: ints, or (key, value) pairs

    widths = [w if isinstance(w, tuple) else (w, w) for w in _parse_widths(args.bits)]
    for bits, kvh, batch, ctx in itertools.product(widths, ints(args.kv_heads), ints(args.batch),
                                                   ints(args.context)):
        if batch * kvh * ctx * args.head_dim * 2 / 1e9 <= max_gb:
            yield bits, kvh, batch, ctx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--kv-heads", default="8,32")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--context", default="4096,16384,32768")
    p.add_argument("--bits", default="4,2", help="code widths, keys:values where they differ (e.g. 4,3,2,3:2)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--preset", default="paper", choices=("paper", "channel64-token", "kv-split"),
                   help="DecoQuant preset of the compressed blocks (default: the paper's)")
    p.add_argument("--tile", type=int, default=None,
                   help="tokens per tile of the mma kernel (default: 128; the rows kernel steps by 32)")
    p.add_argument("--kernel", default="auto", choices=("auto", "mma", "rows"),
                   help="mma: tensor cores; rows: one query row per kv head on integer CUDA-core math (MHA); "
                        "auto: rows where it applies")
    p.add_argument("--num-warps", type=int, default=None, help="default: the kernel's (mma 4, rows 1)")
    p.add_argument("--num-stages", type=int, default=None, help="default: the kernel's (mma 3, rows 1)")
    p.add_argument("--fp32-dots", action="store_true", help="tf32 dots instead of fp16/bf16")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time both from captured CUDA graphs (GPU time; eager timing includes the host's launches)")
    p.add_argument("--paged", action="store_true",
                   help="also time the same blocks laid out as a paged engine's pages (shuffled), read through a "
                        "block table")
    p.add_argument("--window", type=int, default=0,
                   help="fp16 tokens after the blocks that both attend (a cache's sinks and recent tokens)")
    p.add_argument("--own-window-launch", action="store_true",
                   help="with --window: the tensor-core kernel's window in a launch of its own (kernel column mma), "
                        "not in the blocks' launch (the default, mma+window)")
    p.add_argument("--max-fp16-gb", type=float, default=40.0, help="skip shapes whose fp16 K+V exceed this")
    p.add_argument("--dequantize", action="store_true",
                   help="benchmark the dequantize kernel (packed keys -> fp16) against the torch reference instead")
    args = p.parse_args(argv)
    if args.window < 0:
        p.error(f"--window must be >= 0 (fp16 tokens), got {args.window}")
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    peak = copy_bandwidth(device)
    print(f"# {torch.cuda.get_device_name()}  copy bandwidth (read+write) {peak / 1e12:.2f} TB/s"
          + (f"  window {args.window} fp16 tokens" if args.window else ""))
    if args.dequantize:
        print("| batch | kv heads | context | bits | torch ms | triton ms | speedup | triton % copy | rel err |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = []
        # only K, but the torch reference holds fp32 temporaries: a quarter of the limit
        for (bits, _), kvh, batch, ctx in shapes(args, max_gb=args.max_fp16_gb / 4):
            r = run_dequant_case(batch, kvh, ctx, args.head_dim, bits, args.block_size, device, peak)
            rows.append(r)
            sp = f"{r['speedup']:.2f}x" if r["correct"] else "FAILED"
            print(f"| {batch} | {kvh} | {ctx} | {bits} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {sp} | "
                  f"{r['triton_pct_copy']:.0f}% | {r['rel_error']:.1e} |", flush=True)
            torch.cuda.empty_cache()
        print(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth": peak, "dequantize": rows}))
        return 0 if all(r["correct"] for r in rows) else 1
    paged_head = (" paged ms | paged speedup | paged % copy |", "---:|---:|---:|") if args.paged else ("", "")
    print("| batch | kv heads | context | bits | kernel | SDPA fp16 ms | fused ms | speedup | fused GB/s | % copy "
          "| SDPA % copy | ceiling | % of ceiling | rel err |" + paged_head[0])
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + paged_head[1])
    rows = []
    for (bits, vbits), kvh, batch, ctx in shapes(args, max_gb=args.max_fp16_gb / 2):  # fp16 K, V within the limit
        r = run_case(batch, kvh, args.q_heads, ctx, args.head_dim, bits, args.block_size, device, peak,
                     value_bits=vbits, preset=args.preset, cuda_graph=args.cuda_graph, tile=args.tile,
                     num_warps=args.num_warps, num_stages=args.num_stages,
                     low_precision=not args.fp32_dots, kernel=args.kernel, paged=args.paged, window=args.window,
                     fuse_window=not args.own_window_launch)
        rows.append(r)
        sp = f"{r['speedup']:.2f}x" if r["correct"] else "FAILED"
        pc = f"{r['pct_ceiling']:.0f}%" if r["correct"] else "-"
        tail = ""
        if args.paged:
            psp = f"{r['paged_speedup']:.2f}x" if r["correct"] else "FAILED"
            tail = f" {r['paged_ms']:.3f} | {psp} | {r['paged_pct_copy']:.0f}% |"
        label = bits if vbits == bits else f"{bits}:{vbits}"
        print(f"| {batch} | {kvh} | {ctx} | {label} | {r['kernel']} | {r['sdpa_ms']:.3f} | {r['fused_ms']:.3f} | "
              f"{sp} | "
              f"{r['fused_gbps']:.0f} | {r['fused_pct_copy']:.0f}% | {r['sdpa_pct_copy']:.0f}% | {r['ceiling']:.2f}x | "
              f"{pc} | {r['rel_error']:.1e} |{tail}", flush=True)
        torch.cuda.empty_cache()
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_bandwidth": peak, "rows": rows}))
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
