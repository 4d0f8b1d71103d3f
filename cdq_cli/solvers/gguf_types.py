"""The GGUF block types cdq solves on, as data: block sizes, code widths, what each block stores.

Every type splits a row into blocks along the input dimension and stores integer codes ``c`` plus
per-block scales. Written as one affine grid per sub-block (the ``group`` below), a fitted block's
value is always

    ŵ = s · (c − z) + M

with ``s`` the sub-block's scale, ``z`` a fixed integer zero (the symmetric types: codes are
signed) and ``M`` the sub-block's offset (the types with a stored minimum; 0 for the others).
What is stored per type (ggml-quants.c; the values of one block of ``block`` weights):

=====  =====  =====  ====  ===========================================================================
type   block  group  bits  stored scales → ``s`` and ``M`` of sub-block ``g``
=====  =====  =====  ====  ===========================================================================
Q8_0   32     32     8     fp16 ``d``; s = d, z = 128 (codes are int8 + 128)
Q4_0   32     32     4     fp16 ``d``; s = d, z = 8
Q5_0   32     32     5     fp16 ``d``; s = d, z = 16
Q4_1   32     32     4     fp16 ``d``, ``m``; s = d, M = m
Q5_1   32     32     5     fp16 ``d``, ``m``; s = d, M = m
Q2_K   256    16     2     fp16 ``d``, ``dmin``; 4-bit ``sc_g``, ``mn_g``; s = d·sc_g, M = −dmin·mn_g
Q3_K   256    16     3     fp16 ``d``; signed 6-bit ``sc_g`` ∈ [−32, 31]; s = d·sc_g, z = 4
Q4_K   256    32     4     fp16 ``d``, ``dmin``; 6-bit ``sc_g``, ``mn_g``; s = d·sc_g, M = −dmin·mn_g
Q5_K   256    32     5     fp16 ``d``, ``dmin``; 6-bit ``sc_g``, ``mn_g``; s = d·sc_g, M = −dmin·mn_g
Q6_K   256    16     6     fp16 ``d``; int8 ``sc_g``; s = d·sc_g, z = 32
=====  =====  =====  ====  ===========================================================================

A symmetric type's zero is ``2**(bits−1)``, which is exactly the ``sym`` convention of cdq's
uniform grids; the types with a minimum have z = 0 and an offset. ``fallback`` is the type
llama.cpp's quantizer writes instead when a row's width is not a multiple of ``block``
(``tensor_type_fallback`` in llama-quant.cpp); None: none (a 32-block type, or F16 after a
fallback that does not fit either).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type (see the module docstring)."""

    name: str
    ggml_id: int  # GGMLQuantizationType value
    block: int  # weights per (super-)block
    group: int  # weights per sub-block: one scale (and offset) each
    bits: int  # code width
    symmetric: bool  # z = 2**(bits-1), no offset; else z = 0 with an offset
    scale_bits: int  # width of a sub-block scale relative to the block's fp16 d (0: d itself)
    signed_scales: bool  # sub-block scales may be negative (Q3_K, Q6_K)
    type_size: int  # bytes per block
    fallback: str | None = None

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def zero(self) -> int:
        return 2 ** (self.bits - 1) if self.symmetric else 0

    @property
    def k_quant(self) -> bool:
        return self.block == 256

    @property
    def sub_blocks(self) -> int:
        return self.block // self.group

    def bytes_for(self, rows: int, columns: int) -> int:
        """Bytes of a (rows, columns) matrix of this type."""
        return rows * columns // self.block * self.type_size


BLOCK_TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q4_0", 2, 32, 32, 4, True, 0, False, 18),
        BlockType("Q4_1", 3, 32, 32, 4, False, 0, False, 20),
        BlockType("Q5_0", 6, 32, 32, 5, True, 0, False, 22),
        BlockType("Q5_1", 7, 32, 32, 5, False, 0, False, 24),
        BlockType("Q8_0", 8, 32, 32, 8, True, 0, False, 34),
        BlockType("Q2_K", 10, 256, 16, 2, False, 4, False, 84, fallback="Q4_0"),
        BlockType("Q3_K", 11, 256, 16, 3, True, 6, True, 110, fallback="Q4_0"),
        BlockType("Q4_K", 12, 256, 32, 4, False, 6, False, 144, fallback="Q5_0"),
        BlockType("Q5_K", 13, 256, 32, 5, False, 6, False, 176, fallback="Q5_1"),
        BlockType("Q6_K", 14, 256, 16, 6, True, 8, True, 210, fallback="Q8_0"),
    )
}


def block_type(name: str) -> BlockType:
    """The type called ``name`` (case-insensitive); one-line ``ValueError`` naming the choices."""
    found = BLOCK_TYPES.get(str(name).upper())
    if found is None:
        raise ValueError(f"unknown GGUF type {name!r}: choose one of {', '.join(BLOCK_TYPES)}")
    return found


def fitting_type(name: str, columns: int) -> str | None:
    """The type a row of ``columns`` weights gets when ``name`` was asked for: ``name`` itself when
    the width is a multiple of its block, else llama.cpp's fallback when that fits, else None
    (llama.cpp writes F16 there)."""
    wanted = block_type(name)
    if columns % wanted.block == 0:
        return wanted.name
    if wanted.fallback is not None and columns % BLOCK_TYPES[wanted.fallback].block == 0:
        return wanted.fallback
    return None
