import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoquant.packing import pack_codes, packed_length, unpack_codes


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), n=st.integers(1, 70), seed=st.integers(0, 10_000))
def test_round_trip_is_exact(bits, rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_length(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_documented_bit_order():
    codes4 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_codes(codes4, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]
    codes2 = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 3]], dtype=torch.uint8)
    assert pack_codes(codes2, 2).tolist() == [[0b00111001, 0b11000000]]
    # 3 bit: low 2 bits as 2-bit codes (3 | 1 << 4), then the high bits, one per code (codes 0 and 2)
    codes3 = torch.tensor([[7, 0, 5, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    assert pack_codes(codes3, 3).tolist() == [[0x13, 0x00, 0x05]]
    codes3 = torch.tensor([[4] * 9], dtype=torch.uint8)  # 9 codes: each part padded to whole runs of 8
    assert pack_codes(codes3, 3).tolist() == [[0, 0, 0, 0, 0xFF, 0x01]]


def test_packed_size_matches_bits():
    for bits in (2, 3, 4, 8):
        assert packed_length(64, bits) * 8 == 64 * bits


def test_bad_input():
    with pytest.raises(ValueError, match="bits=5"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="n=9"):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), 4, 9)
