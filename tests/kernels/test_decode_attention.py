"""Fused decode attention (Triton) vs the pure-torch reference. On a CPU the kernel runs through
Triton's interpreter at small shapes; on a GPU at real ones."""

import pytest
import torch

import decoquant as dq
from decoquant.kernels.attention import decode_attention
from decoquant.kernels.layout import PackedKV
from decoquant.kernels.reference import dequantize_packed
from decoquant.buffer import pack_blocks
from kernel_cases import CUDA, DEVICE, blocks, packed, rel, tolerance

triton = pytest.importorskip("triton")
tl = triton.language
from decoquant.kernels.triton import int_dot  # noqa: E402


CASES = [  # batch, kv heads, q heads, compressed tokens, valid lengths, window, head_dim, bits, block
    (1, 1, 1, 64, [63], 0, 64, 4, 32),
    (2, 2, 6, 128, [100, 128], 5, 64, 4, 32),
    (3, 1, 4, 96, [96, 33, 65], 1, 64, 2, 32),
    (1, 2, 2, 64, [50], 3, 32, 8, 16),
    (2, 1, 32, 64, [64, 40], 2, 64, 2, 32),  # MQA at 2 bits: two programs of 16 query rows each
]
if CUDA:
    CASES += [(4, 8, 32, 1024, [1000, 1024, 517, 63], 17, 128, 4, 128),
              (2, 32, 32, 2048, [2048, 1500], 100, 128, 2, 128),
              (2, 1, 32, 1024, [1024, 700], 9, 128, 8, 128),  # MQA, values read as 16-bit words
              (2, 8, 64, 512, [512, 300], 3, 128, 4, 128)]  # 8 query rows per kv head


@pytest.mark.parametrize("low_precision", [True, False], ids=["fp16-dots", "fp32-dots"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-kv{}-q{}-t{}-d{}-{}bit".format(*c[:4], c[6], c[7]))
@pytest.mark.usefixtures("poisoned_outputs")
def test_fused_matches_reference(case, low_precision):
    b, kvh, hq, t, lengths, w, d, bits, block = case
    k, v = packed(b, kvh, t, d, bits, block, seed=t + bits)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(b, hq, 2 * d, generator=gen)[..., ::2].to(DEVICE)  # non-contiguous query
    kv_len = torch.tensor(lengths, device=DEVICE)
    kv_start = torch.tensor([i % 3 for i in range(b)], device=DEVICE)  # left padding
    wk = torch.randn(b, kvh, w, d, generator=gen).to(DEVICE) if w else None
    wv = torch.randn(b, kvh, w, d, generator=gen).to(DEVICE) if w else None
    ref = decode_attention(q, k, v, d ** -0.5, kv_start, kv_len, wk, wv, backend="torch")
    out = decode_attention(q, k, v, d ** -0.5, kv_start, kv_len, wk, wv, backend="triton",
                           num_splits=3, tile=min(32, block), low_precision=low_precision)
    assert out.shape == (b, hq, d) and torch.isfinite(out).all()
    assert rel(out, ref) < tolerance(low_precision)


@pytest.mark.usefixtures("poisoned_outputs")
def test_per_head_scales_and_ts():
    k, v = packed(2, 2, 64, 64, 4, 32, seed=5, ts_sharing="head", scale_granularity="token_head")
    assert k.ts.shape[1] == 2 and k.scales.shape[1] == 2
    q = torch.randn(2, 4, 64).to(DEVICE)
    ref = decode_attention(q, k, v, 0.125, backend="torch")
    out = decode_attention(q, k, v, 0.125, backend="triton", num_splits=2, tile=32)
    assert rel(out, ref) < tolerance(True)


@pytest.mark.parametrize("fields", [
    {"preset": "channel64-token", "block_size": 128},  # keys per T_L channel over 64 tokens, asymmetric
    {"preset": "kv-split", "block_size": 64},  # one key group per block, values per token and head
    {"scale_granularity": "token_head", "symmetric": False},  # asymmetric per-token keys and values
], ids=["channel64-token", "kv-split", "asym-token-head"])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("q_heads", [4, 32], ids=["groups-stacked", "rows-split"])
@pytest.mark.usefixtures("poisoned_outputs")
def test_asymmetric_and_channel_scales(fields, bits, q_heads):
    """Asymmetric codes and per-channel key scales: the kernel folds channel scales into the query per
    tile and adds the zero points; ragged lengths, left padding and a window as in the main test. With 2 query
    rows per kv head a 128-token step stacks both 64-token scale groups of the default preset in the tile's
    padding rows; with 16 at 2 bits two programs take 8 rows each, at 4 bits one steps by one group."""
    block = fields.get("block_size", 64)
    k, v = packed(2, 2, 2 * block, 64, bits, block, seed=11 + bits, **fields)
    assert k.zeros is not None and v.zeros is not None
    assert k.channel_group == (fields.get("quant_group_size") or (64 if fields.get("preset") == "channel64-token"
                                                                  else block if "preset" in fields else 0))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, q_heads, 64, generator=gen).to(DEVICE)
    kv_len = torch.tensor([2 * block - 7, block + 3], device=DEVICE)
    kv_start = torch.tensor([0, 2], device=DEVICE)
    wk, wv = (torch.randn(2, 2, 3, 64, generator=gen).to(DEVICE) for _ in range(2))
    ref = decode_attention(q, k, v, 0.125, kv_start, kv_len, wk, wv, backend="torch")
    for low_precision in (False, True):  # fp16 dots also round the channel-scaled query: a little looser
        out = decode_attention(q, k, v, 0.125, kv_start, kv_len, wk, wv, backend="triton", num_splits=2,
                               low_precision=low_precision)
        assert rel(out, ref) < tolerance(low_precision) * (2.5 if low_precision and not CUDA else 1)
    # the reference itself decodes what the codec decodes
    keys = torch.cat([dq.decompress(c) for c in blocks(2, 2, 2 * block, 64, bits, block, 11 + bits, fields)[0]], 2)
    assert rel(dequantize_packed(k), keys) < 1e-3


ROWS_CASES = [  # batch, kv heads (= query heads), compressed tokens, valid lengths, window, head_dim, block
    (1, 1, 64, [63], 0, 64, 32),
    (3, 2, 192, [100, 192, 65], 5, 64, 64),
    (2, 2, 256, [256, 140], 3, 64, 128),  # two key scale groups per block (channel64-token)
]
if CUDA:
    ROWS_CASES += [(4, 32, 1024, [1000, 1024, 517, 63], 17, 128, 128), (2, 8, 4096, [4096, 3001], 100, 128, 128)]


@pytest.mark.parametrize("fields", [{"preset": "paper"}, {"preset": "channel64-token"},
                                    {"scale_granularity": "token_head", "symmetric": False}],
                         ids=["paper", "channel64-token", "asym-token-head"])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("case", ROWS_CASES, ids=lambda c: "b{}-kv{}-t{}-d{}".format(c[0], c[1], c[2], c[5]))
@pytest.mark.usefixtures("poisoned_outputs")
def test_rows_kernel_matches_reference(case, bits, fields):
    """The one-row (MHA) kernel: dp2a on the GPU, its emulation (same integer products) in the
    interpreter; symmetric and asymmetric codes, per-token and per-channel key
    scales; ragged lengths, left padding, a window, a non-contiguous query, outlier channels."""
    b, h, t, lengths, w, d, block = case
    if fields.get("preset") == "channel64-token":
        if block % 64:
            pytest.skip("per-channel key scales over 64-token groups need blocks of a multiple of 64")
        fields = dict(fields, block_size=block)
    k, v = packed(b, h, t, d, bits, block, seed=t + bits + d, **fields)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, h, 2 * d, generator=gen)[..., ::2].to(DEVICE)
    q[:, :, 5] *= 10  # an outlier query channel
    kv_len = torch.tensor(lengths, device=DEVICE)
    kv_start = torch.tensor([i % 3 for i in range(b)], device=DEVICE)
    wk = torch.randn(b, h, w, d, generator=gen).to(DEVICE) if w else None
    wv = torch.randn(b, h, w, d, generator=gen).to(DEVICE) if w else None
    ref = decode_attention(q, k, v, d ** -0.5, kv_start, kv_len, wk, wv, backend="torch")
    out = decode_attention(q, k, v, d ** -0.5, kv_start, kv_len, wk, wv, backend="triton", kernel="rows",
                           num_splits=3)
    assert out.shape == (b, h, d) and torch.isfinite(out).all()
    assert rel(out, ref) < 5e-3  # int16 query and weights (14 bits + sign), exact integer sums over codes


def _with_poisoned_capacity(p: PackedKV, blocks: int) -> PackedKV:
    """p followed by `blocks` blocks of unwritten capacity: random code bytes, NaN scales, zeros and T_S."""
    from dataclasses import replace

    def pad(t, dim, n, fill):
        shape = list(t.shape)
        shape[dim] = n
        extra = (torch.randint(0, 256, shape, dtype=torch.uint8, device=t.device) if fill is None
                 else torch.full(shape, fill, dtype=t.dtype, device=t.device))
        return torch.cat([t, extra], dim)

    tokens = blocks * p.block_size
    rows = tokens // p.channel_group if p.channel_group else tokens
    return replace(p, codes=pad(p.codes, 2, tokens, None), scales=pad(p.scales, 2, rows, float("nan")),
                   zeros=None if p.zeros is None else pad(p.zeros, 2, rows, float("nan")),
                   ts=pad(p.ts, 2, blocks, float("nan")))


@pytest.mark.parametrize("kernel,q_heads,preset", [("rows", 2, "paper"), ("rows", 2, "channel64-token"),
                                                   ("mma", 4, "paper")])
@pytest.mark.usefixtures("poisoned_outputs")
def test_kernels_read_only_the_filled_part_of_a_capacity_view(kernel, q_heads, preset):
    """A static cache (CUDA-graph decoding) hands the kernels its buffers at full capacity with kv_len
    bounds; each program takes its blocks from its sequence's length, so the unwritten capacity (poisoned
    here with NaN) is never read and the split work follows the filled blocks."""
    b, h, d, block = 2, 2, 64, 64
    k, v = packed(b, h, 192, d, 4, block, seed=11, preset=preset, block_size=block)
    kc, vc = _with_poisoned_capacity(k, 5), _with_poisoned_capacity(v, 5)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(b, q_heads, d, generator=gen).to(DEVICE)
    kv_len = torch.tensor([192, 130], device=DEVICE, dtype=torch.int32)
    kv_start = torch.zeros(b, device=DEVICE, dtype=torch.int32)
    ref = decode_attention(q, k, v, d ** -0.5, kv_start, kv_len, backend="torch")
    out = decode_attention(q, kc, vc, d ** -0.5, kv_start, kv_len, backend="triton", kernel=kernel, num_splits=4)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < (5e-3 if kernel == "rows" else tolerance(True))


def test_rows_kernel_refuses_what_it_cannot_read():
    from decoquant.kernels.triton.launch import choose_kernel

    k, v = packed(1, 2, 64, 64, 4, 32, seed=0)
    assert choose_kernel(2, k, v) == "rows" and choose_kernel(4, k, v) == "mma"  # GQA goes to the tensor cores
    assert choose_kernel(2, k, v, low_precision=False) == "mma"
    with pytest.raises(ValueError, match="kernel='rows'"):
        decode_attention(torch.randn(1, 4, 64).to(DEVICE), k, v, 1.0, backend="triton", kernel="rows")
    with pytest.raises(ValueError, match="allowed values"):
        decode_attention(torch.randn(1, 2, 64).to(DEVICE), k, v, 1.0, backend="triton", kernel="wgmma")
    k8, v8 = packed(1, 2, 32, 32, 8, 16, seed=0)
    assert choose_kernel(2, k8, v8) == "mma"  # 8-bit codes: the tensor-core kernel
    from decoquant.kernels.triton.decode_attention import decode_blocks_partials

    window = torch.zeros(1, 2, 3, 64).to(DEVICE)
    lengths = torch.tensor([0], dtype=torch.int32, device=DEVICE), torch.tensor([64], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="merge_with_window"):  # the rows kernel attends no window in its launch
        decode_blocks_partials(torch.randn(1, 2, 64).to(DEVICE), k, v, 1.0, *lengths, kernel="rows", window_k=window,
                               window_v=window)


@triton.jit
def _one_word_dot(W, Q, OUT, BITS: tl.constexpr, ASM: tl.constexpr, USE_ASM: tl.constexpr):
    x = tl.load(Q + tl.arange(0, 32 // BITS))[None, :]
    q0, q1, q2, q3, q4, q5, q6, q7 = int_dot.query_pairs(x, 1, BITS)
    w = tl.load(W + tl.arange(0, 1))[None, :]
    z = tl.zeros([1, 1], tl.int32)
    a0, a1, a2, a3 = int_dot.word_dot(w, q0, q1, q2, q3, q4, q5, q6, q7, z, z, z, z, BITS, ASM, USE_ASM)
    tl.store(OUT + tl.arange(0, 1)[None, :], int_dot.fields_total(a0, a1, a2, a3, BITS))


@triton.jit
def _one_pair_axpy(W, WP, OUT, BITS: tl.constexpr, ASM: tl.constexpr, USE_ASM: tl.constexpr):
    w0 = tl.load(W + tl.arange(0, 1))[None, :]
    w1 = tl.load(W + 1 + tl.arange(0, 1))[None, :]
    wp = tl.load(WP + tl.arange(0, 1))[None, :]
    z = tl.zeros([1, 1], tl.int32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = int_dot.pair_axpy(
        w0, w1, wp, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, BITS, ASM, USE_ASM)
    if BITS == 4:
        out = int_dot.natural8(a0, a1, a2, a3, a4, a5, a6, a7)
    else:
        out = int_dot.natural16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
    tl.store(OUT + tl.arange(0, 32 // BITS)[None, None, :], out)


@pytest.mark.parametrize("bits", [4, 2])
def test_int_dot_reads_what_packing_writes(bits):
    """The key dot and the value accumulation read the codes packing.py writes, exactly: one word of
    random codes against a random int16 query (extremes included), and two tokens' words against a pair of
    int16 weights, in the interpreter's emulation on a CPU and as PTX (dp2a, prmt) on a GPU."""
    from decoquant.packing import pack_codes

    gen = torch.Generator().manual_seed(bits)
    w = 32 // bits
    codes = torch.randint(0, 1 << bits, (2, w), generator=gen)
    codes[0, :2] = (1 << bits) - 1  # the largest code in the first byte's fields
    words = pack_codes(codes.to(torch.uint8), bits).view(torch.int32).reshape(2).to(DEVICE)
    use_asm = CUDA
    q = torch.randint(-16383, 16384, (w,), generator=gen, dtype=torch.int32)
    q[0], q[-1] = -16383, 16383
    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _one_word_dot[(1,)](words, q.to(DEVICE), out, BITS=bits, ASM=int_dot.dot_asm(bits), USE_ASM=use_asm)
    m_max = 1 << (8 - bits)
    assert int(out) == m_max * int((q.long() * codes[0]).sum())
    wts = torch.tensor([16383, 12345], dtype=torch.int32)
    pair = (wts[0] | (wts[1] << 16)).reshape(1).to(DEVICE)
    acc = torch.zeros(w, dtype=torch.int32, device=DEVICE)
    _one_pair_axpy[(1,)](words, pair, acc, BITS=bits, ASM=int_dot.axpy_asm(bits), USE_ASM=use_asm)
    m = 1 << (torch.arange(w) % (8 // bits) * bits)  # m_k of code r = j * NK + k
    assert torch.equal(acc.cpu().long(), m * (wts[0] * codes[0] + wts[1] * codes[1]).long())


def test_unsupported_layouts_are_refused():
    cfg = dq.DecoQuantConfig(method="decoquant", bits=4, scale_granularity="channel")
    c = dq.compress(torch.randn(1, 2, 32, 64), cfg, "key")
    with pytest.raises(ValueError, match="fused kernels"):
        pack_blocks([c])
    with pytest.raises(ValueError, match="backend='cuda'"):
        k, v = packed(1, 1, 32, 64, 4, 32, seed=0)
        decode_attention(torch.randn(1, 1, 64), k, v, 1.0, backend="cuda")
