import pytest
import torch

from decoquant.mpo import full_bond_ranks, mpo_contract, mpo_decompose

FACTORIZATIONS = [
    ((24,), (30,)),
    ((4, 6), (5, 6)),
    ((24, 1), (1, 30)),
    ((2, 3, 4), (3, 2, 5)),
    ((2, 2, 2, 3), (1, 2, 3, 5)),
    ((24, 1, 1, 1), (1, 5, 3, 2)),
]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("rows,cols", FACTORIZATIONS)
@pytest.mark.parametrize("gauge", ["symmetric", "left"])
def test_full_rank_is_exact_in_float64(rows, cols, gauge):
    w = torch.randn(3, 2, 24, 30, dtype=torch.float64)
    w[..., 5] *= 50  # an outlier column
    tensors = mpo_decompose(w, rows, cols, gauge=gauge)
    assert len(tensors) == len(rows)
    for k, t in enumerate(tensors):
        assert t.shape[:2] == (3, 2) and t.shape[-3:-1] == (rows[k], cols[k])
    assert [t.shape[-1] for t in tensors[:-1]] == full_bond_ranks(rows, cols)
    assert rel(mpo_contract(tensors), w) <= 1e-9


def test_symmetric_gauge_splits_singular_values():
    w = torch.randn(40, 16, dtype=torch.float64)
    t_l, t_s = mpo_decompose(w, (40, 1), (1, 16))
    s = torch.linalg.svdvals(w)
    big, small = t_l.reshape(40, 16), t_s.reshape(16, 16)
    assert torch.allclose(big.pow(2).sum(0), s, rtol=1e-9)  # column norms^2 of U sqrt(S)
    assert torch.allclose(small.pow(2).sum(1), s, rtol=1e-9)  # row norms^2 of sqrt(S) V^T


def test_truncation_error_decreases_with_rank():
    w = torch.randn(64, 48, dtype=torch.float64)
    errors = [rel(mpo_contract(mpo_decompose(w, (8, 8), (6, 8), max_rank=r)), w) for r in (4, 16, 32, 48)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] <= 1e-9


def test_float32_and_batch_of_one():
    w = torch.randn(1, 100, 16)
    out = mpo_contract(mpo_decompose(w, (100, 1), (1, 16)))
    assert out.dtype == torch.float32 and rel(out, w) < 1e-5


def test_bad_factors():
    w = torch.randn(24, 30)
    with pytest.raises(ValueError, match="multiply to the matrix shape"):
        mpo_decompose(w, (4, 5), (5, 6))
    with pytest.raises(ValueError, match="same length"):
        mpo_decompose(w, (4, 6), (30,))
    with pytest.raises(ValueError, match="gauge"):
        mpo_decompose(w, (24,), (30,), gauge="right")
