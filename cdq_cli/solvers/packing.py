"""Bit-packing of integer codes into 32-bit words, for any width from 1 to 16 bits.

Codes along the last dimension are laid out as one little-endian bit stream: value ``k`` occupies
bits ``k*bits .. k*bits+bits-1`` of the stream, and word ``m`` holds stream bits ``32m .. 32m+31``.
Every 32 values fill exactly ``bits`` words, so 3-bit codes pack 32 values into 3 words (values may
straddle a word boundary), and 2/4/8-bit codes reduce to the familiar nibble/byte layouts. This is
also the layout of GPTQ's ``qweight`` along its packed dimension.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

_WORD = 32


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words holding ``length`` codes of ``bits`` bits (padded to 32 values)."""
    return -(-length // _WORD) * bits


# int64 working memory one piece of rows may take (packing widens codes to int64 words): a
# 2048 x 8192 layer is packed a few hundred rows at a time, not as 128 MB of int64 at once.
PIECE_BYTES = 8 << 20


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative codes (< 2**bits) along the last dim into int32 words (a few rows at a
    time: the int64 working memory stays within :data:`PIECE_BYTES`)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit codes")
    if codes.numel():
        low, high = torch.aminmax(codes)  # one pass
        if int(low) < 0 or int(high) >= 2**bits:
            raise ValueError(f"codes out of range for {bits} bits")
    *lead, length = codes.shape
    if codes.numel() == 0:
        return _pack_rows(codes, bits)
    if bits in (2, 4, 8):
        return _pack_bytes(codes.reshape(-1, length), bits).reshape(*lead, packed_length(length, bits))
    rows = codes.reshape(-1, length)
    out = torch.empty(rows.shape[0], packed_length(length, bits), dtype=torch.int32, device=codes.device)
    for piece in _pieces(rows.shape[0], -(-length // _WORD) * _WORD * 8 * 2):
        out[piece] = _pack_rows(rows[piece], bits)
    return out.reshape(*lead, out.shape[-1])


def _pack_bytes(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack` for 2-, 4- and 8-bit codes, in bytes: ``8/bits`` values fill each byte from its
    low bits up, and four bytes read little-endian are the int32 word that holds them (the stream
    layout above, without a wider integer: a few passes over one byte per code)."""
    length = rows.shape[1]
    padded = -(-length // _WORD) * _WORD
    data = rows.to(torch.uint8)
    if padded != length:
        data = torch.nn.functional.pad(data, (0, padded - length))
    per = 8 // bits
    if _numpy_route(data):  # numpy's strided integer ops: 2-3x torch's with one thread
        values = data.numpy()
        out = values[:, 0::per].copy()
        for j in range(1, per):
            np.bitwise_or(out, np.left_shift(values[:, j::per], j * bits), out=out)
        return _as_words(torch.from_numpy(out))
    fields = data.reshape(rows.shape[0], padded // per, per)
    packed = fields[..., 0].clone()
    for j in range(1, per):
        packed |= fields[..., j] << (j * bits)
    return _as_words(packed)


def _numpy_route(data: torch.Tensor) -> bool:
    """Whether bytes ``data`` are packed/unpacked by numpy (on the CPU) rather than torch (elsewhere;
    the same layout, tests/test_packing.py runs both)."""
    return data.device.type == "cpu"


def _as_words(data: torch.Tensor) -> torch.Tensor:
    """Bytes (rows, 4·n) as the little-endian int32 words (rows, n) they spell."""
    if sys.byteorder == "little":
        return data.contiguous().view(torch.int32)
    four = data.reshape(data.shape[0], -1, 4).to(torch.int64)
    words = four[..., 0] | four[..., 1] << 8 | four[..., 2] << 16 | four[..., 3] << 24
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _as_bytes(words: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_as_words`: int32 words (rows, n) as their little-endian bytes."""
    if sys.byteorder == "little":
        return words.contiguous().view(torch.uint8)
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(4, device=words.device) * 8
    return ((unsigned.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(words.shape[0], -1)


def _layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the 32 values of a chunk: the word each starts in, its shift there, and for each of
    the chunk's ``bits`` words the index of the last value starting in it (every word holds the
    start of at least one value, as values are at most 16 bits apart)."""
    starts = torch.arange(_WORD, device=device) * bits
    word, shift = starts // _WORD, starts % _WORD
    last = torch.searchsorted(word, torch.arange(bits, device=device), right=True) - 1
    return word, shift, last


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack one piece of rows, all 32 positions of a chunk at once.

    With ``s_k`` the shift of value ``k`` in its word ``w_k``, the word sums
    ``S_w = Σ_{k: w_k = w} c_k · 2^{s_k}`` (< 2^{32+bits}: exact in int64) hold, disjoint bit fields
    being added, word ``w``'s own bits in bits 0..31 and, above them, the start of the value that
    straddles into word ``w+1``; so ``word_w = (S_w mod 2^32) + ⌊S_{w-1} / 2^32⌋``. ``S`` is a
    difference of a cumulative sum taken at each word's last value."""
    codes = codes.to(torch.int64)
    *lead, length = codes.shape
    padded = -(-length // _WORD) * _WORD
    if padded != length:
        codes = torch.nn.functional.pad(codes, (0, padded - length))
    word, shift, last = _layout(bits, codes.device)
    chunks = codes.reshape(*lead, padded // _WORD, _WORD)
    sums = (chunks << shift).cumsum_(-1)
    per_word = sums.index_select(-1, last)
    per_word[..., 1:] -= sums.index_select(-1, last[:-1])
    del sums
    words = per_word & 0xFFFFFFFF
    words[..., 1:] += per_word[..., :-1] >> _WORD
    words = words.reshape(*lead, padded // _WORD * bits)
    # Reinterpret unsigned 32-bit words as int32 (two's complement), the dtype safetensors stores.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, length: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``length`` codes along the last dim, as ``dtype`` (a few
    rows at a time: the int64 working memory stays within :data:`PIECE_BYTES`)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot unpack {bits}-bit codes")
    *lead, n_words = words.shape
    if n_words != packed_length(length, bits):
        raise ValueError(
            f"{length} codes of {bits} bits pack into {packed_length(length, bits)} words, not {n_words}"
        )
    if words.numel() == 0:
        return _unpack_rows(words, bits, length).to(dtype)
    rows = words.reshape(-1, n_words)
    if bits in (2, 4, 8):  # byte by byte, as _pack_bytes wrote them
        data = _as_bytes(rows)
        per = 8 // bits
        if _numpy_route(data):  # numpy, as in _pack_bytes
            values = data.numpy()
            out = np.empty((values.shape[0], values.shape[1] * per), dtype=np.uint8)
            for j in range(per):
                np.bitwise_and(np.right_shift(values, j * bits), (1 << bits) - 1, out=out[:, j::per])
            return torch.from_numpy(out[:, :length]).to(dtype).reshape(*lead, length)
        shifts = torch.arange(per, device=words.device, dtype=torch.uint8) * bits
        fields = (data.unsqueeze(-1) >> shifts).bitwise_and_((1 << bits) - 1)
        return fields.reshape(rows.shape[0], -1)[:, :length].to(dtype).reshape(*lead, length)
    out = torch.empty(rows.shape[0], length, dtype=dtype, device=words.device)
    for piece in _pieces(rows.shape[0], n_words // bits * _WORD * 8 * 3):
        out[piece] = _unpack_rows(rows[piece], bits, length)
    return out.reshape(*lead, length)


def _unpack_rows(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Unpack one piece of rows, all 32 values of a chunk at once: each word joined with the next
    one as a 64-bit pair, value ``k`` is bits ``s_k .. s_k+bits−1`` of its word's pair."""
    *lead, n_words = words.shape
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    chunks = unsigned.reshape(*lead, n_words // bits, bits)
    pairs = chunks.clone()
    pairs[..., :-1] |= chunks[..., 1:] << _WORD  # the top bits may wrap the sign: never read
    del unsigned, chunks
    word, shift, _ = _layout(bits, words.device)
    values = pairs.index_select(-1, word).bitwise_right_shift_(shift).bitwise_and_((1 << bits) - 1)
    return values.reshape(*lead, n_words // bits * _WORD)[..., :length]


def _pieces(rows: int, row_bytes: int) -> list[slice]:
    step = max(1, PIECE_BYTES // max(1, row_bytes))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
