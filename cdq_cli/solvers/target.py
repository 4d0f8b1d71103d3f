"""The full-precision target (``-o target=fp``, GPTAQ's objective): quantize against what the
full-precision model computes, not against what the layer computes on the quantized model's inputs.

For a layer ``W`` (q × p), let ``X`` (p × n) be its inputs in the model being quantized (the
earlier layers already quantized) and ``X̃`` its inputs in the full-precision model, on the same
tokens. The objective is

    f(Ŵ) = ‖W X̃ − Ŵ X‖²

and needs, besides ``Σ = X Xᵀ``, only what W makes of the other stream: captured in one block
pass over two activation streams (:class:`~cdq_cli.solvers.sigma.PairedSigmaAccumulator`), the
residual ``R = W (X̃ − X) Xᵀ`` (q × p, i.e. ``W (C − Σ)`` with ``C = X̃ Xᵀ``) and, per output row,
``‖W X̃‖²`` and ``‖W (X̃ − X)‖²``. Every solver minimises ``‖(V − Ŵ) X‖² = tr((V − Ŵ) Σ (V −
Ŵ)ᵀ)`` for some V, and the reduction is to solve for the least-squares target

    W* = argmin_V ‖W X̃ − V X‖² + λ ‖V − W‖²  =  W (C + λI)(Σ + λI)⁻¹  =  W + R (Σ + λI)⁻¹

(λ = ``damping`` · mean(diag Σ): a ridge toward W, so that ``W* = W`` exactly when the two streams
agree, ``X̃ = X`` (then R is exactly zero: ``W X̃ − W X`` is taken per batch before anything is
summed), and directions X hardly spans do not blow W* up).

**Part of the way** (``-o fp_share=α``, GPTAQ's α): the target's inputs are taken a share α of the
way from the quantized model's toward the full-precision model's, ``X_α = X + α (X̃ − X)``, so
R becomes ``α R`` and

    W*_α = W + α R (Σ + λI)⁻¹,

the least-squares target of ``f_α(Ŵ) = ‖W X_α − Ŵ X‖²``. α = 1 is the objective above in full
(every layer asked to undo all of the error upstream of it), α → 0 the quantized model's own
(``target=quantized``). The whole way was measured worse than the layer's own target on
SmolLM2-135M; GPTAQ's reference implementation scales this term by 0.25, and so does cdq by
default (:data:`FP_SHARE`), which was measured better than both (BENCHMARKS.md, "The
full-precision target part of the way"). The expansion below holds for ``f_α`` with ``X̃``
replaced by ``X_α``; :func:`fp_objective`, the report's error, stays the whole-way ``f``.
Expanding,

    f(Ŵ) = ‖(W* − Ŵ) X‖² + 2λ tr((W* − W)(W* − Ŵ)ᵀ) + const

because ``W C − W* Σ = λ (W* − W)`` (``const`` does not depend on Ŵ): the first term is what the
solver minimises, and the second vanishes without damping (and is small with it). So the solvers
run unchanged on ``(W*, Σ)``; :func:`fp_objective` gives the true ``f`` for the report, as

    f(Ŵ) = ‖(W − Ŵ) X + W (X̃ − X)‖² = tr(D Σ Dᵀ) + 2 ⟨R, D⟩ + ‖W (X̃ − X)‖²,   D = W − Ŵ,

three terms without the cancellation of ``‖W X̃‖² − 2 tr(W C Ŵᵀ) + tr(Ŵ Σ Ŵᵀ)``. It takes R as
``K H`` from the correction ``K = R H⁻¹`` (H = Σ + λI, so ``⟨R, D⟩ = ⟨K, D Σ⟩ + λ ⟨K, D⟩``, and
``D Σ`` is the one product the first term makes anyway): the driver keeps K in R's memory and W*
in W's, since ``W = W* − α K``, so the target costs no layer-sized matrix beyond its statistics.

A Σ of shape (G, c, c) (a grouped convolution: one problem per group) is handled group by group.
"""

from __future__ import annotations

import torch

from .bands import once
from .result import TILE_BYTES, cholesky_in_place, spans

TARGETS = ("quantized", "fp")  # -o target=: W X on the quantized model's inputs, or W X̃ (full precision)
FP_SHARE = 0.25  # -o fp_share: α, the share of the way toward X̃ the target's inputs are taken (GPTAQ's)
# In --resume's fingerprint with target=fp (raised when its results change for the same inputs):
# 2: the statistics W (X̃ − X) Xᵀ per layer and a factor in Σ's dtype (was X̃ Xᵀ and float64: last bits)
FP_REVISION = 2


def fp_target(
    weight: torch.Tensor, sigma: torch.Tensor, residual: torch.Tensor, damping: float, share: float
) -> torch.Tensor:
    """``W*_α = W + α K``, ``K = R (Σ + λI)⁻¹`` (:func:`fp_correction`), α = ``share``, ``R`` =
    ``residual`` = W (X̃ − X) Xᵀ (see the module doc), in Σ's dtype, returned in ``weight``'s."""
    correction = fp_correction(sigma, residual, damping).reshape(weight.shape)
    return (weight.to(sigma.dtype) + share * correction).to(weight.dtype)


def fp_correction(sigma: torch.Tensor, residual: torch.Tensor, damping: float) -> torch.Tensor:
    """``K = R H⁻¹``, H = Σ + λ·mean(diag Σ)·I (:func:`damped_diagonal`), for rows ``residual`` = R
    (q × p, or (G, q/G, c) with a (G, c, c) Σ), in Σ's dtype: exactly zero where R is (the streams
    agree). One Cholesky factor of H, made in a single Σ-sized copy (no float64 copies) and shared
    by the layer's bands (:func:`~cdq_cli.solvers.bands.once`), read in place by two triangular
    solves."""
    if sigma.dim() == 3:
        return torch.stack([fp_correction(sigma[g], residual[g], damping) for g in range(sigma.shape[0])])
    rows = residual.to(sigma.dtype)
    if not bool(rows.any()):  # the streams agree (block 0's first layers): nothing to correct
        return torch.zeros_like(rows)
    factor = once(sigma, ("fp_target", damping), lambda: _factor(sigma, damping))
    # R H⁻¹ = R L⁻ᵀ L⁻¹, solved from the right (torch.cholesky_solve would copy the factor first)
    half = torch.linalg.solve_triangular(factor.mT, rows, upper=True, left=False)
    return torch.linalg.solve_triangular(factor, half, upper=False, left=False)


def damped_diagonal(sigma: torch.Tensor, damping: float) -> torch.Tensor:
    """What H adds to Σ's diagonal: ``λ·mean(diag Σ)`` (``max(damping, 1e-10)``; 1 for a Σ whose
    diagonal averages 0), and 1 on a dead column whose damped diagonal is still not positive."""
    diagonal = sigma.diagonal()
    mean = float(diagonal.mean())
    extra = torch.full_like(diagonal, max(damping, 1e-10) * (mean if mean > 0 else 1.0))
    dead = diagonal + extra <= 0
    extra[dead] = 1.0 - diagonal[dead]
    return extra


def _factor(sigma: torch.Tensor, damping: float) -> torch.Tensor:
    """The lower Cholesky factor of H (:func:`damped_diagonal`), factored in the one copy's memory
    (:func:`.result.cholesky_in_place`)."""
    h = sigma.clone()
    h.diagonal().add_(damped_diagonal(sigma, damping))
    return cholesky_in_place(h, "target=fp could not factor Σ (not positive definite); raise the damping")


def fp_objective(
    weight: torch.Tensor,
    approx: torch.Tensor,
    sigma: torch.Tensor,
    correction: torch.Tensor,
    damping: float,
    upstream: float,
) -> float:
    """``‖W X̃ − Ŵ X‖² = tr(D Σ Dᵀ) + 2 (⟨K, D Σ⟩ + ⟨K, D diag(h)⟩) + ‖W (X̃ − X)‖²`` with ``D = W −
    Ŵ``, ``K`` = ``correction`` (:func:`fp_correction`; ``K H = R``, ``H = Σ + diag(h)``) and
    ``upstream`` = ‖W (X̃ − X)‖² of these rows (summed over groups for a (G, c, c) Σ). One product
    ``D Σ`` in Σ's dtype a row tile at a time, every sum in float64; no copy of Σ."""
    if sigma.dim() == 3:
        groups = sigma.shape[0]
        w = weight.reshape(groups, -1, sigma.shape[1])
        a = approx.reshape(groups, -1, sigma.shape[1])
        terms = sum(_terms(w[g], a[g], sigma[g], correction[g], damping) for g in range(groups))
    else:
        terms = _terms(weight, approx, sigma, correction, damping)
    return terms + upstream


def _terms(
    weight: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor, correction: torch.Tensor, damping: float
) -> float:
    extra = damped_diagonal(sigma, damping).to(sigma.dtype)
    rows, columns = weight.shape
    total = 0.0
    for tile in spans(rows, sigma.element_size() * columns, TILE_BYTES):
        gap = (weight[tile] - approx[tile]).to(sigma.dtype)
        k = correction[tile].to(sigma.dtype)
        product = gap @ sigma
        total += 2.0 * float((product * k).sum(dtype=torch.float64))  # ⟨K, D Σ⟩
        total += float(product.mul_(gap).sum(dtype=torch.float64))  # tr(D Σ Dᵀ)
        total += 2.0 * float(gap.mul_(extra).mul_(k).sum(dtype=torch.float64))  # ⟨K, D diag(h)⟩
    return total
