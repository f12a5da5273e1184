"""In-context learning with a compressed demonstration cache, as in the paper's Table 3.

For each dataset and seed, k demonstrations are drawn from the train split and run through the
model once; the KV cache they leave (every layer, post-RoPE keys) is compressed with the library's
real packed codec (`compress` -> `decompress`; the paper's "group" layout for DecoQuant) and
put back. Each test example is then appended to that cache: the query once, then each option's
tokens, and the cache is cropped back after each. Options are scored by their mean token
negative log-likelihood; contextual calibration (Zhao et al., 2021) divides the option
probabilities by those the model gives a content-free query ("N/A", "", "[MASK]") with the same
demonstrations. Raw and calibrated accuracy are both reported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..api import compress, decompress
from ..config import DecoQuantConfig
from .data import IclTask, icl_split
from ..integrations.transformers import cache_kwargs

CONTENT_FREE = ("N/A", "", "[MASK]")
MAX_DEMO_WORDS = 150  # demonstrations are drawn from train records of at most this many words


@dataclass
class IclResult:
    task: str
    label: str
    shots: int
    seed: int
    accuracy: float  # with contextual calibration
    raw_accuracy: float  # without
    total: int
    demo_tokens: int
    demo_bits: float  # stored bits per element of the compressed demonstration KV (16 for fp16)
    per_seed: list = field(default_factory=list)


def _demos(task: IclTask, train: list[dict], shots: int, rng: random.Random) -> list[dict]:
    pool = [r for r in train if sum(len(str(r[f]).split()) for f in task.fields) <= MAX_DEMO_WORDS]
    if shots > len(pool):
        raise ValueError(f"{task.name}: {shots} shots requested, only {len(pool)} short train records")
    return rng.sample(pool, shots)


def demonstration_prompt(task: IclTask, demos: list[dict]) -> str:
    return "".join(f"{task.prompt(d)} {task.options[d['label']]}\n\n" for d in demos)


def _activate_rollback(cache) -> None:
    for layer in cache.layers:  # sliding-window layers must keep their past to be cropped back
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()


@torch.no_grad()
def compress_cache_(cache, config: DecoQuantConfig | None) -> tuple[int, int]:
    """Replace every layer's keys/values by their compressed-then-decoded values, in place.
    Returns (stored bytes, elements) of the compressed form (fp16 bytes when config is None)."""
    nbytes, numel = 0, 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        for name, kind in (("keys", "key"), ("values", "value")):
            x = getattr(layer, name)
            if config is None:
                nbytes, numel = nbytes + 2 * x.numel(), numel + x.numel()
                continue
            c = compress(x, config, kind)
            setattr(layer, name, decompress(c))
            nbytes, numel = nbytes + c.nbytes, numel + c.numel
    return nbytes, numel


class _Scorer:
    """Scores option continuations after a fixed (compressed) demonstration cache."""

    @torch.no_grad()
    def __init__(self, model, tok, prefix: str, config: DecoQuantConfig | None):
        from transformers import DynamicCache

        self.model, self.tok = model, tok
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        _activate_rollback(self.cache)
        self.prefix_len = 0
        self.bits = 16.0
        if prefix:
            ids = tok(prefix, return_tensors="pt").input_ids.to(self.device)
            model(input_ids=ids, **cache_kwargs(self.cache), use_cache=True, logits_to_keep=1)
            self.cache.crop(0)  # sliding layers back to their window
            nbytes, numel = compress_cache_(self.cache, config)
            self.bits = 8.0 * nbytes / numel
            self.prefix_len = ids.shape[1]

    @torch.no_grad()
    def option_probs(self, query: str, options: list[list[int]]) -> torch.Tensor:
        """Normalised probabilities of the options from their mean token NLL after prefix + query.
        Every forward is cropped straight back to the prefix (sliding-window layers cannot undo
        nested crops): one forward of the query serves all single-token options, each longer
        option gets one forward of query + option[:-1]."""
        special = self.prefix_len == 0  # BOS etc. only at the very start
        q = self.tok(query, add_special_tokens=special).input_ids
        first = None
        scores = []
        for opt in options:
            if len(opt) == 1 and first is not None:
                scores.append(first[opt[0]])
                continue
            ids = torch.tensor([q + opt[:-1]], device=self.device)
            logits = self.model(input_ids=ids, **cache_kwargs(self.cache), use_cache=True,
                                logits_to_keep=len(opt)).logits[0].float()
            self.cache.crop(-ids.shape[1])
            logp = F.log_softmax(logits, -1)
            if first is None:
                first = logp[0]
            scores.append(torch.stack([logp[i, t] for i, t in enumerate(opt)]).mean())
        return torch.softmax(torch.stack(scores), 0)


@torch.no_grad()
def icl_accuracy(model, tok, data_dir, task: IclTask, shots: int, configs: list[DecoQuantConfig | None],
                 seeds: tuple[int, ...] = (0,), limit: int | None = 200, progress=None) -> list[IclResult]:
    """Accuracy of each config on `limit` test records (drawn with seed 1234), averaged over `seeds`
    (each seed draws its own demonstrations)."""
    train, test = icl_split(data_dir, task, "train"), icl_split(data_dir, task, "test")
    if limit is not None and limit < len(test):
        test = random.Random(1234).sample(test, limit)
    option_ids = [tok(" " + o, add_special_tokens=False).input_ids for o in task.options]
    blank = {f: None for f in task.fields}
    results = []
    for config in configs:
        per_seed = []
        for seed in seeds:
            prefix = demonstration_prompt(task, _demos(task, train, shots, random.Random(seed)))
            scorer = _Scorer(model, tok, prefix, config)
            p_cf = torch.stack([scorer.option_probs(task.prompt({**blank, **{f: cf for f in task.fields}}), option_ids)
                                for cf in CONTENT_FREE]).mean(0)
            raw = cal = 0
            records = progress(test) if progress else test
            for r in records:
                p = scorer.option_probs(task.prompt(r), option_ids)
                raw += int(p.argmax()) == r["label"]
                cal += int((p / p_cf).argmax()) == r["label"]
            per_seed.append((cal / len(test), raw / len(test), scorer.prefix_len, scorer.bits))
        n = len(per_seed)
        label = "fp16" if config is None else config.label()
        results.append(IclResult(task.name, label, shots, seeds[0] if n == 1 else -1,
                                 sum(s[0] for s in per_seed) / n, sum(s[1] for s in per_seed) / n, len(test),
                                 round(sum(s[2] for s in per_seed) / n), sum(s[3] for s in per_seed) / n,
                                 per_seed))
    return results
