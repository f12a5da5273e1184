"""Blocks with rows stored exact (`ExactBlocks`): both decode kernels skip them and attention reads the exact
rows instead, against the torch reference and dense attention. On a CPU the kernels run through Triton's
interpreter."""

import pytest
import torch

from decoquant.kernels.attention import decode_attention
from decoquant.kernels.layout import ExactBlocks
from decoquant.kernels.reference import attention_reference, dequantize_packed
from kernel_cases import DEVICE, packed, rel, tolerance

pytest.importorskip("triton")


@pytest.mark.parametrize("kernel,q_heads,preset", [("mma", 4, "paper"), ("mma", 4, "channel64-token"),
                                                    ("rows", 2, "paper"), ("rows", 2, "channel64-token")])
@pytest.mark.usefixtures("poisoned_outputs")
def test_kernels_skip_blocks_stored_exact(kernel, q_heads, preset):
    """Rows of blocks stored exact (`ExactBlocks`): the kernels skip those blocks (their codes here are garbage
    that would change the result), and attention reads the exact tokens instead; the reference equals dense
    attention over the decoded blocks with the exact rows put in their place, at ragged lengths and padding."""
    b, kvh, d, block = 2, 2, 64, 64
    k, v = packed(b, kvh, 3 * block, d, 4, block, seed=21, preset=preset)
    gen = torch.Generator().manual_seed(4)
    # row 1 keeps block 1 exact, row 0 block 2; the skip mask is wider than the blocks (a capacity view)
    skip = torch.zeros(b, 5, dtype=torch.int8)
    skip[1, 1] = skip[0, 2] = 1
    ek, ev = torch.randn(b, kvh, 2 * block, d, generator=gen), torch.randn(b, kvh, 2 * block, d, generator=gen)
    positions = torch.arange(block, 3 * block, dtype=torch.int32)
    dense_k, dense_v = dequantize_packed(k).cpu(), dequantize_packed(v).cpu()
    for row, blk in ((1, 1), (0, 2)):
        span = slice(blk * block, (blk + 1) * block)
        j = slice((blk - 1) * block, blk * block)
        dense_k[row, :, span], dense_v[row, :, span] = ek[row, :, j], ev[row, :, j]
        for p in (k, v):
            p.codes[row, :, span] = 0xA5  # garbage, if it were read
    exact = ExactBlocks(skip.to(DEVICE), ek.to(DEVICE), ev.to(DEVICE), positions.to(DEVICE))
    q = torch.randn(b, q_heads, d, generator=gen)
    kv_start, kv_len = torch.tensor([3, 0]), torch.tensor([3 * block, 2 * block + 9])
    pos = torch.arange(3 * block)
    valid = (pos >= kv_start[:, None]) & (pos < kv_len[:, None])
    want = attention_reference(q, dense_k, dense_v, d ** -0.5, valid)
    args = (q.to(DEVICE), k, v, d ** -0.5, kv_start.to(DEVICE), kv_len.to(DEVICE))
    ref = decode_attention(*args, exact=exact, backend="torch")
    assert rel(ref.cpu(), want) < 1e-5
    out = decode_attention(*args, exact=exact, backend="triton", kernel=kernel, num_splits=2)
    assert torch.isfinite(out).all() and rel(out, ref) < tolerance(True)
