"""DecoQuantCache(overlap=True): a layer's prefill blocks are compressed while the next layer runs (on CUDA,
on a side stream); the cache then holds exactly what overlap=False gives, and a forward returns settled."""

import pytest
import torch

import decoquant as dq
from test_graph_decode import tiny_llama

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "decoded"])
def test_overlapped_prefill_holds_the_same_cache(device, fused):
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = tiny_llama(2, device, dtype)
    if fused:
        dq.enable_fused_attention(model)
    config = dq.DecoQuantConfig(preset="paper", bits=4, block_size=16, residual_length=8, sink_tokens=2)
    ids = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(4)).to(device)
    caches = [dq.DecoQuantCache(config, model.config, fused=fused, overlap=o) for o in (True, False)]
    logits = []
    with torch.no_grad():
        for cache in caches:
            out = [model(input_ids=ids[:, :100], past_key_values=cache).logits,  # a prefill in two chunks
                   model(input_ids=ids[:, 100:140], past_key_values=cache).logits]
            assert not any(layer.store.deferred for layer in cache.layers)  # every forward returns settled
            out += [model(input_ids=ids[:, t:t + 1], past_key_values=cache).logits for t in range(140, 150)]
            logits.append(out)
    for a, b in zip(*logits):
        assert torch.equal(a, b)
    assert caches[0].memory_report() == caches[1].memory_report()
    for la, lb in zip(*(c.layers for c in caches)):
        assert len(la.store.blocks) == len(lb.store.blocks) == (150 - 2 - 8) // 16
        for a, b in zip(la.store.blocks, lb.store.blocks):
            assert all(torch.equal(x, y) for x, y in zip(a.decode(), b.decode()))


def test_overlap_argument_is_checked():
    model = tiny_llama(2)
    with pytest.raises(ValueError, match="overlap"):
        dq.DecoQuantCache(dq.DecoQuantConfig(preset="paper"), model.config, overlap="yes")
