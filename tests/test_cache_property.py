"""Property test of a layer's store: random prefills, decode steps, crops, beam reorders, batch selection and
resets, checked token for token against a plain concatenation (method="none") and, for a compressed codec,
against the same history with its compressed span decoded from the store's own blocks."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import decoquant as dq  # noqa: E402
from decoquant.cache import CompressedKVStore  # noqa: E402

OPS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 40)),
    st.tuples(st.just("step"), st.integers(1, 6)),
    st.tuples(st.just("crop"), st.integers(1, 30)),
    st.tuples(st.just("reorder"), st.integers(0, 5)),
    st.tuples(st.just("select"), st.integers(0, 5)),
    st.tuples(st.just("reset"), st.just(0)),
), min_size=1, max_size=14)


def _run(method, ops, seed):
    cfg = dq.DecoQuantConfig(method=method, bits=4, block_size=8, residual_length=4, sink_tokens=2)
    store = CompressedKVStore(cfg)
    gen = torch.Generator().manual_seed(seed)
    b, h, d = 3, 2, 16
    ref_k = ref_v = None
    for op, n in ops:
        if op in ("append", "step"):
            for _ in range(1 if op == "append" else n):
                t = n if op == "append" else 1
                k = torch.randn(b if ref_k is None else ref_k.shape[0], h, t, d, generator=gen)
                v = torch.randn(k.shape, generator=gen)
                ref_k = k if ref_k is None else torch.cat([ref_k, k], -2)
                ref_v = v if ref_v is None else torch.cat([ref_v, v], -2)
                before = sum(blk.length for blk in store.blocks)  # blocks this step reads decoded
                out_k, out_v = store.append(k, v)
                yield store, before, out_k, out_v, ref_k, ref_v
        elif op == "crop" and ref_k is not None:
            n = min(n, ref_k.shape[-2] - 1)
            if n > 0:
                store.crop(n)
                ref_k, ref_v = ref_k[..., :-n, :], ref_v[..., :-n, :]
        elif op in ("reorder", "select") and ref_k is not None:
            rows = ref_k.shape[0]
            perm = torch.randperm(rows, generator=torch.Generator().manual_seed(n))
            index = perm if op == "reorder" else perm[: max(1, rows - 1)]
            store.select_batch(index)
            ref_k, ref_v = ref_k[index], ref_v[index]
        elif op == "reset":
            store = CompressedKVStore(cfg)
            ref_k = ref_v = None
        if ref_k is not None:
            assert store.length == ref_k.shape[-2]


@settings(max_examples=40, deadline=None)
@given(ops=OPS, seed=st.integers(0, 1000))
def test_uncompressed_store_equals_concatenation(ops, seed):
    for _, _, k, v, ref_k, ref_v in _run("none", ops, seed):
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v)


@settings(max_examples=25, deadline=None)
@given(ops=OPS, seed=st.integers(0, 1000))
def test_compressed_store_equals_its_decoded_blocks(ops, seed):
    """The blocks that existed before a step come back decoded; everything else (sinks, window, the tokens
    this step brought, even where it compressed them) exact; always finite."""
    for store, c, k, v, ref_k, ref_v in _run("rtn", ops, seed):
        assert k.shape == ref_k.shape and torch.isfinite(k).all() and torch.isfinite(v).all()
        s = 0 if store.sink_keys is None else store.sink_keys.shape[-2]
        assert torch.equal(k[..., :s, :], ref_k[..., :s, :])
        assert torch.equal(k[..., s + c:, :], ref_k[..., s + c:, :])
        if c:
            blocks = torch.cat([blk.decode()[0] for blk in store.blocks], -2)[..., :c, :]
            assert torch.equal(k[..., s:s + c, :], blocks)
            err = (blocks - ref_k[..., s:s + c, :]).norm() / ref_k[..., s:s + c, :].norm()
            assert err < 0.25  # 4-bit per-token RTN of Gaussian keys
