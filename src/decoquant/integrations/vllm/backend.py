"""The vLLM attention backend that stores DecoQuant pages: thin glue between vLLM's backend contract and
`paged.PagedLayer` (state) / `pages.PageFormat` (bytes). Imported only inside a vLLM process (`plugin.register`).

vLLM asks the backend for its page cell (`customize_spec`: `state_content_bytes`, so the engine fits more tokens in
the same memory), hands every layer its pages as one tensor `[num_pages, kv_heads, block_size, cell]`, and calls
`forward` with the step's queries, keys and values and the batch's block tables (`forward_includes_kv_cache_update`:
the writes happen in `forward`, which knows each token's position). Requests with one new token (decode) attend
through `PagedLayer.decode`: the decode kernels read the packed pages in place through the block table (the fused
Triton kernel on CUDA, its torch reference elsewhere). Prefill chunks, and formats the kernels do not read, read
each sequence back and attend with `paged.attend`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from .options import page_format, plugin_config, plugin_options
from .paged import PagedLayer, attend


@dataclass
class DecoQuantMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]  # [num_reqs + 1], on the host
    seq_lens: list[int]  # [num_reqs]
    block_table: torch.Tensor  # [num_reqs, max_pages], on the host
    block_table_device: torch.Tensor  # the same, where the decode kernels read it
    slot_mapping: torch.Tensor  # [num_actual_tokens]


class DecoQuantMetadataBuilder(AttentionMetadataBuilder[DecoQuantMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DecoQuantMetadata:
        m = common_attn_metadata
        return DecoQuantMetadata(num_actual_tokens=m.num_actual_tokens,
                                 query_start_loc=m.query_start_loc_cpu[:m.num_reqs + 1].tolist(),
                                 seq_lens=m.seq_lens[:m.num_reqs].tolist(),
                                 block_table=m.block_table_tensor[:m.num_reqs].cpu(),
                                 block_table_device=m.block_table_tensor[:m.num_reqs],
                                 slot_mapping=m.slot_mapping[:m.num_actual_tokens])


class DecoQuantBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    accept_output_buffer: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # the enum member it overrides (vLLM's CPU platform always picks that one)

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int]:
        return [plugin_config(plugin_options()).block_size]  # a page is one compressed block: vLLM must not split it

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any head size the config's group size divides (checked by PageFormat)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        fmt = page_format(plugin_options(), spec.num_kv_heads, spec.head_size, spec.dtype, spec.block_size)
        return replace(spec, state_content_bytes=fmt.cell_bytes)

    @staticmethod
    def get_impl_cls() -> type["DecoQuantImpl"]:
        return DecoQuantImpl

    @staticmethod
    def get_builder_cls() -> type["DecoQuantMetadataBuilder"]:
        return DecoQuantMetadataBuilder


class DecoQuantCudaBackend(DecoQuantBackend):
    """The same backend under the enum member vLLM's CUDA platform honours for an out-of-tree backend: select it
    with `attention_backend="CUSTOM"` (server: `--attention-backend CUSTOM`)."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"


class DecoQuantImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, alibi_slopes,
                 sliding_window, kv_cache_dtype: str, logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        unsupported = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                       "logits_soft_cap": logits_soft_cap or None, "sinks": sinks,
                       "kv_sharing_target_layer_name": kv_sharing_target_layer_name}
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"the DecoQuant vLLM backend does not support {name} (got {value!r}); "
                                          "set DECOQUANT_VLLM_DISABLE=1 to serve this model with vLLM's own backend")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"the DecoQuant vLLM backend serves decoder attention, not {attn_type!r}")
        if kv_cache_dtype != "auto":
            raise NotImplementedError(f"kv_cache_dtype={kv_cache_dtype!r}: the DecoQuant backend stores its own "
                                      "format; leave kv_cache_dtype='auto'")
        vllm_config = get_current_vllm_config()
        tp = vllm_config.parallel_config.tensor_parallel_size
        self.options = plugin_options()
        config = plugin_config(self.options, head_size)
        if tp > 1 and config.method != "none" and not config.head_local:
            raise NotImplementedError(f"tensor_parallel_size={tp}: {config.label()} shares scales or T_S across kv "
                                      "heads; use a head-local config (ts_sharing='head', "
                                      "scale_granularity='token_head')")
        if vllm_config.speculative_config is not None:
            raise NotImplementedError("speculative decoding rewrites cache slots; the DecoQuant backend refuses it")
        # filling pages beyond two per schedulable request are pages of finished requests (`paged.PagedLayer`)
        self.max_filling = 2 * vllm_config.scheduler_config.max_num_seqs
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.sinks = None
        self.layer: PagedLayer | None = None  # built on the first forward, when the page shape is known
        self.reads_pages = False

    def _paged(self, kv_cache: torch.Tensor, dtype: torch.dtype) -> tuple[PagedLayer, torch.Tensor]:
        pages = kv_cache.view(torch.uint8).view(kv_cache.shape[0], -1)
        if self.layer is None:
            config = plugin_config(self.options, self.head_size)
            fmt = page_format(self.options, self.num_kv_heads, self.head_size, dtype, config.block_size)
            if pages.shape[1] != fmt.page_bytes:
                raise RuntimeError(f"vLLM allocated pages of {pages.shape[1]} bytes, the format needs "
                                   f"{fmt.page_bytes}; was the decoquant plugin loaded in every process?")
            self.layer = PagedLayer(fmt, config.sink_tokens, self.max_filling)
            # decode steps read the pages in place where the decode kernels read the format (else, and for prefill,
            # each sequence is read back and attended: `paged.attend`)
            self.reads_pages = fmt.fused_problem() is None
        return self.layer, pages

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the DecoQuant backend")
        if attn_metadata is None:  # profiling and warm-up runs
            return output
        m: DecoQuantMetadata = attn_metadata
        paged, pages = self._paged(kv_cache, key.dtype)
        starts, n = m.query_start_loc, m.num_actual_tokens
        pasts = [seq_len - (starts[i + 1] - starts[i]) for i, seq_len in enumerate(m.seq_lens)]
        # writes first: a request of this step may read a page another one fills in this step (prefix caching
        # hands out a page as cached the step it is scheduled to be computed)
        positions = torch.cat([torch.arange(past, seq_len) for past, seq_len in zip(pasts, m.seq_lens)])
        paged.write(pages, key[:n], value[:n], m.slot_mapping[:n].to(torch.long).cpu(), positions)
        rest = range(len(pasts))
        if self.reads_pages:  # one decode token: all of them at once, the pages read in place by the decode kernels
            one = [i for i in rest if starts[i + 1] - starts[i] == 1]
            if one:
                rows = torch.tensor([starts[i] for i in one], device=query.device)
                out = paged.decode(pages, query.index_select(0, rows), m.block_table[one],
                                   [m.seq_lens[i] for i in one], self.scale,
                                   device_table=m.block_table_device[rows.new_tensor(one)])
                output.index_copy_(0, rows, out.to(output.dtype))
                rest = [i for i in rest if starts[i + 1] - starts[i] != 1]
        for i in rest:
            past = pasts[i]
            a, b = starts[i], starts[i + 1]
            k_past, v_past = paged.read(pages, m.block_table[i].tolist(), past)
            k = torch.cat([k_past, key[a:b].transpose(0, 1).to(k_past.dtype)], 1)
            v = torch.cat([v_past, value[a:b].transpose(0, 1).to(v_past.dtype)], 1)
            output[a:b] = attend(query[a:b], k, v, self.scale, past).to(output.dtype)
        return output
