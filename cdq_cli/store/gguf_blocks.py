"""GGUF block bytes: codes and stored scales of one matrix → the bytes llama.cpp reads.

A row of ``columns`` weights is ``columns / block`` blocks of ``type_size`` bytes each, laid out as
ggml's ``block_q*`` structs (ggml-common.h). :func:`pack` takes the integer codes (rows, columns)
of a block-type grid (the ``c`` of ``s·(c − z) + M``) and its stored scales
(:func:`cdq_cli.solvers.gguf.grid_of`'s ``parts``) and returns (rows, bytes per row) uint8, in the
byte order every layout below was checked against (``gguf.quants.dequantize`` of the bytes equals
cdq's own dequantization bit for bit: tests/test_gguf_grids.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ..solvers.gguf_types import BLOCK_TYPES, block_type


def pack(name: str, codes: torch.Tensor, parts: dict[str, torch.Tensor]) -> np.ndarray:
    """(rows, columns) codes of type ``name`` with stored ``parts`` → (rows, row bytes) uint8."""
    kind = block_type(name)
    rows, columns = codes.shape
    if columns % kind.block:
        raise ValueError(f"{name} rows must be a multiple of {kind.block} weights, got {columns}")
    nb = rows * columns // kind.block
    c = codes.detach().cpu().to(torch.int64).numpy().reshape(nb, kind.block)
    if c.min() < 0 or c.max() > kind.maxq:
        raise ValueError(f"{name} codes must lie in [0, {kind.maxq}]")
    c = c.astype(np.uint8)
    p = {key: value.detach().cpu() for key, value in parts.items()}
    blocks = _PACKERS[name](c, p, nb)
    if blocks.shape != (nb, kind.type_size):
        raise AssertionError(f"{name} block packing produced {blocks.shape}, not ({nb}, {kind.type_size})")
    return blocks.reshape(rows, columns // kind.block * kind.type_size)


def _half(tensor: torch.Tensor, nb: int) -> np.ndarray:
    """float16 values → (nb, 2) little-endian bytes."""
    return tensor.to(torch.float16).numpy().reshape(nb, 1).astype("<f2").view(np.uint8)


def _ints(tensor: torch.Tensor, nb: int, width: int) -> np.ndarray:
    return tensor.to(torch.int64).numpy().reshape(nb, width)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """32 codes per block → 16 bytes: byte j holds codes j (low) and j + 16 (high)."""
    return (c[:, :16] & 0xF) | ((c[:, 16:32] & 0xF) << 4)


def _high_bits32(c: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes → one little-endian uint32 (bit j = code j)."""
    bits = (c[:, :32] >> 4).astype(np.uint32) & 1
    word = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint64).astype("<u4")
    return word.reshape(-1, 1).view(np.uint8)


def _q4_0(c, p, nb):
    return np.concatenate([_half(p["d"], nb), _nibbles(c)], axis=1)


def _q4_1(c, p, nb):
    return np.concatenate([_half(p["d"], nb), _half(p["m"], nb), _nibbles(c)], axis=1)


def _q5_0(c, p, nb):
    return np.concatenate([_half(p["d"], nb), _high_bits32(c), _nibbles(c)], axis=1)


def _q5_1(c, p, nb):
    return np.concatenate([_half(p["d"], nb), _half(p["m"], nb), _high_bits32(c), _nibbles(c)], axis=1)


def _q8_0(c, p, nb):
    signed = (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([_half(p["d"], nb), signed], axis=1)


def _crumbs(low: np.ndarray) -> np.ndarray:
    """256 two-bit values → 64 bytes (Q2_K/Q3_K): for each half h of 128, byte 32h + l holds
    values 128h + l, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7."""
    nb = low.shape[0]
    halves = low.reshape(nb, 2, 4, 32)
    out = halves[:, :, 0] | (halves[:, :, 1] << 2) | (halves[:, :, 2] << 4) | (halves[:, :, 3] << 6)
    return out.reshape(nb, 64).astype(np.uint8)


def _q2_k(c, p, nb):
    scales = (_ints(p["scales"], nb, 16) & 0xF) | ((_ints(p["mins"], nb, 16) & 0xF) << 4)
    return np.concatenate(
        [scales.astype(np.uint8), _crumbs(c & 3), _half(p["d"], nb), _half(p["dmin"], nb)], axis=1
    )


def _q3_scales(signed: np.ndarray) -> np.ndarray:
    """16 signed 6-bit scales (−32..31) → 12 bytes (quantize_row_q3_K_ref's layout)."""
    nb = signed.shape[0]
    l6 = (signed + 32).astype(np.int64)
    out = np.zeros((nb, 12), dtype=np.int64)
    out[:, :8] = l6[:, :8] & 0xF
    out[:, :8] |= (l6[:, 8:16] & 0xF) << 4
    for j in range(16):
        out[:, 8 + j % 4] |= (l6[:, j] >> 4) << (2 * (j // 4))
    return out.astype(np.uint8)


def _q3_k(c, p, nb):
    high = (c > 3).astype(np.uint8).reshape(nb, 8, 32)  # bit k of hmask[m] is code 32k + m
    hmask = (high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(axis=1, dtype=np.uint8)
    return np.concatenate(
        [hmask, _crumbs(c & 3), _q3_scales(_ints(p["scales"], nb, 16)), _half(p["d"], nb)], axis=1
    )


def _k4_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins → 12 bytes (get_scale_min_k4's layout)."""
    nb = scales.shape[0]
    out = np.zeros((nb, 12), dtype=np.int64)
    out[:, 0:4] = scales[:, 0:4] | ((scales[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mins[:, 0:4] | ((mins[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (scales[:, 4:8] & 0xF) | ((mins[:, 4:8] & 0xF) << 4)
    return out.astype(np.uint8)


def _pairs(c: np.ndarray) -> np.ndarray:
    """256 four-bit values → 128 bytes: for each quarter q of 64, byte 32q + l holds values
    64q + l (low nibble) and 64q + 32 + l (high nibble)."""
    nb = c.shape[0]
    quarters = c.reshape(nb, 4, 2, 32)
    return ((quarters[:, :, 0] & 0xF) | ((quarters[:, :, 1] & 0xF) << 4)).reshape(nb, 128).astype(np.uint8)


def _q4_k(c, p, nb):
    return np.concatenate(
        [
            _half(p["d"], nb),
            _half(p["dmin"], nb),
            _k4_scales(_ints(p["scales"], nb, 8), _ints(p["mins"], nb, 8)),
            _pairs(c),
        ],
        axis=1,
    )


def _q5_k(c, p, nb):
    high = (c >> 4).astype(np.uint8).reshape(nb, 8, 32)  # bit k of qh[j] is code 32k + j
    qh = (high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(axis=1, dtype=np.uint8)
    return np.concatenate(
        [
            _half(p["d"], nb),
            _half(p["dmin"], nb),
            _k4_scales(_ints(p["scales"], nb, 8), _ints(p["mins"], nb, 8)),
            qh,
            _pairs(c),
        ],
        axis=1,
    )


def _q6_k(c, p, nb):
    halves = c.reshape(nb, 2, 4, 32)  # half, quarter of the half, position
    low = halves & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    hi = halves >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    scales = _ints(p["scales"], nb, 16).astype(np.int8).view(np.uint8)
    return np.concatenate(
        [
            ql.reshape(nb, 128).astype(np.uint8),
            qh.reshape(nb, 64).astype(np.uint8),
            scales,
            _half(p["d"], nb),
        ],
        axis=1,
    )


# every block type's packing: the function ``_<type>`` of this module (the types: BLOCK_TYPES)
_PACKERS = {name: globals()[f"_{name.lower()}"] for name in BLOCK_TYPES}


def unpack(
    name: str, raw: np.ndarray, rows: int, columns: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The inverse of :func:`pack`: (codes (rows, columns) uint8, stored scales) from the bytes of a
    (rows, columns) matrix of type ``name`` (used to compare with llama.cpp's own files)."""
    kind = block_type(name)
    nb = rows * columns // kind.block
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(nb, kind.type_size)
    codes, parts = _UNPACKERS[name](b)
    shaped = {
        key: torch.from_numpy(np.ascontiguousarray(value)).reshape(rows, -1) for key, value in parts.items()
    }
    return torch.from_numpy(codes.astype(np.uint8)).reshape(rows, columns), shaped


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view("<f2").astype(np.float16).reshape(-1)


def _from_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int64)


def _from_high_bits32(qh: np.ndarray) -> np.ndarray:
    word = qh.copy().view("<u4").reshape(-1, 1)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int64)


def _u_q4_0(b):
    return _from_nibbles(b[:, 2:18]), {"d": _f16(b[:, 0:2])}


def _u_q4_1(b):
    return _from_nibbles(b[:, 4:20]), {"d": _f16(b[:, 0:2]), "m": _f16(b[:, 2:4])}


def _u_q5_0(b):
    return _from_nibbles(b[:, 6:22]) | (_from_high_bits32(b[:, 2:6]) << 4), {"d": _f16(b[:, 0:2])}


def _u_q5_1(b):
    codes = _from_nibbles(b[:, 8:24]) | (_from_high_bits32(b[:, 4:8]) << 4)
    return codes, {"d": _f16(b[:, 0:2]), "m": _f16(b[:, 2:4])}


def _u_q8_0(b):
    return b[:, 2:34].view(np.int8).astype(np.int64) + 128, {"d": _f16(b[:, 0:2])}


def _from_crumbs(qs: np.ndarray) -> np.ndarray:
    nb = qs.shape[0]
    halves = qs.reshape(nb, 2, 1, 32).astype(np.int64)
    return ((halves >> np.array([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3).reshape(nb, 256)


def _u_q2_k(b):
    scales = b[:, 0:16].astype(np.int16)
    parts = {"d": _f16(b[:, 80:82]), "dmin": _f16(b[:, 82:84]), "scales": scales & 0xF, "mins": scales >> 4}
    return _from_crumbs(b[:, 16:80]), parts


def _u_q3_k(b):
    nb = b.shape[0]
    hm = b[:, 0:32].astype(np.int64).reshape(nb, 1, 32)
    high = ((hm >> np.arange(8).reshape(1, 8, 1)) & 1).reshape(nb, 256)
    raw = b[:, 96:108].astype(np.int64)
    low = np.concatenate([raw[:, 0:8] & 0xF, raw[:, 0:8] >> 4], axis=1)
    top = np.stack([(raw[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], axis=1)
    signed = (low | (top << 4)) - 32
    return _from_crumbs(b[:, 32:96]) | (high << 2), {
        "d": _f16(b[:, 108:110]),
        "scales": signed.astype(np.int16),
    }


def _from_k4_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    raw = raw.astype(np.int64)
    scales = np.concatenate([raw[:, 0:4] & 63, (raw[:, 8:12] & 0xF) | ((raw[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([raw[:, 4:8] & 63, (raw[:, 8:12] >> 4) | ((raw[:, 4:8] >> 6) << 4)], axis=1)
    return scales.astype(np.int16), mins.astype(np.int16)


def _from_pairs(qs: np.ndarray) -> np.ndarray:
    nb = qs.shape[0]
    quarters = qs.reshape(nb, 4, 1, 32).astype(np.int64)
    return ((quarters >> np.array([0, 4]).reshape(1, 1, 2, 1)) & 0xF).reshape(nb, 256)


def _u_q4_k(b):
    scales, mins = _from_k4_scales(b[:, 4:16])
    return _from_pairs(b[:, 16:144]), {
        "d": _f16(b[:, 0:2]),
        "dmin": _f16(b[:, 2:4]),
        "scales": scales,
        "mins": mins,
    }


def _u_q5_k(b):
    nb = b.shape[0]
    scales, mins = _from_k4_scales(b[:, 4:16])
    qh = b[:, 16:48].astype(np.int64).reshape(nb, 1, 32)
    high = ((qh >> np.arange(8).reshape(1, 8, 1)) & 1).reshape(nb, 256)
    codes = _from_pairs(b[:, 48:176]) | (high << 4)
    return codes, {"d": _f16(b[:, 0:2]), "dmin": _f16(b[:, 2:4]), "scales": scales, "mins": mins}


def _u_q6_k(b):
    nb = b.shape[0]
    ql = b[:, 0:128].astype(np.int64).reshape(nb, 2, 64)
    qh = b[:, 128:192].astype(np.int64).reshape(nb, 2, 32)
    low = np.stack(
        [ql[:, :, 0:32] & 0xF, ql[:, :, 32:64] & 0xF, ql[:, :, 0:32] >> 4, ql[:, :, 32:64] >> 4], axis=2
    )
    high = np.stack([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=2)
    codes = (low | (high << 4)).reshape(nb, 256)
    return codes, {"d": _f16(b[:, 208:210]), "scales": b[:, 192:208].view(np.int8).astype(np.int16)}


# every block type's unpacking: the function ``_u_<type>`` of this module
_UNPACKERS = {name: globals()[f"_u_{name.lower()}"] for name in BLOCK_TYPES}
