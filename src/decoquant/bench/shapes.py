"""Model shapes the end-to-end benchmarks build at random (real shapes, random weights), and the fp16 baseline
that attends with SDPA's own grouped-query support.

transformers' SDPA path expands GQA keys and values with `repeat_kv` whenever a mask is present (every
StaticCache step), reading each kv head's K/V once per query head; `sdpa_gqa_forward` passes `enable_gqa=True`
instead, so fp16 reads the cache once: the fastest fp16 path transformers can run for these shapes.
"""

from __future__ import annotations

import torch

# name -> (hidden size, MLP size, query heads, kv heads, vocabulary); head_dim 128 for all. Qwen2.5-7B is built as
# a Llama of its shape (its qkv biases are left out: they do not change what decode reads).
SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 32000),
    "llama3-8b": (4096, 14336, 32, 8, 128256),
    "qwen2.5-7b": (3584, 18944, 28, 4, 152064),
}
SDPA_GQA = "sdpa_gqa"


def llama_config(shape: str, layers: int):
    """A LlamaConfig of `shape` (SHAPES) with `layers` decoder layers, fp16."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not supported; allowed values: {tuple(SHAPES)}")
    hidden, mlp, heads, kv_heads, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=65536,
                       torch_dtype="float16")


def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs):
    """A transformers attention function: SDPA over the unexpanded kv heads (`enable_gqa`), mask or not."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_sdpa_gqa() -> None:
    """Register `sdpa_gqa_forward` (and transformers' SDPA mask builder) as attention implementation "sdpa_gqa"."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_GQA, sdpa_gqa_forward)
    AttentionMaskInterface.register(SDPA_GQA, sdpa_mask)
