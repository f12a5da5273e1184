"""The GPU's code conversions of the fused decode kernel (`convert_asm`, `pair_asm`: PTX) run on the CPU by a small
emulator of the instructions they emit, for every byte value and code width."""

import pytest

triton = pytest.importorskip("triton")


def _run_ptx(asm: str, regs: dict) -> dict:
    """Execute the few PTX instructions convert_asm and pair_asm emit (mov, prmt, shr, lop3 with LUT 0xea,
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
        elif op == "lop3.b32":
            assert val(src[3]) == 0xEA  # (a & b) | c
            regs[d] = (val(src[0]) & val(src[1])) | val(src[2])
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
