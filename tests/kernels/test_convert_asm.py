"""The GPU's code conversions of the fused decode kernel (`convert_asm`, `pair_asm`, `three_asm`: PTX) run on the CPU
by a small emulator of the instructions they emit, for every byte value and code width."""

import pytest

triton = pytest.importorskip("triton")


def _run_ptx(asm: str, regs: dict) -> dict:
    """Execute the few PTX instructions the conversions emit (mov, prmt, shl, shr, lop3 with any LUT,
    fma.rn.f16x2)."""
    import numpy as np

    def val(x):
        return regs[x] if x in regs else int(x, 0)

    def halves(v):
        return np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            regs[d] = val(src[0])
        elif op == "prmt.b32":
            pool = val(src[0]).to_bytes(4, "little") + val(src[1]).to_bytes(4, "little")
            sel = val(src[2])
            regs[d] = int.from_bytes(bytes(pool[(sel >> (4 * i)) & 7] for i in range(4)), "little")
        elif op == "shr.b32":
            regs[d] = val(src[0]) >> val(src[1])
        elif op == "shl.b32":
            regs[d] = (val(src[0]) << val(src[1])) & 0xFFFFFFFF
        elif op == "lop3.b32":  # bit k of the LUT: the output where (a, b, c) = bits of k, a the highest
            a, b, c, lut = (val(x) for x in src)
            out = 0
            for k in range(8):
                if lut >> k & 1:
                    out |= ((a if k & 4 else ~a) & (b if k & 2 else ~b) & (c if k & 1 else ~c)) & 0xFFFFFFFF
            regs[d] = out
        elif op == "fma.rn.f16x2":
            r = (halves(val(src[0])).astype(np.float32) * halves(val(src[1])).astype(np.float32)
                 + halves(val(src[2])).astype(np.float32)).astype(np.float16).view(np.uint16)
            regs[d] = int(r[0]) | int(r[1]) << 16
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return regs


@pytest.mark.parametrize("bits,qmax", [(4, 7), (4, 0), (2, 1), (2, 0), (8, 127), (8, 0)])
def test_convert_asm_gives_every_code_minus_qmax(bits, qmax):
    """The GPU's code conversion (PTX, run here by a small emulator of its instructions): 4 packed bytes ->
    plane k, element i = code at bits k*B of byte i, minus qmax, exactly, for every byte value."""
    import numpy as np

    from decoquant.kernels.triton.codes import convert_asm

    asm, planes = convert_asm(bits, qmax), 8 // bits
    for start in range(0, 256, 4):
        word = int.from_bytes(bytes(range(start, start + 4)), "little")
        regs = _run_ptx(asm, {f"${2 * planes}": word})
        for k in range(planes):
            got = np.array([regs[f"${2 * k}"], regs[f"${2 * k + 1}"]], dtype=np.uint32)
            got = got.view(np.uint16).view(np.float16).astype(np.float32)
            want = [((start + i) >> (k * bits) & ((1 << bits) - 1)) - qmax for i in range(4)]
            assert got.tolist() == want, (k, start)


@pytest.mark.parametrize("bits,qmax", [(4, 7), (4, 0), (8, 127), (8, 0)])
def test_pair_asm_gives_every_code_of_two_words_minus_qmax(bits, qmax):
    """The value conversion (`pair_asm`): one register of two 16-bit code words (token t low, t + 1 high) ->
    register k = (code k of t, code k of t + 1) - qmax, exactly, for every value of either word's bytes."""
    import numpy as np

    from decoquant.kernels.triton.codes import pair_asm

    asm, planes = pair_asm(bits, qmax), 16 // bits
    rng = np.random.default_rng(0)
    words = [(lo, hi) for lo in range(0, 1 << 16, 257) for hi in rng.integers(0, 1 << 16, 2)] + [(0xFFFF, 0x0)]
    for lo, hi in words:
        regs = _run_ptx(asm, {f"${planes}": int(lo) | int(hi) << 16})
        for k in range(planes):
            got = np.array([regs[f"${k}"]], dtype=np.uint32).view(np.uint16).view(np.float16).astype(np.float32)
            want = [(w >> (k * bits) & ((1 << bits) - 1)) - qmax for w in (int(lo), int(hi))]
            assert got.tolist() == want, (k, lo, hi)


@pytest.mark.parametrize("qmax", [3, 0])
def test_three_asm_gives_every_code_of_two_elements_minus_qmax(qmax):
    """The 3-bit conversion (`three_asm`): an int16 word pair of low bits and the two elements' high-bit bytes ->
    register i = (code i of element 0, code i of element 1) - qmax, where code i = (low bits 2i..2i+1) | (high bit
    i) << 2, exactly, for every high-bit byte and a spread of low-bit words."""
    import numpy as np

    from decoquant.kernels.triton.codes import three_asm

    asm = three_asm(qmax)
    rng = np.random.default_rng(0)
    for high in range(256):
        for lo0, lo1 in [(0, 0xFFFF), (0xFFFF, 0)] + [tuple(int(x) for x in rng.integers(0, 1 << 16, 2))]:
            high1 = 255 - high
            regs = _run_ptx(asm, {"$8": lo0 | lo1 << 16, "$9": high | high1 << 16})
            for i in range(8):
                got = np.array([regs[f"${i}"]], dtype=np.uint32).view(np.uint16).view(np.float16).astype(np.float32)
                want = [((w >> 2 * i) & 3 | (h >> i & 1) << 2) - qmax for w, h in ((lo0, high), (lo1, high1))]
                assert got.tolist() == want, (i, lo0, lo1, high)
