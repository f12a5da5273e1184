import math

import pytest
import torch

import decoquant as dq
from conftest import outlier_kv

# Upper bounds on the relative Frobenius error on `outlier_kv` per bit width (2, 3, 4, 8):
# measured values plus ~20% headroom, so a regression in any codec fails.
MAX_REL_ERROR = {
    ("rtn", "key"): (0.71, 0.40, 0.32, 0.030),
    ("decoquant", "key"): (0.67, 0.33, 0.19, 0.013),
    ("kivi", "key"): (0.43, 0.19, 0.086, 0.0051),
    ("kivi", "value"): (0.59, 0.30, 0.14, 0.0078),
    ("rotation", "key"): (0.40, 0.17, 0.078, 0.0046),
    ("turboquant", "key"): (0.42, 0.22, 0.12, 0.0125),
}


def cfg(method, bits, **kw):
    if method == "decoquant" and not kw:
        kw = {"preset": "paper"}
    return dq.DecoQuantConfig(method=method, bits=bits, **kw)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method,kind", list(MAX_REL_ERROR))
def test_error_thresholds_per_bit_width(method, kind):
    x = outlier_kv()
    errors = [rel(dq.decompress(dq.compress(x, cfg(method, b), kind)), x) for b in (2, 3, 4, 8)]
    assert all(e <= m for e, m in zip(errors, MAX_REL_ERROR[(method, kind)])), errors
    assert errors == sorted(errors, reverse=True)


def test_decoquant_beats_per_token_rtn_on_outlier_channels():
    x = outlier_kv(seed=3)
    for bits in (4, 8):
        assert rel(dq.fake_quantize(x, cfg("decoquant", bits)), x) < 0.8 * rel(dq.fake_quantize(x, cfg("rtn", bits)), x)


@pytest.mark.parametrize("method", ["rtn", "kivi", "rotation", "turboquant", "decoquant"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_packed_path_decodes_to_fake_quant_bit_for_bit(method, dtype):
    x = outlier_kv(batch=3, heads=2, tokens=37, head_dim=64, dtype=dtype)
    for bits in (2, 3, 4, 8):
        for kind in ("key", "value"):
            c = dq.compress(x, cfg(method, bits), kind)
            y = dq.decompress(c)
            assert y.shape == x.shape and y.dtype == dtype
            assert torch.equal(y, dq.fake_quantize(x, cfg(method, bits), kind))


DESIGN_SPACE = [
    dict(ts_sharing="head"),
    dict(scale_granularity="token_head"),
    dict(scale_granularity="channel", quant_group_size=16),
    dict(scale_granularity="group", quant_group_size=32),
    dict(symmetric=False),
    dict(group_size=8),
    dict(group_size=32),
    dict(num_sites=3),
    dict(num_sites=4),
]


@pytest.mark.parametrize("fields", DESIGN_SPACE, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_decoquant_design_space(fields):
    x = outlier_kv(tokens=100)
    c = dq.compress(x, cfg("decoquant", 4, **fields), "key")
    y = dq.decompress(c)
    assert torch.equal(y, dq.fake_quantize(x, cfg("decoquant", 4, **fields), "key"))
    assert rel(y, x) < 0.2
    assert c.num_exact == 0


def test_more_sites_refactor_only_the_small_tensor():
    x = outlier_kv(tokens=64)
    two = rel(dq.fake_quantize(x, cfg("decoquant", 4, num_sites=2)), x)
    for n in (3, 4):
        c = dq.compress(x, cfg("decoquant", 4, num_sites=n), "key")
        assert sorted(k for k in c.params if k.startswith("site")) == [f"site{k}" for k in range(2, n + 1)]
        assert abs(rel(dq.decompress(c), x) - two) < 0.01


def test_channel_layout_is_fake_quant_only():
    x = outlier_kv(batch=1, tokens=50)
    c = cfg("decoquant", 4, layout="channel")
    y = dq.fake_quantize(x, c, "key")
    assert rel(y, x) < 0.1
    with pytest.raises(ValueError, match="fake_quantize"):
        dq.compress(x, c, "key")


def test_nbytes_counts_every_stored_tensor():
    b, h, t, d = 2, 3, 256, 64
    x = outlier_kv(b, h, t, d)
    c = dq.compress(x, cfg("decoquant", 4), "key")
    codes = b * h * t * d * 4 // 8
    scales = b * t * 2  # one fp16 scale per token
    t_s = b * 16 * 16 * 2  # one fp16 16x16 T_S per batch row
    assert c.nbytes == codes + scales + t_s + b  # + the bool exact-row mask
    assert c.effective_bits == pytest.approx(8 * c.nbytes / x.numel())
    assert c.nbytes / c.fp16_nbytes <= 0.27
    k = dq.compress(x, cfg("kivi", 2, quant_group_size=32), "key")
    assert k.nbytes == b * h * t * d * 2 // 8 + 2 * (b * h * math.ceil(t / 32) * d * 2) + b
    none = dq.compress(x.half(), cfg("none", 4), "key")
    assert none.nbytes == x.numel() * 2 + b and torch.equal(dq.decompress(none), x.half())


@pytest.mark.parametrize("method", ["rtn", "kivi", "rotation", "turboquant", "decoquant"])
def test_nan_inf_rows_stay_exact_and_degenerate_rows_compress(method):
    x = outlier_kv(batch=5, tokens=32)
    x[1, 0, 3, 2] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    x[3] = 0.0
    x[4] = 1.25  # constant
    c = dq.compress(x, cfg(method, 4), "value")
    y = dq.decompress(c)
    assert torch.isfinite(y[[0, 3, 4]]).all()
    assert torch.isnan(y[1, 0, 3, 2]) and torch.isinf(y[2, 1, 0, 0])  # kept exactly, not spread
    assert torch.equal(torch.nan_to_num(y[1:3]), torch.nan_to_num(x[1:3]))
    assert torch.isfinite(y[1]).sum() == x[1].numel() - 1
    assert torch.equal(y[3], x[3]) and rel(y[4], x[4]) < 0.2  # constant rows: finite, close
    assert c.exact_mask[1] and c.exact_mask[2] and not c.exact_mask[0]
    assert not c.exact_mask[3] and not c.exact_mask[4]  # degenerate but finite: compressed, not full width
    if method == "decoquant":  # rank deficient: the T_S = I fallback (plain RTN in the same format), reported
        assert c.fallback_mask.tolist() == [False, False, False, True, True]
        assert c.num_fallback == 2 and "fallback_rows=2" in repr(c)
    assert rel(y[0], x[0]) < 0.35


@pytest.mark.parametrize("bits,max_err", [(8, 0.01), (4, 0.2), (2, 0.85)])
def test_rank_deficient_block_falls_back_to_rtn_in_the_same_format(bits, max_err):
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(1, 2 * 40 * 4, 4, generator=gen) @ torch.randn(4, 16, generator=gen)).reshape(1, 2, 40, 64)
    c = dq.compress(x, cfg("decoquant", bits), "key")  # (its chunk matrix has rank 4)
    rtn = dq.fake_quantize(x, cfg("rtn", bits), "key")  # one symmetric scale per token: the paper's T_L scales
    assert c.num_exact == 0 and c.num_fallback == 1 and c.effective_bits < bits + 1
    assert torch.equal(c.params["site2"].reshape(16, 16), torch.eye(16, dtype=torch.float16))
    y = dq.decompress(c)
    assert torch.isfinite(y).all() and rel(y, x) < max_err
    torch.testing.assert_close(y, rtn)  # T_L = M, quantized as RTN quantizes x


def test_repeated_token_blocks_are_compressed_not_kept_at_full_width():
    tok = torch.randn(1, 3, 1, 64, generator=torch.Generator().manual_seed(0)) * 4
    x = tok.expand(2, 3, 128, 64).contiguous()  # one token repeated: rank deficient
    for preset in ("paper", "channel64-token"):
        c = dq.compress(x, dq.DecoQuantConfig(preset=preset, bits=4), "value")
        assert c.num_exact == 0 and c.num_fallback == 2 and c.nbytes < 0.35 * c.fp16_nbytes
        assert rel(dq.decompress(c), x) < 0.2  # 4-bit RTN of the token (paper: 0.15, per-token absmax)


@pytest.mark.parametrize("rows", [40 * 8, 3 * 512, 4 * 512 + 16])
def test_gram_route_equals_the_svd_route(rows):
    """The Gram/eigh route the GPU takes (checked here in float64 on the CPU): the same T_L @ T_S, the
    same singular values, the same rank-deficiency flags as SVD + the T_L column norms; partial Gram
    products (rows a multiple of 512) or one product."""
    from decoquant.codecs.decoquant import _rank_deficient, _two_sites_gram
    from decoquant.mpo import mpo_decompose

    gen = torch.Generator().manual_seed(rows)
    m = torch.randn(3, rows, 16, generator=gen, dtype=torch.float64)
    m[..., 3] *= 30
    m[1] = torch.randn(rows, 4, generator=gen, dtype=torch.float64) @ torch.randn(4, 16, generator=gen,
                                                                                    dtype=torch.float64)
    t_l, t_s, bad, fallback = _two_sites_gram(m)
    assert torch.allclose(t_l @ t_s.reshape(3, 16, 16), m, atol=1e-8)
    sites = mpo_decompose(m, (rows, 1), (1, 16))
    ref_t_l = sites[0].reshape(3, rows, -1)
    assert torch.allclose(t_l[[0, 2]].pow(2).sum(1), ref_t_l[[0, 2]].pow(2).sum(1), rtol=1e-9)
    assert fallback.tolist() == _rank_deficient(ref_t_l).tolist() == [False, True, False]
    assert not bad.any() and torch.equal(t_l[1], m[1])  # the fallback: T_L = M, T_S = I


def test_single_token_block():
    x = outlier_kv(batch=1, heads=1, tokens=1)
    y = dq.decompress(dq.compress(x, cfg("decoquant", 4), "key"))
    assert torch.isfinite(y).all() and rel(y, x) < 0.2


def test_bad_tensors_and_kinds():
    c = cfg("decoquant", 4)
    with pytest.raises(ValueError, match="4 dims"):
        dq.compress(torch.randn(3, 16, 64), c)
    with pytest.raises(ValueError, match="float tensor"):
        dq.compress(torch.ones(1, 1, 4, 64, dtype=torch.int32), c)
    with pytest.raises(ValueError, match="kind='query'"):
        dq.compress(torch.randn(1, 1, 4, 64), c, kind="query")
    with pytest.raises(ValueError, match="group_size=16.*head_dim=24"):
        dq.compress(torch.randn(1, 1, 4, 24), c)
    with pytest.raises(ValueError, match="power-of-two"):
        dq.compress(torch.randn(1, 1, 4, 24), cfg("rotation", 4))
    with pytest.raises(ValueError, match="DecoQuantConfig"):
        dq.compress(torch.randn(1, 1, 4, 64), {"method": "rtn"})


def test_value_scale_granularity_splits_keys_and_values():
    """Keys with per-channel scales and values with per-token-and-head scales, as KIVI splits them."""
    x = outlier_kv(2, 3, 96, 32, seed=4)
    split = dq.DecoQuantConfig(method="decoquant", bits=4, scale_granularity="channel",
                               value_scale_granularity="token_head", symmetric=False, quant_group_size=96)
    keys_cfg = split.replace(value_scale_granularity=None)
    values_cfg = split.replace(scale_granularity="token_head", value_scale_granularity=None)
    torch.testing.assert_close(dq.decompress(dq.compress(x, split, "key")), dq.fake_quantize(x, keys_cfg, "key"))
    torch.testing.assert_close(dq.decompress(dq.compress(x, split, "value")), dq.fake_quantize(x, values_cfg, "value"))
    assert dq.compress(x, split, "value").params["scale"].shape != dq.compress(x, split, "key").params["scale"].shape
    assert split.label() == "decoquant-g16-channel-vtoken_head-4b"
    with pytest.raises(ValueError, match="value_scale_granularity='tokens'"):
        dq.DecoQuantConfig(value_scale_granularity="tokens")
    with pytest.raises(ValueError, match="pins value_scale_granularity=None"):
        dq.DecoQuantConfig(method="decoquant", preset="paper", value_scale_granularity="channel")


def test_kv_split_preset_pins_its_recipe():
    c = dq.DecoQuantConfig(method="decoquant", bits=2, preset="kv-split", block_size=64)
    assert (c.granularity("key"), c.granularity("value"), c.is_symmetric, c.quant_group_size, c.ts_sharing) == (
        "channel", "token_head", False, 64, "layer")
    assert c.label() == "decoquant-kv-split-2b"
    with pytest.raises(ValueError, match="preset='kv-split' applies to method='decoquant'"):
        dq.DecoQuantConfig(method="kivi", preset="kv-split")
    x = outlier_kv(1, 2, 64, 32, seed=2)
    for kind in ("key", "value"):
        rel = float((dq.decompress(dq.compress(x, c.replace(bits=4), kind)) - x).norm() / x.norm())
        assert rel < 0.1


def test_turboquant_codebook_is_lloyd_max_of_the_rotated_coordinate():
    """Data-free: the levels depend on (head_dim, bits) only; in high dimension a rotated unit vector's
    coordinate is Gaussian with variance 1/d, whose Lloyd-Max levels are known (1 bit: sqrt(2/pi); 2 bits:
    0.4528 and 1.5104 standard deviations), and the MSE of 4-bit codes on Gaussian vectors is the
    Lloyd-Max distortion 0.009497 (relative error 0.0975)."""
    from decoquant.codecs.turboquant import codebook

    d = 4096
    assert codebook(d, 1)[0][1].item() * d ** 0.5 == pytest.approx((2 / math.pi) ** 0.5, rel=2e-3)
    assert (codebook(d, 2)[0][2:] * d ** 0.5).tolist() == pytest.approx([0.4528, 1.5104], rel=3e-3)
    levels, bounds = codebook(64, 3)
    assert torch.equal(levels, -levels.flip(0)) and torch.all(levels[:-1] < bounds) and torch.all(bounds < levels[1:])
    g = torch.randn(4, 2, 512, 128, generator=torch.Generator().manual_seed(0))
    c = dq.compress(g, cfg("turboquant", 4), "key")
    assert rel(dq.decompress(c), g) == pytest.approx(0.0975, rel=0.05)
    assert c.effective_bits == pytest.approx(4 + 16 / 128, abs=1e-2)  # codes + one fp16 norm per vector
