"""Left padding on a real model: does a padded row of a batch behave like the same prompt run alone?

    python -m decoquant.bench.padding [--model smollm2-135m] [--bits 4,2] [--pad 200] [--tokens 512] [--new 64]

Two real-text prompts (gensim's Wikipedia articles): a long one and a short one, `--pad` tokens shorter,
so the short one is left-padded in the batch. For each cache (transformers' DynamicCache, DecoQuantCache
with method "none", the default preset at each bit width), the short row is run twice, in the padded batch
and alone, each through its own cache built by `from_model` (which reads the padding from the mask):

- teacher-forced: the row's continuation (`--tokens` real tokens) fed in chunks of 128 after the prompt;
  KL divergence of each run's next-token distributions to the fp16 run alone (mean, 99th percentile):
  "padded" against "alone" shows whether padding leaks into the compressed blocks;
- greedy: `--new` tokens generated from the prompt; the fraction agreeing with the same cache's run alone
  and the length of the agreeing prefix (greedy decoding amplifies any difference, fp32 padding noise too,
  which is what the DynamicCache row measures).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def _make_cache(model, bits):
    """DynamicCache for bits None, DecoQuantCache "none" for bits 0, else the default preset."""
    import decoquant as dq
    from transformers import DynamicCache

    if bits is None:
        return DynamicCache(config=model.config)
    if bits == 0:
        return dq.DecoQuantCache.from_model(model, method="none")
    return dq.DecoQuantCache.from_model(model, bits=bits)


@torch.no_grad()
def _forced_logprobs(model, ids, mask, cache, prompt_len, chunk=128):
    """Log-probabilities of every position after the prompt, the prompt prefilled at once, then chunks."""
    from ..integrations.model_config import cache_kwargs

    out = []
    steps = [(s, min(s + chunk, ids.shape[1])) for s in range(prompt_len, ids.shape[1], chunk)]
    for start, stop in [(0, prompt_len)] + steps:
        m = mask[:, :stop]
        pos = (m.cumsum(-1) - 1).clamp_min(0)[:, start:stop]
        logits = model(input_ids=ids[:, start:stop], attention_mask=m, position_ids=pos, use_cache=True,
                       **cache_kwargs(cache)).logits
        out.append(F.log_softmax(logits.float(), -1))
    return torch.cat(out, 1)[:, prompt_len - 1:-1]


@torch.no_grad()
def _greedy(model, ids, mask, cache, new):
    from ..integrations.model_config import cache_kwargs

    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, **cache_kwargs(cache))
    return out[:, ids.shape[1]:]


def run(model, tok, bits: list[int], pad: int, tokens: int, new: int) -> list[dict]:
    from ..eval.divergence import kl_per_token, kl_summary
    from ..eval.text import load_text

    text = tok(load_text("gensim-wiki")[:60000], return_tensors="pt").input_ids[0]
    short = 384  # long enough that the prompt alone already fills compressed blocks
    long_ids = text[: short + pad + tokens]
    short_ids = text[short + pad + tokens: 2 * (short + tokens) + pad]
    # the batch: row 0 long, row 1 the short prompt left-padded to the same length (teacher-forced part alike)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = torch.stack([long_ids, torch.cat([torch.full((pad,), pad_id), short_ids])])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    alone, alone_mask = short_ids[None], torch.ones(1, short_ids.numel(), dtype=torch.long)
    ref = _forced_logprobs(model, alone, alone_mask, _make_cache(model, None), short)
    rows = []
    for b in [None, 0] + bits:
        label = {None: "DynamicCache", 0: "none"}.get(b, f"default {b}-bit")
        solo = _forced_logprobs(model, alone, alone_mask, _make_cache(model, b), short)
        padded = _forced_logprobs(model, batch, mask, _make_cache(model, b), short + pad)[1:]
        g_solo = _greedy(model, alone[:, :short], alone_mask[:, :short], _make_cache(model, b), new)[0]
        g_pad = _greedy(model, batch[:, :short + pad], mask[:, :short + pad], _make_cache(model, b), new)[1]
        agree = (g_solo == g_pad).long()
        alone = kl_summary(kl_per_token(ref, solo))
        rows.append(dict(cache=label, bits=b, **{f"alone_{k}": v for k, v in alone.items()},
                         **{f"padded_{k}": v for k, v in kl_summary(kl_per_token(ref, padded)).items()},
                         padded_vs_alone_kl=kl_summary(kl_per_token(solo, padded))["kl_mean"],
                         greedy_agree=float(agree.float().mean()), greedy_prefix=int(agree.cumprod(0).sum()),
                         new_tokens=new))
    return rows


def _markdown(rows, pad) -> str:
    lines = [f"Short row left-padded by {pad} tokens in a batch of two; KL to the fp16 run of the row alone.", "",
             "| cache | KL alone (mean / p99) | KL padded (mean / p99) | KL padded vs alone | greedy agreement "
             "| agreeing prefix |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['alone_kl_mean']:.5f} / {r['alone_kl_p99']:.5f} | "
                     f"{r['padded_kl_mean']:.5f} / {r['padded_kl_p99']:.5f} | {r['padded_vs_alone_kl']:.5f} | "
                     f"{r['greedy_agree']:.2f} | {r['greedy_prefix']} / {r['new_tokens']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", default="4,2")
    p.add_argument("--pad", type=int, default=200)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from ..integrations.models import load_model

    model, tok = load_model(args.model)
    rows = run(model, tok, [int(b) for b in args.bits.split(",")], args.pad, args.tokens, args.new)
    print(_markdown(rows, args.pad))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
