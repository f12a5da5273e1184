"""DecoQuantCache inside transformers' generate() on real models (SmolLM2-135M, Gemma-3-270M)."""

import pytest
import torch

import decoquant as dq
from decoquant.integrations.transformers import cache_kwargs

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a", "Hi"]


def generate(model, tok, batch, cache, **kw):
    tok.padding_side = "left"
    enc = tok(PROMPTS[:batch], return_tensors="pt", padding=True)
    kw.setdefault("do_sample", False)
    return model.generate(**enc, max_new_tokens=kw.pop("max_new_tokens", 64), **cache_kwargs(cache),
                          pad_token_id=tok.pad_token_id, **kw)


def dynamic(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def exact_cache(model, **kw):
    return dq.DecoQuantCache(dq.DecoQuantConfig(method="none", block_size=16, residual_length=8, **kw), model.config)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_method_none_matches_dynamic_cache_token_for_token(request, which, batch):
    model, tok = request.getfixturevalue(which)
    ref = generate(model, tok, batch, dynamic(model))
    out = generate(model, tok, batch, exact_cache(model, sink_tokens=2))
    assert torch.equal(ref, out)


def test_sampling_and_beam_search_match_with_method_none(smollm2):
    model, tok = smollm2
    torch.manual_seed(0)
    ref = generate(model, tok, 2, dynamic(model), do_sample=True, top_k=20, max_new_tokens=24)
    torch.manual_seed(0)
    out = generate(model, tok, 2, exact_cache(model), do_sample=True, top_k=20, max_new_tokens=24)
    assert torch.equal(ref, out)
    ref = generate(model, tok, 2, dynamic(model), num_beams=3, max_new_tokens=24)
    out = generate(model, tok, 2, exact_cache(model), num_beams=3, max_new_tokens=24)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("method", ["decoquant", "rtn", "kivi", "rotation", "turboquant"])
def test_every_codec_generates_through_the_cache(smollm2, method):
    model, tok = smollm2
    cfg = dq.DecoQuantConfig(method=method, bits=4, block_size=16, residual_length=8,
                             preset="paper" if method == "decoquant" else None)
    cache = dq.DecoQuantCache(cfg, model.config)
    out = generate(model, tok, 3, cache, max_new_tokens=40)
    ref = generate(model, tok, 3, dynamic(model), max_new_tokens=40)
    assert out.shape[0] == 3
    assert (out == ref).float().mean() > 0.5  # 4-bit history keeps most greedy tokens
    assert sum(len(cache.layers[i].store.blocks) for i in cache.compressed_layers) > 0
    beams = generate(model, tok, 2, dq.DecoQuantCache(cfg, model.config), num_beams=3, max_new_tokens=20)
    assert beams.shape[0] == 2


def test_gemma_sliding_layers_stay_exact_full_layers_compress(gemma3):
    model, tok = gemma3
    cache = dq.DecoQuantCache(dq.DecoQuantConfig(preset="paper", block_size=16, residual_length=8), model.config)
    generate(model, tok, 1, cache, max_new_tokens=40)
    full = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    assert cache.compressed_layers == full
    assert all(len(cache.layers[i].store.blocks) > 0 for i in full)


def test_crop_and_seq_length(smollm2):
    model, tok = smollm2
    ids = tok(" ".join(["word"] * 90), return_tensors="pt").input_ids
    cache = dq.DecoQuantCache(dq.DecoQuantConfig(preset="paper", block_size=16, residual_length=8), model.config)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    n = ids.shape[1]
    assert cache.get_seq_length() == n
    cache.crop(-20)
    assert cache.get_seq_length() == n - 20
    with torch.no_grad():
        logits = model(input_ids=ids[:, n - 20:n - 19], **cache_kwargs(cache)).logits
    assert torch.isfinite(logits).all() and cache.get_seq_length() == n - 19


def test_compressed_blocks_take_at_most_027x_of_fp16(smollm2):
    model, tok = smollm2
    cache = dq.DecoQuantCache(dq.DecoQuantConfig(preset="paper", bits=4, block_size=128, residual_length=128),
                              model.config)
    ids = tok(" ".join(["The quick brown fox jumps over the lazy dog."] * 80), return_tensors="pt").input_ids[:, :600]
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    mem = cache.memory_report()
    assert mem["compressed_elements"] > 0
    assert mem["compressed_blocks"] / (2 * mem["compressed_elements"]) <= 0.27


def test_long_generation_to_the_maximum_length(smollm2):
    """Prefill to near max_position_embeddings, then decode to exactly the maximum length."""
    model, tok = smollm2
    limit = model.config.max_position_embeddings
    ids = torch.randint(100, 40000, (1, limit - 24), generator=torch.Generator().manual_seed(0))
    cache = dq.DecoQuantCache(dq.DecoQuantConfig(preset="paper", bits=4), model.config)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                         **cache_kwargs(cache), min_new_tokens=24, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == limit
    assert cache.get_seq_length() == limit - 1  # the last generated token is never fed back
    store = cache.layers[0].store
    assert len(store.blocks) == (limit - 1 - store.config.residual_length) // store.config.block_size


def test_bad_models_and_configs_are_clear_errors(smollm2):
    model, _ = smollm2
    with pytest.raises(ValueError, match="group_size=48 must divide head_dim=64"):
        dq.DecoQuantCache(dq.DecoQuantConfig(group_size=48), model.config)
    with pytest.raises(ValueError, match="DecoQuantConfig"):
        dq.DecoQuantCache({"bits": 4}, model.config)
    from transformers import LlamaConfig, T5Config

    with pytest.raises(ValueError, match="encoder-decoder"):
        dq.DecoQuantCache(dq.DecoQuantConfig(), T5Config())
    odd = LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    with pytest.raises(ValueError, match="needs a LinearAttentionLayer cache, which DecoQuantCache does not support"):
        dq.DecoQuantCache(dq.DecoQuantConfig(), odd)
    cache = dq.DecoQuantCache.from_model(model, bits=2)
    assert cache.config.bits == 2 and len(cache.layers) == model.config.num_hidden_layers
    assert (cache.config.preset, cache.config.sink_tokens) == ("channel64-token", 4)  # the frontier's default


FUSED_CONFIGS = {
    "paper": dict(preset="paper", block_size=16, residual_length=8),
    # the frontier's recipe at a small block: keys per channel over 32 tokens, asymmetric, 2 sinks (which
    # are left padding in the shorter rows of the batch)
    "channel-token-sinks": dict(scale_granularity="channel", quant_group_size=32, value_scale_granularity="token",
                                symmetric=False, block_size=32, residual_length=8, sink_tokens=2),
}


@pytest.mark.parametrize("config", list(FUSED_CONFIGS))
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_fused_decode_path_matches_the_decompressing_path(request, which, config):
    """With the fused attention enabled, decode steps read the packed blocks (on the CPU through the
    kernels' torch reference): greedy tokens equal those of the decompress-then-SDPA path."""
    import decoquant.integrations.attention as attention

    model, tok = request.getfixturevalue(which)
    cfg = dq.DecoQuantConfig(**FUSED_CONFIGS[config])
    ref = generate(model, tok, 3, dq.DecoQuantCache(cfg, model.config), max_new_tokens=48)
    calls = []
    original = attention.decode_attention
    attention.decode_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
    previous = model.config._attn_implementation
    try:
        dq.enable_fused_attention(model)
        cache = dq.DecoQuantCache(cfg, model.config)
        assert cache.fused
        out = generate(model, tok, 3, cache, max_new_tokens=48)
    finally:
        attention.decode_attention = original
        model.set_attn_implementation(previous)
    assert calls, "the fused path was never taken"
    assert torch.equal(out, ref)


def test_soak_bytes_follow_the_formula(smollm2):
    """A short soak (the benchmark's own checks): finite logits and the reported bytes equal to the README's
    formula at every checkpoint, the live tensors growing by the cache's growth and no more."""
    from decoquant.bench.soak import soak

    model, tok = smollm2
    r = soak(model, tok, bits=2, tokens=512, every=64, progress=False)
    assert r["finite"] and r["bytes_match"] and len(r["rows"]) >= 4
    assert r["rows"][-1]["cache_bytes"] < 0.6 * r["rows"][-1]["dynamic_cache_bytes"]  # 256 of 512 tokens in blocks
    assert r["live_growth"] <= r["cache_growth"] + (1 << 20)
