"""The full-precision target (``-o target=fp``, GPTAQ's objective): quantize against what the
full-precision model computes, not against what the layer computes on the quantized model's inputs.

For a layer ``W`` (q × p), let ``X`` (p × n) be its inputs in the model being quantized (the
earlier layers already quantized) and ``X̃`` its inputs in the full-precision model, on the same
tokens. The objective is

    f(Ŵ) = ‖W X̃ − Ŵ X‖²

and needs three p × p statistics, captured in one block pass over two activation streams:
``Σ = X Xᵀ``, ``C = X̃ Xᵀ`` and ``Σ̃ = X̃ X̃ᵀ``. Every solver minimises ``‖(V − Ŵ) X‖² =
tr((V − Ŵ) Σ (V − Ŵ)ᵀ)`` for some V, and the reduction is to solve for the least-squares target

    W* = argmin_V ‖W X̃ − V X‖² + λ ‖V − W‖²  =  W (C + λI)(Σ + λI)⁻¹  =  W + W (C − Σ)(Σ + λI)⁻¹

(λ = ``damping`` · mean(diag Σ): a ridge toward W, so that ``W* = W`` exactly when the two streams
agree, ``X̃ = X``, and directions X hardly spans do not blow W* up).

**Part of the way** (``-o fp_share=α``, GPTAQ's α): the target's inputs are taken a share α of the
way from the quantized model's toward the full-precision model's, ``X_α = X + α (X̃ − X)``, so
``C`` becomes ``Σ + α (C − Σ)`` and

    W*_α = W + α W (C − Σ)(Σ + λI)⁻¹,

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
run unchanged on ``(W*, Σ)``; :func:`fp_objective` gives the true ``f`` for the report.

A Σ of shape (G, c, c) (a grouped convolution: one problem per group) is handled group by group.
"""

from __future__ import annotations

import torch

from .bands import once

TARGETS = ("quantized", "fp")  # -o target=: W X on the quantized model's inputs, or W X̃ (full precision)
FP_SHARE = 0.25  # -o fp_share: α, the share of the way toward X̃ the target's inputs are taken (GPTAQ's)


def fp_target(
    weight: torch.Tensor, sigma: torch.Tensor, cross: torch.Tensor, damping: float, share: float
) -> torch.Tensor:
    """``W*_α = W + α W (C − Σ)(Σ + λI)⁻¹`` with α = ``share`` (see the module doc), in
    ``weight``'s dtype; computed in float64 (one Cholesky of the damped Σ). ``cross`` is
    ``C = X̃ Xᵀ``."""
    if sigma.dim() == 3:
        groups = sigma.shape[0]
        rows = weight.reshape(groups, -1, sigma.shape[1])
        return torch.cat([fp_target(rows[g], sigma[g], cross[g], damping, share) for g in range(groups)])
    s = sigma.to(torch.float64)
    w = weight.to(torch.float64)

    def cholesky() -> torch.Tensor:
        h = s.clone()
        mean = float(h.diagonal().mean())
        h.diagonal().add_(max(damping, 1e-10) * (mean if mean > 0 else 1.0))
        dead = h.diagonal() <= 0
        h[dead, dead] = 1.0
        try:
            return torch.linalg.cholesky(h)
        except torch.linalg.LinAlgError as exc:
            raise ValueError(
                "target=fp could not factor Σ (not positive definite); raise the damping"
            ) from exc

    factor = once(sigma, ("fp_target", damping), cholesky)  # once per layer (solvers.bands)
    # W (C − Σ) H⁻¹ = ((H⁻¹ (C − Σ)ᵀ Wᵀ))ᵀ, H symmetric
    correction = torch.cholesky_solve((cross.to(torch.float64) - s).T @ w.T, factor).T
    return (w + share * correction).to(weight.dtype)


def fp_objective(
    weight: torch.Tensor,
    approx: torch.Tensor,
    sigma: torch.Tensor,
    cross: torch.Tensor,
    sigma_fp: torch.Tensor,
) -> float:
    """``‖W X̃ − Ŵ X‖² = tr(W Σ̃ Wᵀ) − 2 tr(W C Ŵᵀ) + tr(Ŵ Σ Ŵᵀ)`` in float64 (summed over groups
    for a (G, c, c) Σ)."""
    if sigma.dim() == 3:
        groups = sigma.shape[0]
        w = weight.reshape(groups, -1, sigma.shape[1])
        a = approx.reshape(groups, -1, sigma.shape[1])
        return sum(fp_objective(w[g], a[g], sigma[g], cross[g], sigma_fp[g]) for g in range(groups))
    w = weight.to(torch.float64)
    a = approx.to(torch.float64)
    full = float(((w @ sigma_fp.to(torch.float64)) * w).sum())
    mixed = float(((w @ cross.to(torch.float64)) * a).sum())
    own = float(((a @ sigma.to(torch.float64)) * a).sum())
    return full - 2.0 * mixed + own


def fp_energy(weight: torch.Tensor, sigma_fp: torch.Tensor) -> float:
    """``‖W X̃‖²``: the full-precision output's energy (the relative error's denominator)."""
    if sigma_fp.dim() == 3:
        groups = sigma_fp.shape[0]
        w = weight.reshape(groups, -1, sigma_fp.shape[1])
        return sum(fp_energy(w[g], sigma_fp[g]) for g in range(groups))
    w = weight.to(torch.float64)
    return float(((w @ sigma_fp.to(torch.float64)) * w).sum())
