"""The fields each DecoQuant preset pins (see `DecoQuantConfig.preset`)."""

from __future__ import annotations

from typing import Any


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
