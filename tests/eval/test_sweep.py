"""The quality-per-bit sweep: its grid, frontier and matched budgets, the frontier preset, and the bits the
fp16 sinks cost."""

import pytest

from decoquant import DecoQuantConfig


def test_sweep_grid_frontier_and_budgets():
    from decoquant.eval.sweep import SweepPoint, describe, mark_frontier, matched_budgets, sweep_grid

    grid = sweep_grid((2, 4), "quick", block_size=64)
    labels = [describe(c) for c in grid]
    assert len(labels) == len(set(labels)) and all(c.block_size == 64 for c in grid)
    assert len(sweep_grid((4,), "full")) > len(sweep_grid((4,), "quick"))
    with pytest.raises(ValueError, match="grid='huge'"):
        sweep_grid((4,), "huge")
    pts = [SweepPoint("a", "kivi", 2, 3.0, 0, 5.0), SweepPoint("b", "decoquant", 2, 2.4, 0, 6.0),
           SweepPoint("c", "decoquant", 2, 2.5, 0, 7.0), SweepPoint("d", "rtn", 2, 2.1, 0, 50.0)]
    mark_frontier(pts)
    assert [p.frontier for p in pts] == [True, True, False, True]
    rows = matched_budgets(pts, [2.5, 3.0])
    assert rows[0]["kivi"] is None and rows[0]["decoquant"].label == "b" and rows[1]["kivi"].label == "a"


@pytest.mark.slow
def test_frontier_preset_and_sink_bits_in_the_sweep(smollm2):
    """channel64-token pins its fields (and refuses explicit ones it would override); the sweep charges fp16
    sinks to the effective bits."""
    from decoquant.eval.perplexity import perplexity

    with pytest.raises(ValueError, match="pins quant_group_size=64, but quant_group_size=8 was given"):
        DecoQuantConfig(preset="channel64-token", bits=2, quant_group_size=8)
    c = DecoQuantConfig(preset="channel64-token", bits=2)
    got = (c.granularity("key"), c.granularity("value"), c.quant_group_size, c.is_symmetric)
    assert got == ("channel", "token", 64, False)
    with pytest.raises(ValueError, match="block_size=96 must be a multiple of 64"):
        DecoQuantConfig(preset="channel64-token", block_size=96)
    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog. " * 80, return_tensors="pt").input_ids[:, :512]
    base = perplexity(model, ids, c.replace(block_size=64, residual_length=64), window=512, chunk=128, max_windows=1)
    sink = perplexity(model, ids, c.replace(block_size=64, residual_length=64, sink_tokens=4), window=512, chunk=128,
                      max_windows=1)
    assert base.history_bits == pytest.approx(base.block_bits)
    assert sink.block_bits < sink.history_bits < 16  # the 4 fp16 sinks cost bits
    expected_sinks = 4 * 2 * 30 * 3 * 64  # tokens x (k, v) x layers x kv heads x head_dim
    blocks_elems = 384 * 2 * 30 * 3 * 64  # 6 blocks of 64 tokens are compressed after the sinks
    want = (sink.block_bits * blocks_elems + 16 * expected_sinks) / (blocks_elems + expected_sinks)
    assert sink.history_bits == pytest.approx(want, rel=1e-3)


def test_sweep_refuses_windows_that_compress_nothing():
    from decoquant.eval.sweep import run_sweep

    with pytest.raises(ValueError, match="no token would read a compressed block"):
        run_sweep(None, None, [DecoQuantConfig(method="rtn", bits=4)], window=256, chunk=128, max_windows=1)


def test_sweep_table_rows_fill_every_column():
    from decoquant.eval.sweep import SweepPoint, sweep_table

    pts = [SweepPoint("kivi-g32-2b", "kivi", 2, 3.0, 21.5, 2.1, kl_mean=0.0274, kl_p99=0.361, delta_se_pct=0.12),
           SweepPoint("rtn-2b", "rtn", 2, 2.1, 80.0, 278.4)]
    header, rule, *rows = sweep_table(pts).splitlines()
    assert all(r.count("|") == header.count("|") == rule.count("|") for r in rows)
    assert "| 0.0274 | 0.361 |" in rows[1] and "| 0.12% |" in rows[1] and "| - |" in rows[0]
