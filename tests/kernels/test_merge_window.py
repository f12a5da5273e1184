"""The merge kernels (triton/merge.py) vs the pure-torch reference: the exact window's chunks and the softmax merge
with the blocks' split partials. On a CPU through Triton's interpreter; on a GPU with its tensor-core dots."""

import pytest
import torch

from decoquant.kernels.attention import decode_attention
from kernel_cases import DEVICE, packed, rel, tolerance

pytest.importorskip("triton")


@pytest.mark.parametrize("window,s", [(0, 3), (5, 3), (37, 3), (133, 3), (37, 70)])
@pytest.mark.usefixtures("poisoned_outputs")
def test_merge_with_window_matches_reference(window, s):
    """The merge kernel: split partials (one split empty, as past a short sequence's end) with an exact
    window read through a non-contiguous view, GQA (2 query heads per kv head), a validity mask with one
    sequence's window fully masked, 3 splits (not a power of two) or 70 (merged in chunks, a whole chunk of
    them empty for one sequence)."""
    from decoquant.kernels.reference import merge_window_reference
    from decoquant.kernels.triton.merge import merge_with_window

    gen = torch.Generator().manual_seed(window + s)
    b, hq, kvh, d = 3, 4, 2, 64
    q = torch.randn(b, hq, d, generator=gen)
    o = torch.randn(b, hq, s, d, generator=gen) * 5
    m = torch.randn(b, hq, s, generator=gen) * 3
    l_ = torch.rand(b, hq, s, generator=gen) + 0.5
    m[1, :, 2], l_[1, :, 2], o[1, :, 2] = float("-inf"), 0.0, 0.0  # an empty split
    if s > 64:
        m[0, :, :40], l_[0, :, :40], o[0, :, :40] = float("-inf"), 0.0, 0.0  # empty chunks first
    wk = torch.randn(b, kvh, window + 3, d, generator=gen)[:, :, 3:]  # a view into a larger buffer
    wv = torch.randn(b, kvh, window + 3, d, generator=gen)[:, :, 3:]
    wk[..., 7] *= 20  # an outlier channel
    valid = torch.rand(b, window, generator=gen) > 0.3
    if window:
        valid[2] = False  # nothing of this sequence's window is attended
    args = [t.to(DEVICE) for t in (q, o, m, l_)]
    for wvalid in (None, valid):
        win = [t.to(DEVICE) if t is not None else None for t in (wk, wv, wvalid)]
        got = merge_with_window(*args, 0.125, *win)
        want = merge_window_reference(*args, 0.125, *win)
        assert got.shape == (b, hq, d) and torch.isfinite(got).all()
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("hq,kvh", [(4, 4), (8, 2), (32, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_window_chunks_in_model_dtype(hq, kvh, dtype):
    """The window in the model's dtype, as a decode step passes it, for MHA, GQA and MQA (32 query rows: two
    programs per kv head and chunk): 150 tokens in 3 chunks of 64, the last one partly filled, and a validity
    mask that empties the middle chunk of one sequence. The probabilities are rounded to the model's dtype for
    the value dot, as flash attention rounds them: bounded by that rounding."""
    from decoquant.kernels.reference import merge_window_reference
    from decoquant.kernels.triton.merge import merge_with_window

    gen = torch.Generator().manual_seed(hq + kvh)
    b, d, s, w = 2, 64, 5, 150
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    o = torch.randn(b, hq, s, d, generator=gen)
    m = torch.randn(b, hq, s, generator=gen) + 4
    l_ = torch.rand(b, hq, s, generator=gen) + 0.5
    wk = torch.randn(b, kvh, w, d, generator=gen)
    wk[..., 3] *= 10
    wv = torch.randn(b, kvh, w, d, generator=gen)
    valid = torch.rand(b, w, generator=gen) > 0.2
    valid[1, 64:128] = False
    args = [t.to(DEVICE) for t in (q, o, m, l_)]
    win = [t.to(dtype).to(DEVICE) for t in (wk, wv)] + [valid.to(DEVICE)]
    got = merge_with_window(*args, d ** -0.5, *win)
    want = merge_window_reference(*args, d ** -0.5, *win)
    assert rel(got, want) < (2e-3 if dtype == torch.float16 else 1.5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("window", [3, 130])
@pytest.mark.parametrize("preset", ["paper", "channel64-token"])
@pytest.mark.parametrize("group", [1, 4, 32], ids=["mha", "gqa4", "mqa"])
@pytest.mark.usefixtures("poisoned_outputs")
def test_window_in_the_blocks_launch(group, preset, window, dtype):
    """The default `fuse_window`: the tensor-core kernel's programs past the block splits attend the window, one
    chunk each (channel64-token: two stacked row groups, each over half a chunk; MQA at 2 bits: its 32 query rows
    split over four programs), and the merge reads one set of partials. Ragged lengths, left padding, a validity
    mask that empties one sequence's second chunk: the same result as the window's own launch (fp32: to rounding
    of the merge order), and the reference's within the kernels' tolerance."""
    kvh = 1 if group == 32 else 2
    bits = 2 if group == 32 else 4
    k, v = packed(2, kvh, 256, 64, bits, 128, seed=group + window, preset=preset)
    gen = torch.Generator().manual_seed(window)
    q = torch.randn(2, kvh * group, 64, generator=gen).to(dtype).to(DEVICE)
    wk, wv = (torch.randn(2, kvh, window, 64, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    valid = torch.rand(2, window, generator=gen) > 0.3
    valid[1, 64:128] = False
    args = (q, k, v, 0.125, torch.tensor([3, 0], device=DEVICE), torch.tensor([256 - 9, 131], device=DEVICE), wk, wv,
            valid.to(DEVICE))
    ref = decode_attention(*args, backend="torch")
    for low_precision in (True, False):
        own = decode_attention(*args, backend="triton", kernel="mma", low_precision=low_precision,
                               fuse_window=False)
        got = decode_attention(*args, backend="triton", kernel="mma", low_precision=low_precision)
        assert got.shape == ref.shape and torch.isfinite(got).all()
        # fp16 windows: the probabilities are rounded against a stacked row's own half-chunk maximum
        assert rel(got, own) < (1e-5 if dtype == torch.float32 else 1e-4)
        assert rel(got, ref) < tolerance(low_precision) * (3 if low_precision else 1) + (
            0 if dtype == torch.float32 else 2e-3)
