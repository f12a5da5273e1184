"""Static stores (fixed addresses, device-side bounds) and graph-replayed decoding.

On the CPU the static steps run eagerly through the kernels' torch reference; on a GPU the decode step
is captured in a CUDA graph and replayed."""

import pytest
import torch

from conftest import outlier_kv
from decoquant.cache import CompressedKVStore, FusedKV
from decoquant.config import DecoQuantConfig
from decoquant.kernels.attention import decode_attention
from decoquant.kernels.reference import attention_reference
from decoquant.integrations.transformers import cache_kwargs

CUDA = torch.cuda.is_available()
CONFIGS = {"paper": dict(preset="paper", block_size=32, residual_length=16),
           "channel64-token-sinks": dict(preset="channel64-token", block_size=64, residual_length=16, sink_tokens=3)}


def _attend(q, step):
    """Attention over what one `append` returned: (FusedKV, FusedKV) or (keys, values)."""
    out = step[0]
    if isinstance(out, FusedKV):
        return decode_attention(q, out.keys, out.values, 0.125, kv_start=out.kv_start, kv_len=out.kv_len,
                                window_k=out.window_keys, window_v=out.window_values, window_valid=out.window_valid)
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


def tiny_llama(kv_heads: int, device="cpu", dtype=torch.float32, layers: int = 2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=512,
                                   max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # larger weights than the default init: logits with clear winners
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    return model


def _teacher_forced(model, cache, ids, tokens):
    """Logits of each decode step of an ordinary eager loop fed `tokens` [B, n]."""
    out = [model(input_ids=ids, **cache_kwargs(cache), use_cache=True).logits[:, -1]]
    for i in range(tokens.shape[1] - 1):
        out.append(model(input_ids=tokens[:, i:i + 1], **cache_kwargs(cache), use_cache=True).logits[:, -1])
    return out


def _decode(model, cache, ids, steps, cuda_graph):
    from decoquant.integrations.graph_decode import GraphDecoder

    first = model(input_ids=ids, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    dec = GraphDecoder(model, cache, first.argmax(-1), ids.shape[1], steps, cuda_graph=cuda_graph)
    logits, tokens = [first], [first.argmax(-1)]
    for _ in range(steps):
        tokens.append(dec.step())
        logits.append(dec.logits.clone())
    return torch.stack(tokens, 1), logits


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_graph_decoder_matches_eager_decoding(kv_heads):
    """The static decode steps (eager here, replayed from a CUDA graph on a GPU) give the logits of the
    ordinary fused DecoQuantCache loop fed the same tokens, over several block compressions; with
    transformers' StaticCache they give DynamicCache's."""
    import decoquant as dq
    from transformers import DynamicCache, StaticCache

    model = tiny_llama(kv_heads)
    dq.enable_fused_attention(model)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    config = DecoQuantConfig(preset="paper", bits=4, block_size=16, residual_length=8)
    with torch.no_grad():
        tokens, logits = _decode(model, dq.DecoQuantCache(config, model.config, fused=True), ids, 60, False)
        want = _teacher_forced(model, dq.DecoQuantCache(config, model.config, fused=True), ids, tokens)
        assert max(_rel(a, b) for a, b in zip(logits, want)) < 1e-4
        model.set_attn_implementation("sdpa")
        tokens, logits = _decode(model, StaticCache(config=model.config, max_cache_len=128), ids, 60, False)
        want = _teacher_forced(model, DynamicCache(config=model.config), ids, tokens)
        assert max(_rel(a, b) for a, b in zip(logits, want)) < 1e-4


def test_generate_and_its_errors():
    import decoquant as dq
    from transformers import DynamicCache

    model = tiny_llama(2)
    dq.enable_fused_attention(model)
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(2))
    cache = dq.DecoQuantCache(DecoQuantConfig(preset="paper", block_size=16, residual_length=8), model.config)
    out = dq.generate(model, ids, cache, 25)
    assert out.shape == (1, 55) and torch.equal(out[:, :30], ids)
    assert cache.get_seq_length() == 54 and cache.is_static
    with pytest.raises(ValueError, match="StaticCache"):
        dq.generate(model, ids, DynamicCache(config=model.config), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dq.generate(model, ids, dq.DecoQuantCache(cache.config, model.config), 0)
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA"):
            dq.generate(model, ids, dq.DecoQuantCache(cache.config, model.config), 4, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha-rows-kernel", "gqa-mma-kernel"])
def test_cuda_graph_replays_the_eager_static_steps(kv_heads):
    """Captured once and replayed across block compressions (done between replays), the graph gives the
    eager static steps' tokens and logits, and the eager fused loop's logits within kernel tolerance."""
    import decoquant as dq

    model = tiny_llama(kv_heads, "cuda", torch.float16)
    dq.enable_fused_attention(model)
    ids = torch.randint(0, 512, (3, 150), generator=torch.Generator().manual_seed(1)).cuda()
    config = DecoQuantConfig(preset="paper", bits=4, block_size=32, residual_length=32)
    with torch.no_grad():
        eager_tokens, eager = _decode(model, dq.DecoQuantCache(config, model.config, fused=True), ids, 100, False)
        tokens, graphed = _decode(model, dq.DecoQuantCache(config, model.config, fused=True), ids, 100, True)
        assert torch.equal(tokens, eager_tokens)
        assert max(_rel(a, b) for a, b in zip(graphed, eager)) < 1e-3
        want = _teacher_forced(model, dq.DecoQuantCache(config, model.config, fused=True), ids, tokens)
        assert max(_rel(a, b) for a, b in zip(graphed, want)) < 2e-2
