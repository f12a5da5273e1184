"""Models with extreme key offsets: a Qwen2-shaped model whose `k_proj` bias has the scale of real
Qwen2/2.5 checkpoints (norms of several hundred per kv head), through every method's cache.

    python -m decoquant.bench.key_offsets [--bits 4,2] [--bias-norm 0,400] [--tokens 1024] [--layers 2]

The model is randomly initialised (Qwen2.5-0.5B's widths: hidden 896, 14 query heads, 2 kv heads,
head_dim 64; `--layers` of them; weights with a wider init so that attention is not uniform;
rope_theta 1e6 as Qwen2.5) and its key bias is set on a few channels per kv head (both halves of the three
lowest-frequency rotary pairs, where the massive values of RoPE models' keys sit) to a total norm of
`--bias-norm` per head. Text: gensim's
Wikipedia articles through SmolLM2's tokenizer. For each method and bit width (every method with the same
4 exact sink tokens), the KL divergence of its next-token distributions to the same model run through
transformers' DynamicCache, fed in chunks of 128 tokens so that history is read back from compressed
blocks. A per-token scale over channels (RTN, the paper's preset, rotation's per-token step) is set by the
offset channels and loses the rest; per-channel key scales with zero points (KIVI, the default preset)
take the offset out.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

BIAS_CHANNELS = (29, 30, 31, 61, 62, 63)  # head_dim 64: both halves of the three lowest-frequency rotary pairs


def qwen2_config(layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096,
                       initializer_range=0.08, rope_theta=1e6, tie_word_embeddings=True)


def offset_model(layers: int, bias_norm: float, seed: int = 0):
    """The random Qwen2-shaped model with each kv head's key bias of norm `bias_norm` on BIAS_CHANNELS."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = qwen2_config(layers)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    hd = cfg.hidden_size // cfg.num_attention_heads
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.k_proj.bias.view(cfg.num_key_value_heads, hd)
            bias.zero_()
            bias[:, list(BIAS_CHANNELS)] = signs * bias_norm / len(BIAS_CHANNELS) ** 0.5
    return model


def method_configs(bits: list[int]):
    """(label, config) per method and bit width; every method keeps the same 4 sink tokens exact."""
    import decoquant as dq

    out = []
    for b in bits:
        for method, preset in (("rtn", None), ("kivi", None), ("rotation", None), ("decoquant", "paper"),
                               ("decoquant", "channel64-token")):
            cfg = dq.DecoQuantConfig(method=method, bits=b, sink_tokens=4, **({"preset": preset} if preset else {}))
            out.append((cfg.label(), cfg))
    return out


def run(layers: int, bias_norms: list[float], bits: list[int], tokens: int, progress=None) -> list[dict]:
    import decoquant as dq
    from transformers import DynamicCache

    from ..eval.divergence import chunked_logprobs, kl_per_token, kl_summary
    from ..eval.text import load_text
    from ..integrations.models import load_model

    _, tok = load_model("smollm2-135m")
    ids = tok(load_text("gensim-wiki")[:40000], return_tensors="pt").input_ids[:, :tokens]
    rows = []
    for norm in bias_norms:
        model = offset_model(layers, norm)
        ref = chunked_logprobs(model, ids, DynamicCache(config=model.config))
        configs = method_configs(bits)
        for label, cfg in (configs if progress is None else progress(configs, desc=f"bias norm {norm:g}")):
            cache = dq.DecoQuantCache(cfg, model.config)
            logp = chunked_logprobs(model, ids, cache)
            kl = kl_per_token(ref, logp)
            rows.append(dict(bias_norm=norm, label=label, method=cfg.method, bits=cfg.bits,
                             finite=bool(torch.isfinite(logp).all()), **kl_summary(kl)))
    return rows


def _markdown(rows: list[dict]) -> str:
    norms = sorted({r["bias_norm"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["bias_norm"]): r for r in rows}
    head = " | ".join(f"KL mean, bias {n:g} | KL p99, bias {n:g}" for n in norms)
    lines = [f"| cache | {head} |", "|---|" + "---:|" * (2 * len(norms))]
    for label in labels:
        cells = " | ".join(f"{by[label, n]['kl_mean']:.4f} | {by[label, n]['kl_p99']:.4f}" for n in norms)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="4,2")
    p.add_argument("--bias-norm", default="0,400")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from ..progress import progress as progress_bar

    rows = run(args.layers, [float(n) for n in args.bias_norm.split(",")], [int(b) for b in args.bits.split(",")],
               args.tokens, progress=progress_bar)
    print(_markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
