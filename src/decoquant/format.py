"""The one statement of which block formats the GPU kernels read, and of the backend choice.

`KVFormat.of(config)` derives, once per config, what a block holds (codes of `bits` bits, fp16 T_S of
g x g, scales per token / per token and head / per T_L channel over token groups, symmetric or with zero
points) and says which kernels read it. Every capability check and its error message comes from here:
`fused_problem()` (the decode-attention kernels), `compress_problem()` (the block compression kernels)
and `dequantize_problem()` (the dequantize kernel). A `None` problem means the kernel reads it.

`Backend` names where the work runs; `Backend.parse` is the one check of a `backend=` argument and
`Backend.on` the one resolver of "auto" (Triton on CUDA, the pure-torch reference elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

FUSED_BITS = (2, 4, 8)  # code widths the decode-attention and compression kernels read
KERNEL_GROUP_SIZES = (16, 32)  # T_S sizes g the kernels read
FUSED_KEY_GROUPS = (32, 64, 128)  # tokens per per-channel key scale group the decode kernels read
COMPRESS_CHANNEL_GROUPS = (16, 32, 64, 128)  # the same, for the compression kernels
PER_TOKEN = ("token", "token_head")


class Backend(str, Enum):
    """Where kernels run: "triton" (the GPU kernels; on a CPU through Triton's interpreter), "torch" (the
    pure-torch reference) or "auto" (triton on CUDA, torch elsewhere)."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"

    @classmethod
    def parse(cls, value, name: str = "backend") -> "Backend":
        """The Backend of a `backend=` argument (a Backend or its name), or a clear error naming `name`."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not supported; allowed values: "
                             f"{tuple(b.value for b in cls)}") from None

    def on(self, cuda: bool) -> "Backend":
        """This backend for work on a CUDA device (`cuda`) or not: "auto" resolved, the others as they are."""
        if self is Backend.AUTO:
            return Backend.TRITON if cuda else Backend.TORCH
        return self


BACKENDS = tuple(b.value for b in Backend)


@dataclass(frozen=True)
class ScaleLayout:
    """How one kind's quantizer scales are laid out: `granularity` (see config.SCALE_GRANULARITIES) and, for
    "channel" (tokens) and "group" (channels), the group size; 0 otherwise."""

    granularity: str
    group: int = 0

    @property
    def per_token(self) -> bool:
        return self.granularity in PER_TOKEN


@dataclass(frozen=True)
class KVFormat:
    """What blocks made with one config hold, and which kernels read them (see the module docstring)."""

    method: str
    layout: str
    num_sites: int
    bits: int
    group_size: int
    block_size: int
    symmetric: bool
    ts_per_head: bool  # one T_S per kv head (else one shared by the heads)
    key: ScaleLayout
    value: ScaleLayout
    label: str

    @staticmethod
    @lru_cache(maxsize=256)
    def of(config) -> "KVFormat":
        """The format of `config`'s blocks (configs are frozen: derived once per config)."""
        def scales(kind: str) -> ScaleLayout:
            gran = config.granularity(kind)
            return ScaleLayout(gran, config.quant_group_size if gran in ("channel", "group") else 0)

        return KVFormat(config.method, config.layout, config.num_sites, config.bits, config.group_size,
                        config.block_size, config.is_symmetric, config.ts_sharing == "head", scales("key"),
                        scales("value"), config.label())

    def scales(self, kind: str) -> ScaleLayout:
        return self.key if kind == "key" else self.value

    @property
    def channel_group(self) -> dict[str, int]:
        """Tokens per key / value scale group in the packed layout (0: per-token scales)."""
        return {kind: self.scales(kind).group if self.scales(kind).granularity == "channel" else 0
                for kind in ("key", "value")}

    def _kernel_problem(self) -> str | None:
        """What keeps every kernel from these blocks, whatever the scales (None: nothing)."""
        if self.method != "decoquant":
            return f"method={self.method!r} (the kernels read method='decoquant')"
        if self.layout != "group":
            return f"layout={self.layout!r} (the kernels read layout='group')"
        if self.num_sites != 2:
            return f"num_sites={self.num_sites} (the kernels read 2 sites)"
        if self.bits not in FUSED_BITS:
            return f"bits={self.bits} (the kernels read {', '.join(map(str, FUSED_BITS))})"
        if self.group_size not in KERNEL_GROUP_SIZES:
            return f"group_size={self.group_size} (the kernels read {' or '.join(map(str, KERNEL_GROUP_SIZES))})"
        return None

    def fused_problem(self) -> str | None:
        """Why the decode-attention kernels cannot read these blocks (None: they can): the kernels' rules,
        then value scales per token (or token and head), key scales per token or per T_L channel over
        32/64/128-token groups that tile the block."""
        problem = self._kernel_problem()
        if problem is not None:
            return problem
        if not self.value.per_token:
            return f"value scales {self.value.granularity!r} (the decode kernels read value scales per token)"
        k = self.key
        if not k.per_token and not (k.granularity == "channel" and k.group in FUSED_KEY_GROUPS
                                    and self.block_size % k.group == 0):
            return (f"key scales {k.granularity!r} over {k.group} (the decode kernels read key scales per token or "
                    f"per channel over {'/'.join(map(str, FUSED_KEY_GROUPS))}-token groups that tile the block of "
                    f"{self.block_size})")
        return None

    @property
    def fused(self) -> bool:
        return self.fused_problem() is None

    def require_fused(self, what: str) -> None:
        """A ValueError saying that `what` needs blocks the decode kernels read, and why these are not."""
        problem = self.fused_problem()
        if problem is not None:
            raise ValueError(f"{what} needs blocks the fused decode kernels read; {self.label} has {problem}")

    def compress_problem(self, kind: str, shape: tuple, dtype) -> str | None:
        """Why the compression kernels cannot compress `kind` tensors of `shape` [B, H, T, D] and `dtype`
        (None: they can): the kernels' rules, scales per token, per token and head, or per T_L channel over
        16..128-token groups that tile T; power-of-two head_dim >= g; fp16, bf16 or fp32; at least g rows
        per MPO matrix (fewer rows take the SVD route, which pads)."""
        import torch

        problem = self._kernel_problem()
        if problem is not None:
            return problem
        _, h, t, d = shape
        s = self.scales(kind)
        if not s.per_token and not (s.granularity == "channel" and s.group in COMPRESS_CHANNEL_GROUPS
                                    and t % s.group == 0):
            return (f"{kind} scales {s.granularity!r} over {s.group} for {t} tokens (the compression kernels read "
                    "scales per token or per channel over 16..128-token groups that tile the tokens)")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {dtype} (the compression kernels read float16, bfloat16 or float32)"
        if d < self.group_size or d & (d - 1):
            return f"head_dim={d} (the compression kernels read a power of two >= group_size)"
        if t * d // self.group_size * (1 if self.ts_per_head else h) < self.group_size:
            return f"{t} tokens (fewer MPO rows than group_size={self.group_size})"
        return None


def dequantize_problem(symmetric: bool, channel_group: int) -> str | None:
    """Why the Triton dequantize kernel cannot read packed blocks (None: it can): it reads symmetric codes
    with per-token scales (the paper preset)."""
    if not symmetric:
        return "asymmetric codes (the dequantize kernel reads symmetric codes)"
    if channel_group:
        return "per-channel scales (the dequantize kernel reads per-token scales)"
    return None
