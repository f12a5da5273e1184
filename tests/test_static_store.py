"""Static stores (fixed addresses, device-side bounds): the same steps as a dynamic store. On the CPU the
static steps run eagerly through the kernels' torch reference."""

import pytest
import torch

from conftest import outlier_kv
from decoquant.cache import CompressedKVStore, FusedKV
from decoquant.config import DecoQuantConfig
from decoquant.kernels.attention import decode_attention
from decoquant.kernels.reference import attention_reference

CONFIGS = {"paper": dict(preset="paper", block_size=32, residual_length=16),
           "channel64-token-sinks": dict(preset="channel64-token", block_size=64, residual_length=16, sink_tokens=3)}


def _attend(q, step):
    """Attention over what one `append` returned: (FusedKV, FusedKV) or (keys, values)."""
    out = step[0]
    if isinstance(out, FusedKV):
        return decode_attention(q, out.keys, out.values, 0.125, kv_start=out.kv_start, kv_len=out.kv_len,
                                window_k=out.window_keys, window_v=out.window_values, window_valid=out.window_valid,
                                exact=out.exact)
    return attention_reference(q, step[0], step[1], 0.125)


@pytest.mark.parametrize("prefill", [20, 100], ids=["no-block-yet", "blocks"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_store_serves_what_the_dynamic_store_serves(name, prefill):
    """Step by step over several block compressions, attention over the static store's fixed view equals
    attention over the ordinary fused store; the blocks and the window end up the same."""
    config = DecoQuantConfig(**CONFIGS[name])
    x = outlier_kv(batch=2, heads=2, tokens=400)
    dynamic, static = CompressedKVStore(config, fused=True), CompressedKVStore(config, fused=True)
    for store in (dynamic, static):
        store.append(x[..., :prefill, :], x[..., :prefill, :] * 0.5)
    dynamic.memory(), static.memory()  # reads every block: their views exist before the buffers are reserved
    static.make_static(400 - prefill)
    if prefill == 100:  # no block keeps a view of the buffers before the reservation (nor keeps them alive)
        lo = static.storage.buffers[0].codes.data_ptr()
        assert all(lo <= b.keys.codes.data_ptr() < lo + static.storage.buffers[0].codes.nbytes for b in static.blocks)
    view = None
    q = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(0))
    for t in range(prefill, 400):
        want = _attend(q, dynamic.append(x[..., t:t + 1, :], x[..., t:t + 1, :] * 0.5))
        step = static.append(x[..., t:t + 1, :], x[..., t:t + 1, :] * 0.5)
        assert step[0].static and (view is None or step[0] is view)  # the same tensors every step
        view = step[0]
        got = _attend(q, step)  # before advance(): the captured step reads the view before the host moves on
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), t
        assert static.advance()
    assert static.length == dynamic.length == 400
    assert len(static.blocks) == len(dynamic.blocks) == static.storage.buffers[0].blocks >= 5
    for a, b in zip(static.blocks, dynamic.blocks):
        assert all(torch.equal(u, w) for u, w in zip(a.decode(), b.decode()))
    static.leave_static()
    assert torch.equal(static.window_keys, dynamic.window_keys)
    assert (static.sink_keys is None) == (dynamic.sink_keys is None)


def test_static_store_leaves_static_for_a_block_that_stays_exact():
    """A token with Inf makes its block keep exact rows; the static view's fixed tensors cannot take them in, so
    advance() says so and the store goes on as an ordinary fused one, with nothing lost."""
    config = DecoQuantConfig(**CONFIGS["paper"])
    x = outlier_kv(batch=2, heads=2, tokens=200)
    x[1, 0, 70, 4] = float("inf")
    dynamic, static = CompressedKVStore(config, fused=True), CompressedKVStore(config, fused=True)
    for store in (dynamic, static):
        store.append(x[..., :60, :], x[..., :60, :])
    static.make_static(140)
    left = None
    for t in range(60, 200):
        want = dynamic.append(x[..., t:t + 1, :], x[..., t:t + 1, :])
        got = static.append(x[..., t:t + 1, :], x[..., t:t + 1, :])
        if left is not None:  # fused steps of the same blocks, window and exact rows
            g, w = got[0], want[0]
            assert all(torch.equal(a, b) for a, b in zip(
                (g.window_keys, g.window_values, *g.keys.tensors(), *g.values.tensors(), g.exact.keys),
                (w.window_keys, w.window_values, *w.keys.tensors(), *w.values.tensors(), w.exact.keys)))
            n = g.keys.ts.shape[2]  # (the skip masks span each store's buffer capacity)
            assert torch.equal(g.exact.skip[:, :n], w.exact.skip[:, :n]) and not g.exact.skip[:, n:].any()
        if static.is_static and not static.advance():
            left = t
    assert left is not None and not static.is_static
    assert any(bool(b.keys.exact_mask.any()) for b in static.blocks)
    assert len(static.blocks) == len(dynamic.blocks) and static.length == dynamic.length
    assert torch.equal(static.window_keys, dynamic.window_keys)


def test_static_store_refuses_what_it_cannot_serve():
    config = DecoQuantConfig(**CONFIGS["paper"])
    x = outlier_kv(batch=1, heads=2, tokens=100)
    with pytest.raises(ValueError, match="fused store"):
        plain = CompressedKVStore(config)
        plain.append(x, x)
        plain.make_static(4)
    store = CompressedKVStore(config, fused=True)
    with pytest.raises(ValueError, match="prefill"):
        store.make_static(4)
    store.append(x[..., :47, :], x[..., :47, :])  # the window is one token short of a compression
    store.make_static(0)
    with pytest.raises(ValueError, match="one token per step"):
        store.append(x[..., 47:49, :], x[..., 47:49, :])
    store.append(x[..., 47:48, :], x[..., 47:48, :])
    with pytest.raises(RuntimeError, match="make_static with more steps"):
        store.advance()
