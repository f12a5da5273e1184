"""Tiny random models of the decoder architectures transformers ships: the cache builds, compresses during 150
generated tokens, stays finite, equals DynamicCache with method="none", and bounds sliding-window layers."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import decoquant as dq  # noqa: E402
from decoquant.integrations.transformers import cache_kwargs  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _llama(head_dim):
    return transformers.LlamaConfig(**{**SMALL, "hidden_size": 4 * head_dim}, num_key_value_heads=2,
                                    head_dim=head_dim)


ARCHS = {
    **{f"llama-hd{d}": (lambda d=d: _llama(d)) for d in (64, 72, 80, 96, 128)},
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32),
    "mistral-sliding": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=48),
    "phi3-sliding": lambda: transformers.Phi3Config(**SMALL, num_key_value_heads=2, sliding_window=48,
                                                    pad_token_id=0),
    "gpt-neox": lambda: transformers.GPTNeoXConfig(**SMALL),
    "opt": lambda: transformers.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                          num_attention_heads=4, word_embed_proj_dim=64),
    "falcon-mqa": lambda: transformers.FalconConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, multi_query=True,
                                                    new_decoder_architecture=False),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4),
    "gemma2-hybrid": lambda: transformers.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=16,
                                                       sliding_window=32),
}
SLIDING = {"mistral-sliding": 48, "phi3-sliding": 48}


def _model(name):
    torch.manual_seed(0)
    config = ARCHS[name]()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _generate(model, cache, ids, new=150):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, **cache_kwargs(cache))


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_architecture(name):
    model = _model(name)
    ids = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = _generate(model, transformers.DynamicCache(config=model.config), ids)
    none = dq.DecoQuantCache.from_model(model, method="none", preset=None, block_size=32, residual_length=16)
    assert torch.equal(_generate(model, none, ids), ref)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # head_dim 72/80: the default's group size adapts, with a warning
        cache = dq.DecoQuantCache.from_model(model, block_size=64, residual_length=16)
    out = _generate(model, cache, ids)
    assert out.shape == ref.shape
    report = cache.memory_report()
    if name in SLIDING:  # every layer is a sliding layer: bounded by its window, nothing compressed
        assert cache.compressed_layers == [] and report["compressed_blocks"] == 0
        for layer in cache.layers:
            assert layer.keys.shape[-2] <= SLIDING[name]
        assert report["total"] == report["dynamic_cache"]
    else:
        assert report["compressed_blocks"] > 0 and report["total"] < report["dynamic_cache"]
        logits = model(out[:, -8:], **cache_kwargs(cache)).logits
        assert torch.isfinite(logits).all()
    if name == "falcon-mqa":
        assert cache.kv_heads == 1


def test_qwen2_sliding_layers_follow_max_window_layers():
    config = transformers.Qwen2Config(**{**SMALL, "num_hidden_layers": 4}, num_key_value_heads=2,
                                      use_sliding_window=True, sliding_window=32, max_window_layers=2)
    cache = dq.DecoQuantCache(dq.DecoQuantConfig(), config)
    expected = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
    assert cache.compressed_layers == expected and 0 < len(expected) < 4


def test_bad_cache_input_is_a_clear_error():
    model = _model("llama-hd64")
    with pytest.raises(ValueError, match="fused=True needs the model's attention"):
        dq.DecoQuantCache(dq.DecoQuantConfig(), model.config, fused=True)
    cache = dq.DecoQuantCache.from_model(model)
    k = torch.zeros(1, 2, 3, 64)
    with pytest.raises(ValueError, match="layer_idx=7 but this cache was built for a model with 2 layers"):
        cache.update(k, k, 7)
    with pytest.raises(ValueError, match="head_dim=32 but this cache was built for a model with head_dim=64"):
        cache.update(torch.zeros(1, 2, 3, 32), torch.zeros(1, 2, 3, 32), 0)
    with pytest.raises(ValueError, match="bitz"):
        dq.DecoQuantCache.from_model(model, bitz=4)
    with pytest.warns(UserWarning, match="head_dim=72.*group_size=12"):
        fitted = dq.DecoQuantCache.from_model(_model("llama-hd72"))
    assert fitted.config.group_size == 12
    # every cache option passes through from_model, and a layer's reset keeps them
    from decoquant.format import Backend

    cache = dq.DecoQuantCache.from_model(model, fused=False, overlap=False, keep_decoded=True, backend="torch")
    assert cache.fused is False
    for layer in (cache.layers[0], cache.layers[1]):
        layer.reset()
        assert layer.store.backend is Backend.TORCH and layer.store.storage.decoded is not None and not layer.overlap
    with pytest.raises(ValueError, match="backend='cuda' is not supported"):
        dq.DecoQuantCache.from_model(model, backend="cuda")
    # another codec through from_model: its own defaults, not the default preset's pinned fields
    for method in ("none", "kivi", "rtn"):
        cfg = dq.DecoQuantCache.from_model(model, method=method, bits=2).config
        assert (cfg.method, cfg.preset, cfg.bits, cfg.sink_tokens) == (method, None, 2, 4)


def test_left_padding_keeps_pads_and_first_real_tokens_exact():
    """A left-padded row's sinks are its first real tokens: the store's exact prefix covers the padding, so no
    pad position enters a block (scales, zero points, T_S)."""
    model = _model("llama-hd64")
    ids = torch.randint(1, 96, (2, 150), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    cache = dq.DecoQuantCache.from_model(model, block_size=64, residual_length=16)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(cache))
    store = cache.layers[0].store
    assert cache.padding == 37 and store.sink_keys.shape[-2] == 4 + 37
    assert store.blocks and all(b.length == 64 for b in store.blocks)
    with pytest.warns(UserWarning, match="right padding"):
        cache.set_padding(torch.tensor([[1, 1, 0]]))
