"""TurboQuant's outlier split (`outlier_channels`): what it stores, what it costs in bits, and that it pays."""

import pytest
import torch

import decoquant as dq
from conftest import outlier_kv, tiny_llama
from decoquant.integrations.transformers import cache_kwargs


def tq(bits, outliers=0):
    return dq.DecoQuantConfig(method="turboquant", bits=bits, outlier_channels=outliers)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bits", [2, 3])
def test_outlier_split_lowers_the_error_and_counts_its_bits(bits):
    x = outlier_kv(batch=2, heads=3, tokens=96, head_dim=64)
    b, h, t, d = x.shape
    n = 16
    plain, split = dq.compress(x, tq(bits), "key"), dq.compress(x, tq(bits, n), "key")
    e_plain, e_split = rel(dq.decompress(plain), x), rel(dq.decompress(split), x)
    e_wider = rel(dq.decompress(dq.compress(x, tq(bits + 1), "key")), x)
    # outlier_kv's outlier channels go to the wider instance: better than the plain codec at the same bits
    assert e_split < 0.75 * e_plain and e_split < 1.15 * e_wider, (e_plain, e_split, e_wider)
    # stored bits: (d - n) codes at b bits, n at b + 1, two fp16 norms per vector, a d-bit mask per head (and
    # the byte per batch row that says whether it is kept exact)
    rows = 8 * b / x.numel()
    want = ((d - n) * bits + n * (bits + 1) + 32) / d + 1 / t + rows
    assert split.effective_bits == pytest.approx(want, rel=1e-9)
    assert plain.effective_bits == pytest.approx(bits + 16 / d + rows, rel=1e-9)


def test_outlier_channels_are_the_largest_rms_channels_and_decode_bit_for_bit():
    x = outlier_kv(batch=2, heads=2, tokens=40, head_dim=64, dtype=torch.float16)
    c = dq.compress(x, tq(2, 8), "value")
    assert torch.equal(dq.decompress(c), dq.fake_quantize(x, tq(2, 8), "value"))
    mask = c.params["outlier_mask"]
    bits = ((mask[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(2, 2, 1, 64).bool()
    top = x.float().pow(2).mean(2, keepdim=True).topk(8, dim=-1).indices
    assert bits.sum(-1).eq(8).all() and bits.gather(-1, top).all()
    assert bits[..., 3].all()  # outlier_kv's x25 channel


def test_outlier_channels_config_errors_name_the_field():
    with pytest.raises(ValueError, match="outlier_channels.*method='turboquant'"):
        dq.DecoQuantConfig(method="kivi", outlier_channels=32)
    with pytest.raises(ValueError, match="bits=4 .*allowed values: 2, 3"):
        tq(4, 32)
    with pytest.raises(ValueError, match="outlier_channels=-1 must be an integer >= 0"):
        tq(2, -1)
    assert tq(2, 32).label() == "turboquant-o32-2b"
    with pytest.raises(ValueError, match=r"outlier_channels=64 must lie in \[2, head_dim - 2\]"):
        dq.compress(outlier_kv(head_dim=64), tq(2, 64), "key")


def test_outlier_split_through_the_cache_generates_like_fp16_at_3_bits():
    model = tiny_llama(kv_heads=2)
    ids = torch.randint(0, 512, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
        cache = dq.DecoQuantCache(tq(3, 16).replace(block_size=64, residual_length=64), model.config)
        out = model(ids, **cache_kwargs(cache), use_cache=True).logits[:, -1]
        nxt = model(ids[:, -1:] * 0 + 7, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    assert cache.layers[0].get_seq_length() == 301 and torch.isfinite(nxt).all()
    assert rel(out, ref) < 1e-6  # the prefill attends its own exact keys
