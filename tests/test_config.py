"""DecoQuantConfig: validation with errors that name the field, presets that refuse conflicting fields (and
their named constructors), and the split into per-kind codec recipes and the cache's streaming."""

import pytest

import decoquant as dq
from decoquant.spec import KindSpec, Streaming


BAD_INPUT = [
    (dict(method="gptq"), "method='gptq'"),
    (dict(bits=5), "bits=5"),
    (dict(preset="best"), "preset='best'"),
    (dict(layout="rows"), "layout='rows'"),
    (dict(ts_sharing="batch"), "ts_sharing='batch'"),
    (dict(scale_granularity="tensor"), "scale_granularity='tensor'"),
    (dict(num_sites=5), "num_sites=5"),
    (dict(group_size=0), "group_size=0"),
    (dict(num_sites=4, group_size=6), "group_size=6"),
    (dict(method="rtn", preset="paper"), "preset='paper'"),
    (dict(bits=4.0), "bits=4.0"),
    (dict(bits=True), "bits=True"),
    (dict(num_sites=2.0), "num_sites=2.0"),
    (dict(preset="paper", group_size=32), "preset='paper' pins group_size=16, but group_size=32"),
    (dict(preset="paper", symmetric=False), "pins symmetric=True, but symmetric=False"),
    (dict(preset="channel64-token", scale_granularity="token_head"), "pins scale_granularity='channel'"),
    # a field given at its default value is given, too: no preset overrides it silently
    (dict(preset="channel64-token", quant_group_size=32), "pins quant_group_size=64, but quant_group_size=32"),
    (dict(preset="kv-split", scale_granularity="token"), "pins scale_granularity='channel', but"),
]


@pytest.mark.parametrize("fields,message", BAD_INPUT)
def test_bad_config_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        dq.DecoQuantConfig(**fields)


def test_config_round_trip_and_paper_preset():
    c = dq.DecoQuantConfig(method="decoquant", bits=2, preset="paper")
    assert (c.group_size, c.symmetric, c.ts_sharing, c.scale_granularity) == (16, True, "layer", "token")
    assert dq.DecoQuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown config fields"):
        dq.DecoQuantConfig.from_dict({"bitz": 4})


def test_presets_follow_replace_and_name_their_head_dim_conflict():
    kv = dq.DecoQuantConfig(preset="kv-split")
    assert kv.replace(block_size=256).quant_group_size == 256  # the pinned group follows the block
    paper = dq.DecoQuantConfig(preset="paper", bits=2)
    assert paper.replace(bits=4).preset == "paper"
    free = paper.replace(preset=None, group_size=8)  # leaving the preset keeps its recipe, now explicit
    assert (free.group_size, free.is_symmetric, free.scale_granularity) == (8, True, "token")
    with pytest.raises(ValueError, match="preset='paper' pins group_size=16.*head_dim=72.*preset=None.*8"):
        paper.check_head_dim(72)


def test_the_config_splits_into_per_kind_recipes_and_streaming():
    """What the codec does to keys and to values (`spec`), resolved for every method, and how the cache streams."""
    c = dq.DecoQuantConfig.channel64_token(bits=2, block_size=256, sink_tokens=4)
    assert c == dq.DecoQuantConfig(method="decoquant", preset="channel64-token", bits=2, block_size=256, sink_tokens=4)
    k, v = c.spec("key"), c.spec("value")
    assert isinstance(k, KindSpec) and (k.kind, k.granularity, k.channel_group, k.symmetric, k.bits) == (
        "key", "channel", 64, False, 2)
    assert (v.granularity, v.channel_group, v.scale_group) == ("token", 0, 0)
    assert c.spec("key") is k  # derived once per config and kind
    assert c.streaming == Streaming(256, 128, 4) and c.streaming.exact_capacity == 4 + 128 + 255
    kivi = dq.DecoQuantConfig(method="kivi", quant_group_size=64)
    assert (kivi.spec("key").granularity, kivi.spec("value").granularity, kivi.spec("value").scale_group) == (
        "channel", "group", 64)
    assert dq.DecoQuantConfig(method="rtn").spec("key").granularity == "token"
    assert dq.DecoQuantConfig(method="rotation", rotation_seed=3).spec("value").seed == 3
    assert dq.DecoQuantConfig.paper(bits=2) == dq.DecoQuantConfig(method="decoquant", preset="paper", bits=2)
    assert dq.DecoQuantConfig.kv_split().preset == "kv-split"
    with pytest.raises(ValueError, match="preset='paper' pins group_size=16, but group_size=32"):
        dq.DecoQuantConfig.paper(group_size=32)
    with pytest.raises(ValueError, match="kind='query' is not supported"):
        c.spec("query")


def test_value_bits_give_values_their_own_width():
    import torch

    from decoquant.format import KVFormat

    cfg = dq.DecoQuantConfig(preset="channel64-token", bits=3, value_bits=2)
    assert cfg.spec("key").bits == 3 and cfg.spec("value").bits == 2
    assert cfg.label() == "decoquant-channel64-token-3b-v2b"
    assert dq.DecoQuantConfig(bits=3, value_bits=3).label() == dq.DecoQuantConfig(bits=3).label()
    assert KVFormat.of(cfg).fused and KVFormat.of(cfg.replace(bits=4)).fused  # the kernels read mixed widths
    x = torch.randn(1, 2, 128, 64, generator=torch.Generator().manual_seed(0))
    x[..., 3] *= 20
    for kind, bits in (("key", 3), ("value", 2)):
        c = dq.compress(x, cfg, kind)
        assert torch.equal(dq.decompress(c), dq.fake_quantize(x, cfg, kind))
        same = dq.compress(x, dq.DecoQuantConfig(preset="channel64-token", bits=bits), kind)
        assert c.nbytes == same.nbytes and torch.equal(dq.decompress(c), dq.decompress(same))
    kivi = dq.DecoQuantConfig(method="kivi", bits=4, value_bits=2)
    assert dq.compress(x, kivi, "value").effective_bits < dq.compress(x, kivi, "key").effective_bits


@pytest.mark.parametrize("fields,match", [
    ({"value_bits": 5}, "value_bits"),
    ({"method": "none", "value_bits": 2}, "method='none' stores no codes"),
    ({"method": "turboquant", "bits": 2, "value_bits": 4, "outlier_channels": 8}, "value_bits=4"),
])
def test_value_bits_rejects_what_it_cannot_mean(fields, match):
    with pytest.raises(ValueError, match=match):
        dq.DecoQuantConfig(**fields)


def test_quality_commands_read_key_value_width_pairs():
    from decoquant.cli.common import _parse_widths
    from decoquant.eval.job import method_configs

    assert _parse_widths("4,3:2,2") == [4, (3, 2), 2]
    for bad in ("3:5", "3:2:2", "x", "5"):
        with pytest.raises(SystemExit, match="not allowed"):
            _parse_widths(bad)
    labels = [c.label() for c in method_configs(["decoquant", "kivi"], [(3, 2)], {}, ["channel64-token"])]
    assert labels == ["decoquant-channel64-token-3b-v2b", "kivi-g32-3b-v2b"]
