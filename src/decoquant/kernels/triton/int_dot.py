"""Exact integer products on packed 2- and 4-bit codes, two per instruction (one-row decode kernel).

A 32-bit word of packed codes holds W = 32 / B codes, code r in bits r*B..(r+1)*B (packing.py's
order): byte j holds codes j*NK + k (k < NK = 8 / B) at bits k*B of the byte. One AND with mask_k
(the k-th B-bit field of every byte) leaves four bytes m_k * code, m_k = 2**(k*B), and PTX
`dp2a.lo` / `dp2a.hi` multiply bytes 0, 1 / 2, 3 by the two signed 16-bit halves of another register
and add both products to a 32-bit accumulator. Integer sums are exact, so nothing needs centring:
the code offset (qmax, zero points) is one exact correction per token or block.

- keys (`word_dot`): the query, rounded to int16 per block (query_pairs), meets each word's codes in
  2 * NK pairs; one accumulator per k, acc_k = m_k * sum of q * code over the codes of that k.
- values (`pair_axpy`): the words of two tokens are interleaved byte by byte (prmt) so that bytes 0, 1
  (2, 3) of a register hold one channel of both tokens; dp2a with the tokens' int16 weights (low
  half: the even token) adds both products to that channel's accumulator (m_k * sum of w * code).

On the GPU both run as PTX; under Triton's interpreter (CI, no GPU) the same functions compute the
same integer products from the same packed operands, so packing, pair order and the arithmetic are
checked on the CPU (exactly: integer results), the instruction encodings on the GPU.
"""

from __future__ import annotations

from functools import lru_cache

import triton
import triton.language as tl


def _mask(bits: int, k: int) -> int:
    return ((1 << bits) - 1) << (k * bits) & 0xFF


@lru_cache(maxsize=None)  # built once per width: the launcher asks for it at every decode step
def dot_asm(bits: int) -> str:
    """Outputs $0..$(NK-1): acc_k += word's codes of field k . query pairs. Inputs: the word, its 2 NK
    query pairs (pair 2k + h: bytes 2h, 2h + 1 of field k), the NK accumulators."""
    nk = 8 // bits
    word, pair, acc_in = f"${nk}", lambda p: f"${nk + 1 + p}", lambda k: f"${3 * nk + 1 + k}"
    lines = ["{", ".reg .b32 t;"]
    for k in range(nk):
        mask = _mask(bits, k) * 0x01010101
        lines += [f"and.b32 t, {word}, {mask:#010x};",
                  f"dp2a.lo.s32.u32 ${k}, {pair(2 * k)}, t, {acc_in(k)};",
                  f"dp2a.hi.s32.u32 ${k}, {pair(2 * k + 1)}, t, ${k};"]
    lines.append("}")
    return "\n".join(lines)


@lru_cache(maxsize=None)
def axpy_asm(bits: int) -> str:
    """Outputs $0..$(W-1): acc_r += w_even * m_k code_r(even token) + w_odd * m_k code_r(odd token) for
    r = j * NK + k. Inputs: the two tokens' words, their int16 weight pair, the W accumulators."""
    nk, w = 8 // bits, 32 // bits
    w0, w1, wp, acc_in = f"${w}", f"${w + 1}", f"${w + 2}", lambda r: f"${w + 3 + r}"
    lines = ["{", ".reg .b32 y, t;"]
    for half, sel in ((0, "0x5140"), (1, "0x7362")):  # bytes (even 2h, odd 2h, even 2h+1, odd 2h+1)
        lines.append(f"prmt.b32 y, {w0}, {w1}, {sel};")
        for k in range(nk):
            lines.append(f"and.b32 t, y, {_mask(bits, k) * 0x01010101:#010x};")
            for mode in (0, 1):  # lo: byte 2h of both tokens, hi: byte 2h + 1
                r = (2 * half + mode) * nk + k
                lines.append(f"dp2a.{'hi' if mode else 'lo'}.s32.u32 ${r}, {wp}, t, {acc_in(r)};")
    lines.append("}")
    return "\n".join(lines)


DOT_CONSTRAINTS4 = tl.constexpr(",".join(["=r"] * 2 + ["r"] * 7))
DOT_CONSTRAINTS2 = tl.constexpr(",".join(["=r"] * 4 + ["r"] * 13))
AXPY_CONSTRAINTS4 = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 11))
AXPY_CONSTRAINTS2 = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 19))


# ---- packing (both paths) -------------------------------------------------------------------------

@triton.jit
def _pack16(lo, hi):
    # two int32 tensors (values fit int16) -> int32 holding lo in bits 0..15, hi in bits 16..31
    return (lo & 0xFFFF) | (hi << 16)


@triton.jit
def query_pairs(x, NW: tl.constexpr, BITS: tl.constexpr):
    """Rounded query int32 [A, NW * W] (natural column order) -> the 2 NK int16 pairs [A, NW] of each
    word, pair 2k + h = (x[2h*NK + k], x[(2h+1)*NK + k]) (the codes dp2a meets in bytes 2h, 2h + 1 of field
    k); 8 outputs (4-bit: pairs 0..3, then zeros)."""
    A: tl.constexpr = x.shape[0]
    if BITS == 4:  # column r = 2j + k, j = 2h + b
        y = tl.reshape(x, [A, NW, 2, 2, 2])  # (h, b, k)
        k0, k1 = tl.split(y)  # [A, NW, h, b]
        k0b0, k0b1 = tl.split(k0)  # [A, NW, h]
        k1b0, k1b1 = tl.split(k1)
        a0, a1 = tl.split(k0b0)
        b0, b1 = tl.split(k0b1)
        c0, c1 = tl.split(k1b0)
        d0, d1 = tl.split(k1b1)
        z = tl.zeros([A, NW], tl.int32)
        return _pack16(a0, b0), _pack16(a1, b1), _pack16(c0, d0), _pack16(c1, d1), z, z, z, z
    else:  # column r = 4j + k, j = 2h + b, k = 2 k1 + k0
        y = tl.reshape(x, [A, NW, 2, 2, 2, 2])  # (h, b, k1, k0)
        e0, e1 = tl.split(y)  # k0: [A, NW, h, b, k1]
        e00, e01 = tl.split(e0)  # (k0, k1) = (0, 0), (0, 1): [A, NW, h, b]
        e10, e11 = tl.split(e1)  # (1, 0), (1, 1)
        f0b0, f0b1 = tl.split(e00)  # k = 0: [A, NW, h]
        f1b0, f1b1 = tl.split(e10)  # k = 1
        f2b0, f2b1 = tl.split(e01)  # k = 2
        f3b0, f3b1 = tl.split(e11)  # k = 3
        a0, a1 = tl.split(f0b0)
        b0, b1 = tl.split(f0b1)
        c0, c1 = tl.split(f1b0)
        d0, d1 = tl.split(f1b1)
        e0_, e1_ = tl.split(f2b0)
        g0, g1 = tl.split(f2b1)
        i0, i1 = tl.split(f3b0)
        j0, j1 = tl.split(f3b1)
        return (_pack16(a0, b0), _pack16(a1, b1), _pack16(c0, d0), _pack16(c1, d1),
                _pack16(e0_, g0), _pack16(e1_, g1), _pack16(i0, j0), _pack16(i1, j1))


# ---- the interpreter's path: the same products with shifts and multiplies ---------------------------

@triton.jit
def _half(x, HI: tl.constexpr):
    # signed 16-bit half of an int32 (dp2a's .s32 operand)
    return (x >> 16) if HI else ((x << 16) >> 16)


@triton.jit
def _code(w, J: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr):
    # byte J of (w & mask_k): m_k * the code in field K of byte J, unsigned
    return ((w >> (8 * J + K * BITS)) & ((1 << BITS) - 1)) << (K * BITS)


@triton.jit
def _dp2a(pair, w, acc, K: tl.constexpr, HI: tl.constexpr, BITS: tl.constexpr):
    # dp2a.lo / .hi of pair with (w & mask_k): bytes 2 HI, 2 HI + 1 times the pair's halves
    return acc + _half(pair, 0) * _code(w, 2 * HI, K, BITS) + _half(pair, 1) * _code(w, 2 * HI + 1, K, BITS)


@triton.jit
def _dot_emulated(w, q0, q1, q2, q3, q4, q5, q6, q7, a0, a1, a2, a3, BITS: tl.constexpr):
    a0 = _dp2a(q1, w, _dp2a(q0, w, a0, 0, 0, BITS), 0, 1, BITS)
    a1 = _dp2a(q3, w, _dp2a(q2, w, a1, 1, 0, BITS), 1, 1, BITS)
    if BITS == 2:
        a2 = _dp2a(q5, w, _dp2a(q4, w, a2, 2, 0, BITS), 2, 1, BITS)
        a3 = _dp2a(q7, w, _dp2a(q6, w, a3, 3, 0, BITS), 3, 1, BITS)
    return a0, a1, a2, a3


@triton.jit
def _axpy_emulated(w0, w1, wp, acc, R: tl.constexpr, BITS: tl.constexpr):
    # channel r = j * NK + k: both tokens' code (times m_k) times their weight
    J: tl.constexpr = R // (8 // BITS)
    K: tl.constexpr = R % (8 // BITS)
    return acc + _half(wp, 0) * _code(w0, J, K, BITS) + _half(wp, 1) * _code(w1, J, K, BITS)


# ---- what the kernel calls --------------------------------------------------------------------------

@triton.jit
def word_dot(w, q0, q1, q2, q3, q4, q5, q6, q7, a0, a1, a2, a3, BITS: tl.constexpr, ASM: tl.constexpr,
             USE_ASM: tl.constexpr):
    """Words int32, their query pairs (query_pairs; broadcastable) and NK accumulators -> the
    accumulators plus m_k * sum of q * code over each field k (4 outputs; 4-bit: a2, a3 unchanged).
    ASM: dot_asm(BITS)."""
    if USE_ASM:
        if BITS == 4:
            a0, a1 = tl.inline_asm_elementwise(ASM, DOT_CONSTRAINTS4, [w, q0, q1, q2, q3, a0, a1],
                                               dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(ASM, DOT_CONSTRAINTS2,
                                                       [w, q0, q1, q2, q3, q4, q5, q6, q7, a0, a1, a2, a3],
                                                       dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        return a0, a1, a2, a3
    else:
        return _dot_emulated(w, q0, q1, q2, q3, q4, q5, q6, q7, a0, a1, a2, a3, BITS)


@triton.jit
def pair_axpy(w0, w1, wp, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
              BITS: tl.constexpr, ASM: tl.constexpr, USE_ASM: tl.constexpr):
    """One word of an even and the next odd token, w0 / w1 int32, their int16 weight pair wp and the W
    channel accumulators (natural order; 4-bit: a0..a7) -> the accumulators plus w * m_k * code.
    ASM: axpy_asm(BITS)."""
    if USE_ASM:
        if BITS == 4:
            a0, a1, a2, a3, a4, a5, a6, a7 = tl.inline_asm_elementwise(
                ASM, AXPY_CONSTRAINTS4, [w0, w1, wp, a0, a1, a2, a3, a4, a5, a6, a7],
                dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        else:
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = tl.inline_asm_elementwise(
                ASM, AXPY_CONSTRAINTS2, [w0, w1, wp, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13,
                                         a14, a15], dtype=(tl.int32,) * 16, is_pure=True, pack=1)
    else:
        a0 = _axpy_emulated(w0, w1, wp, a0, 0, BITS)
        a1 = _axpy_emulated(w0, w1, wp, a1, 1, BITS)
        a2 = _axpy_emulated(w0, w1, wp, a2, 2, BITS)
        a3 = _axpy_emulated(w0, w1, wp, a3, 3, BITS)
        a4 = _axpy_emulated(w0, w1, wp, a4, 4, BITS)
        a5 = _axpy_emulated(w0, w1, wp, a5, 5, BITS)
        a6 = _axpy_emulated(w0, w1, wp, a6, 6, BITS)
        a7 = _axpy_emulated(w0, w1, wp, a7, 7, BITS)
        if BITS == 2:
            a8 = _axpy_emulated(w0, w1, wp, a8, 8, BITS)
            a9 = _axpy_emulated(w0, w1, wp, a9, 9, BITS)
            a10 = _axpy_emulated(w0, w1, wp, a10, 10, BITS)
            a11 = _axpy_emulated(w0, w1, wp, a11, 11, BITS)
            a12 = _axpy_emulated(w0, w1, wp, a12, 12, BITS)
            a13 = _axpy_emulated(w0, w1, wp, a13, 13, BITS)
            a14 = _axpy_emulated(w0, w1, wp, a14, 14, BITS)
            a15 = _axpy_emulated(w0, w1, wp, a15, 15, BITS)
    return a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15


@triton.jit
def fields_total(a0, a1, a2, a3, BITS: tl.constexpr):
    """word_dot's accumulators -> m_max * sum of q * code (m_max = m_k of the last field; exact)."""
    if BITS == 4:  # m_k = 16**k
        return a0 * 16 + a1
    else:  # m_k = 4**k
        return ((a0 * 4 + a1) * 4 + a2) * 4 + a3


@triton.jit
def natural8(o0, o1, o2, o3, o4, o5, o6, o7):
    """8 tensors [A, B] -> [A, B, 8] with [..., r] = o_r (joins add the fastest axis in each lane's
    registers: no data moves)."""
    x = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
    return tl.reshape(x, [o0.shape[0], o0.shape[1], 8])


@triton.jit
def natural16(o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15):
    """16 tensors [A, B] -> [A, B, 16] with [..., r] = o_r."""
    even = natural8(o0, o2, o4, o6, o8, o10, o12, o14)
    odd = natural8(o1, o3, o5, o7, o9, o11, o13, o15)
    return tl.reshape(tl.join(even, odd), [o0.shape[0], o0.shape[1], 16])
