"""KL divergence of a compressed cache's next-token distributions to the uncompressed model's.

Both runs feed the same tokens in chunks through their own cache (as generation does: later chunks read
the earlier ones back from the cache), and every position's log-probabilities are compared:
KL(p_ref || p_cache), its mean over scored tokens and its 99th percentile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..integrations.model_config import cache_kwargs


@torch.no_grad()
def chunked_logprobs(model, input_ids: torch.Tensor, cache, chunk: int = 128) -> torch.Tensor:
    """Log-probabilities [batch, tokens, vocab] (float32) of `input_ids` fed `chunk` tokens at a time."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out = []
    for start in range(0, input_ids.shape[1], chunk):
        piece = input_ids[:, start:start + chunk]
        logits = model(input_ids=piece, use_cache=True, **cache_kwargs(cache)).logits
        out.append(F.log_softmax(logits.float(), dim=-1))
    return torch.cat(out, dim=1)


class Reference:
    """A reference's next-token distributions, set up once for KL divergences to many others:
    KL(ref || other) = sum p log p - sum p log q, the first term kept per position."""

    def __init__(self, ref_logp: torch.Tensor):
        self.p = ref_logp.exp()
        self.neg_entropy = torch.linalg.vecdot(self.p, ref_logp)

    def kl(self, logp: torch.Tensor, start: int = 0) -> torch.Tensor:
        """KL(ref || other) per position for log-probabilities `logp` of the positions from `start` on."""
        p = self.p[start:start + logp.shape[0]] if start or logp.shape[0] != self.p.shape[0] else self.p
        if p.shape != logp.shape:
            raise ValueError(f"log-probabilities differ in shape: {tuple(p.shape)} vs {tuple(logp.shape)}")
        return (self.neg_entropy[start:start + logp.shape[0]] - torch.linalg.vecdot(p, logp)).clamp_min(0.0)


def kl_per_token(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per position, from log-probabilities of the same shape [..., vocab]."""
    if ref_logp.shape != logp.shape:
        raise ValueError(f"log-probabilities differ in shape: {tuple(ref_logp.shape)} vs {tuple(logp.shape)}")
    return Reference(ref_logp).kl(logp)


def kl_summary(kl: torch.Tensor) -> dict[str, float]:
    """Mean and 99th percentile of per-token KL values (any shape), and the token count."""
    flat = kl.reshape(-1).double()
    return {"kl_mean": float(flat.mean()), "kl_p99": float(torch.quantile(flat, 0.99)), "tokens": flat.numel()}
