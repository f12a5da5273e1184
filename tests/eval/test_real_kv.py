"""Codecs on real KV captured from SmolLM2-135M (post-RoPE, 1024 tokens, all 30 layers)."""

import pytest

import decoquant as dq
from decoquant.eval.reconstruction import evaluate_config

pytestmark = pytest.mark.slow

# mean relative Frobenius error over layers, (K, V), measured + ~15%
MAX_ERROR = {
    ("decoquant", 2): (0.84, 0.94), ("decoquant", 4): (0.18, 0.17), ("decoquant", 8): (0.010, 0.0095),
    ("rtn", 4): (0.26, 0.19), ("kivi", 4): (0.046, 0.098), ("rotation", 4): (0.10, 0.103),
}


def config(method, bits):
    return dq.DecoQuantConfig(method=method, bits=bits, preset="paper" if method == "decoquant" else None)


def test_shapes(smollm2_kv):
    assert len(smollm2_kv) == 30
    assert tuple(smollm2_kv[0][0].shape) == (1, 3, 1024, 64)


def test_paper_preset_beats_per_token_rtn_at_4_bits(smollm2_kv):
    """The paper's central claim, on real post-RoPE KV."""
    paper = evaluate_config(smollm2_kv, config("decoquant", 4))
    rtn = evaluate_config(smollm2_kv, config("rtn", 4))
    assert paper.key_error < rtn.key_error
    assert paper.value_error < rtn.value_error
    assert paper.effective_bits <= 4.2
    assert paper.exact_blocks == 0


@pytest.mark.parametrize("method,bits", list(MAX_ERROR))
def test_error_thresholds_on_real_kv(smollm2_kv, method, bits):
    row = evaluate_config(smollm2_kv, config(method, bits))
    max_k, max_v = MAX_ERROR[(method, bits)]
    assert row.key_error <= max_k and row.value_error <= max_v, (row.key_error, row.value_error)
