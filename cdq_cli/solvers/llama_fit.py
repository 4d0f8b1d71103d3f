"""llama.cpp's own choice of block scales, reimplemented from ggml-quants.c (llama.cpp b-series
vendored by llama-cpp-python 0.3.36).

Each function mirrors one C routine operation for operation in float32, with the C loops' order
of accumulation kept (sequential sums over a block's elements), so that the stored scales come
out as llama.cpp writes them; the blocks themselves are processed all at once. Layout: a block's
elements run along the FIRST dimension (``x[i]`` is element i of every block, one contiguous
slab), per-block values have the remaining shape. ``nearest_int`` is llama.cpp's
round-half-to-even (``torch.round``).

Two paths per type, as in llama.cpp:

* reference (no importance): ``quantize_row_*_ref``, what ``llama-quantize`` does without an
  importance matrix;
* importance-weighted: ``quantize_row_*_impl`` with ``quant_weights`` = an importance per input
  column (llama.cpp's imatrix is the mean of the squared activations, diag(Σ)/n; cdq passes diag Σ,
  the same up to a factor that none of these routines depends on).

:func:`fit_parts` returns a type's stored scales (see :mod:`.gguf_types`): ``d`` (and ``dmin``,
``m``) as float16, the sub-block ``scales``/``mins`` as integers.
"""

from __future__ import annotations

import torch

from .gguf_types import BLOCK_TYPES, block_type

F32 = torch.float32
GROUP_MAX_EPS = 1e-15


def _c(value: float) -> torch.Tensor:
    """A float32 scalar constant (C's ``1.0f`` literals and int-to-float conversions)."""
    return torch.tensor(value, dtype=F32)


def _sqrtf(value: torch.Tensor) -> torch.Tensor:
    """C's ``sqrtf``, correctly rounded: torch's float32 CPU sqrt is not (a few values in a
    thousand are one unit off); the float64 root rounded to float32 is."""
    return torch.sqrt(value.double()).to(F32)


def nearest_int(value: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even, as a float tensor of integers."""
    return torch.round(value)


def _seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """``float s = 0; for i: s += terms[i]`` along the first dimension (float32, in order)."""
    total = torch.zeros(terms.shape[1:], dtype=F32, device=terms.device)
    for row in terms:
        total.add_(row)
    return total


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude (the first one on ties; 0 when all are zero): C's
    ``if (ax > amax) { amax = ax; max = x[i]; }`` from ``amax = 0``."""
    index = x.abs().argmax(dim=0, keepdim=True)
    return x.gather(0, index).squeeze(0)


def _safe(value: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return torch.where(ok, value, torch.ones_like(value))


def make_qx_quants(
    x: torch.Tensor, nmax: int, rmse_type: int, qw: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type, qw)`` for ``rmse_type`` 1 (the only one the types
    here use): returns (scale, L) with ``L = l + nmax``, ``l ∈ [−nmax, nmax−1]``."""
    if rmse_type != 1:
        raise ValueError("only rmse_type 1 is used by the supported types")
    maxv = _signed_max(x)
    zero = maxv.abs() < GROUP_MAX_EPS
    safe = _safe(maxv, ~zero)
    w = qw if qw is not None else x * x
    wx = w * x
    nmax_f = _c(float(nmax))

    def attempt(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
        return levels, _seq_sum(wx * levels), _seq_sum(w * levels * levels)

    levels, sumlx, suml2 = attempt(-nmax_f / safe)
    scale = torch.where(suml2 != 0, sumlx / _safe(suml2, suml2 != 0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(nmax_f + _c(0.1) * _c(float(step))) / safe
        cand, slx, sl2 = attempt(iscale)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        levels = torch.where(better, cand, levels)
        scale = torch.where(better, slx / _safe(sl2, sl2 > 0), scale)
        best = torch.where(better, scale * slx, best)
    levels = torch.where(zero, torch.full_like(levels, -nmax), levels)
    return torch.where(zero, torch.zeros_like(scale), scale), levels + nmax


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: (scale, L) with ``L ∈ [0, 2·nmax)``."""
    maxv = _signed_max(x)
    zero = maxv.abs() < GROUP_MAX_EPS
    iscale = -_c(float(nmax)) / _safe(maxv, ~zero)
    levels = nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
    w = x * x
    sumlx = _seq_sum(w * x * levels)
    suml2 = _seq_sum(w * levels * levels)
    for _ in range(5):
        for i in range(x.shape[0]):
            xi, wi, li = x[i], w[i], levels[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = nearest_int(xi * sl2 / _safe(slx, slx > 0)).clamp_(-nmax, nmax - 1)
            slx2 = slx + wi * xi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            levels[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2, suml2 > 0), 0.0)
    levels = torch.where(zero, torch.full_like(levels, -nmax), levels)
    return torch.where(zero, torch.zeros_like(scale), scale), levels + nmax


def make_qkx_quants(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    *,
    strict_flat: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` (``strict_flat``: a block is flat when ``max == min``) and
    ``make_qkx3_quants`` (flat when ``max <= min``; the caller passes ``x²`` when llama.cpp's
    weights are NULL): returns (scale, the_min, L) with the block's value ``scale·L − the_min``."""
    lo = x[0].clone()
    hi = x[0].clone()
    sum_w = weights[0].clone()
    sum_x = sum_w * x[0]
    for i in range(1, x.shape[0]):
        lo = torch.where(x[i] < lo, x[i], lo)
        hi = torch.where(x[i] > hi, x[i], hi)
        sum_w.add_(weights[i])
        sum_x.add_(weights[i] * x[i])
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = (hi == lo) if strict_flat else (hi <= lo)
    nmax_f = _c(float(nmax))
    iscale = nmax_f / _safe(hi - lo, ~flat)
    scale = _c(1.0) / iscale
    levels = nearest_int(iscale * (x - lo)).clamp_(0, nmax)
    wx = weights * x

    def error(scale_: torch.Tensor, min_: torch.Tensor, levels_: torch.Tensor) -> torch.Tensor:
        diff = scale_ * levels_ + min_ - x
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return _seq_sum(diff.mul_(weights))

    best = error(scale, lo, levels)
    low = lo  # C's `min`: a better candidate replaces it, and later candidates start from it
    if nstep >= 1:
        for step in range(nstep + 1):
            span = _safe(hi - low, ~flat)
            iscale_s = (_c(rmin) + _c(rdelta) * _c(float(step)) + nmax_f) / span
            cand = nearest_int(iscale_s * (x - low)).clamp_(0, nmax)
            wl = weights * cand
            sum_l = _seq_sum(wl)
            sum_l2 = _seq_sum(wl * cand)
            sum_xl = _seq_sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            ok = det > 0
            safe_det = _safe(det, ok)
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
            positive = this_min > 0
            this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
            this_scale = torch.where(positive, sum_xl / _safe(sum_l2, sum_l2 != 0), this_scale)
            cur = error(this_scale, this_min, cand)
            better = ok & (cur < best)
            levels = torch.where(better, cand, levels)
            best = torch.where(better, cur, best)
            scale = torch.where(better, this_scale, scale)
            low = torch.where(better, this_min, low)
    del wx
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    low = torch.where(flat, lo, low)
    return scale, -low, levels


def make_qp_quants(
    x: torch.Tensor, nmax: int, quant_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: (scale, L), the block's values
    ``scale·L`` with ``L ∈ [0, nmax]`` (uint8 in C: a negative level wraps modulo 256)."""
    maxv = torch.clamp(x.amax(dim=0), min=0.0)
    zero = maxv < GROUP_MAX_EPS
    safe = _safe(maxv, ~zero)
    nmax_f = _c(float(nmax))
    w = quant_weights
    iscale = nmax_f / safe
    first = torch.remainder(nearest_int(iscale * x), 256)
    scale = _c(1.0) / iscale
    diff = x - scale * first
    best = _seq_sum(w * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_s = (_c(0.1) * _c(float(step)) + nmax_f) / safe
        scale_s = _c(1.0) / iscale_s
        levels = torch.clamp(nearest_int(iscale_s * x), max=nmax)
        diff = x - scale_s * levels
        mse = _seq_sum(w * diff * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_s, iscale)
    raw = torch.clamp(nearest_int(iscale * x), max=nmax)
    sumlx = _seq_sum(w * x * raw)
    suml2 = _seq_sum(w * raw * raw)
    levels = torch.remainder(raw, 256)
    for _ in range(5):
        for i in range(x.shape[0]):
            xi, wi, li = x[i], w[i], levels[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            live = (slx > 0) & (sl2 > 0)
            new_l = torch.clamp(nearest_int(xi * sl2 / _safe(slx, live)), max=nmax)
            slx2 = slx + wi * xi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = live & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            levels[i] = torch.where(take, torch.remainder(new_l, 256), li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2, suml2 > 0), 0.0)
    levels = torch.where(zero, torch.zeros_like(levels), levels)
    return torch.where(zero, torch.zeros_like(scale), scale), levels


def _half(value: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16: round to nearest even."""
    return value.to(torch.float16)


def _u8(value: torch.Tensor) -> torch.Tensor:
    """A C ``uint8_t`` assignment from an int: modulo 256."""
    return torch.remainder(value, 256)


def fit_parts(
    weight: torch.Tensor, name: str, importance: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The stored scales llama.cpp chooses for ``weight`` (rows, columns) as type ``name``: its
    importance-matrix path when ``importance`` (one value per input column) is given, else its
    reference path. Shapes: ``d``, ``dmin`` (rows, blocks) float16; ``m`` (rows, blocks) float16;
    ``scales``, ``mins`` (rows, sub-blocks) int16 (unsigned types 0..2**scale_bits−1, Q3_K the
    signed −32..31, Q6_K int8 values)."""
    kind = block_type(name)
    x = weight.detach().to(F32)
    rows, columns = x.shape
    if columns % kind.block:
        raise ValueError(
            f"{kind.name} needs an input width that is a multiple of {kind.block}, got {columns}"
        )
    qw = None
    if importance is not None and kind.name != "Q8_0":
        qw = importance.detach().to(F32).reshape(1, columns).expand(rows, columns)
    parts = _FITTERS[kind.name](x, qw)
    return {key: value.reshape(rows, -1) for key, value in parts.items()}


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """(size, rows, blocks) view of (rows, columns) in blocks of ``size``, element axis first."""
    rows, columns = x.shape
    return x.reshape(rows, columns // size, size).permute(2, 0, 1).contiguous()


def _sub_blocks(x: torch.Tensor, group: int) -> torch.Tensor:
    """(group, rows, blocks of 256, sub-blocks) of (rows, columns), element axis first."""
    rows, columns = x.shape
    return x.reshape(rows, columns // 256, 256 // group, group).permute(3, 0, 1, 2).contiguous()


def _row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """``Σ x² / n`` over each row of (rows, columns), the C loop's order."""
    return _seq_sum((x * x).T.contiguous()) / _c(float(x.shape[1]))


def _block_sigma2(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor · Σ x² / 256`` over each 256-block: (rows, blocks)."""
    squares = _blocks(x * x, 256)
    return _c(factor) * _seq_sum(squares) / _c(256.0)


def _fit_q8_0(x: torch.Tensor, qw: torch.Tensor | None) -> dict[str, torch.Tensor]:
    rows, columns = x.shape
    amax = x.reshape(rows, columns // 32, 32).abs().amax(dim=-1)
    return {"d": _half(amax / _c(127.0))}


def _legacy_sym(
    x: torch.Tensor, qw: torch.Tensor | None, nmax: int, divisor: float
) -> dict[str, torch.Tensor]:
    xb = _blocks(x, 32)
    if qw is None:
        return {"d": _half(_signed_max(xb) / _c(divisor))}
    sigma2 = _row_sigma2(x).reshape(1, -1, 1)
    weight = _blocks(qw, 32) * _sqrtf(sigma2 + xb * xb)
    d, _ = make_qx_quants(xb, nmax, 1, weight)
    return {"d": _half(d)}


def _fit_q4_0(x, qw):
    return _legacy_sym(x, qw, 8, -8.0)


def _fit_q5_0(x, qw):
    return _legacy_sym(x, qw, 16, -16.0)


def _legacy_affine(x: torch.Tensor, qw: torch.Tensor | None, nmax: int) -> dict[str, torch.Tensor]:
    rows, columns = x.shape
    if qw is None:
        xr = x.reshape(rows, columns // 32, 32)
        lo, hi = xr.amin(dim=-1), xr.amax(dim=-1)
        return {"d": _half((hi - lo) / _c(float(nmax))), "m": _half(lo)}
    xb = _blocks(x, 32)
    sigma2 = _row_sigma2(x).reshape(1, -1, 1)
    weight = _blocks(qw, 32) * _sqrtf(sigma2 + xb * xb)
    scale, the_min, _ = make_qkx_quants(xb, weight, nmax, -0.9, 0.05, 36, False, strict_flat=False)
    return {"d": _half(scale), "m": _half(-the_min)}


def _fit_q4_1(x, qw):
    return _legacy_affine(x, qw, 15)


def _fit_q5_1(x, qw):
    return _legacy_affine(x, qw, 31)


def _quantize_unsigned(values: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path's sub-block scale quantization over a block's sub-blocks (last axis):
    ``max = max(0, values)``, ``l = min(top, (uint8) nearest_int(top / max · v))``, ``d = max / top``."""
    vmax = torch.clamp(values.amax(dim=-1), min=0.0)
    inv = torch.where(vmax > 0, _c(float(top)) / _safe(vmax, vmax > 0), 0.0)
    levels = torch.clamp(_u8(nearest_int(inv.unsqueeze(-1) * values)), max=top)
    return levels, vmax / _c(float(top))


def _imatrix_weights(
    x: torch.Tensor, qw: torch.Tensor, group: int, factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sub-blocks of x, llama.cpp's weights ``qw·sqrt(sigma2 + x²)``) with the block's sigma2."""
    xs = _sub_blocks(x, group)
    sigma2 = _block_sigma2(x, factor).unsqueeze(-1)
    return xs, _sub_blocks(qw, group) * _sqrtf(sigma2 + xs * xs)


def _fit_q2_k(x: torch.Tensor, qw: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if qw is None:
        xs = _sub_blocks(x, 16)
        scales, mins, _ = make_qkx_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, True, strict_flat=True)
        max_scale = torch.clamp(scales.amax(dim=-1), min=0.0)
        max_min = torch.clamp(mins.amax(dim=-1), min=0.0)
        iscale = _c(15.0) / _safe(max_scale, max_scale > 0)
        ls = torch.where((max_scale > 0).unsqueeze(-1), nearest_int(iscale.unsqueeze(-1) * scales), 0.0)
        imin = _c(15.0) / _safe(max_min, max_min > 0)
        lm = torch.where((max_min > 0).unsqueeze(-1), nearest_int(imin.unsqueeze(-1) * mins), 0.0)
        d = torch.where(max_scale > 0, max_scale / _c(15.0), 0.0)
        dmin = torch.where(max_min > 0, max_min / _c(15.0), 0.0)
    else:
        xs, weight = _imatrix_weights(x, qw, 16, 1.0)
        sw = _seq_sum(weight)
        scales, mins, _ = make_qkx_quants(xs, weight, 3, -0.9, 0.05, 36, False, strict_flat=False)
        d, ls = make_qp_quants(scales.movedim(-1, 0), 15, sw.movedim(-1, 0))
        dmin, lm = make_qp_quants(mins.movedim(-1, 0), 15, sw.movedim(-1, 0))
        ls, lm = ls.movedim(0, -1), lm.movedim(0, -1)
    byte = torch.bitwise_or(_u8(ls).to(torch.int16), _u8(lm * 16).to(torch.int16))
    return {
        "d": _half(d),
        "dmin": _half(dmin),
        "scales": (byte & 0xF).to(torch.int16),
        "mins": (byte >> 4).to(torch.int16),
    }


def _fit_q3_k(x: torch.Tensor, qw: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if qw is None:
        scales, _ = make_q3_quants(_sub_blocks(x, 16), 4)
        max_scale = _signed_max(scales.movedim(-1, 0))
        live = max_scale != 0
        iscale = -_c(32.0) / _safe(max_scale, live)
        levels = nearest_int(iscale.unsqueeze(-1) * scales).clamp(-32, 31)
        signed = torch.where(live.unsqueeze(-1), levels, torch.full_like(levels, -32.0))
        d = torch.where(live, _c(1.0) / iscale, 0.0)
    else:
        xs, weight = _imatrix_weights(x, qw, 16, 2.0)
        sw = _seq_sum(weight)
        scales, _ = make_qx_quants(xs, 4, 1, weight)
        d, stored = make_qx_quants(scales.movedim(-1, 0), 32, 1, sw.movedim(-1, 0))
        signed = stored.movedim(0, -1) - 32
    return {"d": _half(d), "scales": signed.to(torch.int16)}


def _fit_qk(x: torch.Tensor, qw: torch.Tensor | None, nmax: int, ref: tuple[float, float, int]) -> dict:
    if qw is None:
        xs = _sub_blocks(x, 32)
        av_x = _sqrtf(_seq_sum(xs * xs) / _c(32.0))
        weight = av_x + xs.abs()
        rmin, rdelta, nstep = ref
        scales, mins, _ = make_qkx_quants(xs, weight, nmax, rmin, rdelta, nstep, False, strict_flat=True)
        ls, d = _quantize_unsigned(scales, 63)
        lm, dmin = _quantize_unsigned(mins, 63)
    else:
        xs, weight = _imatrix_weights(x, qw, 32, 2.0)
        sw = _seq_sum(weight)
        scales, mins, _ = make_qkx_quants(xs, weight, nmax, -0.9, 0.05, 36, False, strict_flat=False)
        d, ls = make_qp_quants(scales.movedim(-1, 0), 63, sw.movedim(-1, 0))
        dmin, lm = make_qp_quants(mins.movedim(-1, 0), 63, sw.movedim(-1, 0))
        ls, lm = torch.clamp(ls.movedim(0, -1), max=63), torch.clamp(lm.movedim(0, -1), max=63)
    return {"d": _half(d), "dmin": _half(dmin), "scales": ls.to(torch.int16), "mins": lm.to(torch.int16)}


def _fit_q4_k(x, qw):
    return _fit_qk(x, qw, 15, (-1.0, 0.1, 20))


def _fit_q5_k(x, qw):
    return _fit_qk(x, qw, 31, (-0.5, 0.1, 15))


def _fit_q6_k(x: torch.Tensor, qw: torch.Tensor | None) -> dict[str, torch.Tensor]:
    xs = _sub_blocks(x, 16)
    weights = None if qw is None else _sub_blocks(qw, 16)
    scales, _ = make_qx_quants(xs, 32, 1, weights)
    max_scale = _signed_max(scales.movedim(-1, 0))
    live = max_scale.abs() >= GROUP_MAX_EPS
    iscale = -_c(128.0) / _safe(max_scale, live)
    levels = torch.clamp(nearest_int(iscale.unsqueeze(-1) * scales), max=127)
    levels = torch.where(live.unsqueeze(-1), levels, torch.zeros_like(levels))
    d = torch.where(live, _c(1.0) / iscale, 0.0)
    return {"d": _half(d), "scales": levels.to(torch.int16)}


# every block type's fit: the function ``_fit_<type>`` of this module (one list of types: BLOCK_TYPES)
_FITTERS = {name: globals()[f"_fit_{name.lower()}"] for name in BLOCK_TYPES}
