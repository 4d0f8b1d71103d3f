"""How many Σ-sized matrices the solvers' Σ-only work holds at once (issue 21: cdq on a model whose
widest layer has a 8,192² Σ, 256 MiB, peaked at GPTQ's factorization and the refits' sums).

Each bound is measured in its own process: the peak resident size (``VmHWM``, reset through
``/proc/self/clear_refs``) while one function runs, against Σ's size. The equalities check that
the leaner ways compute the same bits as the textbook ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdq_cli.solvers import gptq as gptq_module
from cdq_cli.solvers import lsq
from cdq_cli.solvers.result import damp

REPO = Path(__file__).resolve().parents[1]


def _sigma(n: int, seed: int = 0, dead: tuple[int, ...] = ()) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, n, generator=generator) * torch.rand(n, generator=generator) ** 2
    x[:, list(dead)] = 0
    return x.T @ x


@pytest.mark.parametrize("act_order", [False, True])
def test_the_factor_is_the_textbook_one_bit_for_bit(act_order):
    """``_cholesky(Σ, λ, order)`` = the Cholesky factor of ``J P damp(Σ) Pᵀ J``, made in place in
    one gathered copy, and its extra diagonal is ``diag(P damp(Σ) Pᵀ) − diag(P Σ Pᵀ)``; the pass's
    blocks of ``Ũ = J L J`` read from it are the textbook Ũ's."""
    sigma = _sigma(96, dead=(5, 40))
    order = torch.argsort(sigma.diagonal(), descending=True, stable=True) if act_order else None
    lower, extra = gptq_module._cholesky(sigma, 0.01, order)
    damped = damp(sigma, 0.01)
    plain = sigma
    if order is not None:
        damped, plain = damped[order][:, order], sigma[order][:, order]
    h = damped.flip(0, 1)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    assert torch.equal(lower, torch.linalg.cholesky(h))
    assert torch.equal(extra, h.diagonal().flip(0) - plain.diagonal())
    upper = torch.linalg.cholesky(h).flip(0, 1)
    blocks = gptq_module._Blocks.of(lower, 32, "torch")
    parts = zip(blocks.bounds, blocks.upper, blocks.cross, blocks.inverse, strict=True)
    for (b0, b1), ut_bb, cross, u_bb in parts:
        assert torch.equal(ut_bb, upper[b0:b1, b0:b1])
        assert torch.equal(cross, upper[:b0, b0:b1] @ u_bb)


def test_block_sums_in_pieces_are_the_float64_sums():
    """The refits' S[g, h] taken a few rows at a time: the float64 sum of the float32 entries (to
    float64 rounding), for one group and for many, on a Σ larger than one piece."""
    sigma = _sigma(1536)
    assert sigma.numel() > lsq._SUM_ELEMENTS
    for groups in (1, 12):
        size = 1536 // groups
        exact = sigma.double().reshape(groups, size, groups, size).sum(dim=(1, 3))
        torch.testing.assert_close(lsq._block_sums(sigma, groups), exact, rtol=1e-13, atol=0)


_PROBE = r"""
import gc, json, sys, torch
from cdq_cli.memory import tune_allocator
from cdq_cli.solvers import gptq, lsq, target
torch.set_num_threads(1)
tune_allocator()  # as cdq runs: tensors of 1 MiB or more are mappings, returned when freed
n = int(sys.argv[1])
x = torch.randn(2 * n, n)
sigma = x.T @ x
del x
order = torch.argsort(sigma.diagonal(), descending=True, stable=True)
def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))
def peak(work):
    work()  # warm up (LAPACK's and the allocator's first-call costs)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    base = status("VmRSS")
    kept = work()
    return status("VmHWM") - base
out = {
    "sigma": sigma.numel() * 4,
    "cholesky": peak(lambda: gptq._cholesky(sigma, 0.01)),
    "cholesky_act_order": peak(lambda: gptq._cholesky(sigma, 0.01, order)),
    "factor": peak(lambda: gptq._Blocks.of(gptq._cholesky(sigma, 0.01, order)[0], 128, "torch")),
    "block_sums": peak(lambda: lsq._block_sums(sigma, 1)),
}
rows = torch.randn(256, n)  # a band's residual R = W (X̃ − X) Xᵀ, and its weights
approx = rows.round()
out["fp_correction"] = peak(lambda: target.fp_correction(sigma, rows, 0.01))
out["fp_objective"] = peak(lambda: target.fp_objective(rows, approx, sigma, rows, 0.01, 0.0))
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's clear_refs")
def test_sigma_only_work_holds_few_copies_of_sigma():
    """GPTQ's factorization holds one Σ-sized matrix besides Σ (``J H J``, factored in place; it
    held two, ``J H J`` and its factor, then the factor and Ũ, and before that four with act order:
    the permuted copy, the damped copy, the flipped copy and the factor), the whole factor with
    the pass's blocks (half of Ũ) one and a half, and the refits' float64 sums a 16 MiB piece (they
    converted Σ whole to float64: two Σ's). ``-o target=fp``'s correction holds its factor (one Σ,
    read in place by the triangular solves) and the band's result; it held float64 copies of Σ,
    of the cross term and their difference, and its factor, about eight Σ's), and the report's
    true objective a few products of the band's rows (it converted Σ and the cross term to
    float64 whole: four Σ's)."""
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, "4096"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    found = json.loads(run.stdout.strip().splitlines()[-1])
    size = found["sigma"]
    assert found["cholesky"] < 1.25 * size, found
    assert found["cholesky_act_order"] < 1.25 * size, found
    assert found["factor"] < 1.75 * size, found
    assert found["block_sums"] < 0.4 * size, found
    assert found["fp_correction"] < 1.25 * size, found
    assert found["fp_objective"] < 0.5 * size, found  # a 256-row band's products: 1/16 Σ each
