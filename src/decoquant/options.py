"""The allowed values of the configuration's fields, and the checks whose errors name the field and them."""

from __future__ import annotations

from typing import Any

METHODS = ("decoquant", "rtn", "kivi", "rotation", "turboquant", "none")
BITS = (2, 3, 4, 8)
KINDS = ("key", "value")
LAYOUTS = ("group", "channel")
TS_SHARING = ("layer", "head")
# Granularity of the quantizer scales of DecoQuant's large local tensor T_L:
#   token       one scale per token over all heads (the paper)
#   token_head  one scale per token and head
#   channel     one scale per channel over groups of `quant_group_size` tokens (KIVI keys)
#   group       one scale per token over groups of `quant_group_size` channels (KIVI values)
SCALE_GRANULARITIES = ("token", "token_head", "channel", "group")
PRESETS = (None, "paper", "kv-split", "channel64-token", "channel64-clip")
# what every integration (DecoQuantCache.from_model, lm-eval, vLLM, the CLI) runs unless told otherwise: the
# quality-per-bit frontier's preset (docs/results/frontier.md) with 4 sink tokens
DEFAULT_PRESET = "channel64-token"
DEFAULT_SINK_TOKENS = 4
# the scale granularity of each method's keys and values (DecoQuant's: its fields)
METHOD_GRANULARITY = {"rtn": ("token", "token"), "kivi": ("channel", "group"), "rotation": ("token_head",) * 2,
                      "turboquant": ("token_head",) * 2, "none": ("token", "token")}


def choice(name: str, value: Any, allowed: tuple) -> None:
    # `4.0 in (2, 4)` and `True in (1,)` hold in Python: a value must also have an allowed value's type
    if value not in allowed or not any(type(value) is type(a) for a in allowed if a == value):
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {shown}")


def positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
