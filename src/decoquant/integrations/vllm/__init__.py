"""DecoQuant as a vLLM general plugin: the entry point `register` (group `vllm.general_plugins`, name `decoquant`)
makes every attention layer of a vLLM engine store DecoQuant pages (`backend.DecoQuantBackend`; on CUDA where
`attention_backend="CUSTOM"` selects it). Install the
`vllm` extra; vLLM loads the plugin in each of its processes by itself. Set the config with
`LLM(..., additional_config={"decoquant": {"bits": 2}})` or the `DECOQUANT_VLLM` environment variable; set
`DECOQUANT_VLLM_DISABLE=1` to keep the plugin installed but off."""

from __future__ import annotations

import os


def register() -> None:
    """vLLM's entry point: DecoQuant's backend overrides the CPU attention backend (vLLM's CPU platform always picks
    that one) and is registered as the CUSTOM backend, which vLLM's CUDA platform uses where it is selected
    (`attention_backend="CUSTOM"`). Nothing else is touched."""
    if os.environ.get("DECOQUANT_VLLM_DISABLE", "") not in ("", "0"):
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, "decoquant.integrations.vllm.backend.DecoQuantBackend")
    register_backend(AttentionBackendEnum.CUSTOM, "decoquant.integrations.vllm.backend.DecoQuantCudaBackend")
