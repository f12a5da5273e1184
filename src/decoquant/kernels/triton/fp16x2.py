"""Two codes per instruction: packed fp16x2 arithmetic on 2- and 4-bit codes (one-row decode kernel).

A 32-bit word of packed codes holds W = 32 / B codes, code r in bits r*B..(r+1)*B (packing.py's
order). Pair p of a word is (code p, code W/2 + p): one in each 16-bit half, at the same bits. With
p = byte * (8 / B) + k and m = 2**(k*B),
    lop3((word >> 8*byte) & mask_k | 0x6400 6400)  = the fp16 pair (1024 + m*code_lo, 1024 + m*code_hi)
exactly (the codes land in the mantissa), and one f16x2 subtraction of 1024 + m*centre centres both:
m * (code - centre), small exact integers (`centre`: qmax of symmetric codes, else the middle code).
The query (keys) is packed the same way, divided by m, so one f16x2 fma per pair accumulates two
products; each word's sum leaves in fp32.

`word_dot` (keys) and `word_axpy` (values, 4 tokens at a time) run PTX on the GPU; under Triton's
interpreter (CI, no GPU) the same functions compute the same pairs with integer shifts and round every
accumulation to fp16 as the GPU does, so the packing, the pair order and the rounding are tested on
the CPU, and the instructions themselves on the GPU.
"""

from __future__ import annotations

from functools import lru_cache

import triton
import triton.language as tl


def _unpack_lines(src: str, bits: int, centre: int, dest) -> list[str]:
    """PTX that leaves each centred pair of word `src` in register dest(p) (p = pair index)."""
    nk, mask = 8 // bits, (1 << bits) - 1
    lines = []
    for byte in range(2):
        word = src
        if byte:
            lines.append(f"shr.u32 sw, {src}, 8;")
            word = "sw"
        for k in range(nk):
            m = 1 << (k * bits)
            pair_mask = (mask << k * bits) * 0x10001
            lines.append(f"lop3.b32 {dest(byte * nk + k)}, {word}, {pair_mask:#010x}, 0x64006400, 0xEA;")
            lines.append(f"mov.b32 off, {(0x6400 + m * centre) * 0x10001:#010x};")
            lines.append(f"sub.f16x2 {dest(byte * nk + k)}, {dest(byte * nk + k)}, off;")
    return lines


@lru_cache(maxsize=None)  # built once per format: the launcher asks for it at every decode step
def dot_asm(bits: int, centre: int) -> str:
    """$0 (fp32) = sum over the word's pairs of pair(code - centre) . $2.. (f16x2 query pairs); $1 = word."""
    pairs = 16 // bits
    chains = 2 if bits == 2 else 1  # fp16 rounding grows with the chain: 2-bit words sum in two chains of 4
    lines = ["{", ".reg .b32 sw, off, t, acc0, acc1;", ".reg .b16 lo, hi;", ".reg .f32 a, b, c, d;"]
    unpack = _unpack_lines("$1", bits, centre, lambda p: "t")
    i = 0
    for p in range(pairs):
        take = 3 + (1 if p == pairs // 2 else 0)  # lop3, offset, subtraction (+ the shift before byte 1)
        lines += unpack[i:i + take]
        i += take
        acc = f"acc{p * chains // pairs}"
        first = p % (pairs // chains) == 0
        lines.append(f"mul.rn.f16x2 {acc}, t, ${2 + p};" if first else f"fma.rn.f16x2 {acc}, t, ${2 + p}, {acc};")
    lines += ["mov.b32 {lo, hi}, acc0;", "cvt.f32.f16 a, lo;", "cvt.f32.f16 b, hi;"]
    if chains == 1:
        lines.append("add.f32 $0, a, b;")
    else:
        lines += ["mov.b32 {lo, hi}, acc1;", "cvt.f32.f16 c, lo;", "cvt.f32.f16 d, hi;", "add.f32 a, a, b;",
                  "add.f32 c, c, d;", "add.f32 $0, a, c;"]
    lines.append("}")
    return "\n".join(lines)


@lru_cache(maxsize=None)
def axpy_asm(bits: int, centre: int, tokens: int = 4) -> str:
    """Outputs $0..$(2P-1) (fp32): for pair p = byte * (8/B) + k, half h: sum over the tokens r of
    weight_(r,k) * pair_p(m * (code - centre)) of word_r (lo half -> $(2p), hi half -> $(2p+1)).
    Inputs: `tokens` words, then the f16x2 weights of token r, k at tokens + r * (8/B) + k: each token's
    weight divided by m = 2**(k*B), so the sums come out in code units."""
    pairs, nk = 16 // bits, 8 // bits
    n_out = 2 * pairs
    acc = lambda p: f"a{p}"  # noqa: E731
    lines = ["{", ".reg .b32 sw, off, t;", ".reg .b32 " + ", ".join(acc(p) for p in range(pairs)) + ";",
             ".reg .b16 lo, hi;"]
    for r in range(tokens):
        unpack = _unpack_lines(f"${n_out + r}", bits, centre, lambda p: "t")
        i = 0
        for p in range(pairs):
            if p == pairs // 2:
                lines.append(unpack[i])  # the shift to the second byte of each half
                i += 1
            lines += unpack[i:i + 3]  # lop3, offset, subtraction
            i += 3
            weight = f"${n_out + tokens + r * nk + p % nk}"
            lines.append(f"mul.rn.f16x2 {acc(p)}, t, {weight};" if r == 0 else
                         f"fma.rn.f16x2 {acc(p)}, t, {weight}, {acc(p)};")
    for p in range(pairs):
        lines += [f"mov.b32 {{lo, hi}}, {acc(p)};", f"cvt.f32.f16 ${2 * p}, lo;", f"cvt.f32.f16 ${2 * p + 1}, hi;"]
    lines.append("}")
    return "\n".join(lines)


def centre(bits: int, qmax: int) -> int:
    """The code subtracted in fp16: qmax for symmetric codes (their value is (code - qmax) * s, so the
    dot needs no correction and nothing cancels), the middle code for asymmetric ones (qmax = 0)."""
    return qmax if qmax else 1 << (bits - 1)


DOT_CONSTRAINTS4 = tl.constexpr("=f," + ",".join(["r"] * 5))
DOT_CONSTRAINTS2 = tl.constexpr("=f," + ",".join(["r"] * 9))
AXPY_CONSTRAINTS4 = tl.constexpr(",".join(["=f"] * 8 + ["r"] * 12))
AXPY_CONSTRAINTS2 = tl.constexpr(",".join(["=f"] * 16 + ["r"] * 20))


# ---- packing (both paths) -------------------------------------------------------------------------

@triton.jit
def _fp16_bits(x):
    # fp32 -> the 16 bits of its fp16 rounding, in the low half of an int32
    return x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def pack_pair(lo, hi):
    """Two fp32 tensors -> int32 holding the fp16 pair (lo in bits 0..15, hi in bits 16..31)."""
    return _fp16_bits(lo) | (_fp16_bits(hi) << 16)


@triton.jit
def pack_weight(w):
    """fp32 -> int32 holding (w, w) as fp16."""
    b = _fp16_bits(w)
    return b | (b << 16)


@triton.jit
def query_pairs(x, NW: tl.constexpr, BITS: tl.constexpr):
    """Queries [A, NW * W] (natural column order) -> the 16 / BITS f16x2 pairs [A, NW] of each word, pair p
    holding (x[p], x[W/2 + p]) / m_p; 8 outputs (2-bit: pairs 0..7; 4-bit: pairs 0..3, then zeros)."""
    A: tl.constexpr = x.shape[0]
    if BITS == 4:  # column r = 4h + 2*byte + k, m = 16**k
        y = tl.reshape(x, [A, NW, 2, 2, 2])
        k0, k1 = tl.split(y)  # [A, NW, h, byte]
        k0b0, k0b1 = tl.split(k0)  # [A, NW, h]
        k1b0, k1b1 = tl.split(k1)
        z = tl.zeros([A, NW], tl.int32)
        return (pack_pair(*tl.split(k0b0)), pack_pair(*tl.split(k1b0 * 0.0625)),
                pack_pair(*tl.split(k0b1)), pack_pair(*tl.split(k1b1 * 0.0625)), z, z, z, z)
    else:  # column r = 8h + 4*byte + k, k = 2*k1 + k0, m = 4**k
        y = tl.reshape(x, [A, NW, 2, 2, 2, 2])
        e0, e1 = tl.split(y)  # k0: [A, NW, h, byte, k1]
        e00, e01 = tl.split(e0)  # k1: [A, NW, h, byte]
        e10, e11 = tl.split(e1)
        a, b = tl.split(e00)  # byte: [A, NW, h]  (k = 0)
        c, d = tl.split(e10 * 0.25)  # k = 1
        e, f = tl.split(e01 * 0.0625)  # k = 2
        g, i = tl.split(e11 * 0.015625)  # k = 3
        return (pack_pair(*tl.split(a)), pack_pair(*tl.split(c)), pack_pair(*tl.split(e)), pack_pair(*tl.split(g)),
                pack_pair(*tl.split(b)), pack_pair(*tl.split(d)), pack_pair(*tl.split(f)), pack_pair(*tl.split(i)))


# ---- the interpreter's path: the same pairs, with integer shifts ------------------------------------

@triton.jit
def _half(x, HI: tl.constexpr):
    # the fp16 number in one half of an int32, as fp32
    h = (x >> 16) if HI else x
    return (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pair(w, P: tl.constexpr, HI: tl.constexpr, BITS: tl.constexpr, CENTRE: tl.constexpr):
    # m * (code - centre) of one half of pair P of word w, fp32
    NK: tl.constexpr = 8 // BITS
    K: tl.constexpr = P % NK
    shift: tl.constexpr = 16 * HI + 8 * (P // NK) + K * BITS
    code = ((w >> shift) & ((1 << BITS) - 1)).to(tl.float32)
    return (code - CENTRE) * (1 << (K * BITS))


@triton.jit
def _fma16(a, b, c):
    # one lane of fma.rn.f16x2: the product of two fp16 numbers is exact in fp32, then one rounding
    return (a * b + c).to(tl.float16).to(tl.float32)


@triton.jit
def _dot_half(w, q0, q1, q2, q3, q4, q5, q6, q7, HI: tl.constexpr, BITS: tl.constexpr, CENTRE: tl.constexpr):
    # one half of word_dot's f16x2 accumulators, rounded to fp16 after every fma as on the GPU
    s = _fma16(_pair(w, 0, HI, BITS, CENTRE), _half(q0, HI), 0.0)
    s = _fma16(_pair(w, 1, HI, BITS, CENTRE), _half(q1, HI), s)
    s = _fma16(_pair(w, 2, HI, BITS, CENTRE), _half(q2, HI), s)
    s = _fma16(_pair(w, 3, HI, BITS, CENTRE), _half(q3, HI), s)
    if BITS == 2:  # a second chain
        t = _fma16(_pair(w, 4, HI, BITS, CENTRE), _half(q4, HI), 0.0)
        t = _fma16(_pair(w, 5, HI, BITS, CENTRE), _half(q5, HI), t)
        t = _fma16(_pair(w, 6, HI, BITS, CENTRE), _half(q6, HI), t)
        s += _fma16(_pair(w, 7, HI, BITS, CENTRE), _half(q7, HI), t)
    return s


@triton.jit
def _dot_emulated(w, q0, q1, q2, q3, q4, q5, q6, q7, BITS: tl.constexpr, CENTRE: tl.constexpr):
    return (_dot_half(w, q0, q1, q2, q3, q4, q5, q6, q7, 0, BITS, CENTRE)
            + _dot_half(w, q0, q1, q2, q3, q4, q5, q6, q7, 1, BITS, CENTRE))


@triton.jit
def _axpy_emulated(w0, w1, w2, w3, a0, a1, a2, a3, P: tl.constexpr, BITS: tl.constexpr, CENTRE: tl.constexpr):
    # (lo, hi) of pair P: one f16x2 chain over 4 tokens with their weights a_r for P's k, rounded as on the GPU
    lo = _fma16(_pair(w0, P, 0, BITS, CENTRE), _half(a0, 0), 0.0)
    hi = _fma16(_pair(w0, P, 1, BITS, CENTRE), _half(a0, 0), 0.0)
    lo = _fma16(_pair(w1, P, 0, BITS, CENTRE), _half(a1, 0), lo)
    hi = _fma16(_pair(w1, P, 1, BITS, CENTRE), _half(a1, 0), hi)
    lo = _fma16(_pair(w2, P, 0, BITS, CENTRE), _half(a2, 0), lo)
    hi = _fma16(_pair(w2, P, 1, BITS, CENTRE), _half(a2, 0), hi)
    lo = _fma16(_pair(w3, P, 0, BITS, CENTRE), _half(a3, 0), lo)
    hi = _fma16(_pair(w3, P, 1, BITS, CENTRE), _half(a3, 0), hi)
    return lo, hi


# ---- what the kernel calls --------------------------------------------------------------------------

@triton.jit
def word_dot(w, q0, q1, q2, q3, q4, q5, q6, q7, BITS: tl.constexpr, CENTRE: tl.constexpr, ASM: tl.constexpr,
             USE_ASM: tl.constexpr):
    """Words int32 and their query pairs (f16x2, broadcastable) -> fp32: each word's sum of (code - CENTRE) * q.
    ASM: dot_asm(BITS, CENTRE)."""
    if USE_ASM:
        if BITS == 4:
            return tl.inline_asm_elementwise(ASM, DOT_CONSTRAINTS4, [w, q0, q1, q2, q3], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(ASM, DOT_CONSTRAINTS2, [w, q0, q1, q2, q3, q4, q5, q6, q7],
                                             dtype=tl.float32, is_pure=True, pack=1)
    else:
        return _dot_emulated(w, q0, q1, q2, q3, q4, q5, q6, q7, BITS, CENTRE)


@triton.jit
def _join_pairs(o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, BITS: tl.constexpr):
    # outputs o(2p + h), each [A, B] -> [A, B, W] in natural column order r = h * W/2 + p (joins add the
    # fastest axis, in the lane's registers: no data moves)
    if BITS == 4:  # p = 2*p1 + p0
        x = tl.join(tl.join(tl.join(o0, o1), tl.join(o4, o5)), tl.join(tl.join(o2, o3), tl.join(o6, o7)))
        return tl.reshape(x, [o0.shape[0], o0.shape[1], 8])
    else:  # p = 4*p2 + 2*p1 + p0
        e0 = tl.join(tl.join(tl.join(o0, o1), tl.join(o8, o9)), tl.join(tl.join(o4, o5), tl.join(o12, o13)))
        e1 = tl.join(tl.join(tl.join(o2, o3), tl.join(o10, o11)), tl.join(tl.join(o6, o7), tl.join(o14, o15)))
        return tl.reshape(tl.join(e0, e1), [o0.shape[0], o0.shape[1], 16])


@triton.jit
def word_axpy(w0, w1, w2, w3, c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23,
              c30, c31, c32, c33, BITS: tl.constexpr, CENTRE: tl.constexpr, ASM: tl.constexpr, USE_ASM: tl.constexpr):
    """One word of each of 4 tokens, w_r [A, B] int32, and their weights c_rk [A, B] (`token_weights`) ->
    [A, B, W] fp32 (W = 32 / BITS codes in natural order): sum over the 4 tokens of weight * (code - CENTRE).
    ASM: axpy_asm(BITS, CENTRE)."""
    if USE_ASM:
        if BITS == 4:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                ASM, AXPY_CONSTRAINTS4, [w0, w1, w2, w3, c00, c01, c10, c11, c20, c21, c30, c31],
                dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            return _join_pairs(o0, o1, o2, o3, o4, o5, o6, o7, o0, o0, o0, o0, o0, o0, o0, o0, BITS)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = tl.inline_asm_elementwise(
                ASM, AXPY_CONSTRAINTS2, [w0, w1, w2, w3, c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23,
                                           c30, c31, c32, c33], dtype=(tl.float32,) * 16, is_pure=True, pack=1)
            return _join_pairs(o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, BITS)
    else:  # pair p = byte * (8 / BITS) + k takes the weights of its k
        a0, a1 = _axpy_emulated(w0, w1, w2, w3, c00, c10, c20, c30, 0, BITS, CENTRE)
        a2, a3 = _axpy_emulated(w0, w1, w2, w3, c01, c11, c21, c31, 1, BITS, CENTRE)
        if BITS == 4:
            a4, a5 = _axpy_emulated(w0, w1, w2, w3, c00, c10, c20, c30, 2, BITS, CENTRE)
            a6, a7 = _axpy_emulated(w0, w1, w2, w3, c01, c11, c21, c31, 3, BITS, CENTRE)
            return _join_pairs(a0, a1, a2, a3, a4, a5, a6, a7, a0, a0, a0, a0, a0, a0, a0, a0, BITS)
        else:
            a4, a5 = _axpy_emulated(w0, w1, w2, w3, c02, c12, c22, c32, 2, BITS, CENTRE)
            a6, a7 = _axpy_emulated(w0, w1, w2, w3, c03, c13, c23, c33, 3, BITS, CENTRE)
            a8, a9 = _axpy_emulated(w0, w1, w2, w3, c00, c10, c20, c30, 4, BITS, CENTRE)
            a10, a11 = _axpy_emulated(w0, w1, w2, w3, c01, c11, c21, c31, 5, BITS, CENTRE)
            a12, a13 = _axpy_emulated(w0, w1, w2, w3, c02, c12, c22, c32, 6, BITS, CENTRE)
            a14, a15 = _axpy_emulated(w0, w1, w2, w3, c03, c13, c23, c33, 7, BITS, CENTRE)
            return _join_pairs(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, BITS)


@triton.jit
def token_weights(w, BITS: tl.constexpr):
    """Weights fp32 -> the 4 f16x2 (w / m, w / m) of k = 0..3 (m = 2**(k*B)), each of w's shape."""
    c0 = pack_weight(w)
    c1 = pack_weight(w * (0.0625 if BITS == 4 else 0.25))
    c2 = pack_weight(w * 0.0625)
    c3 = pack_weight(w * 0.015625)
    return c0, c1, c2, c3
