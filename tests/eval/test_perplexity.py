"""Perplexity and KL through the cache: forking compressed caches from the reference's exact prefix gives the
numbers of running every cache over every chunk; the store's kept decoded history equals decoding each step."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import decoquant as dq  # noqa: E402
from decoquant.cache import CompressedKVStore, exact_capacity  # noqa: E402
from decoquant.eval.perplexity import paired_se_pct, perplexities, perplexity, shared_chunks  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
MODELS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, head_dim=16),
    "mistral-sliding": lambda: transformers.MistralConfig(**SMALL, sliding_window=40),
    "gemma2-hybrid": lambda: transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=24),
}
CONFIGS = [
    None,
    dq.DecoQuantConfig(method="decoquant", bits=2, block_size=16, residual_length=16, sink_tokens=3),
    dq.DecoQuantConfig(method="kivi", bits=2, block_size=32, residual_length=8, quant_group_size=16),
    dq.DecoQuantConfig(method="rtn", bits=4, block_size=16, residual_length=48),
    dq.DecoQuantConfig(method="rtn", bits=4, block_size=256, residual_length=16),  # never compresses a block
]


def _model(name):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(MODELS[name]()).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forked_caches_equal_full_runs(name):
    model = _model(name)
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(1))
    fast = perplexities(model, ids, CONFIGS, window=96, chunk=12, share_prefix=True)
    slow = perplexities(model, ids, CONFIGS, window=96, chunk=12, share_prefix=False)
    for a, b in zip(fast, slow):
        assert a.label == b.label and a.tokens == b.tokens == 2 * 95 and a.windows == 2
        assert a.nll == pytest.approx(b.nll, rel=1e-5, abs=1e-6)
        assert a.kl_mean == pytest.approx(b.kl_mean, rel=1e-4, abs=1e-7)
        assert a.kl_p99 == pytest.approx(b.kl_p99, rel=1e-4, abs=1e-7)
        assert a.delta_se_pct == pytest.approx(b.delta_se_pct, rel=1e-4, abs=1e-6)
        assert a.bytes_per_token == b.bytes_per_token
        assert a.perplexity == pytest.approx(math.exp(a.nll))
    fp16, dq2, kivi, rtn, never = fast
    assert fp16.kl_mean == 0.0 and never.kl_mean == pytest.approx(0.0, abs=1e-9) and never.nll == fp16.nll
    if name == "mistral-sliding":  # every layer sliding: transformers bounds them, nothing is compressed
        assert dq2.kl_mean == 0.0 and dq2.bytes_per_token == fp16.bytes_per_token
        return
    assert dq2.kl_mean > 1e-6 and kivi.kl_mean > 1e-6 and dq2.kl_p99 > dq2.kl_mean
    assert fp16.delta_se_pct == 0.0 and dq2.delta_se_pct > 0.0
    assert dq2.bytes_per_token < fp16.bytes_per_token


def test_single_cache_wrapper_and_kl_against_the_reference():
    model = _model("llama")
    ids = torch.randint(0, 96, (1, 128), generator=torch.Generator().manual_seed(2))
    both = perplexities(model, ids, CONFIGS[:2], window=64, chunk=8)
    alone = perplexity(model, ids, CONFIGS[1], window=64, chunk=8)
    assert alone.nll == pytest.approx(both[1].nll, rel=1e-6) and alone.kl_mean == pytest.approx(both[1].kl_mean)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids[:, :10], None, window=64)


def test_shared_chunks_follow_the_store():
    cfg = dq.DecoQuantConfig(method="rtn", bits=4, block_size=16, residual_length=8, sink_tokens=2)
    cap = exact_capacity(cfg)
    for n, blocks in ((cap, 0), (cap + 1, 1)):
        store = CompressedKVStore(cfg)
        store.append(torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16))
        assert len(store.blocks) == blocks, n
    assert shared_chunks(cfg, 5, 100) == cap // 5 + 1 and shared_chunks(None, 5, 7) == 7
    assert shared_chunks(cfg, 1, 10) == 10


def test_kept_decoded_history_equals_decoding_every_step():
    cfg = dq.DecoQuantConfig(method="decoquant", bits=2, block_size=16, residual_length=8)
    plain, kept = CompressedKVStore(cfg), CompressedKVStore(cfg, keep_decoded=True)
    gen, batch = torch.Generator().manual_seed(3), 2
    for step, n in enumerate((20, 7, 16, 1, 1, 30, 5)):
        k, v = torch.randn(batch, 2, n, 16, generator=gen), torch.randn(batch, 2, n, 16, generator=gen)
        a, b = plain.append(k, v), kept.append(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), step
        if step == 3:
            plain.crop(9)
            kept.crop(9)
        if step == 4:
            index = torch.tensor([1, 0, 1])
            plain.select_batch(index)
            kept.select_batch(index)
            batch = 3
    assert kept.storage.decoded.blocks == len(kept.blocks) > 2
    mem = kept.memory()
    assert mem["decoded_copy"] == 2 * kept.storage.decoded.keys.numel() * 4 and plain.memory()["decoded_copy"] == 0
    assert mem["total"] == plain.memory()["total"]
    with pytest.raises(ValueError, match="keep_decoded"):
        CompressedKVStore(cfg, keep_decoded="yes")


def test_paired_standard_error_of_the_delta():
    # windows whose mean NLL is 0.1 and 0.3 above the reference's: delta exp(0.2) - 1, s.e. exp(0.2) * 0.1
    assert paired_se_pct([1.1, 2.3], [1.0, 2.0]) == pytest.approx(100 * math.exp(0.2) * 0.1)
    assert math.isnan(paired_se_pct([1.1], [1.0]))
