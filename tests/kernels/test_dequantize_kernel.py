"""The dequantize kernel (Triton) and the kernels' reference against decompress(): on a CPU through Triton's
interpreter at small shapes, on a GPU at real ones."""

import pytest
import torch

import decoquant as dq
from decoquant.buffer import pack_blocks
from kernel_cases import CUDA, packed, rel

pytest.importorskip("triton")


def test_reference_matches_decompress():
    """The kernels' reference decodes exactly what decompress() returns."""
    from decoquant.kernels.reference import dequantize_packed

    cfg = dq.DecoQuantConfig(preset="paper", bits=4)
    x = torch.randn(2, 3, 32, 64)
    x[..., 1] *= 30
    c = dq.compress(x, cfg, "key")
    assert torch.allclose(dequantize_packed(pack_blocks([c])), dq.decompress(c), atol=1e-5, rtol=1e-5)


DEQUANT_CASES = [  # batch, kv heads, tokens, head_dim, bits, block, config fields
    (1, 1, 64, 64, 4, 32, {}),
    (2, 3, 96, 64, 2, 32, {}),
    (2, 2, 32, 32, 8, 16, {}),
    (1, 2, 64, 64, 4, 64, dict(group_size=32)),
    (2, 2, 64, 64, 2, 32, dict(ts_sharing="head", scale_granularity="token_head")),
    (2, 3, 96, 64, 3, 32, {}),  # runs of 8 codes in 3 bytes
]
if CUDA:
    DEQUANT_CASES += [(4, 8, 1024, 128, 4, 128, {}), (2, 32, 2048, 128, 2, 128, dict(ts_sharing="head")),
                      (4, 8, 1024, 128, 3, 128, {})]


@pytest.mark.parametrize("case", DEQUANT_CASES, ids=lambda c: "b{}-kv{}-t{}-d{}-{}bit-blk{}".format(*c[:6]))
@pytest.mark.usefixtures("poisoned_outputs")
def test_dequantize_kernel_matches_reference(case):
    from decoquant.kernels.attention import dequantize

    b, h, t, d, bits, block, fields = case
    k, v = packed(b, h, t, d, bits, block, seed=t + bits, **fields)
    for p in (k, v):
        ref = dequantize(p, torch.float32, backend="torch")
        out = dequantize(p, torch.float32, backend="triton")
        assert out.shape == ref.shape == (b, h, t, d)
        assert rel(out, ref) < (1e-5 if not CUDA else 1e-4)
    half = dequantize(k, torch.float16, backend="triton")
    assert half.dtype == torch.float16 and rel(half, dequantize(k, torch.float32, backend="torch")) < 1e-3
    with pytest.raises(ValueError, match="backend='cuda'"):
        dequantize(k, backend="cuda")


@pytest.mark.skipif(not CUDA, reason="needs more than 2**31 output elements on a GPU")
def test_dequantize_kernel_offsets_past_int32():
    """A [B, H, T, D] output of more than 2**31 elements (the last batch rows sit past int32 offsets)."""
    from decoquant.kernels.attention import dequantize
    from decoquant.kernels.layout import PackedKV

    k, _ = packed(1, 8, 128, 128, 2, 128, seed=11)
    b = 2**31 // (8 * 128 * 128) + 2  # rows beyond 2**31 output elements
    big = PackedKV(k.codes.expand(b, -1, -1, -1), k.scales.expand(b, -1, -1), k.ts.expand(b, -1, -1, -1, -1),
                   k.bits, k.block_size, k.group_size)
    out = dequantize(big, torch.float16, backend="triton")
    ref = dequantize(k, torch.float16, backend="torch")
    assert rel(out[-1:], ref) < 1e-3 and rel(out[:1], ref) < 1e-3



@pytest.mark.usefixtures("poisoned_outputs")
def test_the_poison_reaches_what_the_kernel_wrappers_allocate():
    assert torch.empty(4).isnan().all() and torch.empty_like(torch.zeros(2, dtype=torch.float16)).isnan().all()
    assert (torch.empty(3, dtype=torch.int32) == 2**31 - 1).all()
