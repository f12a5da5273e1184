"""Perplexity and KL divergence through the real compressed cache.

The text is cut into windows of `window` tokens. Each window starts with a fresh cache and is fed
in chunks of `chunk` tokens, so every token attends to the earlier chunks through the cache exactly
as in generation: tokens older than the residual window are read back from compressed blocks.

Every window first runs through transformers' DynamicCache (the reference). Its next-token
distributions give each compressed cache's KL divergence, and its first chunks are shared: a chunk
that reads only exact tokens through a cache (nothing compressed yet, see `cache.exact_capacity`)
has the reference's logits, so a compressed cache starts from the key/value states the reference
saw for those tokens and runs the model from the first chunk that reads a compressed block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cache import exact_capacity
from ..config import DecoQuantConfig
from ..integrations.transformers import cache_kwargs
from .divergence import Reference, kl_summary


@dataclass
class PerplexityResult:
    label: str
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int
    bytes_per_token: float  # cache bytes at the end of a window / tokens, exact tokens counted as fp16
    fp16_bytes_per_token: float  # the same cache entirely in fp16
    block_bits: float  # stored bits per element of the compressed blocks alone (nan if none)
    history_bits: float  # the same over everything older than the window: blocks and fp16 sinks
    kl_mean: float = 0.0  # KL(reference || this cache) of the next-token distribution, mean over predicted tokens
    kl_p99: float = 0.0  # its 99th percentile
    delta_se_pct: float = float("nan")  # standard error of the perplexity delta to fp16 over windows, in % (paired:
    # the same windows through both; nan with one window)


def make_cache(model, config: DecoQuantConfig | None):
    """A DecoQuantCache that keeps its decoded blocks (each block decoded once while a window is evaluated), or
    transformers' DynamicCache when config is None (the fp16 baseline)."""
    if config is None:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    from ..integrations.transformers import DecoQuantCache

    return DecoQuantCache(config, model.config, keep_decoded=True)


def _cache_bytes(cache) -> tuple[int, int, int, int, int]:
    """(bytes with exact tokens as fp16, fp16 bytes, compressed block bytes, compressed block elements,
    sink elements).
    Exact tokens count 2 bytes per element whatever dtype the (CPU, fp32) model ran in, so the
    numbers are those of the same cache in an fp16 model."""
    if hasattr(cache, "memory_report"):
        mem = cache.memory_report()
        total = mem["compressed_blocks"] + 2 * mem["exact_elements"]
        return total, mem["fp16_equivalent"], mem["compressed_blocks"], mem["compressed_elements"], mem["sink_elements"]
    fp16 = sum(layer.keys.numel() * 2 * 2 for layer in cache.layers if layer.is_initialized)
    return fp16, fp16, 0, 0, 0


def shared_chunks(config: DecoQuantConfig | None, chunk: int, chunks: int) -> int:
    """How many leading chunks of a window read only exact tokens through `config`'s cache (their logits are
    the reference's): chunk c reads the c * chunk tokens before it."""
    if config is None:
        return chunks
    return min(chunks, exact_capacity(config) // chunk + 1)


def _recorder(model_config, keep: int):
    """The reference cache, also keeping the key/value states each layer was handed for the first `keep`
    tokens (what a forked cache starts from; a sliding-window layer's own tensors drop old tokens)."""
    from transformers import DynamicCache

    class Recorder(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            seen = self.seen.setdefault(layer_idx, [])
            held = sum(k.shape[-2] for k, _ in seen)
            if held < keep:
                seen.append((key_states[..., : keep - held, :].clone(), value_states[..., : keep - held, :].clone()))
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    rec = Recorder(config=model_config)
    rec.seen = {}
    return rec


def _seed(cache, recorded: dict, tokens: int) -> None:
    """Hand `cache` the first `tokens` key/value states of every layer, as the model's forwards would have."""
    for layer_idx in sorted(recorded):
        ks, vs = zip(*recorded[layer_idx])
        cache.update(torch.cat(ks, -2)[..., :tokens, :], torch.cat(vs, -2)[..., :tokens, :], layer_idx)


class _Tally:
    """One cache's sums over windows."""

    def __init__(self):
        self.nll, self.count, self.kl, self.window_nll = 0.0, 0, [], []
        self.bpt = self.fp16_bpt = 0.0
        self.block_bytes = self.block_elems = self.sink_elems = 0

    def add_bytes(self, cache, window: int) -> None:
        total, fp16, blocks, elems, sinks = _cache_bytes(cache)
        self.bpt += total / window
        self.fp16_bpt += fp16 / window
        self.block_bytes += blocks
        self.block_elems += elems
        self.sink_elems += sinks if elems else 0

    def result(self, label: str, windows: int, reference: list[float]) -> PerplexityResult:
        nll = self.nll / self.count
        kl = kl_summary(torch.cat(self.kl))
        bb, be, se = self.block_bytes, self.block_elems, self.sink_elems
        return PerplexityResult(label, math.exp(nll), nll, self.count, windows, self.bpt / windows,
                                self.fp16_bpt / windows, 8.0 * bb / be if be else float("nan"),
                                (8.0 * bb + 16.0 * se) / (be + se) if be else float("nan"),
                                kl["kl_mean"], kl["kl_p99"], paired_se_pct(self.window_nll, reference))


def paired_se_pct(window_nll: list[float], reference: list[float]) -> float:
    """Standard error, in %, of the perplexity delta exp(mean d) - 1 where d = per-window mean NLL minus the
    reference's on the same window (delta method: d(exp x) = exp x dx at the mean)."""
    if len(window_nll) < 2:
        return float("nan")
    d = torch.tensor(window_nll, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    return float(100.0 * math.exp(float(d.mean())) * d.std() / math.sqrt(d.numel()))


def _chunk_logprobs(model, piece: torch.Tensor, cache) -> torch.Tensor:
    logits = model(input_ids=piece, **cache_kwargs(cache), use_cache=True).logits
    return F.log_softmax(logits[0].float(), dim=-1)


@torch.no_grad()
def perplexities(model, input_ids: torch.Tensor, configs: list, window: int = 1024, chunk: int = 128,
                 max_windows: int | None = None, progress=None, share_prefix: bool = True) -> list[PerplexityResult]:
    """One result per entry of `configs` (a DecoQuantConfig, or None for the uncompressed DynamicCache) on
    `input_ids` [1, N]. share_prefix False runs every cache over every chunk (the same numbers, slower).
    progress: wraps the iterable of (window, cache) steps (e.g. a progress bar)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, tokens], got shape {tuple(input_ids.shape)}")
    if window < 2 or chunk < 1:
        raise ValueError(f"window must be >= 2 and chunk >= 1, got window={window}, chunk={chunk}")
    n_windows = input_ids.shape[1] // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the text has {input_ids.shape[1]} tokens, fewer than one window of {window}")
    device = next(model.parameters()).device
    starts = list(range(0, window, chunk))
    shared = [shared_chunks(c, chunk, len(starts)) if share_prefix else 0 for c in configs]
    keep = max([min(s * chunk, window) for s, c in zip(shared, configs) if c is not None], default=0)
    tallies = [_Tally() for _ in configs]
    reference: list[float] = []  # the uncompressed cache's mean NLL per window
    steps = [(w, i) for w in range(n_windows) for i in range(len(configs))]
    ref_logp = ref_nll = ref = recorded = targets = rec = None
    for w, i in (steps if progress is None else progress(steps)):
        ids = input_ids[:, w * window:(w + 1) * window].to(device)
        if i == 0:  # the reference first: its log-probabilities and the states to fork from
            targets = ids[0, 1:]
            rec = _recorder(model.config, keep)
            ref_logp = torch.cat([_chunk_logprobs(model, ids[:, s:s + chunk], rec) for s in starts])[:-1]
            ref_nll = -ref_logp.gather(1, targets[:, None])[:, 0]
            ref = Reference(ref_logp)
            recorded = rec.seen
        config, tally = configs[i], tallies[i]
        if config is None:
            nll, kl = ref_nll, torch.zeros_like(ref_nll)
            tally.add_bytes(rec, window)
        else:
            cache = make_cache(model, config)
            fork = min(shared[i] * chunk, window)
            if fork:
                _seed(cache, recorded, fork)
            rest = [_chunk_logprobs(model, ids[:, s:s + chunk], cache) for s in starts[shared[i]:]]
            logp = torch.cat(rest)[: window - 1 - fork] if rest else ref_logp[:0]
            kl = torch.cat([torch.zeros(fork, device=logp.device), ref.kl(logp, fork)])[: window - 1]
            nll = torch.cat([ref_nll[:fork], -logp.gather(1, targets[fork:, None])[:, 0]])
            tally.add_bytes(cache, window)
        tally.nll += float(nll.double().sum())
        tally.count += nll.numel()
        tally.window_nll.append(float(nll.double().mean()))
        if i == 0:
            reference.append(float(ref_nll.double().mean()))
        tally.kl.append(kl.float().cpu())
    return [t.result("fp16" if c is None else c.label(), n_windows, reference) for t, c in zip(tallies, configs)]


def perplexity(model, input_ids: torch.Tensor, config: DecoQuantConfig | None, window: int = 1024,
               chunk: int = 128, max_windows: int | None = None, progress=None) -> PerplexityResult:
    """One cache's result (`perplexities` with the reference run beside it for the KL divergence)."""
    configs = [None] if config is None else [None, config]
    return perplexities(model, input_ids, configs, window, chunk, max_windows, progress)[-1]
