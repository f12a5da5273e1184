"""Static SASS of the tensor-core decode kernel, compiled for sm_90 on a machine without a GPU.

    python tools/kernel_sass.py [--preset channel64-token] [--bits 4] [--kv-heads 8] [--q-heads 32]

Builds empty packed caches of the given shape on the CPU, runs the launcher (`decode_blocks_partials`) up to the
launch, compiles the kernel it would launch for compute capability 9.0 (with the GPU's PTX conversions), and
prints registers, shared memory and the instructions of the block loop per warp and 128-token step, by opcode.
Counting instructions is how kernel variants are compared before timing them on the GPU: it is a static count,
not a measurement of speed. Use the Triton version of the GPU machine (its codegen is what runs there).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

_TYPES = {torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8", torch.int32: "*i32",
          torch.int8: "*i8", torch.int16: "*i16"}


def capture_launch(preset: str, bits: int, kv_heads: int, q_heads: int, batch: int, tokens: int, head_dim: int):
    """(kernel, positional args, keyword args) that `decode_blocks_partials` would launch on a GPU."""
    import decoquant as dq
    from decoquant.format import KVFormat
    from decoquant.kernels.layout import PackedKV
    from decoquant.kernels.triton import codes, decode_attention as da

    cfg = dq.DecoQuantConfig(preset=preset, bits=bits)
    fmt = KVFormat.of(cfg)
    packs = []
    for spec in (fmt.key, fmt.value):
        nb, cg = tokens // 128, spec.channel_group
        scales = torch.empty(batch, kv_heads, tokens // cg, head_dim, dtype=torch.float16) if cg else \
            torch.empty(batch, 1, tokens, dtype=torch.float16)
        packs.append(PackedKV(torch.empty(batch, kv_heads, tokens, head_dim * bits // 8, dtype=torch.uint8), scales,
                              torch.empty(batch, 1, nb, 16, 16, dtype=torch.float16), bits, 128, 16,
                              None if spec.symmetric else torch.empty_like(scales), cg))
    captured = {}

    class Shim:
        def __getitem__(self, grid):
            return lambda *a, **kw: captured.update(args=a, kwargs=kw)

    kernel, da._decode_blocks_kernel = da._decode_blocks_kernel, Shim()
    try:
        q = torch.empty(batch, q_heads, head_dim, dtype=torch.float16)
        n = torch.full((batch,), tokens, dtype=torch.int32)
        da.decode_blocks_partials(q, *packs, head_dim ** -0.5, torch.zeros_like(n), n, num_splits=4, kernel="mma")
    finally:
        da._decode_blocks_kernel = kernel
    kw = dict(captured["kwargs"])
    k, v = packs
    kw.update(USE_ASM=True, KCONV=codes.convert_asm(k.bits, k.qmax),
              VCONV=(codes.pair_asm if kw["VPAIR"] else codes.convert_asm)(v.bits, v.qmax))
    return kernel, captured["args"], kw


def compile_sm90(kernel, args, kwargs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    num_warps = kwargs.pop("num_warps", 4)
    values = dict(zip(kernel.arg_names, args), **kwargs)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        v = values[name]
        if kernel.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name], attrs[(i,)] = _TYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int) and v == 1:
            sig[name], consts[name] = "constexpr", 1
        elif isinstance(v, int):
            sig[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    src = ASTSource(kernel, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=3))


def sass_report(compiled) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    start, end = 0, -1  # the longest backward branch: the block loop
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            j = next(n for n, (a, _) in enumerate(ins) if a >= int(m.group(1), 16))
            if i - j > end - start:
                start, end = j, i
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split(" ")[0] for _, t in ins[start:end + 1])
    regs = re.search(r"REG:(\d+)", res).group(1)
    return (f"registers {regs}, shared memory {compiled.metadata.shared} B, {len(ins)} instructions; block loop "
            f"{sum(ops.values())} per warp and step: " + ", ".join(f"{o} {n}" for o, n in ops.most_common(16)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="channel64-token", choices=("paper", "channel64-token", "kv-split"))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    args = p.parse_args(argv)
    kernel, a, kw = capture_launch(args.preset, args.bits, args.kv_heads, args.q_heads, args.batch, args.context, 128)
    shown = {k: kw[k] for k in ("GROUP", "ROWS", "STACK", "TILE", "VPAIR", "GROUP_PAD")}
    print(f"{args.preset}, {args.bits}-bit, {args.q_heads} query / {args.kv_heads} kv heads: {shown}")
    print(sass_report(compile_sm90(kernel, a, kw)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
