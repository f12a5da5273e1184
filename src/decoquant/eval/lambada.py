"""LAMBADA accuracy under the paper's projection protocol.

Two scorings:
- "paper": last-TOKEN accuracy on the validation passages, as DecoQuant's Table 2 (and the
  SmoothQuant evaluator it borrowed) ran it: the whole passage is the input and the prediction at the
  second-to-last position must be the last token.
- "openai": last-WORD accuracy on OpenAI's test set, as lm-eval's `lambada_openai`: context =
  passage up to the last space, target = " " + last word (tokenized separately), correct when every
  target token is the greedy prediction.

The key/value projection outputs are fake-quantized over the whole sequence (see `projection`).
Passages are batched by exact token length, so no padding enters any scale or decomposition.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..config import DecoQuantConfig
from .data import LAMBADA_VARIANTS, lambada_passages
from .projection import quantized_projections


@dataclass
class AccuracyResult:
    task: str
    label: str  # cache / method label
    weight_bits: int | None  # k_proj/v_proj weights per-channel RTN at this width (None: exact)
    accuracy: float
    correct: int
    total: int


def lambada_items(tok, passages: list[str], variant: str) -> list[tuple[list[int], int]]:
    """(token ids, number of target tokens at the end) per passage."""
    items = []
    for text in passages:
        if variant == "paper":
            ids = tok(text).input_ids
            items.append((ids, 1))
        else:
            context, word = text.rsplit(" ", 1)
            ctx = tok(context).input_ids
            target = tok(" " + word, add_special_tokens=False).input_ids
            items.append((ctx + target, len(target)))
    return items


@torch.no_grad()
def lambada_accuracy(model, items: list[tuple[list[int], int]], config: DecoQuantConfig | None,
                     weight_bits: int | None = None, batch_size: int = 32, task: str = "lambada",
                     progress=None, smoothing: dict | None = None) -> AccuracyResult:
    """Greedy accuracy on `items` with k/v projection outputs quantized by `config` (None: exact);
    `smoothing` (SmoothQuant's channel divisors) turns an RTN config into the SmoothQuant baseline."""
    by_length: dict[int, list[tuple[list[int], int]]] = defaultdict(list)
    for ids, n in items:
        if len(ids) < n + 1:
            raise ValueError(f"a LAMBADA item has {len(ids)} tokens, too few for {n} target tokens")
        by_length[len(ids)].append((ids, n))
    batches = [group[i:i + batch_size] for _, group in sorted(by_length.items())
               for i in range(0, len(group), batch_size)]
    device = next(model.parameters()).device
    correct = 0
    with quantized_projections(model, config, weight_bits, smoothing):
        for batch in (progress(batches) if progress else batches):
            ids = torch.tensor([b[0] for b in batch], device=device)
            keep = max(n for _, n in batch) + 1
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
            pred = logits[:, :-1].argmax(-1)  # predictions for the last keep-1 tokens
            for row, (_, n) in enumerate(batch):
                correct += int(torch.equal(pred[row, keep - 1 - n:], ids[row, -n:]))
    label = "fp16" if config is None else config.label()
    if smoothing is not None and config is not None:
        label = f"smoothquant-{config.bits}b"
    return AccuracyResult(task, label, weight_bits, correct / len(items), correct, len(items))


def lambada(model, tok, data_dir, variant: str, configs: list[DecoQuantConfig | None],
            weight_bits: int | None = None, limit: int | None = None, batch_size: int = 32,
            progress=None, smoothing: dict | None = None) -> list[AccuracyResult]:
    """Accuracy for each config on the first `limit` passages of the chosen LAMBADA variant."""
    if variant not in LAMBADA_VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported; allowed values: {LAMBADA_VARIANTS}")
    passages = lambada_passages(data_dir, variant)[:limit]
    items = lambada_items(tok, passages, variant)
    task = f"lambada-{variant}"
    return [lambada_accuracy(model, items, c, weight_bits, batch_size, task, progress, smoothing) for c in configs]
