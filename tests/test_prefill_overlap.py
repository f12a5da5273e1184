"""DecoQuantCache(overlap=True): a layer's prefill blocks are compressed while the following layers run (on
CUDA, on a worker thread and a side stream); the cache then holds exactly what overlap=False gives, and a
forward returns with every compression done."""

import pytest
import torch

import decoquant as dq
from conftest import tiny_llama
from decoquant.integrations.transformers import cache_kwargs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "decoded"])
def test_overlapped_prefill_holds_the_same_cache(device, fused):
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = tiny_llama(2, device, dtype, layers=5)
    if fused:
        dq.enable_fused_attention(model)
    config = dq.DecoQuantConfig(preset="paper", bits=4, block_size=16, residual_length=8, sink_tokens=2)
    ids = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(4)).to(device)
    caches = [dq.DecoQuantCache(config, model.config, fused=fused, overlap=o) for o in (False, True)]
    logits = []
    with torch.no_grad():
        for cache in caches:
            out = [model(input_ids=ids[:, :100], **cache_kwargs(cache)).logits,  # a prefill in two chunks
                   model(input_ids=ids[:, 100:140], **cache_kwargs(cache)).logits]
            assert not any(layer.store.pending for layer in cache.layers)  # every forward returns settled
            out += [model(input_ids=ids[:, t:t + 1], **cache_kwargs(cache)).logits for t in range(140, 150)]
            logits.append(out)
    for other, cache in zip(logits[1:], caches[1:]):
        assert all(torch.equal(a, b) for a, b in zip(logits[0], other))
        assert cache.memory_report() == caches[0].memory_report()
        for la, lb in zip(caches[0].layers, cache.layers):
            assert len(la.store.blocks) == len(lb.store.blocks) == (150 - 2 - 8) // 16
            for a, b in zip(la.store.blocks, lb.store.blocks):
                assert all(torch.equal(x, y) for x, y in zip(a.decode(), b.decode()))


def test_overlap_is_checked():
    model = tiny_llama(2)
    for bad in ("yes", 2, None):
        with pytest.raises(ValueError, match="overlap=.* allowed values: True, False"):
            dq.DecoQuantCache(dq.DecoQuantConfig(preset="paper"), model.config, overlap=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_launched_work_runs_in_order_after_the_main_stream_and_reraises():
    from decoquant import streams

    x = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(20_000_000)  # keeps the main stream busy: the job must wait for the fill below
    x.fill_(1.0)
    seen = []
    jobs = [streams.launch(lambda: seen.append(float(x.sum())), streams.mark(x.device), x.device, (x,)),
            streams.launch(lambda: seen.append("second"), streams.mark(x.device), x.device)]
    for job in jobs:
        job.wait()
    assert seen == [float(1 << 20), "second"]

    def fails():
        raise RuntimeError("boom")

    job = streams.launch(fails, streams.mark(x.device), x.device)
    with pytest.raises(RuntimeError, match="boom"):
        job.wait()
