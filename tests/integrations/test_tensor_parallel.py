"""Tensor parallelism on the CPU: transformers' tp_plan="auto" over a 2-rank gloo group, a tiny
random Llama, greedy generation through DecoQuantCache on each rank vs one process."""

import os

import pytest
import torch

import decoquant as dq
from decoquant.integrations.transformers import cache_kwargs

CONFIGS = {
    "none": dq.DecoQuantConfig(method="none"),
    "head-local": dq.DecoQuantConfig(method="decoquant", bits=4, ts_sharing="head", scale_granularity="token_head",
                                     block_size=16, residual_length=8),
    "kivi": dq.DecoQuantConfig(method="kivi", bits=4, quant_group_size=16, block_size=16, residual_length=8),
}


def _generate(model, name):
    cache = dq.DecoQuantCache.from_model(model, CONFIGS[name])
    ids = (torch.arange(50)[None] * 7) % 256
    with torch.no_grad():
        out = model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=16, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, 50:].tolist(), torch.stack(out.logits).float()


def _rank(rank, path, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32)
        assert model.tp_size == 2
        out = {name: _generate(model, name) for name in CONFIGS}
        with pytest.raises(ValueError, match="tensor-parallel over 2 ranks"):
            dq.DecoQuantCache.from_model(model, dq.DecoQuantConfig(preset="paper"))
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_matches_one_process(tmp_path):
    pytest.importorskip("transformers")
    import socket

    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    expected = {name: _generate(single, name) for name in CONFIGS}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_rank, args=(str(tmp_path / "model"), port, results), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        for name, (tokens, logits) in expected.items():
            got_tokens, got_logits = results[rank][name]
            assert got_tokens == tokens, (rank, name)
            assert float((got_logits - logits).norm() / logits.norm()) < 1e-4, (rank, name)


def test_head_local_configs():
    assert dq.DecoQuantConfig(method="decoquant", ts_sharing="head", scale_granularity="token_head").head_local
    assert dq.DecoQuantConfig(method="decoquant", ts_sharing="head", scale_granularity="channel",
                              value_scale_granularity="token_head").head_local
    assert not dq.DecoQuantConfig(preset="paper").head_local
    assert not dq.DecoQuantConfig(method="decoquant", ts_sharing="head").head_local  # token scales span heads
    assert not dq.DecoQuantConfig(method="rtn").head_local
    assert dq.DecoQuantConfig(method="kivi").head_local and dq.DecoQuantConfig(method="rotation").head_local
