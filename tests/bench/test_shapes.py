"""The end-to-end benchmarks' model shapes and their enable_gqa fp16 baseline (CPU: the baseline must compute
what transformers' own SDPA path computes, with and without a padding mask, before and after a cache fills)."""

import pytest
import torch

from conftest import tiny_llama


def test_shapes_are_the_published_ones():
    from decoquant.bench.shapes import llama_config

    for name, heads, kv in [("llama2-7b", 32, 32), ("llama3-8b", 32, 8), ("qwen2.5-7b", 28, 4)]:
        cfg = llama_config(name, 2)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (heads, kv, 2)
        assert cfg.hidden_size // cfg.num_attention_heads == 128
    with pytest.raises(ValueError, match="shape='llama-9b'.*llama3-8b"):
        llama_config("llama-9b", 2)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@torch.no_grad()
def test_sdpa_gqa_matches_transformers_sdpa(cache_kind):
    from transformers import DynamicCache, StaticCache

    from decoquant.bench.shapes import SDPA_GQA, register_sdpa_gqa
    from decoquant.integrations.transformers import cache_kwargs

    model = tiny_llama(kv_heads=2)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    register_sdpa_gqa()
    logits = {}
    for impl in ("sdpa", SDPA_GQA):
        model.set_attn_implementation(impl)
        cache = StaticCache(config=model.config, max_cache_len=20) if cache_kind == "static" else \
            DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
        steps = [out.logits[:, -1]]
        nxt, m = out.logits[:, -1:].argmax(-1), mask
        for _ in range(3):  # decode steps over the filled cache
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
            out = model(input_ids=nxt, attention_mask=m, **cache_kwargs(cache), use_cache=True)
            steps.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
        logits[impl] = torch.stack(steps)
    ref = logits["sdpa"]
    assert ((logits[SDPA_GQA] - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("steps", ["16", "0", "130"])
def test_e2e_decode_times_whole_block_cycles(steps, capsys):
    """The end-to-end benchmark refuses step counts that are not whole block cycles (each layer compresses one block
    per 128 steps: fewer steps miss that cost or count it several times over), before it touches a GPU."""
    from decoquant.bench.e2e_decode import STEPS, main

    assert STEPS == 128
    with pytest.raises(SystemExit):
        main(["--steps", steps])
    assert f"--steps={steps}" in capsys.readouterr().err
