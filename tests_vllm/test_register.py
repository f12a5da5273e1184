"""The plugin's registration, without an engine: the CPU override and the CUSTOM backend that vLLM's CUDA
platform selects (`attention_backend="CUSTOM"`), checked through vLLM's own CUDA selection code."""

import torch

from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig

from decoquant.integrations.vllm import register


def test_register_overrides_cpu_and_registers_custom(monkeypatch):
    monkeypatch.delenv("DECOQUANT_VLLM_DISABLE", raising=False)
    register()
    cpu, custom = AttentionBackendEnum.CPU_ATTN.get_class(), AttentionBackendEnum.CUSTOM.get_class()
    assert cpu.__name__ == "DecoQuantBackend" and cpu.get_name() == "CPU_ATTN"
    assert custom.__name__ == "DecoQuantCudaBackend" and custom.get_name() == "CUSTOM"
    assert custom.get_impl_cls() is cpu.get_impl_cls()


def test_custom_backend_passes_vllms_selection_checks(monkeypatch):
    """What vLLM's CUDA platform runs on a selected backend (`validate_configuration`, read in its
    `get_attn_backend_cls`; the CUDA platform itself does not import in the CPU build): no reasons on an H100/H200
    (compute capability 9.0) for a GQA decoder layer, the backend's reason for a sliding-window one."""
    from vllm.platforms.interface import DeviceCapability

    monkeypatch.delenv("DECOQUANT_VLLM_DISABLE", raising=False)
    register()
    custom = AttentionBackendEnum.CUSTOM.get_class()
    config = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=128)
    assert custom.validate_configuration(device_capability=DeviceCapability(9, 0), **config._asdict()) == []
    reasons = custom.validate_configuration(device_capability=DeviceCapability(9, 0),
                                            **config._replace(has_sliding_window=True)._asdict())
    assert reasons == ["sliding window not supported"]
