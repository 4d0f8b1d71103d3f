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


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative codes (< 2**bits) along the last dim into int32 words."""
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit codes")
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
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


def unpack(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``length`` codes along the last dim, as int64."""
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot unpack {bits}-bit codes")
    *lead, n_words = words.shape
    if n_words != packed_length(length, bits):
        raise ValueError(
            f"{length} codes of {bits} bits pack into {packed_length(length, bits)} words, not {n_words}"
        )
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
