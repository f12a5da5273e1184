"""The one statement of which block formats the GPU kernels read, and of the backend choice.

`KVFormat.of(config)` derives, once per config, what a block holds (from the config's key and value
`KindSpec`s: codes of `bits` bits, fp16 T_S of g x g, scales per token / per token and head / per T_L channel
over token groups, symmetric or with zero points) and says which kernels read it. Every capability check and
its error message comes from here: `fused_problem()` (the decode-attention kernels), `compress_problem()` (the
block compression kernels, per kind) and `dequantize_problem()` (the dequantize kernel). A `None` problem means
the kernel reads it.

`Backend` names where the work runs; `Backend.parse` is the one check of a `backend=` argument and
`Backend.on` the one resolver of "auto" (Triton on CUDA, the pure-torch reference elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from .spec import KindSpec

FUSED_BITS = (2, 3, 4, 8)  # code widths the decode-attention and compression kernels read (keys and values each)
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


def kernel_problem(spec: KindSpec) -> str | None:
    """What keeps every kernel from blocks of `spec`, whatever the scales (None: nothing)."""
    if spec.method != "decoquant":
        return f"method={spec.method!r} (the kernels read method='decoquant')"
    if spec.layout != "group":
        return f"layout={spec.layout!r} (the kernels read layout='group')"
    if spec.num_sites != 2:
        return f"num_sites={spec.num_sites} (the kernels read 2 sites)"
    if spec.bits not in FUSED_BITS:
        return f"bits={spec.bits} (the kernels read {', '.join(map(str, FUSED_BITS))})"
    if spec.group_size not in KERNEL_GROUP_SIZES:
        return f"group_size={spec.group_size} (the kernels read {' or '.join(map(str, KERNEL_GROUP_SIZES))})"
    return None


def compress_problem(spec: KindSpec, shape: tuple, dtype) -> str | None:
    """Why the compression kernels cannot compress tensors of `shape` [B, H, T, D] and `dtype` with `spec` (None:
    they can): the kernels' rules, scales per token, per token and head, or per T_L channel over 16..128-token
    groups that tile T; power-of-two head_dim >= g; fp16, bf16 or fp32; at least g rows per MPO matrix (fewer
    rows take the SVD route, which pads)."""
    import torch

    problem = kernel_problem(spec)
    if problem is not None:
        return problem
    if spec.clip and (spec.symmetric or spec.granularity != "channel"):
        return (f"{spec.kind}s with clip_keys and {spec.granularity!r} scales (the compression kernels search the "
                "ranges of asymmetric per-channel key scales only)")
    _, h, t, d = shape
    if not _per_token(spec) and not (spec.granularity == "channel" and spec.scale_group in COMPRESS_CHANNEL_GROUPS
                                     and t % spec.scale_group == 0):
        return (f"{spec.kind} scales {spec.granularity!r} over {spec.scale_group} for {t} tokens (the compression "
                "kernels read scales per token or per channel over 16..128-token groups that tile the tokens)")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (the compression kernels read float16, bfloat16 or float32)"
    if d < spec.group_size or d & (d - 1):
        return f"head_dim={d} (the compression kernels read a power of two >= group_size)"
    if t * d // spec.group_size * (1 if spec.ts_sharing == "head" else h) < spec.group_size:
        return f"{t} tokens (fewer MPO rows than group_size={spec.group_size})"
    return None


def _per_token(spec: KindSpec) -> bool:
    return spec.granularity in PER_TOKEN


@dataclass(frozen=True)
class KVFormat:
    """What blocks made with one config hold (its key and value `KindSpec`s and the block size), and which
    kernels read them (see the module docstring)."""

    key: KindSpec
    value: KindSpec
    block_size: int

    @staticmethod
    @lru_cache(maxsize=256)
    def of(config) -> "KVFormat":
        """The format of `config`'s blocks (configs are frozen: derived once per config)."""
        return KVFormat(config.spec("key"), config.spec("value"), config.block_size)

    @property
    def label(self) -> str:
        return self.key.label

    @property
    def symmetric(self) -> bool:
        return self.key.symmetric

    @property
    def ts_per_head(self) -> bool:
        """One T_S per kv head (else one shared by the heads)."""
        return self.key.ts_sharing == "head"

    def scales(self, kind: str) -> KindSpec:
        return self.key if kind == "key" else self.value

    @property
    def channel_group(self) -> dict[str, int]:
        """Tokens per key / value scale group in the packed layout (0: per-token scales)."""
        return {"key": self.key.channel_group, "value": self.value.channel_group}

    def fused_problem(self) -> str | None:
        """Why the decode-attention kernels cannot read these blocks (None: they can): the kernels' rules,
        then value scales per token (or token and head), key scales per token or per T_L channel over
        32/64/128-token groups that tile the block."""
        problem = kernel_problem(self.key)
        if problem is not None:
            return problem
        problem = kernel_problem(self.value)
        if problem is not None:
            return problem
        if not _per_token(self.value):
            return f"value scales {self.value.granularity!r} (the decode kernels read value scales per token)"
        k = self.key
        if not _per_token(k) and not (k.granularity == "channel" and k.scale_group in FUSED_KEY_GROUPS
                                      and self.block_size % k.scale_group == 0):
            return (f"key scales {k.granularity!r} over {k.scale_group} (the decode kernels read key scales per "
                    f"token or per channel over {'/'.join(map(str, FUSED_KEY_GROUPS))}-token groups that tile the "
                    f"block of {self.block_size})")
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
        """`compress_problem` for `kind` tensors of these blocks."""
        return compress_problem(self.scales(kind), shape, dtype)


def dequantize_problem(symmetric: bool, channel_group: int) -> str | None:
    """Why the Triton dequantize kernel cannot read packed blocks (None: it can): it reads symmetric codes
    with per-token scales (the paper preset)."""
    if not symmetric:
        return "asymmetric codes (the dequantize kernel reads symmetric codes)"
    if channel_group:
        return "per-channel scales (the dequantize kernel reads per-token scales)"
    return None
