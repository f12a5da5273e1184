"""Block compression kernels (Triton) vs the pure-torch reference, and the codec route that uses them. On a
CPU the kernels run through Triton's interpreter at small shapes; on a GPU at real ones."""

import pytest
import torch
from conftest import outlier_kv

import decoquant as dq
from decoquant.codecs import decoquant as codec
from decoquant.kernels.compress import factor, gram, quantize_pack
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


def shape_id(s) -> str:
    return "b{}-h{}-t{}-d{}-g{}-{}".format(*s[:5], "head" if s[5] else "layer")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.usefixtures("poisoned_outputs")
def test_gram_kernel_matches_reference(shape, dtype):
    b, h, t, d, g, per_head = shape
    x = kv(b, h, t, d, dtype, strided=t % 2 == 1)
    ref = gram(x, g, per_head, backend="torch")
    out = gram(x, g, per_head, backend="triton")
    assert out.shape == ref.shape == ((b, h, g, g) if per_head else (b, g, g))
    # exact products, fp32 sums (tensor cores sum fp16 products a little coarser; the decomposition stays exact
    # whatever the basis: T_S is the inverse of the W the codes come from)
    assert float((out - ref).norm() / ref.norm()) < (1e-4 if CUDA else 1e-6)


def test_gram_kernel_flags_non_finite_rows():
    x = kv(3, 2, 40, 64, torch.float16)
    x[1, 1, 7, 5] = float("nan")
    x[2, 0, 39, 0] = float("inf")
    flags, ref_flags = (torch.zeros(3, dtype=torch.int32, device=DEVICE) for _ in range(2))
    out = gram(x, 16, False, flags, backend="triton")
    ref = gram(x, 16, False, ref_flags, backend="torch")
    assert flags.tolist() == ref_flags.tolist() == [0, 1, 1]
    assert torch.equal(out[1:], ref[1:]) and torch.equal(out[1], torch.eye(16, dtype=torch.float64, device=DEVICE))
    assert float((out[0] - ref[0]).norm() / ref[0].norm()) < 1e-6


@pytest.mark.usefixtures("poisoned_outputs")
def test_factor_kernel_matches_reference():
    """W and T_S from the eigenpairs: random Gram matrices of outlier-heavy K/V (per batch row and per head),
    a zero block (rank deficient) and one whose T_S passes fp16's range: both fall back to W = T_S = I and set
    their fallback flag."""
    grams = [gram(kv(2, 3, 64, 64, torch.float32, seed=s), 16, s == 1, backend="torch").reshape(-1, 16, 16)
             for s in range(2)]
    special = torch.stack([torch.zeros(16, 16), torch.eye(16) * 1e20]).double().to(DEVICE)
    mats = torch.cat(grams + [special])  # 2 + 6 + 2 matrices: 5 batch rows of 2
    evals, evecs = torch.linalg.eigh(mats)
    flags, ref_flags = (torch.zeros(5, dtype=torch.int32, device=DEVICE) for _ in range(2))
    w, t_s = factor(evals.reshape(5, 2, 16), evecs.reshape(5, 2, 16, 16), flags, backend="triton")
    ref_w, ref_t_s = factor(evals.reshape(5, 2, 16), evecs.reshape(5, 2, 16, 16), ref_flags, backend="torch")
    assert flags.tolist() == ref_flags.tolist() == [0, 0, 0, 0, 1]
    eye = torch.eye(16, device=DEVICE)
    assert torch.equal(w[4], eye.expand(2, 16, 16)) and torch.equal(t_s[4].float(), eye.expand(2, 16, 16))
    assert w.dtype == torch.float32 and t_s.dtype == torch.float16 and w.shape == t_s.shape == (5, 2, 16, 16)
    assert float((w - ref_w).norm() / ref_w.norm()) < 1e-6
    ok = torch.isfinite(ref_t_s)
    assert torch.equal(ok, torch.isfinite(t_s)) and torch.allclose(t_s[ok].float(), ref_t_s[ok].float(), rtol=1e-3)


FORMATS = [  # scale granularity, symmetric, channel group, bits
    ("token", True, 0, 4), ("token", True, 0, 2), ("token", False, 0, 2), ("token", True, 0, 8),
    ("token_head", False, 0, 4), ("token_head", True, 0, 2),
    ("channel", False, 32, 2), ("channel", False, 16, 4), ("channel", True, 32, 8),
    ("token", True, 0, 3), ("token_head", False, 0, 3), ("channel", False, 32, 3),  # runs of 8 codes in 3 bytes
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "{}-{}-cg{}-{}bit".format(f[0], "sym" if f[1] else "asym",
                                                                                 *f[2:]))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.usefixtures("poisoned_outputs")
def test_quantize_pack_kernel_matches_reference(shape, fmt):
    b, h, t, d, g, per_head = shape
    gran, sym, cg, bits = fmt
    if gran == "channel" and t % cg:
        t = t - t % cg
    x = kv(b, h, t, d, torch.float16, seed=bits, strided=True)
    w, t_s, _, _ = codec._factor_gram(gram(x, g, per_head, backend="torch"))  # real W = V S^{-1/2}, T_S = W^-1
    flags = torch.zeros(b, dtype=torch.int32, device=DEVICE)
    ref = quantize_pack(x, w, bits, gran, sym, cg, backend="torch")
    out = quantize_pack(x, w, bits, gran, sym, cg, flags, backend="triton")
    assert not flags.any()
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
    assert sqnr[0] > sqnr[1] - 0.05
    # and a floor (not at 2 bits: 4 levels per token across 32 heads of outlier-heavy data fall below 0 dB)
    assert bits == 2 or sqnr[0] > {3: 5.0, 4: 10.0, 8: 30.0}[bits]


@pytest.mark.parametrize("bits,cg", [(2, 64), (4, 32), (2, 16)])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.usefixtures("poisoned_outputs")
def test_quantize_pack_kernel_range_search_matches_reference(shape, bits, cg):
    """clip: each per-channel key group's range searched as quant.quantize does. The kernel sums the candidates'
    errors in another order, so a near tie may pick the neighbouring ratio: rare, and never a worse block."""
    b, h, t, d, g, per_head = shape
    t = max(cg, t - t % cg)
    x = kv(b, h, t, d, torch.bfloat16, seed=bits + 10)
    w, t_s, _, _ = codec._factor_gram(gram(x, g, per_head, backend="torch"))
    ref = quantize_pack(x, w, bits, "channel", False, cg, backend="torch", clip=True)
    plain = quantize_pack(x, w, bits, "channel", False, cg, backend="triton")
    out = quantize_pack(x, w, bits, "channel", False, cg, backend="triton", clip=True)
    same_range = (out[2] == ref[2]) & (out[1] == ref[1])
    assert same_range.float().mean() > 0.98
    codes, ref_codes = (unpack_codes(c, bits, d).int() for c in (out[0], ref[0]))
    assert (codes != ref_codes).float().mean() < 0.02
    t_s = t_s.reshape(*t_s.shape[:-4], g, g).double()
    t_s = t_s if per_head else t_s[:, None]
    x64 = x.double()

    def sqnr(q):
        x_hat = (dequantize_kv(q, "channel", cg).double().reshape(b, h, -1, g) @ t_s).reshape(x.shape)
        return float(10 * torch.log10(x64.pow(2).sum() / (x_hat - x64).pow(2).sum()))

    unpack = lambda r: QTensor(unpack_codes(r[0], bits, d), r[1], r[2], bits)  # noqa: E731
    s_out, s_ref, s_plain = sqnr(unpack(out)), sqnr(unpack(ref)), sqnr(unpack(plain))
    assert s_out > s_ref - 0.05 and s_out > s_plain + {2: 0.5, 4: 0.05}[bits], (s_out, s_ref, s_plain)
    with pytest.raises(ValueError, match="clip"):
        quantize_pack(x, w, bits, "token", False, backend="triton", clip=True)


def test_quantize_pack_kernel_flags_overflowing_scales():
    x = kv(3, 2, 32, 64, torch.float32)
    x[1, 0, 5] *= 1e9  # T_L past fp16: an infinite scale
    w = torch.eye(16, device=DEVICE).expand(3, 16, 16)
    for gran, cg in (("token", 0), ("token_head", 0), ("channel", 16)):
        flags = torch.zeros(3, dtype=torch.int32, device=DEVICE)
        quantize_pack(x, w, 4, gran, False, cg, flags, backend="triton")
        assert flags.tolist() == [0, 1, 0], gran


def _config(**fields):
    return dq.DecoQuantConfig(**{"bits": 4, "block_size": 64, "residual_length": 0, **fields})


CODEC_CONFIGS = [dict(preset="paper"), dict(preset="paper", bits=2), dict(preset="channel64-token"),
                 dict(preset="channel64-clip", bits=2),
                 dict(group_size=32, ts_sharing="head", scale_granularity="token_head", symmetric=False)]


@pytest.mark.parametrize("fields", CODEC_CONFIGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_kernel_route_reconstructs_like_the_torch_route(fields):
    """The codec's kernel route (Gram kernel, float64 eigenproblem, quantize-pack kernel) against its torch
    route (SVD on a CPU): an equally good decomposition (the singular vectors' signs may differ)."""
    cfg = _config(**fields)
    x = kv(3, 2, 128, 64, torch.float16, seed=5)
    for kind in ("key", "value"):
        spec = cfg.spec(kind)
        assert codec.CODEC.uses_kernels(x, spec, "triton") and not codec.CODEC.uses_kernels(x, spec, "torch")
        fast = codec.encode_kernels([x], [spec])[0]
        slow = codec.encode(x, spec)
        assert fast.packed and not slow.packed and not fast.unsafe.any()
        fast.codes = unpack_codes(fast.codes, cfg.bits, 64)
        err = [float((codec.decode(e, spec, x.shape) - x.float()).norm() / x.float().norm())
               for e in (fast, slow)]
        assert err[0] < 1.1 * err[1] + 1e-3, err


@pytest.mark.usefixtures("poisoned_outputs")
def test_kernel_route_through_compress():
    """compress() on the kernel route (on a CPU through the interpreter): packed codes straight from the
    kernel, decompress == fake_quantize bit for bit, NaN/Inf rows kept exact, a degenerate row through the
    T_S = I fallback (as the torch route)."""
    cfg = _config(preset="paper")
    x = kv(4, 2, 64, 64, torch.float16, seed=9)
    x[1, 0, 3, 3] = float("nan")
    x[2] = 0.0  # rank deficient
    x[3, 1, 60, 0] = float("-inf")
    c = dq.compress(x, cfg, "key", backend="triton")
    assert c.exact_mask.tolist() == [False, True, False, True]
    assert c.fallback_mask.tolist() == [False, False, True, False]
    assert c.codes.shape == (4, 2, 64, 64 * 4 // 8) and c.n_codes == 64
    y = dq.decompress(c)
    torch.testing.assert_close(y, dq.fake_quantize(x, cfg, "key", backend="triton"), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y[[1, 3]], x[[1, 3]], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(y[2], x[2])  # zeros: T_L = 0 under the identity fallback
    assert float((y[0] - x[0]).float().norm() / x[0].float().norm()) < 0.2  # 4 bits, outlier channels


@pytest.mark.parametrize("fields", [dict(preset="paper"), dict(preset="channel64-token"),
                                    dict(group_size=32, ts_sharing="head", scale_granularity="token_head")],
                         ids=["paper", "channel64-token", "g32-head"])
def test_compress_kv_equals_two_compress_calls(fields):
    """compress_kv's shared eigenproblem batch and single sync change nothing: bit-identical blocks, each
    tensor's own exact rows."""
    cfg = _config(**fields)
    k, v = kv(3, 2, 64, 64, torch.float16, seed=3), kv(3, 2, 64, 64, torch.float16, seed=4)
    v[2, 1, 0, 0] = float("nan")
    ck, cv = dq.compress_kv(k, v, cfg, backend="triton")
    for c, x, kind in ((ck, k, "key"), (cv, v, "value")):
        ref = dq.compress(x, cfg, kind, backend="triton")
        assert torch.equal(c.codes, ref.codes) and torch.equal(c.exact_mask, ref.exact_mask)
        assert all(torch.equal(c.params[n], ref.params[n]) for n in ref.params)
    assert ck.num_exact == 0 and cv.exact_mask.tolist() == [False, False, True]
    torch.testing.assert_close(dq.decompress(cv)[2], v[2], rtol=0, atol=0, equal_nan=True)


def test_backend_errors():
    x = kv(1, 1, 64, 64, torch.float16)
    with pytest.raises(ValueError, match="backend='cuda'"):
        dq.compress(x, _config(preset="paper"), "key", backend="cuda")
    with pytest.raises(ValueError, match="method='rtn'"):
        dq.compress(x, _config(method="rtn"), "key", backend="triton")
    with pytest.raises(ValueError, match="backend='triton'"):  # 8 chunk rows per head: fewer than g = 16
        dq.compress(kv(1, 2, 1, 128, torch.float16), _config(ts_sharing="head"), "key", backend="triton")
    with pytest.raises(ValueError, match="backend='gpu'"):
        dq.compress_kv(x, x, _config(preset="paper"), backend="gpu")

