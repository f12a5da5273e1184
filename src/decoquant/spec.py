"""The two halves a `DecoQuantConfig` splits into: what a codec does to one kind of tensor (`KindSpec`, one for
keys and one for values) and how the cache streams blocks (`Streaming`). Both are derived by the config
(`DecoQuantConfig.spec(kind)`, `DecoQuantConfig.streaming`); codecs read only a `KindSpec`, the store only its
`Streaming` and the codec recipe it hands on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KindSpec:
    """Everything a codec reads to encode and decode one kind.

    method: the codec. kind: "key" or "value". bits: bits per stored code.
    granularity: the quantizer scales' layout (config.SCALE_GRANULARITIES), resolved for the method (KIVI: keys
        "channel", values "group"; RTN "token"; rotation and TurboQuant "token_head"; DecoQuant: its fields).
    quant_group_size: tokens ("channel") or channels ("group") per scale group.
    symmetric: absmax codes (True) or min/max with a zero point (False), resolved for the method.
    group_size, ts_sharing, num_sites, site_factors, layout: DecoQuant's MPO (see `DecoQuantConfig`).
    seed: of the rotation (rotation, TurboQuant).
    label: the config's label, for messages.
    outliers: TurboQuant's outlier channels per head and block, at bits + 1 (0: none).
    clip: search each scale group's range for the smallest squared error (`quant.quantize`).
    """

    method: str
    kind: str
    bits: int
    granularity: str
    quant_group_size: int
    symmetric: bool
    group_size: int
    ts_sharing: str
    num_sites: int
    site_factors: tuple[int, ...]
    layout: str
    seed: int
    label: str
    outliers: int = 0
    clip: bool = False

    @property
    def scale_group(self) -> int:
        """Tokens or channels per scale group ("channel" / "group" granularities), else 0."""
        return self.quant_group_size if self.granularity in ("channel", "group") else 0

    @property
    def channel_group(self) -> int:
        """Tokens per per-channel scale group in the packed layout (0: per-token scales)."""
        return self.quant_group_size if self.granularity == "channel" else 0


@dataclass(frozen=True)
class Streaming:
    """How a cache streams: `block_size` tokens per compressed block, the `residual_length` newest tokens and
    the first `sink_tokens` tokens kept exact."""

    block_size: int
    residual_length: int
    sink_tokens: int

    @property
    def exact_capacity(self) -> int:
        """The most tokens a fresh, unpadded store holds before its first block is compressed (everything it
        answers attention with up to then is exact): the sinks, the window and one token short of a block."""
        return self.sink_tokens + self.residual_length + self.block_size - 1


def site_factors(g: int, n_sites: int) -> tuple[int, ...] | None:
    """The column factors j_2..j_n of DecoQuant's small local tensors: g split into n_sites - 1 factors >= 2
    as evenly as possible (None if impossible)."""
    need = n_sites - 1
    if need == 1:
        return (g,)
    primes, rest, p = [], g, 2
    while rest > 1:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if len(primes) < need:
        return None
    factors = [1] * need
    for prime in sorted(primes, reverse=True):
        factors[factors.index(min(factors))] *= prime
    return tuple(sorted(factors, reverse=True))
