"""Public entry points: compress, decompress, fake_quantize."""

from __future__ import annotations

from dataclasses import replace

import torch

from .codecs import get_codec
from .codecs.base import Encoded
from .compressed import CompressedKV
from .config import KINDS, DecoQuantConfig
from .packing import pack_codes, unpack_codes


def _validate(x: torch.Tensor, config: DecoQuantConfig, kind: str) -> None:
    if not isinstance(config, DecoQuantConfig):
        raise ValueError(f"config must be a decoquant.DecoQuantConfig, got {type(config).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not supported; allowed values: {KINDS}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims [batch, kv_heads, tokens, head_dim], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a float tensor (float16, bfloat16, float32, float64), got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    config.check_head_dim(x.shape[-1])


def _encode(x: torch.Tensor, config: DecoQuantConfig, kind: str, backend: str) -> tuple[Encoded, torch.Tensor]:
    """Encode x with non-finite rows zeroed (or flagged by the GPU kernels themselves, which read x once);
    returns the encoding and the exact-row mask [B]."""
    b, spec = x.shape[0], config.spec(kind)
    codec = get_codec(config.method)
    if codec.uses_kernels(x, spec, backend):  # the route, decided once (format.compress_problem)
        enc = codec.encode_kernels([x], [spec])[0]  # they flag non-finite inputs and parameters
        return enc, enc.unsafe
    finite = torch.isfinite(x).reshape(b, -1).all(1)
    clean = torch.where(finite[:, None, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    enc = codec.encode(clean, spec)
    mask = ~finite if enc.unsafe is None else ~finite | enc.unsafe
    for p in enc.params.values():  # e.g. an fp16 scale that overflowed
        mask = mask | ~torch.isfinite(p.float()).reshape(b, -1).all(1)
    return enc, mask


def _restore(decoded: torch.Tensor, mask: torch.Tensor, exact: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    out = decoded.to(dtype)
    if exact is not None:
        out[mask] = exact
    return out


def compress(x: torch.Tensor, config: DecoQuantConfig, kind: str = "key", backend: str = "auto") -> CompressedKV:
    """Compress a KV tensor x [batch, kv_heads, tokens, head_dim] (any float dtype).

    backend: "auto" (Triton kernels on CUDA for the formats they take, else torch), "triton" or "torch".

    Returns a `CompressedKV` with packed codes and fp16 metadata. Batch rows that contain NaN/Inf
    or that the codec cannot compress safely are stored exactly (see `CompressedKV.exact_mask`).
    """
    _validate(x, config, kind)
    shape = tuple(x.shape)
    if config.method == "none":
        mask = torch.ones(shape[0], dtype=torch.bool, device=x.device)
        return CompressedKV(config, kind, shape, x.dtype, None, 0, {}, mask, x.detach().clone())
    if config.method == "decoquant" and config.layout == "channel":
        raise ValueError("layout='channel' stores a tokens x rank fp16 tensor and saves no memory: it is "
                         "supported by decoquant.fake_quantize only; use layout='group' to compress")
    enc, mask = _encode(x.detach(), config, kind, backend)
    return _stored(x, enc, mask, bool(mask.any()), config, kind)


def _stored(x: torch.Tensor, enc: Encoded, mask: torch.Tensor, any_exact: bool, config: DecoQuantConfig,
            kind: str) -> CompressedKV:
    """The CompressedKV of an encoding: packed codes, parameters, and x's rows under `mask` kept exact."""
    exact = x.detach()[mask].clone() if any_exact else None
    n_codes = x.shape[-1] if enc.packed else enc.codes.shape[-1]
    codes = enc.codes if enc.packed else pack_codes(enc.codes, config.kind_bits(kind))
    return CompressedKV(config, kind, tuple(x.shape), x.dtype, codes, n_codes, enc.params, mask, exact,
                        _not_exact(enc.fallback, mask) if any_exact else enc.fallback)


def _not_exact(fallback: torch.Tensor | None, exact: torch.Tensor) -> torch.Tensor | None:
    """The fallback rows that are not kept exact (only asked where some are: no work on the common path)."""
    return None if fallback is None else fallback & ~exact


def compress_kv(keys: torch.Tensor, values: torch.Tensor, config: DecoQuantConfig,
                backend: str = "auto") -> tuple[CompressedKV, CompressedKV]:
    """`compress(keys, config, "key", backend)` and `compress(values, config, "value", backend)`; where both
    take the GPU kernels (same shape), one batch of eigenproblems and one host sync serve both."""
    ck, cv, any_exact = compress_kv_deferred(keys, values, config, backend)
    if bool(any_exact):
        ck, cv = with_exact_rows(ck, keys), with_exact_rows(cv, values)
    return ck, cv


def compress_kv_deferred(keys: torch.Tensor, values: torch.Tensor, config: DecoQuantConfig,
                         backend: str = "auto") -> tuple[CompressedKV, CompressedKV, torch.Tensor]:
    """`compress_kv` without its host sync: (keys block, values block, any exact row: a bool tensor on the
    device). On the kernel route the blocks lack their exact rows until `with_exact_rows` adds them (needed
    only where that flag is True), so the caller can queue more GPU work before it asks."""
    _validate(keys, config, "key")
    _validate(values, config, "value")
    codec = get_codec(config.method) if config.method != "none" else None
    if codec is not None and keys.shape == values.shape:
        specs = [config.spec("key"), config.spec("value")]
        if codec.uses_kernels(keys, specs[0], backend) and codec.uses_kernels(values, specs[1], backend):
            encs = codec.encode_kernels([keys.detach(), values.detach()], specs)
            ck, cv = (_stored(x, e, e.unsafe, False, config, kind)
                      for x, e, kind in zip((keys, values), encs, ("key", "value")))
            return ck, cv, (encs[0].unsafe | encs[1].unsafe).any()
    ck, cv = compress(keys, config, "key", backend), compress(values, config, "value", backend)
    return ck, cv, (ck.exact_mask | cv.exact_mask).any()


def with_exact_rows(c: CompressedKV, x: torch.Tensor) -> CompressedKV:
    """c with x's rows under its exact mask stored (a no-op if they are, or there are none)."""
    if c.exact_values is not None or c.exact_mask is None or not bool(c.exact_mask.any()):
        return c
    return replace(c, exact_values=x.detach()[c.exact_mask].clone(),
                   fallback_mask=_not_exact(c.fallback_mask, c.exact_mask))


def decompress(c: CompressedKV) -> torch.Tensor:
    """Decode a CompressedKV back to a tensor of its original shape and dtype."""
    if not isinstance(c, CompressedKV):
        raise ValueError(f"c must be a decoquant.CompressedKV, got {type(c).__name__}")
    if c.config.method == "none":
        return c.exact_values.clone()
    enc = Encoded(unpack_codes(c.codes, c.config.kind_bits(c.kind), c.n_codes), c.params)
    decoded = get_codec(c.config.method).decode(enc, c.config.spec(c.kind), c.shape)
    return _restore(decoded, c.exact_mask, c.exact_values, c.dtype)


def fake_quantize(x: torch.Tensor, config: DecoQuantConfig, kind: str = "key", backend: str = "auto") -> torch.Tensor:
    """Quantize and reconstruct (accuracy studies). Decodes to exactly the values
    `decompress(compress(x, config, kind, backend))` returns, and also supports layout='channel'."""
    _validate(x, config, kind)
    if config.method == "none":
        return x.detach().clone()
    enc, mask = _encode(x.detach(), config, kind, backend)
    if enc.packed:
        enc.codes = unpack_codes(enc.codes, config.kind_bits(kind), x.shape[-1])
    decoded = get_codec(config.method).decode(enc, config.spec(kind), tuple(x.shape))
    exact = x.detach()[mask] if bool(mask.any()) else None
    return _restore(decoded, mask, exact, x.dtype)
