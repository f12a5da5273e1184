"""The fields each DecoQuant preset pins (see `DecoQuantConfig.preset`), and how a config's given fields meet them."""

from __future__ import annotations

from typing import Any


class _Unset:
    """The default of a field a preset may pin: "not given" (the preset's value, else the field's own default),
    so a preset can tell a field set to its default value from one left out."""

    def __repr__(self) -> str:
        return "<the preset's value, else the default>"


UNSET: Any = _Unset()
# the fields a preset may pin, with their values when no preset pins them
PINNABLE = dict(group_size=16, layout="group", ts_sharing="layer", scale_granularity="token",
                value_scale_granularity=None, symmetric=None, num_sites=2, quant_group_size=32, clip_keys=False)


def preset_fields(preset: str, block_size: int) -> dict[str, Any]:
    """The fields a preset pins (see `DecoQuantConfig.preset`)."""
    if preset == "paper":
        return dict(group_size=16, ts_sharing="layer", scale_granularity="token", value_scale_granularity=None,
                    symmetric=True, num_sites=2)
    if preset == "kv-split":
        return dict(group_size=16, ts_sharing="layer", scale_granularity="channel",
                    value_scale_granularity="token_head", symmetric=False, num_sites=2, layout="group",
                    quant_group_size=block_size)
    fields = dict(group_size=16, ts_sharing="layer", scale_granularity="channel", value_scale_granularity="token",
                  symmetric=False, num_sites=2, layout="group", quant_group_size=64)
    # "channel64-token": chosen from the quality-per-bit frontier (docs/results/frontier.md); "channel64-clip":
    # the same with the key range search (`clip_keys`)
    return {**fields, "clip_keys": preset == "channel64-clip"}


def pin_fields(preset: str | None, block_size: int, given: dict[str, Any]) -> dict[str, Any]:
    """The PINNABLE fields' values: each one `given` (UNSET where left out) becomes the preset's value, else its
    default; one given that differs from what the preset pins is a ValueError."""
    pinned = {} if preset is None else preset_fields(preset, block_size)
    out = {}
    for name, default in PINNABLE.items():
        value = given[name]
        if value is UNSET:
            value = pinned.get(name, default)
        elif name in pinned and value != pinned[name]:
            raise ValueError(
                f"preset={preset!r} pins {name}={pinned[name]!r}, but {name}={value!r} was given; drop "
                f"{name} to use the preset, or pass preset=None to set every field yourself")
        out[name] = value
    return out
