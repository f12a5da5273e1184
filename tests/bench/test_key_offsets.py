"""Qwen2-shaped keys with a bias of the scale real Qwen2/2.5 checkpoints carry (norm 400 per kv head): the
default preset's per-channel key scales and zero points take the offset out; a per-token scale (RTN) is set
by the offset channels and loses the rest."""

import pytest
import torch

pytest.importorskip("transformers")

import decoquant as dq
from decoquant.bench.key_offsets import offset_model
from decoquant.eval.divergence import chunked_logprobs, kl_per_token, kl_summary


def _kl(model, ids, cfg):
    from transformers import DynamicCache

    ref = chunked_logprobs(model, ids, DynamicCache(config=model.config))
    logp = chunked_logprobs(model, ids, dq.DecoQuantCache(cfg, model.config))
    assert torch.isfinite(logp).all()
    return kl_summary(kl_per_token(ref, logp))["kl_mean"]


def test_default_preset_is_unmoved_by_huge_key_bias():
    ids = torch.randint(0, 49152, (1, 384), generator=torch.Generator().manual_seed(0))
    default = dq.DecoQuantConfig(preset="channel64-token", bits=4, sink_tokens=4)
    rtn = dq.DecoQuantConfig(method="rtn", bits=4, sink_tokens=4)
    plain, biased = offset_model(1, 0.0), offset_model(1, 400.0)
    k_plain, k_biased = _kl(plain, ids, default), _kl(biased, ids, default)
    assert k_biased <= 1.5 * k_plain + 2e-3, (k_plain, k_biased)
    r_plain, r_biased = _kl(plain, ids, rtn), _kl(biased, ids, rtn)
    assert r_biased >= 4 * r_plain, (r_plain, r_biased)  # the probe does stress a per-token scale
    assert k_biased * 4 <= r_biased


def test_kl_helpers_check_shapes_and_are_zero_on_identical_inputs():
    logp = torch.log_softmax(torch.randn(2, 5, 11), -1)
    assert kl_summary(kl_per_token(logp, logp))["kl_mean"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        kl_per_token(logp, logp[:, :4])
