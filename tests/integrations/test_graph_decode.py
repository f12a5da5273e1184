"""Graph-replayed decoding (`integrations.graph_decode`): on a GPU the decode step is captured in a CUDA graph
and replayed; on the CPU the static steps run eagerly, and give the logits of eager decoding."""

import pytest
import torch

from conftest import tiny_llama
from decoquant.config import DecoQuantConfig
from decoquant.integrations.transformers import cache_kwargs

CUDA = torch.cuda.is_available()


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
