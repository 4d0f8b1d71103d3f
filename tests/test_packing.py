"""Bit-packing of codes into int32 words: round trips and the exact little-endian stream layout."""

from __future__ import annotations

import pytest
import torch

from cdq_cli.solvers.packing import pack, packed_length, unpack


def _reference_pack(values: list[int], bits: int) -> list[int]:
    """Independent oracle: one Python big integer as the bit stream, cut into signed 32-bit words."""
    stream = 0
    for k, v in enumerate(values):
        stream |= v << (k * bits)
    words = []
    for m in range(packed_length(len(values), bits)):
        word = (stream >> (32 * m)) & 0xFFFFFFFF
        words.append(word - 2**32 if word >= 2**31 else word)
    return words


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
@pytest.mark.parametrize("length", [1, 7, 31, 32, 33, 100])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip(bits, length, lead):
    """unpack(pack(c)) == c for any length (padding to 32) and leading batch dimensions."""
    gen = torch.Generator().manual_seed(bits * 1000 + length)
    codes = torch.randint(0, 2**bits, (*lead, length), generator=gen, dtype=torch.int64)
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (*lead, packed_length(length, bits))
    assert torch.equal(unpack(words, bits, length), codes)
    # uint8 codes (what solvers return) pack the same way.
    assert torch.equal(pack(codes.to(torch.uint8), bits), words)


@pytest.mark.parametrize("length", [5, 32, 45, 96])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_bitstream_oracle(bits, length):
    """Every word equals the independent big-integer bit stream (value k at bits k*b..k*b+b-1)."""
    gen = torch.Generator().manual_seed(7 + bits + length)
    codes = torch.randint(0, 2**bits, (length,), generator=gen)
    assert pack(codes, bits).tolist() == _reference_pack(codes.tolist(), bits)


def test_extreme_codes_use_all_bits():
    """All-ones codes fill every word completely (−1 as int32), including straddling 3-bit values."""
    for bits in (2, 3, 4, 8):
        words = pack(torch.full((2, 64), 2**bits - 1), bits)
        assert words.shape == (2, 2 * bits)
        assert torch.all(words == -1)


def test_three_bits_pack_32_values_into_3_words():
    assert packed_length(32, 3) == 3
    assert packed_length(33, 3) == 6
    assert pack(torch.zeros(32, dtype=torch.int64), 3).shape == (3,)


def test_hand_computed_layouts():
    """Worked examples of the layout, computed by hand."""
    # Short inputs are zero-padded to 32 values, so trailing words are 0.
    # 4 bits: nibbles low to high: [1..8] -> 0x87654321 (as int32).
    assert pack(torch.tensor(list(range(1, 9))), 4).tolist() == [0x87654321 - 2**32, 0, 0, 0]
    # 8 bits: bytes low to high.
    assert pack(torch.tensor([1, 2, 3, 4]), 8).tolist() == [0x04030201] + [0] * 7
    # 2 bits: [3, 0, 1, 2] -> 0b10_01_00_11 = 147.
    assert pack(torch.tensor([3, 0, 1, 2]), 2).tolist() == [147, 0]
    # 3 bits, straddling words: value 5 at k=0 (bits 0..2), 7 at k=10 (stream bits 30, 31, 32),
    # 3 = 0b011 at k=21 (stream bits 63, 64, 65).
    codes = torch.zeros(32, dtype=torch.int64)
    codes[0], codes[10], codes[21] = 5, 7, 3
    word0 = 5 | (0b11 << 30)  # bits 30 and 31 of word 0
    word1 = 1 | (1 << 31)  # stream bit 32 (top bit of the 7) and stream bit 63 (low bit of the 3)
    word2 = 1  # stream bit 64 (second bit of the 3); bit 65 is 0
    expected = [w - 2**32 if w >= 2**31 else w for w in (word0, word1, word2)]
    assert pack(codes, 3).tolist() == expected
    assert unpack(torch.tensor(expected, dtype=torch.int32), 3, 32).tolist() == codes.tolist()


def test_rejects_bad_input():
    """Out-of-range codes and a word count other than exactly what the codes pack into are errors."""
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([-1, 0]), 2)
    with pytest.raises(ValueError, match="33 codes of 3 bits pack into 6 words, not 3"):
        unpack(torch.zeros(3, dtype=torch.int32), 3, 33)
    with pytest.raises(ValueError, match="pack into 3 words, not 4"):
        unpack(torch.zeros(4, dtype=torch.int32), 3, 10)
    with pytest.raises(ValueError, match="64 codes of 3 bits pack into 6 words, not 9"):
        unpack(torch.zeros(9, dtype=torch.int32), 3, 64)  # room for 96 codes: too many words is wrong too
    assert unpack(torch.zeros(6, dtype=torch.int32), 3, 64).shape == (64,)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_a_few_rows_at_a_time_gives_the_same_words(bits, monkeypatch):
    """Rows are packed and unpacked in pieces (bounded int64 working memory): a piece of one row
    gives exactly the words and codes of one piece for everything."""
    from cdq_cli.solvers import packing

    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (2, 7, 45), generator=gen).to(torch.uint8)
    whole = pack(codes, bits)
    back = unpack(whole, bits, 45, torch.uint8)
    monkeypatch.setattr(packing, "PIECE_BYTES", 1)
    assert torch.equal(pack(codes, bits), whole)
    assert torch.equal(unpack(whole, bits, 45, torch.uint8), back)
    assert back.dtype == torch.uint8 and torch.equal(back, codes)
    assert torch.equal(unpack(whole, bits, 45), codes.to(torch.int64))


@pytest.mark.parametrize("bits", range(1, 17))
def test_every_width_matches_the_bitstream_oracle(bits):
    """Every width from 1 to 16 bits (straddling or not), random and extreme codes: the words equal
    the independent big-integer bit stream and unpack back to the codes."""
    gen = torch.Generator().manual_seed(bits)
    for codes in (
        torch.randint(0, 2**bits, (3, 70), generator=gen),
        torch.full((1, 64), 2**bits - 1),
    ):
        words = pack(codes, bits)
        assert words.tolist() == [_reference_pack(row, bits) for row in codes.tolist()]
        assert torch.equal(unpack(words, bits, codes.shape[-1]), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_byte_paths_do_not_depend_on_the_machines_byte_order(bits, monkeypatch):
    """2/4/8-bit codes pack through bytes read as little-endian words; the portable spelling used
    on a big-endian machine gives the same words and codes."""
    from cdq_cli.solvers import packing

    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 45), generator=gen)
    native = pack(codes, bits)
    monkeypatch.setattr(packing.sys, "byteorder", "big")
    assert torch.equal(pack(codes, bits), native)
    assert torch.equal(unpack(native, bits, 45), codes)


@pytest.mark.parametrize("length", [7, 32, 45, 96])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_torch_byte_path_equals_the_numpy_one(bits, length, monkeypatch):
    """On the CPU 2/4/8-bit codes pack through numpy; elsewhere (a GPU) through torch's ops: both
    give the oracle's words and the codes back."""
    from cdq_cli.solvers import packing

    gen = torch.Generator().manual_seed(bits + length)
    codes = torch.randint(0, 2**bits, (4, length), generator=gen, dtype=torch.uint8)
    native = pack(codes, bits)
    assert native.flatten().tolist() == sum((_reference_pack(row, bits) for row in codes.tolist()), [])
    monkeypatch.setattr(packing, "_numpy_route", lambda data: False)
    assert torch.equal(pack(codes, bits), native)
    assert torch.equal(unpack(native, bits, length, torch.uint8), codes)
