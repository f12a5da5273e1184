"""Weight-only quantization (WxA16) of a model's Linear layers, data-free: `quantize_weights`."""

from __future__ import annotations

from typing import Sequence

import torch

from .codec import WEIGHT_METHODS, decode_weight, encode_weight
from .linear import QuantLinear

__all__ = ["QuantLinear", "quantize_weights", "default_symmetric", "weight_memory", "encode_weight", "decode_weight",
           "WEIGHT_METHODS"]


def _select(model, modules: Sequence[str] | None) -> list[tuple[str, torch.nn.Linear]]:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if modules is None:  # every Linear inside the decoder layers (not the embedding / LM head)
        chosen = [n for n in linears if ".layers." in f".{n}"]
        if not chosen:
            raise ValueError("found no Linear modules inside '*.layers.*'; pass modules= explicitly")
        return [(n, linears[n]) for n in chosen]
    chosen = []
    for pattern in modules:
        hits = [n for n in linears if n == pattern or n.endswith("." + pattern)]
        if not hits:
            shown = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"modules: {pattern!r} matches no Linear module; Linear names end with {shown}")
        chosen += [n for n in hits if n not in chosen]
    return [(n, linears[n]) for n in chosen]


DEFAULT_GROUP_SIZE = 32


def default_symmetric(method: str) -> bool:
    """The quantizer each method uses unless told otherwise: RTN symmetric (the paper's baseline, and
    the better RTN on our models), DecoQuant asymmetric (its T_L is not centred; docs/results/weights.md)."""
    return method == "rtn"


def quantize_weights(model, method: str = "decoquant", bits: int = 4, modules: Sequence[str] | None = None,
                     group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool | None = None) -> dict:
    """Replace the selected `nn.Linear` modules of `model` by `QuantLinear`, in place.

    method: "decoquant" (2-site MPO, T_L per-output-channel RTN, T_S fp16) or "rtn" (per-output-channel
    RTN, the baseline). modules: None = every Linear in the decoder layers, or names / name suffixes
    such as ["k_proj", "v_proj"]. group_size: DecoQuant's chunk width g (one g x g T_S per matrix).
    symmetric: None = the method's default (`default_symmetric`). Returns `weight_memory(model)`.
    """
    if method not in WEIGHT_METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed values: {WEIGHT_METHODS}")
    if symmetric is None:
        symmetric = default_symmetric(method)
    from ..packing import SUPPORTED_BITS

    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed values: {SUPPORTED_BITS}")
    if any(isinstance(m, QuantLinear) for m in model.modules()) or getattr(model.config, "quantization_config", None):
        raise ValueError("the model is already quantized; load a fresh copy to quantize it again")
    selected = _select(model, modules)
    tied = getattr(model.config, "tie_word_embeddings", False)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, linear in selected:
        if tied and linear is out_emb:
            raise ValueError(f"modules: {name!r} shares its weight with the input embeddings (tie_word_embeddings); "
                             "quantizing it would change the embeddings too")
        if method == "decoquant" and linear.in_features % group_size:
            raise ValueError(f"{name}: in_features={linear.in_features} cannot be factorized into chunks of "
                             f"group_size={group_size}; use a group_size that divides it")
    for name, linear in selected:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(linear, method, bits, group_size, symmetric))
    return weight_memory(model)


def weight_memory(model) -> dict:
    """Bytes of the quantized Linear weights, and of the same weights in fp16."""
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    stored = sum(m.nbytes for m in quant)
    fp16 = sum(2 * m.in_features * m.out_features for m in quant)
    return {"quantized_modules": len(quant), "quantized_bytes": stored, "fp16_bytes": fp16,
            "ratio": stored / fp16 if fp16 else float("nan"),
            "bits_per_weight": 8 * stored / (fp16 / 2) if fp16 else float("nan")}
