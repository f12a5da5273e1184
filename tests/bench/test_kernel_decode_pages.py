"""kernel_decode's page layout (`--paged`): the benchmark's blocks moved into shuffled byte pages attend exactly
as the per-sequence blocks they came from (checked with the torch reference, so on any machine)."""

import pytest
import torch

from decoquant.bench.kernel_decode import random_packed, to_pages
from decoquant.kernels.attention import decode_attention


@pytest.mark.parametrize("preset", ["paper", "channel64-token"])
def test_pages_hold_the_same_blocks(preset):
    k, v = random_packed(2, 2, 512, 64, 4, 128, "cpu", seed=0, preset=preset)
    kp, vp, table = to_pages(k, v, preset, "cpu", seed=1)
    assert table.shape == (2, 4) and sorted(table.flatten().tolist()) == list(range(8))
    assert table.flatten().tolist() != list(range(8))  # shuffled
    storage = kp.codes.untyped_storage().data_ptr()  # every field of keys and values is a view of one page tensor
    assert all(t.untyped_storage().data_ptr() == storage for t in kp.tensors() + vp.tensors())
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2))
    dense = decode_attention(q, k, v, 0.125, backend="torch")
    paged = decode_attention(q, kp, vp, 0.125, block_table=table, backend="torch")
    assert torch.equal(dense, paged)
