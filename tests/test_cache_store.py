"""CompressedKVStore on random tensors: streaming, immutability, crop, batch selection, bytes."""

import pytest
import torch

import decoquant as dq
from decoquant.cache import CompressedKVStore
from conftest import outlier_kv


def cfg(**kw):
    base = dict(method="decoquant", preset="paper", bits=4, block_size=16, residual_length=8)
    base.update(kw)
    return dq.DecoQuantConfig(**base)


def feed(store, x, sizes):
    outs, start = [], 0
    for n in sizes:
        outs.append(store.append(x[..., start:start + n, :], x[..., start:start + n, :] * 0.5))
        start += n
    return outs


def test_none_method_returns_exactly_what_was_fed():
    x = outlier_kv(batch=2, heads=3, tokens=100)
    store = CompressedKVStore(cfg(method="none", preset=None))
    outs = feed(store, x, [37, 1, 1, 20, 41])
    assert torch.equal(outs[-1][0], x) and torch.equal(outs[-1][1], x * 0.5)
    assert store.length == 100


def test_blocks_window_and_returned_values():
    x = outlier_kv(batch=2, heads=3, tokens=100)
    store = CompressedKVStore(cfg())
    k, v = store.append(x[..., :50, :], x[..., :50, :])
    assert torch.equal(k, x[..., :50, :])  # the prefill attends over itself exactly
    assert len(store.blocks) == 2 and store.window_keys.shape[-2] == 18  # 50 = 2*16 + 18 (>= residual 8)
    k, _ = store.append(x[..., 50:51, :], x[..., 50:51, :])
    first = dq.decompress(dq.compress(x[..., :16, :].contiguous(), cfg(), "key"))
    assert torch.equal(k[..., :16, :], first)  # history comes back from the compressed block
    assert torch.equal(k[..., 32:, :], x[..., 32:51, :])  # window + new token exact
    assert k.shape[-2] == store.length == 51


def test_blocks_are_immutable():
    x = outlier_kv(batch=1, heads=2, tokens=200)
    store = CompressedKVStore(cfg())
    feed(store, x, [40])
    block0 = store.blocks[0]
    codes0 = block0.keys.codes.clone()
    feed(store, x[..., 40:, :], [1] * 160)
    assert store.blocks[0] is block0 and torch.equal(block0.keys.codes, codes0)
    assert len(store.blocks) == (200 - 8) // 16
    assert 8 <= store.window_keys.shape[-2] < 8 + 16


def test_sink_tokens_stay_exact():
    x = outlier_kv(batch=1, heads=2, tokens=120)
    store = CompressedKVStore(cfg(sink_tokens=4))
    feed(store, x, [2, 30, 1, 1, 86])
    k, _ = store.append(x[..., :1, :], x[..., :1, :])
    assert torch.equal(k[..., :4, :], x[..., :4, :])
    assert store.sink_keys.shape[-2] == 4 and len(store.blocks) == (120 - 4 - 8) // 16


def test_crop_shortens_blocks_without_rewriting():
    x = outlier_kv(batch=1, heads=2, tokens=80)
    store = CompressedKVStore(cfg())
    before = feed(store, x, [80])[0][0]
    full, _ = store.append(x[..., :0, :], x[..., :0, :])
    n_blocks = len(store.blocks)
    store.crop(30)  # window (16) + 14 tokens of the last block
    assert store.length == 50 and len(store.blocks) == n_blocks
    k, _ = store.append(x[..., 50:51, :], x[..., 50:51, :])
    assert torch.equal(k[..., :50, :], full[..., :50, :]) and torch.equal(k[..., 50:, :], x[..., 50:51, :])
    assert before.shape[-2] == 80


def test_select_batch_reorders_every_part():
    x = outlier_kv(batch=3, heads=2, tokens=60)
    x[1, 0, 0, 0] = float("nan")  # an exact row inside the first block
    store = CompressedKVStore(cfg())
    feed(store, x, [60])
    full, _ = store.append(x[..., :0, :], x[..., :0, :])
    index = torch.tensor([2, 1, 1, 0])
    store.select_batch(index)
    empty = x[index][..., :0, :]
    again, _ = store.append(empty, empty)
    assert torch.equal(torch.nan_to_num(again), torch.nan_to_num(full[index]))


def test_inconsistent_batch_is_an_error():
    store = CompressedKVStore(cfg())
    store.append(torch.randn(2, 2, 40, 64), torch.randn(2, 2, 40, 64))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        store.append(torch.randn(3, 2, 1, 64), torch.randn(3, 2, 1, 64))


def test_memory_counts_blocks_and_window():
    x = outlier_kv(batch=1, heads=4, tokens=4 * 128 + 100, head_dim=128).half()
    store = CompressedKVStore(cfg(block_size=128, residual_length=64))
    feed(store, x, [x.shape[-2]])
    mem = store.memory()
    blocks = sum(b.keys.nbytes + b.values.nbytes for b in store.blocks)
    assert mem["compressed_blocks"] == blocks and mem["exact_tokens"] == 2 * store.window_keys.numel() * 2
    assert mem["total"] == blocks + mem["exact_tokens"]
    assert mem["fp16_equivalent"] == 2 * x.numel() * 2
    assert blocks / (2 * 2 * mem["compressed_elements"] / 2) <= 0.27


@pytest.mark.parametrize("fields", [{}, dict(preset=None, scale_granularity="channel", quant_group_size=32,
                                             block_size=32, symmetric=False, value_scale_granularity="token",
                                             sink_tokens=3)],
                         ids=["paper-like", "channel-token-sinks"])
def test_fused_store_serves_the_same_history_as_decoding(fields):
    """A fused store keeps blocks in growing packed buffers (blocks are views into them) and answers
    single-token steps with a FusedKV; attention over it equals attention over the decoded history,
    also after a beam reorder and a crop. With sinks, the FusedKV's exact tokens start with them."""
    from decoquant.cache import FusedKV
    from decoquant.kernels.attention import decode_attention
    from decoquant.kernels.reference import attention_reference

    x = outlier_kv(batch=2, heads=2, tokens=220)
    config = cfg(**fields)
    plain, fused = CompressedKVStore(config), CompressedKVStore(config, fused=True)
    for store in (plain, fused):
        store.append(x[..., :80, :], x[..., :80, :] * 0.5)
    q = torch.randn(2, 4, 64)
    for t in range(80, 220):
        if t == 150:
            for store in (plain, fused):
                store.select_batch(torch.tensor([1, 0]))
            x = x[[1, 0]]
        k_ref, v_ref = plain.append(x[..., t:t + 1, :], x[..., t:t + 1, :] * 0.5)
        out = fused.append(x[..., t:t + 1, :], x[..., t:t + 1, :] * 0.5)[0]
        assert isinstance(out, FusedKV) and out.sink_tokens == fields.get("sink_tokens", 0)
        got = decode_attention(q, out.keys, out.values, 0.125, window_k=out.window_keys, window_v=out.window_values)
        assert torch.allclose(got, attention_reference(q, k_ref, v_ref, 0.125), atol=1e-5, rtol=1e-4)
    assert fused.storage.buffers[0].blocks == len(fused.blocks) == len(plain.blocks)
    used = sum(b.keys.nbytes + b.values.nbytes for b in fused.blocks)  # views: the used part of the buffers
    assert used == sum(b.keys.nbytes + b.values.nbytes for b in plain.blocks)
    assert used <= fused.memory()["compressed_blocks"] <= 1.3 * used + 4096  # + the buffers' spare capacity
    fused.crop(30)  # into the last block: the fused path steps aside, decoding takes over
    plain.crop(30)
    k_f, _ = fused.append(x[..., :1, :], x[..., :1, :])
    k_p, _ = plain.append(x[..., :1, :], x[..., :1, :])
    assert torch.equal(k_f, k_p)


def test_fused_store_blocks_follow_regrown_buffers_and_batch_changes():
    """Blocks of a fused store are views into its packed buffers, made when first read: after the
    buffers regrow (many single-token steps) and after a batch-expanding selection (beam search starts),
    every block decodes to what the plain store's blocks decode to, and no block keeps the old buffers."""
    x = outlier_kv(batch=2, heads=2, tokens=400)
    config = cfg(block_size=32, residual_length=16)
    plain, fused = CompressedKVStore(config), CompressedKVStore(config, fused=True)
    for store in (plain, fused):
        store.append(x[..., :40, :], x[..., :40, :] * 0.5)
    pointers = set()
    for t in range(40, 400):
        for store in (plain, fused):
            store.append(x[..., t:t + 1, :], x[..., t:t + 1, :] * 0.5)
        if fused.storage.buffers[0].codes is not None:
            pointers.add(fused.storage.buffers[0].codes.data_ptr())
        if t % 50 == 0:
            fused.memory()  # reads every block: their views exist before the next regrow
    assert len(pointers) > 2  # the buffers regrew
    index = torch.tensor([1, 0, 1])
    for store in (plain, fused):
        store.select_batch(index)
    assert fused.storage.buffers[0].blocks == len(fused.blocks) == len(plain.blocks) > 8
    codes = fused.storage.buffers[0].codes
    lo, hi = codes.data_ptr(), codes.data_ptr() + codes.nbytes
    for a, b in zip(fused.blocks, plain.blocks):
        assert lo <= a.keys.codes.data_ptr() < hi  # a view into the current buffer
        (ka, va), (kb, vb) = a.decode(), b.decode()
        assert ka.shape[0] == 3 and torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("q_heads", [2, 4], ids=["rows-kernel", "mma-kernel"])
def test_fused_store_keeps_exact_rows_beside_the_buffers(q_heads):
    """On the kernel route a fused store queues its blocks into the packed buffers before it learns whether one
    keeps exact rows; one that does stays there with those rows cleared and recorded exact beside the buffers
    (also after a regrow), every block decodes as a store on the torch route decodes it, and single-token steps
    stay fused: the kernel skips the exact rows and attention reads them exactly. (On a CPU the kernels run
    through Triton's interpreter.)"""
    pytest.importorskip("triton")
    from decoquant.blocks import FusedKV
    from decoquant.kernels.attention import decode_attention
    from decoquant.kernels.reference import attention_reference

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = outlier_kv(batch=2, heads=2, tokens=101, seed=7).to(dev)
    x[1, 0, 40, 3] = float("nan")  # in the block a decode step compresses (tokens 32..63; the buffer regrows)
    config = cfg(block_size=32, residual_length=16)
    fast, ref = CompressedKVStore(config, fused=True, backend="triton"), CompressedKVStore(config, backend="torch")
    for store in (fast, ref):
        store.append(x[..., :60, :], x[..., :60, :] * 0.5)
    for t in range(60, 100):
        for store in (fast, ref):
            store.append(x[..., t:t + 1, :], x[..., t:t + 1, :] * 0.5)
    assert len(fast.blocks) == len(ref.blocks) == fast.storage.buffers[0].blocks == 2  # both in the buffers
    assert list(fast.storage.exact) == [1] and fast.blocks[1].keys.exact_mask.tolist() == [False, True]
    assert fast.memory()["exact_blocks"] == ref.memory()["exact_blocks"] == 1
    for a, b in zip(fast.blocks, ref.blocks):
        (ka, va), (kb, vb) = a.decode(), b.decode()
        exact = a.keys.exact_mask
        for fast_x, ref_x in ((ka, kb), (va, vb)):
            torch.testing.assert_close(fast_x[exact], ref_x[exact], rtol=0, atol=0, equal_nan=True)
            assert float((fast_x[~exact] - ref_x[~exact]).norm() / ref_x[~exact].norm()) < 1e-3  # signs aside
    new = (x[..., 100:101, :], x[..., 100:101, :] * 0.5)
    kf, _ = fast.append(*new)
    kd, vd = ref.append(*new)
    assert isinstance(kf, FusedKV) and kf.exact is not None and kf.exact.skip[:, :2].tolist() == [[0, 0], [0, 1]]
    q = torch.randn(2, q_heads, 64, generator=torch.Generator().manual_seed(3)).to(dev)
    out = decode_attention(q, kf.keys, kf.values, 0.125, window_k=kf.window_keys, window_v=kf.window_values,
                           exact=kf.exact, backend="triton")
    want = attention_reference(q, kd, vd, 0.125)
    assert float((out[0] - want[0]).norm() / want[0].norm()) < 1e-2  # row 0: every block read by the kernel
    assert torch.equal(torch.isnan(out[1]), torch.isnan(want[1]))  # row 1 attends its NaN key exactly
    k_full, _ = fast.append(x[..., :2, :], x[..., :2, :])  # several tokens: decoded, the exact rows in place
    assert torch.isnan(k_full[1, 0, 40, 3]) and not torch.isnan(k_full[0]).any()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_overlapped_prefill_compression_equals_immediate(device):
    """append(overlap=True) leaves a prefill's blocks to launch()/settle() (on CUDA: a worker thread, a side stream).
    It returns what an immediate append returns, every later read settles first, and the store then holds
    the same blocks, buffers and window; single-token steps never overlap."""
    x = outlier_kv(batch=2, heads=2, tokens=300, seed=3).to(device)
    config = cfg(block_size=32, residual_length=16, sink_tokens=2)
    now, later = CompressedKVStore(config, fused=True), CompressedKVStore(config, fused=True)
    k_now, v_now = now.append(x[..., :200, :], x[..., :200, :] * 0.5)
    k_later, v_later = later.append(x[..., :200, :], x[..., :200, :] * 0.5, overlap=True)
    assert torch.equal(k_now, k_later) and torch.equal(v_now, v_later)
    assert later.pending and not later.blocks and later.length == 200
    assert later.memory() == now.memory() and not later.pending  # a read settles
    assert len(later.blocks) == len(now.blocks) == (200 - 2 - 16) // 32
    for a, b in zip(now.storage.buffers, later.storage.buffers):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))
    later.append(x[..., 200:201, :], x[..., 200:201, :], overlap=True)  # one token: compressed at once
    now.append(x[..., 200:201, :], x[..., 200:201, :])
    assert not later.pending
    k_now, _ = now.append(x[..., 201:300, :], x[..., 201:300, :])
    later.append(x[..., 201:300, :], x[..., 201:300, :], overlap=True)
    assert later.pending
    k_later, _ = later.append(x[..., :1, :], x[..., :1, :])  # the next append settles the previous one first
    k_now, _ = now.append(x[..., :1, :], x[..., :1, :])
    assert torch.equal(k_now.window_keys, k_later.window_keys) and len(later.blocks) == len(now.blocks)  # FusedKVs
    for a, b in zip(now.storage.buffers, later.storage.buffers):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))
    later.append(x[..., :40, :], x[..., :40, :], overlap=True)
    now.append(x[..., :40, :], x[..., :40, :])
    later.crop(50)
    now.crop(50)
    assert later.memory() == now.memory()


def test_degenerate_blocks_are_compressed_and_reported():
    """A run of one repeated token (padding, whitespace) is rank deficient: compressed with the T_S = I
    fallback and counted, not kept at full width; a NaN block stays exact and is counted apart."""
    store = CompressedKVStore(cfg(block_size=16, residual_length=8))
    tok = torch.randn(1, 2, 1, 64, generator=torch.Generator().manual_seed(0))
    keys = torch.cat([tok.expand(1, 2, 32, 64), torch.randn(1, 2, 24, 64)], -2)
    store.append(keys, keys.clone())
    nan = torch.randn(1, 2, 16, 64)
    nan[0, 0, 3, 5] = float("nan")
    store.append(nan, nan.clone())
    mem = store.memory()
    assert mem["fallback_blocks"] == 2 and mem["exact_blocks"] == 1 and len(store.blocks) == 4
    assert mem["dynamic_cache"] == 4 * 2 * 2 * 72 * 64  # float32 K and V of 72 tokens, as DynamicCache holds them
