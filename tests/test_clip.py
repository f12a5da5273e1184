"""The key range search (`clip_keys`, preset "channel64-clip"): the quantizer's search, the config's rules, and that
the stored blocks are the ones the fused kernels already read."""

import pytest
import torch

import decoquant as dq
from conftest import outlier_kv
from decoquant.format import KVFormat
from decoquant.quant import CLIP_RATIOS, dequantize, quantize


def sq_err(q, x, dims):
    return (dequantize(q) - x.float()).pow(2).sum(dims, keepdim=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_search_never_loses_to_min_max_and_wins_at_low_bits(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 4, 64, 32, generator=gen)
    x[:, :, 5] *= 6  # one token far out in every group
    plain, clip = quantize(x, bits, (2,), False), quantize(x, bits, (2,), False, clip=True)
    e_plain, e_clip = sq_err(plain, x, (2,)), sq_err(clip, x, (2,))
    assert (e_clip <= e_plain).all()  # the search includes the min/max range itself (ratio 1, first)
    if bits <= 3:
        assert e_clip.sum() < 0.8 * e_plain.sum()
    # the chosen range is one of the candidates: zero = lo + f (hi - lo) in fp16, for one f per group
    lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
    fs = torch.tensor([(1 - r) / 2 for r in CLIP_RATIOS])
    zeros = (lo[None] + fs.view(-1, 1, 1, 1, 1) * (hi - lo)[None]).half()
    assert (zeros == clip.zero[None]).any(0).all()


def test_symmetric_quantizer_ignores_nothing_it_was_not_asked():
    x = torch.randn(3, 64)
    with_clip, without = quantize(x, 2, (1,), True, clip=True), quantize(x, 2, (1,), True)
    assert torch.equal(with_clip.codes, without.codes) and torch.equal(with_clip.scale, without.scale)


@pytest.mark.parametrize("method,fields", [("decoquant", {"preset": "channel64-clip"}),
                                           ("kivi", {"clip_keys": True})])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clipped_keys_pack_and_decode_bit_for_bit_and_values_are_untouched(method, fields, bits):
    x = outlier_kv(batch=2, heads=2, tokens=128, head_dim=64)
    cfg = dq.DecoQuantConfig(method=method, bits=bits, **fields)
    base = cfg.replace(preset="channel64-token") if method == "decoquant" else cfg.replace(clip_keys=False)
    k = dq.compress(x, cfg, "key")
    assert torch.equal(dq.decompress(k), dq.fake_quantize(x, cfg, "key"))
    rel = lambda c: float((dq.decompress(c) - x).norm() / x.norm())  # noqa: E731
    assert rel(k) <= rel(dq.compress(x, base, "key")) * 1.001
    v, v_base = dq.compress(x, cfg, "value"), dq.compress(x, base, "value")
    assert torch.equal(v.codes, v_base.codes)  # only keys are searched
    assert k.nbytes == dq.compress(x, base, "key").nbytes  # same stored format


def test_clip_keys_config_rules_name_the_field():
    with pytest.raises(ValueError, match="clip_keys applies to method='decoquant' or 'kivi'"):
        dq.DecoQuantConfig(method="rotation", clip_keys=True)
    with pytest.raises(ValueError, match="clip_keys searches the range of asymmetric"):
        dq.DecoQuantConfig(method="decoquant", clip_keys=True)  # symmetric by default
    with pytest.raises(ValueError, match="pins clip_keys=False"):
        dq.DecoQuantConfig(preset="channel64-token", clip_keys=True)
    with pytest.raises(ValueError, match="clip_keys=1 is not supported"):
        dq.DecoQuantConfig(method="kivi", clip_keys=1)
    c = dq.DecoQuantConfig(preset="channel64-clip", bits=2)
    assert c.clip_keys and c.spec("key").clip and not c.spec("value").clip
    assert c.label() == "decoquant-channel64-clip-2b"
    assert dq.DecoQuantConfig(preset="kv-split", clip_keys=True).label() == "decoquant-kv-split-clip-4b"
    assert dq.DecoQuantConfig(method="kivi", clip_keys=True, bits=2).label() == "kivi-g32-clip-2b"
    fmt = KVFormat.of(c)
    assert fmt.fused  # the decode kernels read it
    assert fmt.compress_problem("key", (1, 2, 128, 64), torch.float16) is None  # the kernels search too
    assert fmt.compress_problem("value", (1, 2, 128, 64), torch.float16) is None
    per_token = KVFormat.of(dq.DecoQuantConfig(symmetric=False, scale_granularity="token", clip_keys=True))
    assert "clip_keys" in per_token.compress_problem("key", (1, 2, 128, 64), torch.float16)


@pytest.mark.usefixtures("poisoned_outputs")
def test_fused_decode_reads_clipped_keys_as_the_reference_does():
    pytest.importorskip("triton")
    from decoquant.kernels.attention import decode_attention
    from kernel_cases import DEVICE, packed, rel, tolerance

    k, v = packed(2, 2, 256, 64, 2, 128, seed=7, preset="channel64-clip")
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    kv_start, kv_len = torch.tensor([3, 0], device=DEVICE), torch.tensor([256, 131], device=DEVICE)
    ref = decode_attention(q, k, v, 0.125, kv_start, kv_len, backend="torch")
    out = decode_attention(q, k, v, 0.125, kv_start, kv_len, backend="triton", num_splits=2)
    assert torch.isfinite(out).all() and rel(out, ref) < tolerance(True) * 2.5
