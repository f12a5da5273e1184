"""Packed codes -> fp16 operands of the tensor-core decode kernel (decode_attention.py) and the dequantize kernel.

Two readings of the same bytes (packing.py's bit order):
- by byte (`_code_planes`, keys): 4 bytes of one token row -> the 8 / bits bit planes, plane k holding the codes
  at bits k*B of every byte (columns P*j + k);
- by 16-bit word pairs (`_pair_planes`, values): the codes viewed as int16 words, two tokens' words in one
  register (what the tensor cores' B operand wants when tokens are the reduction dimension: a pair of
  consecutive tokens per register, loaded transposed from shared memory) -> the 16 / bits planes of a word,
  plane k holding columns (16 / bits) * j + k. No byte loads and no byte shuffles.
On the GPU the conversion is PTX of a few instructions per pair of codes (exact: 0x6400 | code is the fp16
number 1024 + code); the interpreter (CI) and fp32 dots take the arithmetic path.
3-bit codes, whose runs of 8 codes span 3 bytes, are read a run at a time (`_load_runs`, `_run_codes`: the
codes in channel order, no planes) and written by `_pack_runs` / `_store_runs`.
"""

from __future__ import annotations

import struct
from functools import lru_cache

import triton
import triton.language as tl


def _f16_pair(v: float) -> str:
    """The 32-bit pattern of two fp16 halves equal to v."""
    return f"{struct.unpack('<H', struct.pack('<e', v))[0] * 0x10001:#010x}"


@triton.jit
def _plane(packed, k: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, LOW_PRECISION: tl.constexpr):
    # bit plane k of int16 packed bytes -> (code - qmax) as fp16 (or fp32). The fp16 path skips the
    # slow int->float conversion: 0x6400 | code is the fp16 number 1024 + code, exactly.
    bits = (packed >> (k * BITS)) & ((1 << BITS) - 1)
    if LOW_PRECISION:
        return (bits | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + QMAX)
    else:
        return bits.to(tl.float32) - QMAX


@lru_cache(maxsize=None)  # built once per (width, offset): the launcher asks for it at every decode step
def convert_asm(bits: int, qmax: int) -> str:
    """PTX converting 4 packed code bytes (the last input) into the 8 / bits bit planes of their codes minus
    qmax, as fp16, two per output register (plane k: outputs 2k, 2k + 1). Per pair of codes: one lop3 ((x &
    mask) | 0x6400 puts 1024 + code * 2**s in each half) and one fma.f16x2 (* 2**-s - 1024 * 2**-s - qmax),
    exact; two prmt per 4 bytes spread them to 16-bit halves."""
    planes = 8 // bits
    pair = _f16_pair
    w = f"${2 * planes}"
    lines = ["{", ".reg .b32 t0, t1, x, s, o, z;", "mov.b32 z, 0;", f"prmt.b32 t0, {w}, z, 0x5140;",
             f"prmt.b32 t1, {w}, z, 0x7362;"]
    for k in range(planes):
        shift = k * bits
        mask = (((1 << bits) - 1) << shift) * 0x10001
        lines += [f"mov.b32 s, {pair(2.0 ** -shift)};", f"mov.b32 o, {pair(-(1024.0 * 2.0 ** -shift) - qmax)};"]
        for j, t in enumerate(("t0", "t1")):
            lines += [f"lop3.b32 x, {t}, {mask:#010x}, 0x64006400, 0xea;",  # (t & mask) | magic
                      f"fma.rn.f16x2 ${2 * k + j}, x, s, o;"]
    lines.append("}")
    return "\n".join(lines)


@triton.jit
def _code_planes(packed8, CONV: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, LOW_PRECISION: tl.constexpr,
                 USE_ASM: tl.constexpr):
    # packed uint8 codes [R, C] -> the 8 / BITS planes of (code - qmax), [R, C] each (packing.py's order:
    # plane k holds the codes at bits k*BITS of every byte); extra outputs repeat. On the GPU, fp16: the PTX of
    # convert_asm, about one instruction per code; elsewhere (the interpreter, fp32 dots): _plane per plane.
    P: tl.constexpr = 8 // BITS
    if USE_ASM:
        if P == 1:
            c0 = tl.inline_asm_elementwise(CONV, "=r,=r,r", [packed8], dtype=tl.float16, is_pure=True, pack=4)
            return c0, c0, c0, c0
        elif P == 2:
            c0, c1 = tl.inline_asm_elementwise(CONV, "=r,=r,=r,=r,r", [packed8], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
            return c0, c1, c0, c1
        else:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(CONV, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed8],
                                                       dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                       is_pure=True, pack=4)
            return c0, c1, c2, c3
    else:
        return _arith_planes(packed8.to(tl.int16), P, BITS, QMAX, LOW_PRECISION)


@triton.jit
def _arith_planes(x, N: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, LOW_PRECISION: tl.constexpr):
    # int16 x -> its first N (<= 4) planes by arithmetic (`_plane`); extra outputs repeat
    return (_plane(x, 0, BITS, QMAX, LOW_PRECISION), _plane(x, 1 % N, BITS, QMAX, LOW_PRECISION),
            _plane(x, 2 % N, BITS, QMAX, LOW_PRECISION), _plane(x, 3 % N, BITS, QMAX, LOW_PRECISION))


@triton.jit
def _planes(x, P: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    # x [ROWS, D] -> P planes [ROWS, D / P]; plane k holds columns P*j + k, the codes that sit in
    # bits k*B..(k+1)*B of packed byte j (packing.py's order). Extra outputs repeat plane 0.
    if P == 1:
        return x, x, x, x
    elif P == 2:
        even, odd = tl.split(tl.reshape(x, [ROWS, D // 2, 2]))
        return even, odd, even, odd
    else:
        lo, hi = tl.split(tl.reshape(x, [ROWS, D // 4, 2, 2]))  # k = 2a + b: lo = (b=0), hi = (b=1)
        p0, p2 = tl.split(lo)
        p1, p3 = tl.split(hi)
        return p0, p1, p2, p3


@triton.jit
def _unplanes(a0, a1, a2, a3, P: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    # inverse of _planes: P planes [ROWS, D / P] -> [ROWS, D]
    if P == 1:
        return a0
    elif P == 2:
        return tl.reshape(tl.join(a0, a1), [ROWS, D])
    else:
        return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [ROWS, D])




@lru_cache(maxsize=None)
def pair_asm(bits: int, qmax: int) -> str:
    """PTX converting one register of two 16-bit code words (token t in the low half, t + 1 in the high half;
    16 / bits codes each, bits 4 or 8) into 16 / bits registers of fp16 pairs: register k = (code k of t, code k
    of t + 1) minus qmax. Per register: one lop3 and one fma.f16x2 (as convert_asm), and one shift that brings
    the high bytes down (a code at bit 8 or above would overlap the exponent of 0x6400)."""
    per = 16 // bits
    lines = ["{", ".reg .b32 y, t, s, o;", f"shr.b32 y, ${per}, 8;"]
    for k in range(per):
        src, shift = (f"${per}", k * bits) if k * bits < 8 else ("y", k * bits - 8)
        mask = (((1 << bits) - 1) << shift) * 0x10001
        offset = _f16_pair(-(1024.0 * 2.0 ** -shift) - qmax)
        lines += [f"mov.b32 s, {_f16_pair(2.0 ** -shift)};", f"mov.b32 o, {offset};",
                  f"lop3.b32 t, {src}, {mask:#010x}, 0x64006400, 0xea;", f"fma.rn.f16x2 ${k}, t, s, o;"]
    lines.append("}")
    return "\n".join(lines)


@triton.jit
def _pair_planes(w16, CONV: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, LOW_PRECISION: tl.constexpr,
                 USE_ASM: tl.constexpr):
    # int16 code words [R, C] (BITS 4 or 8) -> the 16 / BITS planes of (code - qmax), [R, C] each; plane k holds
    # the codes at bits k*BITS of every word; extra outputs repeat
    if USE_ASM:
        if BITS == 8:
            c0, c1 = tl.inline_asm_elementwise(CONV, "=r,=r,r", [w16], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=2)
            return c0, c1, c0, c1
        else:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(CONV, "=r,=r,=r,=r,r", [w16],
                                                       dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                       is_pure=True, pack=2)
            return c0, c1, c2, c3
    else:  # int16: the masks drop what an arithmetic shift brings in
        return _arith_planes(w16, 16 // BITS, BITS, QMAX, LOW_PRECISION)


@triton.jit
def _load_runs(ptr, mask, D: tl.constexpr):
    # 3-bit codes at ptr (token rows [R, 1]): each run of 8 codes is 3 bytes (packing.py) -> the runs as
    # 24-bit int32 words [R, D / 8]
    run = 3 * tl.arange(0, D // 8)[None, :]
    b0 = tl.load(ptr + run, mask=mask, other=0).to(tl.int32)
    b1 = tl.load(ptr + run + 1, mask=mask, other=0).to(tl.int32)
    b2 = tl.load(ptr + run + 2, mask=mask, other=0).to(tl.int32)
    return b0 | (b1 << 8) | (b2 << 16)


@triton.jit
def _run_codes(words, QMAX: tl.constexpr, LOW_PRECISION: tl.constexpr, R: tl.constexpr, D: tl.constexpr):
    # run words [R, D / 8] -> (code - qmax) [R, D] in channel order (code i of run j is channel 8j + i), as fp16
    # (exact: 0x6400 | code is 1024 + code) or fp32
    codes = tl.reshape((words[:, :, None] >> (3 * tl.arange(0, 8))[None, None, :]) & 7, [R, D])
    if LOW_PRECISION:
        return (codes.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + QMAX)
    else:
        return codes.to(tl.float32) - QMAX


@triton.jit
def _pack_runs(codes, R: tl.constexpr, D: tl.constexpr):
    # int32 3-bit codes [R, D] -> run words [R, D / 8] (code i of a run at bits 3i)
    return tl.sum(tl.reshape(codes, [R, D // 8, 8]) << (3 * tl.arange(0, 8))[None, None, :], axis=2)


@triton.jit
def _store_runs(ptr, words, mask, D: tl.constexpr):
    # inverse of _load_runs: run words [R, D / 8] -> their 3 bytes each at ptr (token rows [R, 1])
    run = 3 * tl.arange(0, D // 8)[None, :]
    tl.store(ptr + run, (words & 255).to(tl.uint8), mask=mask)
    tl.store(ptr + run + 1, ((words >> 8) & 255).to(tl.uint8), mask=mask)
    tl.store(ptr + run + 2, ((words >> 16) & 255).to(tl.uint8), mask=mask)
