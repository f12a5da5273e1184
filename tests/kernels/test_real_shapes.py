"""The decode kernels at the shapes models serve (head_dim 128, thousands of tokens, the launcher's own choice
of kernel, tile, splits and word view) against the torch reference: Llama-3-8B (32 query / 8 kv heads),
Qwen2.5-7B (28 / 4), MQA (32 / 1) and MHA (32 / 32), every preset and code width the kernels read, with
left padding, ragged lengths, a window and blocks stored exact. These shapes take minutes in Triton's
interpreter, so they run on the GPU only; the interpreter runs the same paths at head_dim 64 in
test_group_ratios.py and test_exact_blocks.py."""

import pytest
import torch

from decoquant.kernels.attention import decode_attention
from decoquant.kernels.layout import ExactBlocks
from kernel_cases import CUDA, packed, rel

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not CUDA, reason="real shapes need the GPU (the interpreter runs head_dim 64)")

LAYOUTS = [(32, 8), (28, 4), (32, 1), (32, 32)]  # (query heads, kv heads)
TOKENS = 2048


@pytest.mark.parametrize("preset", ["paper", "channel64-token", "channel64-clip"])
@pytest.mark.parametrize("bits,value_bits", [(2, 2), (3, 3), (4, 4), (8, 8), (3, 2)],
                         ids=["2bit", "3bit", "4bit", "8bit", "3:2bit"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"q{q}kv{k}" for q, k in LAYOUTS])
@pytest.mark.usefixtures("poisoned_outputs")
def test_fused_decode_matches_reference_at_real_shapes(layout, bits, value_bits, preset):
    hq, kvh = layout
    batch, d = 3, 128
    k, v = packed(batch, kvh, TOKENS, d, bits, 128, seed=hq + kvh + bits, preset=preset, value_bits=value_bits)
    gen = torch.Generator().manual_seed(bits)
    q = torch.randn(batch, hq, d, generator=gen).cuda()
    kv_start = torch.tensor([0, 77, 0], device="cuda")  # a left-padded row
    kv_len = torch.tensor([TOKENS, TOKENS - 5, 1000], device="cuda")  # ragged lengths, one inside a block
    wk, wv = (torch.randn(batch, kvh, 130, d, generator=gen).half().cuda() for _ in range(2))
    valid = torch.ones(batch, 130, dtype=torch.bool, device="cuda")
    valid[1, 100:] = False
    ref = decode_attention(q, k, v, d ** -0.5, kv_start, kv_len, wk, wv, valid, backend="torch")
    out = decode_attention(q, k, v, d ** -0.5, kv_start, kv_len, wk, wv, valid, backend="triton")
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel(out, ref) < 1e-2  # fp16 tensor-core dots round the transformed query and p * s_v


@pytest.mark.parametrize("preset", ["paper", "channel64-token"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"q{q}kv{k}" for q, k in LAYOUTS])
@pytest.mark.usefixtures("poisoned_outputs")
def test_window_in_the_blocks_launch_at_real_shapes(layout, bits, preset):
    """The default `fuse_window`: a static store's full window (260 tokens: 5 chunks, the last one partly filled)
    attended by the tensor-core kernel's own programs, fp16 as a model passes it, against the reference and the
    window's own launch."""
    hq, kvh = layout
    batch, d, w = 3, 128, 260
    k, v = packed(batch, kvh, TOKENS, d, bits, 128, seed=hq + kvh, preset=preset)
    gen = torch.Generator().manual_seed(hq)
    q = torch.randn(batch, hq, d, generator=gen).half().cuda()
    lengths = torch.tensor([0, 77, 0], device="cuda"), torch.tensor([TOKENS, TOKENS - 5, 1000], device="cuda")
    wk, wv = (torch.randn(batch, kvh, w, d, generator=gen).half().cuda() for _ in range(2))
    valid = torch.ones(batch, w, dtype=torch.bool, device="cuda")
    valid[1, 64:200] = False
    args = (q, k, v, d ** -0.5, *lengths, wk, wv, valid)
    ref = decode_attention(*args, backend="torch")
    own = decode_attention(*args, backend="triton", kernel="mma", fuse_window=False)
    got = decode_attention(*args, backend="triton", kernel="mma")
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert rel(got, ref) < 1e-2 and rel(got, own) < 1e-3


@pytest.mark.parametrize("layout", [(32, 8), (28, 4)], ids=["q32kv8", "q28kv4"])
@pytest.mark.usefixtures("poisoned_outputs")
def test_fused_decode_skips_exact_blocks_at_real_shapes(layout):
    """Blocks 2 and 9 of row 0 stored exact: the kernel skips them (their codes are garbage) and their tokens are
    attended with the window, as in the reference."""
    hq, kvh = layout
    batch, d, block = 2, 128, 128
    k, v = packed(batch, kvh, TOKENS, d, 4, block, seed=5, preset="channel64-token")
    gen = torch.Generator().manual_seed(1)
    skip = torch.zeros(batch, TOKENS // block, dtype=torch.int8)
    skip[0, 2] = skip[0, 9] = 1
    for n in (2, 9):
        k.codes[0, :, n * block:(n + 1) * block] = 255
        v.codes[0, :, n * block:(n + 1) * block] = 255
    rows = torch.randn(2, batch, kvh, 2 * block, d, generator=gen).half().cuda()
    positions = torch.cat([torch.arange(n * block, (n + 1) * block, dtype=torch.int32) for n in (2, 9)])
    exact = ExactBlocks(skip.cuda(), rows[0], rows[1], positions.cuda())
    q = torch.randn(batch, hq, d, generator=gen).cuda()
    ref = decode_attention(q, k, v, d ** -0.5, exact=exact, backend="torch")
    out = decode_attention(q, k, v, d ** -0.5, exact=exact, backend="triton")
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-2
