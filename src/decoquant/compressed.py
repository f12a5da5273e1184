"""`CompressedKV`: what one compressed KV tensor actually stores, and its honest byte count."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .config import DecoQuantConfig


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class CompressedKV:
    """A compressed tensor of shape `shape` = [batch, kv_heads, tokens, head_dim].

    codes: packed uint8 codes (see packing.py), last dim holds `n_codes` codes; None for "none".
    params: fp16 tensors stored beside the codes (scale, zero, local tensors site2..siteN).
    exact_mask: bool [batch]; True where a batch row was kept exact (NaN/Inf, or a degenerate
        block the codec could not compress safely; every row for method "none").
    exact_values: the exact rows, in the input dtype, [num_exact, kv_heads, tokens, head_dim].
    fallback_mask: bool [batch] or None; True where the codec stored a row with its simpler fallback (DecoQuant:
        T_S = I for a rank-deficient block, i.e. plain RTN in the same format). For reports; not stored data.
    """

    config: DecoQuantConfig
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    codes: torch.Tensor | None
    n_codes: int
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    exact_mask: torch.Tensor | None = None
    exact_values: torch.Tensor | None = None
    fallback_mask: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        b, h, t, d = self.shape
        return b * h * t * d

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor: codes, scales, zero points, fp16 local tensors, the
        exact-row mask and the exact rows."""
        return (_tensor_bytes(self.codes) + sum(_tensor_bytes(p) for p in self.params.values())
                + _tensor_bytes(self.exact_mask) + _tensor_bytes(self.exact_values))

    @property
    def fp16_nbytes(self) -> int:
        return 2 * self.numel

    @property
    def effective_bits(self) -> float:
        """Stored bits per element, metadata included."""
        return 8.0 * self.nbytes / max(self.numel, 1)

    @property
    def num_fallback(self) -> int:
        return 0 if self.fallback_mask is None else int(self.fallback_mask.sum())

    @property
    def num_exact(self) -> int:
        return 0 if self.exact_mask is None else int(self.exact_mask.sum())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.params)
        for name in ("codes", "exact_mask", "exact_values"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def to(self, device: torch.device | str) -> "CompressedKV":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, codes=move(self.codes), params={k: move(v) for k, v in self.params.items()},
                       exact_mask=move(self.exact_mask), exact_values=move(self.exact_values),
                       fallback_mask=move(self.fallback_mask))

    def __repr__(self) -> str:
        return (f"CompressedKV({self.config.label()}, kind={self.kind!r}, shape={list(self.shape)}, "
                f"nbytes={self.nbytes}, effective_bits={self.effective_bits:.3f}, exact_rows={self.num_exact}, "
                f"fallback_rows={self.num_fallback})")
