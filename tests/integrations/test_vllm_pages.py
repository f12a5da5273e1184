"""The vLLM plugin's page format and paged state, without vLLM: pages decode to what the library's own
compress/decompress gives, filling pages and sinks stay exact, pages handed out again start afresh, and the
reference attention equals plain causal attention over the same keys."""

import pytest
import torch
import torch.nn.functional as F

from conftest import outlier_kv
from decoquant import DecoQuantConfig
from decoquant.api import compress, decompress
from decoquant.integrations.vllm.paged import PagedLayer, attend
from decoquant.integrations.vllm.pages import PageFormat

CONFIGS = {
    "default": DecoQuantConfig(preset="channel64-token", sink_tokens=4),
    "paper": DecoQuantConfig.paper(4),
    "default-2b": DecoQuantConfig(preset="channel64-token", bits=2),
    "kivi-2b": DecoQuantConfig(method="kivi", bits=2),
    "none": DecoQuantConfig(method="none"),
}


def _blocks(n=3, heads=2, head_dim=64, seed=0):
    x = outlier_kv(batch=2 * n, heads=heads, tokens=128, head_dim=head_dim, seed=seed)
    return x[:n], x[n:]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pages_decode_as_the_library_does(name):
    config = CONFIGS[name]
    fmt = PageFormat(config, 2, 64, torch.float32)
    keys, values = _blocks()
    pages, exact = fmt.pack(keys, values)
    assert pages.dtype == torch.uint8 and pages.shape == (3, fmt.page_bytes) and not exact.any()
    assert fmt.page_bytes == fmt.cell_bytes * 2 * 128 and fmt.cell_bytes % 4 == 0
    k, v = fmt.unpack(pages)
    for got, x, kind in ((k, keys, "key"), (v, values, "value")):
        want = decompress(compress(x, config, kind))
        assert torch.equal(got, want)
    if name == "none":
        assert torch.equal(k, keys) and fmt.cell_bytes == 2 * 64 * 4  # the stock page, byte for byte


def test_page_size_counts_every_stored_byte():
    config = CONFIGS["default"]
    fmt = PageFormat(config, 2, 64, torch.bfloat16)
    keys, values = _blocks(n=1)
    stored = compress(keys, config, "key").nbytes + compress(values, config, "value").nbytes
    stored -= 2  # the two one-byte exact-row masks, which a page does not hold (pack reports them instead)
    assert fmt.content_bytes == stored and 0 <= fmt.page_bytes - stored < 2 * 2 * 128
    assert 4.4 <= fmt.bits_per_element <= 4.7  # 4-bit codes, their scales and T_S, and the padding of a cell
    assert 2 * 64 * 2 / fmt.cell_bytes >= 3.0  # >= 3x more tokens than a bf16 page in the same bytes


def test_non_finite_block_is_reported_not_packed():
    fmt = PageFormat(CONFIGS["default"], 2, 64, torch.float32)
    keys, values = _blocks()
    keys[1, 0, 5, 3] = float("inf")
    pages, exact = fmt.pack(keys, values)
    assert exact.tolist() == [False, True, False] and not pages[1].any()


def test_format_rejects_bad_arguments():
    with pytest.raises(ValueError, match="residual_length"):
        PageFormat(DecoQuantConfig(residual_length=256), 2, 64, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        PageFormat(CONFIGS["default"], 2, 72, torch.float32)
    fmt = PageFormat(CONFIGS["default"], 2, 64, torch.float32)
    with pytest.raises(ValueError, match="keys and values"):
        fmt.pack(torch.zeros(1, 2, 64, 64), torch.zeros(1, 2, 64, 64))
    with pytest.raises(ValueError, match="pages must be uint8"):
        fmt.unpack(torch.zeros(1, fmt.page_bytes))
    with pytest.raises(ValueError, match="sink_tokens"):
        PagedLayer(fmt, sink_tokens=129)


def _write_sequence(layer, pages, page_ids, keys, values, chunks):
    """Write one sequence's tokens (keys, values [heads, tokens, d]) in chunks of the given sizes."""
    at = 0
    for n in chunks:
        pos = torch.arange(at, at + n)
        slots = torch.tensor(page_ids)[pos // 128] * 128 + pos % 128
        layer.write(pages, keys[:, at:at + n].transpose(0, 1), values[:, at:at + n].transpose(0, 1), slots, pos)
        at += n


@pytest.mark.parametrize("name", ["default", "none", "paper"])
def test_paged_layer_reads_full_pages_compressed_and_the_filling_page_exact(name):
    config = CONFIGS[name]
    fmt = PageFormat(config, 2, 64, torch.float32)
    layer = PagedLayer(fmt, config.sink_tokens)
    pages = torch.zeros(8, fmt.page_bytes, dtype=torch.uint8)
    x = outlier_kv(batch=2, heads=2, tokens=300, head_dim=64, seed=3)
    keys, values = x[0], x[1]
    page_ids = [5, 2, 7]  # not in order, as an engine hands them out
    _write_sequence(layer, pages, page_ids, keys, values, chunks=[100, 60, 1, 1, 138])
    k, v = layer.read(pages, page_ids, 300)
    assert k.shape == (2, 300, 64)
    assert layer.packed_pages == (2 if fmt.compresses else 0)
    for got, src, kind in ((k, keys, "key"), (v, values, "value")):
        full = src[:, :256].reshape(2, 2, 128, 64).transpose(0, 1)  # [2 pages, heads, 128, d]
        want = decompress(compress(full, config, kind)).transpose(0, 1).reshape(2, 256, 64)
        want[:, :config.sink_tokens] = src[:, :config.sink_tokens]
        assert torch.equal(got[:, :256], want)
        assert torch.equal(got[:, 256:], src[:, 256:])  # the filling page: exact
        if fmt.compresses:
            err = (got[:, :256] - src[:, :256]).norm() / src[:, :256].norm()
            assert 0 < err < 0.15  # 4-bit relative error, outlier channels included
    k_short, _ = layer.read(pages, page_ids, 140)
    assert torch.equal(k_short, k[:, :140])


def test_paged_layer_keeps_unsafe_blocks_exact_and_starts_reused_pages_afresh():
    config = CONFIGS["default"]
    fmt = PageFormat(config, 2, 64, torch.float32)
    layer = PagedLayer(fmt, config.sink_tokens)
    pages = torch.zeros(4, fmt.page_bytes, dtype=torch.uint8)
    x = outlier_kv(batch=2, heads=2, tokens=256, head_dim=64, seed=4)
    keys, values = x[0].clone(), x[1]
    keys[1, 130, 9] = float("nan")  # the second page cannot be compressed safely
    _write_sequence(layer, pages, [0, 1], keys, values, chunks=[256])
    assert set(layer.exact) == {1} and layer.side_bytes > 0
    k, _ = layer.read(pages, [0, 1], 256)
    torch.testing.assert_close(k[:, 128:], keys[:, 128:], rtol=0, atol=0, equal_nan=True)  # kept exact, NaN and all
    assert torch.isfinite(k[:, :128]).all()
    # the engine frees page 1 and hands it to another sequence: its first write starts it afresh
    other = outlier_kv(batch=2, heads=2, tokens=128, head_dim=64, seed=5)
    _write_sequence(layer, pages, [1], other[0], other[1], chunks=[10])
    assert 1 not in layer.exact and 1 in layer.filling
    k, _ = layer.read(pages, [1], 10)
    assert torch.equal(k, other[0][:, :10])
    with pytest.raises(RuntimeError, match="not filling"):
        layer.write(pages, keys[:, :1].transpose(0, 1), values[:, :1].transpose(0, 1), torch.tensor([2 * 128 + 5]),
                    torch.tensor([261]))
    with pytest.raises(RuntimeError, match="read past"):
        layer.read(pages, [1], 11)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("past,q", [(0, 7), (130, 1), (255, 33)])
def test_attend_is_causal_attention_over_past_and_new_tokens(heads, kv_heads, past, q):
    g = torch.Generator().manual_seed(past + q)
    query = torch.randn(q, heads, 32, generator=g)
    keys = torch.randn(kv_heads, past + q, 32, generator=g)
    values = torch.randn(kv_heads, past + q, 32, generator=g)
    got = attend(query, keys, values, 0.3, past)
    rep = heads // kv_heads
    k, v = keys.repeat_interleave(rep, 0), values.repeat_interleave(rep, 0)
    scores = torch.einsum("qhd,hkd->hqk", query, k) * 0.3
    pos_q, pos_k = torch.arange(past, past + q)[:, None], torch.arange(past + q)[None]
    scores = scores.masked_fill(pos_k > pos_q, float("-inf"))
    want = torch.einsum("hqk,hkd->qhd", F.softmax(scores, -1), v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_idle_filling_pages_spill_and_come_back():
    config = CONFIGS["default"]
    fmt = PageFormat(config, 2, 64, torch.float32)
    layer = PagedLayer(fmt, config.sink_tokens, max_filling=2)
    pages = torch.zeros(6, fmt.page_bytes, dtype=torch.uint8)
    seqs = [outlier_kv(batch=2, heads=2, tokens=128, head_dim=64, seed=10 + i) for i in range(3)]
    for page, x in enumerate(seqs):  # three requests, 50 tokens each, one after the other
        _write_sequence(layer, pages, [page], x[0], x[1], chunks=[50])
    assert set(layer.filling) == {1, 2} and layer.spilled == {0: 50} and layer.spills == 1
    k, _ = layer.read(pages, [0], 50)  # the spilled page reads back compressed, its sinks exact
    want = decompress(compress(torch.cat([seqs[0][0][:, :50], seqs[0][0].new_zeros(2, 78, 64)], 1)[None],
                               config, "key"))[0, :, :50]
    want[:, :4] = seqs[0][0][:, :4]
    assert torch.equal(k, want)
    # its request comes back: the page is decoded into a filling page and written on, nothing is lost
    x = seqs[0]
    pos = torch.arange(50, 60)
    layer.write(pages, x[0][:, 50:60].transpose(0, 1), x[1][:, 50:60].transpose(0, 1), pos, pos)
    assert 0 in layer.filling and 0 not in layer.spilled
    k, _ = layer.read(pages, [0], 60)
    assert torch.equal(k[:, :50], want) and torch.equal(k[:, 50:], x[0][:, 50:60])
    with pytest.raises(RuntimeError, match="read past"):
        layer.read(pages, [1], 51)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["default", "paper"])
def test_decode_through_the_block_table_equals_read_then_attend(name, backend):
    """`PagedLayer.decode` (the decode kernels reading the pages in place, the filling page, sinks and exact blocks
    as their window) gives what reading each sequence back and attending does, for a batch of sequences: one with
    two packed pages and a filling one, one ending on a full page with a block kept exact, one inside its first
    page, one just past a page boundary; GQA with 4 query heads per kv head."""
    if backend == "triton":
        pytest.importorskip("triton")
    config = CONFIGS[name]
    fmt = PageFormat(config, 2, 64, torch.float32)
    layer = PagedLayer(fmt, config.sink_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the fused kernel itself, else interpreted
    pages = torch.zeros(10, fmt.page_bytes, dtype=torch.uint8, device=device)
    seqs = {(5, 2, 7): 300, (0, 1): 256, (3,): 50, (4, 6): 129}
    for i, (ids, n) in enumerate(seqs.items()):
        x = outlier_kv(batch=2, heads=2, tokens=n, head_dim=64, seed=20 + i).to(device)
        _write_sequence(layer, pages, list(ids), x[0], x[1], chunks=[n - 1, 1])
        if ids == (0, 1):  # as `pack` leaves a block it could not compress: no bytes, the block kept exact
            layer.exact[1] = (x[0][:, 128:].clone(), x[1][:, 128:].clone())
            pages[1] = 0
    table = torch.tensor([list(ids) + [9] * (3 - len(ids)) for ids in seqs])  # padded with a page never written
    query = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(1)).to(device)
    got = layer.decode(pages, query, table, list(seqs.values()), 0.125, backend=backend)
    assert got.shape == query.shape and torch.isfinite(got).all()
    for i, (ids, n) in enumerate(seqs.items()):
        k, v = layer.read(pages, list(ids), n)
        want = attend(query[i:i + 1], k, v, 0.125, n - 1)[0]
        err = (got[i] - want).norm() / want.norm()
        assert err < (1e-5 if backend == "torch" else 5e-3 if device == "cpu" else 1e-2), (ids, err)
    with pytest.raises(RuntimeError, match="read past"):  # the third sequence holds 50 tokens, not 51
        layer.decode(pages, query[:1], table[2:3], [51], 0.125, backend=backend)
    with pytest.raises(ValueError, match="cannot hold"):
        layer.decode(pages, query[:1], table[2:3, :1], [129], 0.125, backend=backend)
