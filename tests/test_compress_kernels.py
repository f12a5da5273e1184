"""Block compression kernels (Triton) vs the pure-torch reference, and the codec route that uses them. On a
CPU the kernels run through Triton's interpreter at small shapes; on a GPU at real ones."""

import pytest
import torch
from conftest import outlier_kv

import decoquant as dq
from decoquant.codecs import decoquant as codec
from decoquant.kernels.compress import gram, quantize_pack
from decoquant.packing import unpack_codes
from decoquant.quant import dequantize_kv, QTensor

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

SHAPES = [  # batch, heads, tokens, head_dim, group size, one T_S per head
    (2, 3, 63, 64, 16, False),
    (1, 2, 100, 64, 32, True),
    (2, 2, 64, 128, 16, False),
]
if CUDA:
    SHAPES += [(8, 32, 1000, 128, 16, False), (4, 8, 1024, 128, 32, True)]


def kv(b, h, t, d, dtype, seed=0, strided=False):
    """Outlier-heavy K/V on the device; strided: a [B, T, H, D] tensor seen as [B, H, T, D]."""
    x = outlier_kv(b, h, t, d, seed=seed).to(DEVICE, dtype)
    return x.transpose(1, 2).contiguous().transpose(1, 2) if strided else x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-h{}-t{}-d{}-g{}-{}".format(*s[:5], "head" if s[5] else "layer"))
def test_gram_kernel_matches_reference(shape, dtype):
    b, h, t, d, g, per_head = shape
    x = kv(b, h, t, d, dtype, strided=t % 2 == 1)
    ref = gram(x, g, per_head, backend="torch")
    out = gram(x, g, per_head, backend="triton")
    assert out.shape == ref.shape == ((b, h, g, g) if per_head else (b, g, g))
    assert float((out - ref).norm() / ref.norm()) < 1e-6  # exact products, fp32 sums


def test_gram_kernel_flags_non_finite_rows():
    x = kv(3, 2, 40, 64, torch.float16)
    x[1, 1, 7, 5] = float("nan")
    x[2, 0, 39, 0] = float("inf")
    out = gram(x, 16, False, backend="triton")
    finite = torch.isfinite(out.diagonal(dim1=-2, dim2=-1)).all(-1)
    assert finite.tolist() == [True, False, False]
    ref = gram(x[:1], 16, False, backend="torch")[0]
    assert float((out[0] - ref).norm() / ref.norm()) < 1e-6


FORMATS = [  # scale granularity, symmetric, channel group, bits
    ("token", True, 0, 4), ("token", True, 0, 2), ("token", False, 0, 2), ("token", True, 0, 8),
    ("token_head", False, 0, 4), ("token_head", True, 0, 2),
    ("channel", False, 32, 2), ("channel", False, 16, 4), ("channel", True, 32, 8),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "{}-{}-cg{}-{}bit".format(f[0], "sym" if f[1] else "asym", *f[2:]))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-h{}-t{}-d{}-g{}-{}".format(*s[:5], "head" if s[5] else "layer"))
def test_quantize_pack_kernel_matches_reference(shape, fmt):
    b, h, t, d, g, per_head = shape
    gran, sym, cg, bits = fmt
    if gran == "channel" and t % cg:
        t = t - t % cg
    x = kv(b, h, t, d, torch.float16, seed=bits, strided=True)
    w, t_s, _ = codec._factor_gram(gram(x, g, per_head, backend="torch"))  # real W = V S^{-1/2}, T_S = W^-1
    ref = quantize_pack(x, w, bits, gran, sym, cg, backend="torch")
    out = quantize_pack(x, w, bits, gran, sym, cg, backend="triton")
    assert out[0].shape == ref[0].shape and out[1].shape == ref[1].shape
    assert (out[2] is None) == (ref[2] is None) == sym
    codes, ref_codes = (unpack_codes(c, bits, d).int() for c in (out[0], ref[0]))
    # T_L's products may sum in another order than torch's: a code may flip at a rounding boundary, rarely
    assert (codes - ref_codes).abs().max() <= 1 and (codes != ref_codes).float().mean() < 1e-3
    for p, r in zip(out[1:], ref[1:]):
        if r is not None:
            assert float((p.float() - r.float()).abs().max() / r.float().abs().max()) < 1e-3
    # the codes reconstruct x as well as the reference's, within the bit width's error
    t_s = t_s.reshape(*t_s.shape[:-4], g, g).double()
    t_s = t_s if per_head else t_s[:, None]
    x64 = x.double()
    sqnr = []
    for q in (QTensor(codes.to(torch.uint8), out[1], out[2], bits), QTensor(ref_codes.to(torch.uint8), *ref[1:], bits)):
        x_hat = (dequantize_kv(q, gran, cg or 32).double().reshape(b, h, -1, g) @ t_s).reshape(x.shape)
        sqnr.append(float(10 * torch.log10(x64.pow(2).sum() / (x_hat - x64).pow(2).sum())))
    assert sqnr[0] > sqnr[1] - 0.05 and sqnr[0] > {2: 1.0, 4: 10.0, 8: 30.0}[bits]


def _config(**fields):
    return dq.DecoQuantConfig(**{"bits": 4, "block_size": 64, "residual_length": 0, **fields})


CODEC_CONFIGS = [dict(preset="paper"), dict(preset="paper", bits=2), dict(preset="channel64-token"),
                 dict(group_size=32, ts_sharing="head", scale_granularity="token_head", symmetric=False)]


@pytest.mark.parametrize("fields", CODEC_CONFIGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_kernel_route_reconstructs_like_the_torch_route(fields):
    """The codec's kernel route (Gram kernel, float64 eigenproblem, quantize-pack kernel) against its torch
    route (SVD on a CPU): an equally good decomposition (the singular vectors' signs may differ)."""
    cfg = _config(**fields)
    x = kv(3, 2, 128, 64, torch.float16, seed=5)
    for kind in ("key", "value"):
        fast = codec.encode(x, cfg, kind, backend="triton")
        slow = codec.encode(x, cfg, kind, backend="torch")
        assert fast.packed and not slow.packed and not fast.unsafe.any()
        fast.codes = unpack_codes(fast.codes, cfg.bits, 64)
        err = [float((codec.decode(e, cfg, kind, x.shape) - x.float()).norm() / x.float().norm())
               for e in (fast, slow)]
        assert err[0] < 1.1 * err[1] + 1e-3, err


def test_kernel_route_through_compress():
    """compress() on the kernel route (on a CPU through the interpreter): packed codes straight from the
    kernel, decompress == fake_quantize bit for bit, NaN/Inf and degenerate rows kept exact."""
    cfg = _config(preset="paper")
    x = kv(4, 2, 64, 64, torch.float16, seed=9)
    x[1, 0, 3, 3] = float("nan")
    x[2] = 0.0  # rank deficient
    x[3, 1, 60, 0] = float("-inf")
    c = dq.compress(x, cfg, "key", backend="triton")
    assert c.exact_mask.tolist() == [False, True, True, True]
    assert c.codes.shape == (4, 2, 64, 64 * 4 // 8) and c.n_codes == 64
    y = dq.decompress(c)
    torch.testing.assert_close(y, dq.fake_quantize(x, cfg, "key", backend="triton"), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y[1:], x[1:], rtol=0, atol=0, equal_nan=True)
    assert float((y[0] - x[0]).float().norm() / x[0].float().norm()) < 0.2  # 4 bits, outlier channels


def test_backend_errors():
    x = kv(1, 1, 64, 64, torch.float16)
    with pytest.raises(ValueError, match="backend='cuda'"):
        dq.compress(x, _config(preset="paper"), "key", backend="cuda")
    with pytest.raises(ValueError, match="backend='triton'"):
        dq.compress(x, _config(bits=3), "key", backend="triton")
    with pytest.raises(ValueError, match="method='rtn'"):
        dq.compress(x, _config(method="rtn"), "key", backend="triton")
