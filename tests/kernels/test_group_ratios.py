"""The tensor-core decode kernel for every number of query heads per kv head (1 = MHA through the mma kernel,
odd GQA groups as in Qwen2.5, 8 and 16, 32 = MQA) and every code width and preset, against the torch reference:
ragged lengths, left padding and a window. These shapes take each path the launcher can pick: value codes read
as bytes or as 16-bit word pairs, key scale groups stacked in the tile's padding rows or one a step, and a kv
head's query rows in one program or split over several."""

import pytest
import torch

from decoquant.kernels.attention import decode_attention
from kernel_cases import DEVICE, packed, rel, tolerance

pytest.importorskip("triton")

GROUPS = [1, 3, 7, 8, 16, 32]
# key bits, value bits: every width alone (3 bits: runs of 8 codes in 3 bytes), and mixed widths at one budget
WIDTHS = [(2, 2), (3, 3), (4, 4), (8, 8), (3, 2), (2, 3), (4, 2)]


@pytest.mark.parametrize("preset", ["paper", "channel64-token"])
@pytest.mark.parametrize("bits,value_bits", WIDTHS, ids=[f"{kb}:{vb}" for kb, vb in WIDTHS])
@pytest.mark.parametrize("group", GROUPS, ids=[f"group{g}" for g in GROUPS])
@pytest.mark.usefixtures("poisoned_outputs")
def test_mma_kernel_matches_reference_for_every_group_and_format(group, bits, value_bits, preset):
    from decoquant.kernels.triton.launch import _tile

    kvh = 2 if group < 16 else 1
    k, v = packed(2, kvh, 256, 64, bits, 128, seed=group + bits, preset=preset, value_bits=value_bits)
    assert (k.bits, v.bits) == (bits, value_bits)
    gen = torch.Generator().manual_seed(group)
    q = torch.randn(2, kvh * group, 64, generator=gen).to(DEVICE)
    kv_len = torch.tensor([256 - 9, 131], device=DEVICE)
    kv_start = torch.tensor([3, 0], device=DEVICE)
    wk, wv = (torch.randn(2, kvh, 5, 64, generator=gen).to(DEVICE) for _ in range(2))
    ref = decode_attention(q, k, v, 0.125, kv_start, kv_len, wk, wv, backend="torch")
    out = decode_attention(q, k, v, 0.125, kv_start, kv_len, wk, wv, backend="triton", num_splits=2, kernel="mma")
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # fp16 dots round the (channel-scaled) query and p * s_v: up to 5.5e-3 here in the interpreter, where fp32
    # dots match to 2e-6 for every width pair
    assert rel(out, ref) < tolerance(True) * 3
    exact = decode_attention(q, k, v, 0.125, kv_start, kv_len, wk, wv, backend="triton", num_splits=2, kernel="mma",
                             low_precision=False)
    assert rel(exact, ref) < tolerance(False)
    tile, stack, rows = _tile(k, None, group)
    assert group % rows == 0 and rows * stack <= max(16, group)


def test_value_words_view_only_where_the_bytes_pair_up():
    """Values are read as int16 words only through an exact view of the same bytes; odd rows, strides or offsets
    keep the byte path (None)."""
    from decoquant.kernels.triton.launch import _value_words

    codes = torch.randint(0, 256, (2, 3, 8, 64), dtype=torch.uint8)
    words = _value_words(codes)
    assert words.dtype == torch.int16 and words.shape == (2, 3, 8, 32)
    assert torch.equal(words.view(torch.uint8), codes)
    assert _value_words(codes[..., 1:]) is None and _value_words(codes[..., :63]) is None
    assert _value_words(torch.zeros(2, 3, 8, 66, dtype=torch.uint8)[..., 1:65]) is None


def test_tile_stacks_scale_groups_and_splits_rows_to_fit_one_tile():
    from decoquant.kernels.triton.launch import _tile

    k, _ = packed(1, 1, 128, 64, 4, 128, seed=0, preset="channel64-token")
    assert _tile(k, None, 4) == (128, 2, 4) and _tile(k, None, 8) == (128, 2, 8) and _tile(k, None, 7) == (128, 2, 7)
    assert _tile(k, None, 16) == (64, 1, 16) and _tile(k, None, 32) == (64, 1, 32) and _tile(k, 32, 4) == (64, 1, 4)
    k2, _ = packed(1, 1, 128, 64, 2, 128, seed=0, preset="channel64-token")
    assert _tile(k2, None, 16) == (128, 2, 8) and _tile(k2, None, 32) == (128, 2, 8)
    assert _tile(k2, None, 17) == (64, 1, 17)
    paper, _ = packed(1, 1, 128, 64, 4, 128, seed=0)
    assert _tile(paper, None, 4) == (128, 1, 4) and _tile(paper, 32, 4) == (32, 1, 4)
    assert _tile(paper, None, 32) == (128, 1, 32)
    paper2, _ = packed(1, 1, 128, 64, 2, 128, seed=0)
    assert _tile(paper2, None, 32) == (128, 1, 16)
    # at 4 bits the rows split only where one block per split leaves SMs idle (batch 1, short contexts)
    assert _tile(k, None, 32, starved=True) == (128, 2, 8) and _tile(paper, None, 32, starved=True) == (128, 1, 16)
    assert _tile(k, None, 4, starved=True) == (128, 2, 4)


def test_rows_split_only_where_split_k_cannot_fill_the_gpu():
    from decoquant.kernels.triton.launch import _sms, _starved

    sms = _sms(torch.device(DEVICE))
    assert _starved(1, 4 * sms - 1, torch.device(DEVICE)) and not _starved(1, 4 * sms, torch.device(DEVICE))
    assert not _starved(8 * 8, 256, torch.device(DEVICE))  # batch 8 x 8 kv heads x 32k


def test_split_count_is_a_power_of_two_near_the_programs_per_sm_asked_for(monkeypatch):
    """The tensor-core kernel's splits: 2 programs per SM rounded down (132 SMs: 4 programs x 64 splits at batch
    1 x 32k, not 256 splits of one block, whose 512 partials per query head the merge spilled), never more
    splits than blocks, at least one; the rows kernel's: 16 per SM rounded up."""
    from decoquant.kernels.triton import launch as da

    monkeypatch.setattr(da, "_sms", lambda device: 132)
    cpu = torch.device("cpu")
    mma = lambda programs, blocks: da._num_splits(programs, blocks, cpu, per_sm=2, round_up=False)  # noqa: E731
    assert [mma(p, 256) for p in (2, 4, 8, 32, 64, 256, 1024)] == [128, 64, 32, 8, 4, 1, 1]
    assert mma(4, 32) == 32 and mma(4, 5) == 5 and mma(4, 1) == 1
    assert [da._num_splits(p, 256, cpu, per_sm=16) for p in (32, 256, 8192)] == [128, 16, 1]


@pytest.mark.parametrize("starved", [False, True], ids=["one-program", "rows-split"])
@pytest.mark.parametrize("preset", ["paper", "channel64-token"])
@pytest.mark.usefixtures("poisoned_outputs")
def test_mqa_at_4_bits_matches_reference_with_and_without_the_row_split(preset, starved, monkeypatch):
    """Both configurations the launcher picks for MQA at 4 bits (32 rows in one program, or split over programs
    where the GPU is starved), whatever this machine's SM count makes of the shape."""
    import decoquant.kernels.triton.decode_attention as launcher

    monkeypatch.setattr(launcher, "_starved", lambda *a, **k: starved)
    k, v = packed(2, 1, 256, 64, 4, 128, seed=3, preset=preset)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 32, 64, generator=gen).to(DEVICE)
    kv_len, kv_start = torch.tensor([256 - 9, 131], device=DEVICE), torch.tensor([3, 0], device=DEVICE)
    ref = decode_attention(q, k, v, 0.125, kv_start, kv_len, backend="torch")
    out = decode_attention(q, k, v, 0.125, kv_start, kv_len, backend="triton", num_splits=2, kernel="mma")
    assert torch.isfinite(out).all() and rel(out, ref) < tolerance(True) * 2.5
