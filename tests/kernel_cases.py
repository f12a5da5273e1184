"""What the kernel tests share: the device, a relative error, and packed blocks of random outlier-heavy KV."""

import torch

import decoquant as dq
from decoquant.buffer import pack_blocks

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def packed(batch, kv_heads, tokens, head_dim, bits, block, seed, **cfg_fields):
    """Compress `tokens` of random outlier-heavy K and V block by block."""
    ks, vs = blocks(batch, kv_heads, tokens, head_dim, bits, block, seed, cfg_fields or {"preset": "paper"})
    return pack_blocks(ks), pack_blocks(vs)



def blocks(batch, kv_heads, tokens, head_dim, bits, block, seed, fields):
    """The same blocks as `packed`, unpacked (lists of CompressedKV for keys and values)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = dq.DecoQuantConfig(method="decoquant", bits=bits, **fields)
    ks, vs = [], []
    for _ in range(tokens // block):
        k = torch.randn(batch, kv_heads, block, head_dim, generator=gen)
        k[..., 3] *= 25
        k[:, 0, :, head_dim - 2] += 10
        v = torch.randn(batch, kv_heads, block, head_dim, generator=gen)
        v[..., 7] *= 8
        ks.append(dq.compress(k.to(DEVICE), cfg, "key"))
        vs.append(dq.compress(v.to(DEVICE), cfg, "value"))
    return ks, vs


def tolerance(low_precision):
    """Relative error allowed between a decode kernel and the torch reference."""
    if CUDA:
        return 1e-2  # fp16 or tf32 tensor-core dots
    return 2e-3 if low_precision else 1e-5  # the interpreter computes fp32 dots exactly
