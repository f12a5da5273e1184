"""The decode kernel over paged blocks (a paged engine's page bytes, read through a block table) against the
torch reference and against the same blocks laid out per sequence: shuffled, non-contiguous pages, unused pages
full of garbage bytes, ragged lengths, sinks (kv_start), skipped blocks and a window, for MHA, GQA and MQA and
both presets. On a CPU through Triton's interpreter at small shapes; on a GPU at real ones."""

import pytest
import torch

import decoquant as dq
from decoquant.buffer import pack_blocks
from decoquant.integrations.vllm.pages import PageFormat
from decoquant.kernels.attention import decode_attention
from decoquant.kernels.reference import dequantize_packed, gather_pages
from kernel_cases import CUDA, DEVICE, rel, tolerance

pytest.importorskip("triton")
from decoquant.kernels.triton.decode_rows import rows_kernel_supports

CASES = [  # kv heads, q heads, head_dim, block, lengths (compressed tokens per sequence)
    (2, 2, 64, 64, [64, 150, 1]),  # MHA: the rows kernel and the mma kernel
    (2, 8, 64, 64, [191, 64]),  # GQA-4
    (1, 32, 64, 128, [256, 129]),  # MQA: query rows split over programs
]
if CUDA:
    CASES += [(8, 32, 128, 128, [4096, 1000, 16384, 129, 3000, 7, 128, 8191]),  # Llama-3-8B
              (4, 28, 128, 128, [2048, 4000]),  # Qwen2.5-7B: 7 query heads per kv head
              (32, 32, 128, 128, [4096, 513])]  # Llama-2-7B (MHA)


def _pages(fmt: PageFormat, n: int, seed: int) -> torch.Tensor:
    """n pages of outlier-heavy random KV, then the same number of pages of random bytes (never attended: a
    kernel that reads past a sequence's blocks meets NaN and Inf)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *fmt.shape)
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k[..., 3] *= 25
    k[:, 0, :, -2] += 10
    v[..., 7] *= 8
    pages, exact = fmt.pack(k.to(DEVICE), v.to(DEVICE))
    assert not exact.any()
    junk = torch.randint(0, 256, (n, fmt.page_bytes), generator=gen, dtype=torch.uint8).to(DEVICE)
    return torch.cat([pages, junk])


def _block_table(lengths: list[int], block: int, pages: int, seed: int) -> torch.Tensor:
    """Each sequence's blocks on distinct pages in shuffled order among the first `pages` (the real ones), the
    rest of each row pointing at the garbage pages beyond them."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block) for n in lengths]
    width = max(need) + 1
    order = torch.randperm(pages, generator=gen).tolist()
    table = torch.randint(pages, 2 * pages, (len(lengths), width), generator=gen)
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = torch.tensor(order[at:at + n])
        at += n
    return table.to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("preset", ["paper", "channel64-token"])
@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "kv{}-q{}-d{}-blk{}".format(*c[:4]))
@pytest.mark.usefixtures("poisoned_outputs")
def test_paged_kernel_matches_reference(case, bits, preset):
    kvh, hq, d, block, lengths = case
    cfg = dq.DecoQuantConfig(method="decoquant", bits=bits, preset=preset, block_size=block, residual_length=block)
    fmt = PageFormat(cfg, kvh, d, torch.float16)
    need = sum(-(-n // block) for n in lengths)
    pages = _pages(fmt, need + 3, seed=bits + kvh)
    table = _block_table(lengths, block, need + 3, seed=hq)
    k, v = fmt.packed(pages)
    b = len(lengths)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(b, hq, d, generator=gen).to(DEVICE)
    kv_len = torch.tensor(lengths, device=DEVICE)
    kv_start = torch.tensor([min(4, n - 1) if i % 2 else 0 for i, n in enumerate(lengths)], device=DEVICE)  # sinks
    skip = torch.zeros(b, table.shape[1], dtype=torch.int8, device=DEVICE)
    skip[0, 1 if lengths[0] > block else 0] = 1  # a block kept exact elsewhere (its tokens in the window)
    wk, wv = (torch.randn(b, kvh, 6, d, generator=gen).to(DEVICE) for _ in range(2))
    valid = torch.rand(b, 6, generator=gen).to(DEVICE) < 0.7
    valid[:, 0] = True
    args = (q, k, v, 0.125, kv_start, kv_len, wk, wv, valid)
    ref = decode_attention(*args, skip=skip, block_table=table, backend="torch")
    # the same blocks laid out per sequence (the layout the transformers cache keeps)
    dense_k, dense_v = gather_pages(k, table), gather_pages(v, table)
    kernels = ["mma"] + (["rows"] if rows_kernel_supports(hq, kvh, k, v, True) else [])
    assert (kvh == hq and bits != 3) == ("rows" in kernels)  # MHA at 2 or 4 bits takes the rows kernel too
    for kernel in kernels:
        out = decode_attention(*args, skip=skip, block_table=table, backend="triton", num_splits=3, kernel=kernel)
        assert out.shape == (b, hq, d) and torch.isfinite(out).all()
        assert rel(out, ref) < tolerance(True) * 2.5, kernel  # fp16 dots round the (channel-scaled) query, p * s_v
        dense = decode_attention(q, dense_k, dense_v, 0.125, kv_start, kv_len, wk, wv, valid, skip=skip,
                                 backend="triton", num_splits=3, kernel=kernel)
        assert rel(out, dense) < 1e-5, kernel  # the same kernel, the same numbers


def test_page_views_decode_what_the_codec_decodes():
    """`PageFormat.packed` views the page bytes as the kernels' layout without copying; gathered through a block
    table they decode as `PageFormat.unpack` does, and as the per-sequence layout of the same blocks compressed one
    by one (`pack_blocks`, what the transformers cache keeps)."""
    cfg = dq.DecoQuantConfig(method="decoquant", bits=4, preset="channel64-token", block_size=128,
                             residual_length=128)
    fmt = PageFormat(cfg, 2, 64, torch.float32)
    x = torch.randn(2, 4, *fmt.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x[..., 5] *= 30
    pages, exact = fmt.pack(x[0], x[1])
    k, v = fmt.packed(pages)
    assert k.codes.data_ptr() == pages.data_ptr() and k.codes.shape == (4, 2, 128, 32) and not exact.any()
    assert k.channel_group == 64 and k.zeros is not None and v.channel_group == 0
    order = (2, 0, 3, 1)
    table = torch.tensor([order], device=DEVICE)
    for p, want, kind, src in zip((k, v), fmt.unpack(pages), ("key", "value"), x):
        got = dequantize_packed(gather_pages(p, table))[0]
        assert rel(got, torch.cat([want[i] for i in order], 1)) < 1e-6
        dense = pack_blocks([dq.compress(src[i:i + 1], cfg, kind) for i in order])
        assert rel(dequantize_packed(dense)[0], got) < 1e-6


def test_paged_arguments_are_checked():
    cfg = dq.DecoQuantConfig(method="decoquant", bits=4, block_size=64, residual_length=64)
    fmt = PageFormat(cfg, 1, 64, torch.float16)
    k, v = fmt.packed(_pages(fmt, 2, seed=1))
    q = torch.randn(2, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="block_table is"):
        decode_attention(q, k, v, 0.125, block_table=torch.zeros(3, 2, dtype=torch.int32, device=DEVICE),
                         backend="triton")
    kivi = PageFormat(dq.DecoQuantConfig(method="kivi", bits=2, block_size=64, residual_length=64), 1, 64,
                      torch.float16)
    with pytest.raises(ValueError, match="decode kernels cannot read these pages"):
        kivi.packed(torch.zeros(2, kivi.page_bytes, dtype=torch.uint8))
