"""decoquant: data-free low-bit KV-cache compression by matrix decomposition (DecoQuant)."""

from .api import compress, compress_kv, decompress, fake_quantize
from .compressed import CompressedKV
from .config import DecoQuantConfig

__all__ = ["DecoQuantConfig", "CompressedKV", "compress", "compress_kv", "decompress", "fake_quantize",
           "DecoQuantCache", "enable_fused_attention", "generate", "GraphDecoder"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: the transformers integration imports transformers
    if name == "DecoQuantCache":
        from .integrations.transformers import DecoQuantCache

        return DecoQuantCache
    if name == "enable_fused_attention":
        from .integrations.attention import enable_fused_attention

        return enable_fused_attention
    if name in ("generate", "GraphDecoder"):
        from .integrations import graph_decode

        return getattr(graph_decode, name)
    raise AttributeError(f"module 'decoquant' has no attribute {name!r}")
