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
3-bit codes (packing.py: their low 2 bits as 2-bit codes, then their high bits) are read as int16 words of low bits
beside a byte of high bits (`_load3`) and become the same four planes as 2-bit codes (`_three_planes`; on the GPU
the PTX of `three_asm`, about two instructions per code).
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


@lru_cache(maxsize=None)
def three_asm(qmax: int) -> str:
    """PTX converting the 3-bit codes of two elements (packing.py: low 2 bits as 2-bit codes, then the high bits;
    input $8: two int16 words of low bits, element 0 in the low half, code i at bits 2i; input $9: the two
    elements' high-bit bytes zero-extended to 16 bits, code i at bit i) into 8 registers of fp16 pairs: register
    i = code i of each element minus qmax. Per register: at most one shift of the high bits, two lop3 (the low
    bits | 0x6400, then | the high bit beside them: 1024 + code * 2**s in each half) and one fma.f16x2, exact."""
    lines = ["{", ".reg .b32 y, t, u, s, o;", "shr.b32 y, $8, 8;"]  # codes 4..7 down to bits 0..7 of each half
    for i in range(8):
        src, shift = ("$8", 2 * i) if i < 4 else ("y", 2 * (i - 4))
        move = shift + 2 - i  # the high bit of code i, from bit i to bit shift + 2
        hi = "$9" if move == 0 else "u"
        if move:
            lines.append(f"{'shl' if move > 0 else 'shr'}.b32 u, $9, {abs(move)};")
        offset = _f16_pair(-(1024.0 * 2.0 ** -shift) - qmax)
        lines += [f"mov.b32 s, {_f16_pair(2.0 ** -shift)};", f"mov.b32 o, {offset};",
                  f"lop3.b32 t, {src}, {(3 << shift) * 0x10001:#010x}, 0x64006400, 0xea;",  # (src & mask) | magic
                  f"lop3.b32 t, t, {hi}, {(4 << shift) * 0x10001:#010x}, 0xf8;",  # t | (hi & mask)
                  f"fma.rn.f16x2 ${i}, t, s, o;"]
    lines.append("}")
    return "\n".join(lines)


@triton.jit
def _load3(ptr, mask, D: tl.constexpr):
    # 3-bit codes at ptr (uint8 token rows [R, 1], packing.py's two parts) -> (int16 words [R, D / 8]: the low
    # bits of codes 8m..8m+7, code i at bits 2i; int16 [R, D / 8]: their high bits, code i at bit i)
    j = tl.arange(0, D // 8)[None, :]
    words = tl.load(ptr.to(tl.pointer_type(tl.int16)) + j, mask=mask, other=0)
    high = tl.load(ptr + D // 4 + j, mask=mask, other=0).to(tl.int16)
    return words, high


@triton.jit
def _three(words, high, i: tl.constexpr, QMAX: tl.constexpr, LOW_PRECISION: tl.constexpr):
    # code i of every element, minus qmax, by arithmetic (as _plane)
    code = ((words >> (2 * i)) & 3) | (((high >> i) & 1) << 2)
    if LOW_PRECISION:
        return (code | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + QMAX)
    else:
        return code.to(tl.float32) - QMAX


@triton.jit
def _three_planes(words, high, CONV: tl.constexpr, QMAX: tl.constexpr, LOW_PRECISION: tl.constexpr,
                  USE_ASM: tl.constexpr, R: tl.constexpr, D: tl.constexpr):
    # `_load3`'s words and high bits -> the four planes of (code - qmax) [R, D / 4] that 2-bit codes give (plane k:
    # columns 4j + k, `_code_planes`): element m's codes k and k + 4 are columns 4 * 2m + k and 4 * (2m + 1) + k.
    # On the GPU, fp16: the PTX of three_asm; elsewhere `_three` per code.
    if USE_ASM:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            CONV, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words, high], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    else:
        c0 = _three(words, high, 0, QMAX, LOW_PRECISION)
        c1 = _three(words, high, 1, QMAX, LOW_PRECISION)
        c2 = _three(words, high, 2, QMAX, LOW_PRECISION)
        c3 = _three(words, high, 3, QMAX, LOW_PRECISION)
        c4 = _three(words, high, 4, QMAX, LOW_PRECISION)
        c5 = _three(words, high, 5, QMAX, LOW_PRECISION)
        c6 = _three(words, high, 6, QMAX, LOW_PRECISION)
        c7 = _three(words, high, 7, QMAX, LOW_PRECISION)
    return (tl.reshape(tl.join(c0, c4), [R, D // 4]), tl.reshape(tl.join(c1, c5), [R, D // 4]),
            tl.reshape(tl.join(c2, c6), [R, D // 4]), tl.reshape(tl.join(c3, c7), [R, D // 4]))
