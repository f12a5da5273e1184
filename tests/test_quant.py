import torch

from decoquant.quant import dequantize, dequantize_kv, quantize, quantize_kv


def sqnr_db(x_hat, x):
    return float(10 * torch.log10(x.pow(2).sum() / (x_hat - x).pow(2).sum()))


def test_paper_symmetric_quantizer_levels():
    x = torch.linspace(-1, 1, 2001).reshape(1, -1)
    for bits, qmax in ((2, 1), (3, 3), (4, 7), (8, 127)):
        q = quantize(x, bits, (-1,), symmetric=True)
        levels = (q.codes.long() - qmax).unique()
        assert levels.min() == -qmax and levels.max() == qmax  # 2 bits: ternary {-1, 0, 1}
        assert len(levels) == 2 * qmax + 1
        assert float(q.scale) == float(torch.tensor(1.0 / qmax, dtype=torch.float16))


def test_round_half_to_even_and_scale_floor():
    x = torch.tensor([[2.5, 1.5, -0.5, 7.0]])
    q = quantize(x, 4, (-1,), symmetric=True)  # scale = 1
    assert (q.codes.long() - 7).tolist() == [[2, 2, 0, 7]]
    z = quantize(torch.zeros(1, 4), 4, (-1,), symmetric=True)
    assert float(z.scale) > 0 and torch.equal(dequantize(z), torch.zeros(1, 4))


def test_asymmetric_uses_all_levels():
    x = torch.linspace(-0.3, 2.0, 64).reshape(1, -1)
    q = quantize(x, 2, (-1,), symmetric=False)
    assert q.codes.unique().tolist() == [0, 1, 2, 3]
    assert sqnr_db(dequantize(q), x) > 9


def test_granularities_error_drops_with_bits():
    x = torch.randn(2, 3, 70, 64)
    x[..., 5] *= 30
    for gran, group, symmetric in (("token_head", 32, True), ("channel", 32, False), ("group", 16, False)):
        s = [sqnr_db(dequantize_kv(quantize_kv(x, b, gran, symmetric, group), gran, group), x) for b in (2, 3, 4, 8)]
        assert s == sorted(s) and s[-1] > 30, (gran, s)


def test_quantize_kv_shapes_and_partial_groups():
    x = torch.randn(2, 3, 70, 64)
    expect = {"token": (2, 1, 70, 1), "token_head": (2, 3, 70, 1),
              "channel": (2, 3, 3, 1, 64), "group": (2, 3, 70, 2, 1)}
    for gran, shape in expect.items():
        q = quantize_kv(x, 4, gran, symmetric=False, group=32)
        assert q.codes.shape == x.shape and tuple(q.scale.shape) == shape
        assert sqnr_db(dequantize_kv(q, gran, 32), x) > 15
