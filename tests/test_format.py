"""The format description: which configs the kernels read, the error messages generated from it, and the one
backend switch (parsed once, resolved once, passed from the cache down to every kernel call)."""

import pytest
import torch

import decoquant as dq
from decoquant.cache import CompressedKVStore
from decoquant.format import Backend, KVFormat, dequantize_problem

FUSED = [dict(preset="paper"), dict(preset="channel64-token"), dict(preset="kv-split"),
         dict(preset="paper", bits=2), dict(preset="channel64-token", bits=8),
         dict(method="decoquant", group_size=32, scale_granularity="token_head"),
         dict(method="decoquant", bits=3), dict(preset="channel64-token", bits=3, value_bits=2),
         dict(preset="paper", bits=2, value_bits=4)]
NOT_FUSED = [  # fields, the words the problem must name
    (dict(method="kivi"), "method='kivi'"),
    (dict(method="decoquant", num_sites=3), "num_sites=3"),
    (dict(method="decoquant", layout="channel"), "layout='channel'"),
    (dict(method="decoquant", group_size=8), "group_size=8"),
    (dict(method="decoquant", scale_granularity="channel", value_scale_granularity="channel"), "value scales"),
    (dict(method="decoquant", scale_granularity="group", value_scale_granularity="token"), "key scales 'group'"),
    (dict(preset="kv-split", block_size=256), "over 256"),
]


@pytest.mark.parametrize("fields", FUSED)
def test_fused_formats(fields):
    fmt = KVFormat.of(dq.DecoQuantConfig(**fields))
    assert fmt.fused and fmt.fused_problem() is None
    fmt.require_fused("this")  # no error


@pytest.mark.parametrize("fields,named", NOT_FUSED)
def test_formats_the_fused_kernels_do_not_read_say_why(fields, named):
    cfg = dq.DecoQuantConfig(**fields)
    fmt = KVFormat.of(cfg)
    assert not fmt.fused and named in fmt.fused_problem()
    with pytest.raises(ValueError, match=f"fused attention needs .*{cfg.label()}|layout='channel'"):
        CompressedKVStore(cfg, fused=True)


def test_a_cache_refuses_the_fake_quantization_layout_at_construction():
    with pytest.raises(ValueError, match="layout='channel'.*fake_quantize only"):
        CompressedKVStore(dq.DecoQuantConfig(method="decoquant", layout="channel"))


def test_the_format_is_derived_once_per_config():
    a, b = dq.DecoQuantConfig(preset="paper"), dq.DecoQuantConfig(preset="paper")
    assert KVFormat.of(a) is KVFormat.of(b)
    fmt = KVFormat.of(dq.DecoQuantConfig(preset="channel64-token"))
    assert fmt.channel_group == {"key": 64, "value": 0} and not fmt.symmetric and not fmt.ts_per_head


def test_compression_kernel_rules():
    cfg = dq.DecoQuantConfig(preset="channel64-token")
    fmt = KVFormat.of(cfg)
    assert fmt.compress_problem("key", (2, 4, 128, 64), torch.float16) is None
    assert "tile the tokens" in fmt.compress_problem("key", (2, 4, 96, 64), torch.float16)  # 96 % 64
    assert fmt.compress_problem("value", (2, 4, 96, 64), torch.float16) is None  # per-token value scales
    assert "dtype" in fmt.compress_problem("key", (2, 4, 128, 64), torch.float64)
    assert "head_dim=96" in fmt.compress_problem("key", (2, 4, 128, 96), torch.float16)
    assert "fewer MPO rows" in KVFormat.of(dq.DecoQuantConfig(preset="paper", block_size=2)).compress_problem(
        "key", (1, 1, 2, 64), torch.float16)
    assert dequantize_problem(True, 0) is None and "asymmetric" in dequantize_problem(False, 0)
    assert "per-channel" in dequantize_problem(True, 64)


def test_backend_is_parsed_once_and_resolved_once():
    assert Backend.parse("auto") is Backend.AUTO and Backend.parse(Backend.TORCH) is Backend.TORCH
    assert Backend.AUTO.on(True) is Backend.TRITON and Backend.AUTO.on(False) is Backend.TORCH
    assert Backend.TORCH.on(True) is Backend.TORCH and Backend.TRITON.on(False) is Backend.TRITON
    for build in (lambda: Backend.parse("cuda"), lambda: CompressedKVStore(dq.DecoQuantConfig(), backend="gpu"),
                  lambda: dq.compress(torch.randn(1, 1, 32, 64), dq.DecoQuantConfig(), backend="gpu")):
        with pytest.raises(ValueError, match=r"backend='(cuda|gpu)' is not supported; allowed values: \('auto'"):
            build()


def test_the_store_hands_its_backend_to_the_fused_step():
    cfg = dq.DecoQuantConfig(preset="paper", block_size=32, residual_length=16)
    store = CompressedKVStore(cfg, fused=True, backend="torch")
    x = torch.randn(2, 1, 2, 80, 64)
    store.append(x[0], x[1])
    k, v = store.append(x[0, :, :, :1], x[1, :, :, :1])
    assert k is v and k.backend is Backend.TORCH and k.keys.tokens == 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backend_torch_keeps_a_cuda_store_off_the_kernels(monkeypatch):
    """On CUDA, backend='torch' compresses, dequantizes and attends with the reference: every Triton entry
    point raises if called; the answer equals the kernels' within the fp16 rounding of the fused path."""
    import decoquant.kernels.triton.compress as triton_compress
    import decoquant.kernels.triton.decode_attention as triton_decode
    import decoquant.kernels.triton.dequantize as triton_dequantize
    from decoquant.kernels.attention import decode_attention

    cfg = dq.DecoQuantConfig(preset="channel64-token", bits=4, block_size=64, residual_length=32)
    x = torch.randn(2, 2, 4, 200, 64, device="cuda", dtype=torch.float16)
    q = torch.randn(2, 8, 64, device="cuda", dtype=torch.float16)

    def step(backend):
        store = CompressedKVStore(cfg, fused=True, backend=backend)
        store.append(x[0], x[1])
        kv, _ = store.append(x[0, :, :, :1], x[1, :, :, :1])
        return decode_attention(q, kv.keys, kv.values, 0.125, window_k=kv.window_keys, window_v=kv.window_values,
                                backend=kv.backend)

    fast = step("auto")
    for module, name in ((triton_compress, "gram_triton"), (triton_compress, "quantize_pack_triton"),
                         (triton_decode, "decode_blocks_partials"), (triton_dequantize, "dequantize_packed_triton")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a Triton kernel ran under backend='torch'"))
    ref = step("torch")
    assert float((fast - ref).norm() / ref.norm()) < 2e-2
