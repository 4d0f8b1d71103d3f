"""Bit-packing of integer codes into 32-bit words, for any width from 1 to 16 bits.

Codes along the last dimension are laid out as one little-endian bit stream: value ``k`` occupies
bits ``k*bits .. k*bits+bits-1`` of the stream, and word ``m`` holds stream bits ``32m .. 32m+31``.
Every 32 values fill exactly ``bits`` words, so 3-bit codes pack 32 values into 3 words (values may
straddle a word boundary), and 2/4/8-bit codes reduce to the familiar nibble/byte layouts. This is
also the layout of GPTQ's ``qweight`` along its packed dimension.
"""

from __future__ import annotations

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
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    *lead, length = codes.shape
    if codes.numel() == 0:
        return _pack_rows(codes, bits)
    rows = codes.reshape(-1, length)
    out = torch.empty(rows.shape[0], packed_length(length, bits), dtype=torch.int32, device=codes.device)
    for piece in _pieces(rows.shape[0], -(-length // _WORD) * _WORD * 8 * 2):
        out[piece] = _pack_rows(rows[piece], bits)
    return out.reshape(*lead, out.shape[-1])


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    codes = codes.to(torch.int64)
    *lead, length = codes.shape
    padded = -(-length // _WORD) * _WORD
    if padded != length:
        codes = torch.nn.functional.pad(codes, (0, padded - length))
    chunks = codes.reshape(*lead, padded // _WORD, _WORD)
    words = torch.zeros(*lead, padded // _WORD, bits, dtype=torch.int64, device=codes.device)
    for k in range(_WORD):
        start = k * bits
        word, shift = divmod(start, _WORD)
        value = chunks[..., k]
        words[..., word] |= (value << shift) & 0xFFFFFFFF
        if shift + bits > _WORD:  # straddles into the next word
            words[..., word + 1] |= value >> (_WORD - shift)
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
    out = torch.empty(rows.shape[0], length, dtype=dtype, device=words.device)
    for piece in _pieces(rows.shape[0], n_words // bits * _WORD * 8 * 3):
        out[piece] = _unpack_rows(rows[piece], bits, length)
    return out.reshape(*lead, length)


def _unpack_rows(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    *lead, n_words = words.shape
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    chunks = unsigned.reshape(*lead, n_words // bits, bits)
    mask = (1 << bits) - 1
    values = []
    for k in range(_WORD):
        start = k * bits
        word, shift = divmod(start, _WORD)
        value = chunks[..., word] >> shift
        if shift + bits > _WORD:
            value = value | (chunks[..., word + 1] << (_WORD - shift))
        values.append(value & mask)
    out = torch.stack(values, dim=-1).reshape(*lead, n_words // bits * _WORD)
    return out[..., :length]


def _pieces(rows: int, row_bytes: int) -> list[slice]:
    step = max(1, PIECE_BYTES // max(1, row_bytes))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
