"""One validated configuration object for every codec and the cache.

`DecoQuantConfig` is a frozen dataclass: construct it, it validates itself, and every bad value
raises a `ValueError` that names the field and the allowed values. `preset="paper"` pins the
settings of the paper's memory-saving ("group") experiments exactly; `DecoQuantConfig.paper(...)` and the
other named constructors say the same. It splits into what the codec does to keys and to values
(`spec("key")`, `spec("value")`: `spec.KindSpec`) and how the cache streams (`streaming`: `spec.Streaming`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .options import (BITS, KINDS, LAYOUTS, METHOD_GRANULARITY, METHODS, PRESETS, SCALE_GRANULARITIES,
                      TS_SHARING)
from .options import choice as _choice
from .options import positive_int as _positive_int
from .presets import PINNABLE, UNSET, pin_fields, preset_fields
from .spec import KindSpec, Streaming
from .spec import site_factors as _site_factors


@dataclass(frozen=True)
class DecoQuantConfig:
    """Settings of a KV codec (and, for the cache, of its streaming blocks).

    Codec fields
    ------------
    method: "decoquant" | "rtn" | "kivi" | "rotation" | "turboquant" | "none".
    bits: 2, 3, 4 or 8 bits per stored code.
    value_bits: None (values at `bits` too) or the values' width (2, 3, 4 or 8), keys staying at `bits`: mixed
        widths at one budget, e.g. bits=3, value_bits=2 (the fused decode kernels read any pair of widths).
    preset: None, "paper", "kv-split", "channel64-token" or "channel64-clip". "paper" forces DecoQuant's published
        recipe: group layout, g=16, one g x g fp16 T_S per block shared by all heads, T_L quantized
        symmetrically with one absmax scale per token over all heads. The other two keep that T_S
        and quantize T_L asymmetrically with KIVI's split: keys per T_L channel, values per token.
        "kv-split": key scales over the whole block, value scales per token and head.
        "channel64-token" (the frontier's choice, docs/results/frontier.md): key scales over
        64-token groups, value scales per token over all heads; block_size must be a multiple of
        64. "channel64-clip": channel64-token with clip_keys. The fused kernel reads them all (key scale groups
        of 32, 64 or 128 tokens). A field a preset
        pins (PINNABLE) is left out or given the preset's value; any other value, the field's default
        included, is a ValueError, never silently replaced.
    group_size: g, the number of consecutive channels of one head that one row of the MPO matrix
        holds (DecoQuant, group layout). Must divide head_dim.
    layout: "group" (the paper's memory-saving layout) or "channel" (the paper's LAMBADA layout,
        whose T_S is tokens x rank: fake quantization only).
    ts_sharing: "layer" (one T_S for all kv heads) or "head" (one per kv head).
    scale_granularity: see SCALE_GRANULARITIES above.
    value_scale_granularity: None (values use scale_granularity too) or a separate granularity for
        values, e.g. per-channel scales for keys and per-token scales for values, as KIVI splits them.
    symmetric: symmetric absmax quantizer (True) or asymmetric min/max with zero point (False).
        None picks the method's own default (DecoQuant and RTN: symmetric; KIVI and rotation:
        asymmetric).
    num_sites: number of MPO local tensors (2, 3 or 4). The first holds the tokens and is
        quantized; the others factorize the g x g small tensor and stay fp16.
    quant_group_size: group size of KIVI's groups (tokens for keys, channels for values) and of
        DecoQuant's "channel"/"group" scale granularities.
    clip_keys: DecoQuant and KIVI with asymmetric keys: each key scale group's range is searched among
        shrunk min/max ranges for the smallest squared error (`quant.CLIP_RATIOS`; the group's own data, same
        stored format, so the fused kernels read it as they read unclipped keys).
    rotation_seed: seed of the random sign flips of the randomized Hadamard rotation (rotation) or of the
        random orthogonal rotation (turboquant).
    outlier_channels: turboquant only: the channels of each head and block with the largest RMS, kept at
        bits + 1 by a second TurboQuant instance (the paper's outlier split: 32 of 128 channels at 3 bits and
        the rest at 2 gives 2.5 bits per code); 0 = off. bits 2 or 3.

    Cache fields (used by `DecoQuantCache`)
    ------------
    block_size: tokens per compressed block.
    residual_length: the most recent tokens kept in full precision.
    sink_tokens: the first tokens of each sequence kept exact.
    """

    method: str = "decoquant"
    bits: int = 4
    value_bits: int | None = None
    preset: str | None = None
    group_size: int = UNSET  # fields a preset may pin: see PINNABLE for their defaults
    layout: str = UNSET
    ts_sharing: str = UNSET
    scale_granularity: str = UNSET
    value_scale_granularity: str | None = UNSET
    symmetric: bool | None = UNSET
    num_sites: int = UNSET
    quant_group_size: int = UNSET
    clip_keys: bool = UNSET
    rotation_seed: int = 0
    outlier_channels: int = 0
    block_size: int = 128
    residual_length: int = 128
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        _choice("preset", self.preset, PRESETS)
        _positive_int("block_size", self.block_size)
        preset = self.preset if self.method == "decoquant" else None
        for name, value in pin_fields(preset, self.block_size, {n: getattr(self, n) for n in PINNABLE}).items():
            object.__setattr__(self, name, value)
        _choice("method", self.method, METHODS)
        _choice("bits", self.bits, BITS)
        _choice("value_bits", self.value_bits, (None,) + tuple(BITS))
        if self.value_bits is not None and self.method == "none":
            raise ValueError("value_bits sets the values' code width: method='none' stores no codes")
        _choice("layout", self.layout, LAYOUTS)
        _choice("ts_sharing", self.ts_sharing, TS_SHARING)
        _choice("scale_granularity", self.scale_granularity, SCALE_GRANULARITIES)
        _choice("value_scale_granularity", self.value_scale_granularity, (None,) + SCALE_GRANULARITIES)
        _choice("symmetric", self.symmetric, (None, True, False))
        _choice("num_sites", self.num_sites, (2, 3, 4))
        _positive_int("group_size", self.group_size, 2)
        _positive_int("quant_group_size", self.quant_group_size)
        _positive_int("residual_length", self.residual_length, 0)
        _positive_int("sink_tokens", self.sink_tokens, 0)
        _positive_int("outlier_channels", self.outlier_channels, 0)
        _choice("clip_keys", self.clip_keys, (False, True))
        if self.clip_keys and self.method not in ("decoquant", "kivi"):
            raise ValueError(f"clip_keys applies to method='decoquant' or 'kivi', got method={self.method!r}")
        if self.clip_keys and self.is_symmetric:
            raise ValueError("clip_keys searches the range of asymmetric (min/max) key codes, but symmetric=True; "
                             "pass symmetric=False or a preset with asymmetric keys (channel64-token, kv-split)")
        if self.outlier_channels and self.method != "turboquant":
            raise ValueError(f"outlier_channels={self.outlier_channels} applies to method='turboquant', got "
                             f"method={self.method!r}")
        if self.outlier_channels and self.value_bits not in (None, 2, 3):
            raise ValueError(f"outlier_channels keeps outliers at bits + 1: value_bits={self.value_bits} is not "
                             "supported with it; use 2 or 3")
        if self.outlier_channels and self.bits not in (2, 3):
            raise ValueError(f"outlier_channels keeps outliers at bits + 1: bits={self.bits} is not supported with "
                             "it; allowed values: 2, 3")
        if self.preset is not None:
            if self.method != "decoquant":
                raise ValueError(f"preset={self.preset!r} applies to method='decoquant', got method={self.method!r}")
            if self.preset in ("channel64-token", "channel64-clip") and self.block_size % 64:
                raise ValueError(f"preset={self.preset!r} groups keys by 64 tokens: block_size={self.block_size} "
                                 "must be a multiple of 64")
        if self.num_sites > 2 and self.layout == "channel":
            raise ValueError("num_sites > 2 is only defined for layout='group'")
        if self.num_sites > 2 and _site_factors(self.group_size, self.num_sites) is None:
            raise ValueError(
                f"group_size={self.group_size} cannot be split into {self.num_sites - 1} factors >= 2 "
                f"for num_sites={self.num_sites}; use a group_size with enough prime factors (e.g. 16)")

    # ------------------------------------------------------------------ named presets
    @classmethod
    def paper(cls, bits: int = 4, **fields: Any) -> "DecoQuantConfig":
        """DecoQuant's published recipe (`preset="paper"`); a field it pins given otherwise is a ValueError."""
        return cls(method="decoquant", bits=bits, preset="paper", **fields)

    @classmethod
    def channel64_token(cls, bits: int = 4, **fields: Any) -> "DecoQuantConfig":
        """The quality-per-bit frontier's choice (`preset="channel64-token"`), the cache's default recipe."""
        return cls(method="decoquant", bits=bits, preset="channel64-token", **fields)

    @classmethod
    def kv_split(cls, bits: int = 4, **fields: Any) -> "DecoQuantConfig":
        """KIVI's key/value split over DecoQuant's T_L (`preset="kv-split"`)."""
        return cls(method="decoquant", bits=bits, preset="kv-split", **fields)

    # ------------------------------------------------------------------ the two halves
    def spec(self, kind: str) -> KindSpec:
        """What the codec does to `kind` ("key" or "value"), resolved (derived once per config and kind)."""
        _choice("kind", kind, KINDS)
        return _kind_spec(self, kind)

    @property
    def streaming(self) -> Streaming:
        """How a cache streams blocks of this config."""
        return Streaming(self.block_size, self.residual_length, self.sink_tokens)

    # ------------------------------------------------------------------ helpers
    def kind_bits(self, kind: str) -> int:
        """Bits per stored code of `kind` ("key" or "value")."""
        return self.value_bits if kind == "value" and self.value_bits is not None else self.bits

    def granularity(self, kind: str) -> str:
        """The scale granularity used for `kind` ("key" or "value"): the method's own, or DecoQuant's fields."""
        if self.method != "decoquant":
            return METHOD_GRANULARITY[self.method][kind == "value"]
        if kind == "value" and self.value_scale_granularity is not None:
            return self.value_scale_granularity
        return self.scale_granularity

    @property
    def is_symmetric(self) -> bool:
        """The quantizer actually used: the explicit field, else the method's default."""
        if self.symmetric is not None:
            return self.symmetric
        return self.method in ("decoquant", "rtn")

    @property
    def head_local(self) -> bool:
        """Whether every kv head is compressed on its own (no scale or T_S shared across heads), so
        a tensor-parallel rank holding some of the heads compresses them exactly as one GPU would."""
        if self.method in ("none", "kivi", "rotation", "turboquant"):
            return True
        if self.method == "rtn":
            return False  # one scale per token over all heads
        if self.layout == "channel":
            return False
        local = ("token_head", "channel", "group")
        return self.ts_sharing == "head" and self.granularity("key") in local and self.granularity("value") in local

    @property
    def site_factors(self) -> tuple[int, ...]:
        """Column factors j_2..j_n of the small local tensors (product = group_size)."""
        return _site_factors(self.group_size, self.num_sites) or (self.group_size,)

    def replace(self, **changes: Any) -> "DecoQuantConfig":
        """A copy with some fields changed (validated again). Into a preset (kept or new), the fields it pins
        are derived again (e.g. kv-split's key scale group follows a new block_size) unless `changes` sets
        them, which must then agree with it; with preset=None they stay as they are (the preset's recipe, now
        with explicit fields)."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; allowed fields: {sorted(FIELDS)}")
        preset = changes.get("preset", self.preset)
        if preset is not None and changes.get("method", self.method) == "decoquant":
            derived = set(preset_fields(preset, 0)) | set(preset_fields(self.preset, 0) if self.preset else ())
            for name in derived:  # the new preset's fields, and the old one's back to their defaults
                changes.setdefault(name, UNSET)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DecoQuantConfig":
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; allowed fields: {sorted(FIELDS)}")
        return cls(**data)

    def label(self) -> str:
        """Short human-readable name, e.g. 'decoquant-paper-4b', 'kivi-g32-2b' or 'kivi-g32-3b-v2b' (3-bit keys,
        2-bit values)."""
        if self.method == "none":
            return "none"
        if self.value_bits is not None and self.value_bits != self.bits:
            return f"{self.replace(value_bits=None).label()}-v{self.value_bits}b"
        if self.method == "decoquant":
            tag = self.preset or f"g{self.group_size}-{self.scale_granularity}"
            if self.preset is None and self.value_scale_granularity not in (None, self.scale_granularity):
                tag += f"-v{self.value_scale_granularity}"
            if self.clip_keys and self.preset != "channel64-clip":
                tag += "-clip"
            if self.layout == "channel":
                tag += "-channel"
            return f"decoquant-{tag}-{self.bits}b"
        if self.method == "kivi":
            return f"kivi-g{self.quant_group_size}{'-clip' if self.clip_keys else ''}-{self.bits}b"
        if self.outlier_channels:
            return f"{self.method}-o{self.outlier_channels}-{self.bits}b"
        return f"{self.method}-{self.bits}b"

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a ValueError if this config cannot compress heads of size `head_dim`."""
        if self.method == "decoquant" and self.layout == "group" and head_dim % self.group_size:
            sizes = [d for d in range(2, head_dim + 1) if head_dim % d == 0]
            if self.preset is not None:
                raise ValueError(
                    f"preset={self.preset!r} pins group_size={self.group_size}, which does not divide "
                    f"head_dim={head_dim}; pass preset=None with a group_size that does: {sizes}")
            raise ValueError(f"group_size={self.group_size} must divide head_dim={head_dim}; allowed group sizes: "
                             f"{sizes}")
        if self.outlier_channels and not (2 <= self.outlier_channels <= head_dim - 2 and head_dim % 8 == 0):
            raise ValueError(f"outlier_channels={self.outlier_channels} must lie in [2, head_dim - 2] and head_dim a "
                             f"multiple of 8, got head_dim={head_dim}")
        if self.method == "rotation" and head_dim & (head_dim - 1):
            raise ValueError(f"method='rotation' needs a power-of-two head_dim, got head_dim={head_dim}")
        if self.method == "kivi" or (self.method == "decoquant" and "group" in (self.granularity("key"),
                                                                                 self.granularity("value"))):
            if head_dim % self.quant_group_size and self.quant_group_size < head_dim:
                raise ValueError(
                    f"quant_group_size={self.quant_group_size} must divide head_dim={head_dim} "
                    "(channel groups of values)")


FIELDS = tuple(f.name for f in dataclasses.fields(DecoQuantConfig))


@lru_cache(maxsize=512)
def _kind_spec(config: DecoQuantConfig, kind: str) -> KindSpec:
    return KindSpec(config.method, kind, config.kind_bits(kind), config.granularity(kind), config.quant_group_size,
                    config.is_symmetric, config.group_size, config.ts_sharing, config.num_sites, config.site_factors,
                    config.layout, config.rotation_seed, config.label(), config.outlier_channels,
                    config.clip_keys and kind == "key")
