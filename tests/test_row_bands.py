"""Layers solved in bands of rows (:mod:`cdq_cli.solvers.bands`).

Every run solves a layer in the same bands (:func:`row_bands` of its shape and device kind), so
that several ranks sharing a layer's bands write one process's bytes (tests/test_distributed.py
checks those bytes). Here: the band rule; the Σ-only work shared by a layer's bands changes no bit
of any band's result (GPTQ's factorization, the sweeps' permuted Σ, ``-o target=fp``'s factor, a
shrunk diagonal); GPTQ and RTN, which never look across rows, make the whole layer's choices in a
band; GPTQ's objective row by row; a layer's bands run in lockstep through cdq's phases give
every band's bits and drop each phase's Σ-only work before the next phase.
"""

from __future__ import annotations

import pytest
import torch

from cdq_cli.solvers import bands as bands_module
from cdq_cli.solvers import run_solver, run_solver_phases, solve
from cdq_cli.solvers.bands import even_bands, finish, lockstep, row_bands, shared
from cdq_cli.solvers.grid import GridSpec
from cdq_cli.solvers.target import fp_target

BANDS = [(0, 5), (5, 6), (6, 17), (17, 24)]


def _problem(seed: int, rows: int = 24, columns: int = 48, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(columns, 4 * columns, generator=gen, dtype=torch.float64)
    mix = torch.eye(columns, dtype=torch.float64) + 0.3 * torch.randn(
        columns, columns, generator=gen, dtype=torch.float64
    )
    x = (mix @ x) * torch.rand(columns, 1, generator=gen, dtype=torch.float64).add(0.2)
    weight = torch.randn(rows, columns, generator=gen, dtype=torch.float64)
    weight[3, 0] = 6.0
    return weight.to(dtype), (x @ x.T).to(dtype)


def _bands_alone_and_shared(method, weight, sigma, spec, options, bands=BANDS):
    alone = [run_solver(method, weight[lo:hi], sigma, spec, options) for lo, hi in bands]
    with shared(sigma):
        together = [run_solver(method, weight[lo:hi], sigma, spec, options) for lo, hi in bands]
    return alone, together


@pytest.mark.parametrize(
    "method, options, spec",
    [
        ("cdq", {}, GridSpec(3)),
        ("cdq", {"order": "cyclic", "rounds": 2}, GridSpec(4, sym=True)),
        ("cdq", {"shrink": 0.3}, GridSpec(2, 16)),
        ("gptq", {}, GridSpec(3)),
        ("gptq", {"act_order": False}, GridSpec(3, 16)),
    ],
    ids=["cdq", "cdq-cyclic-rounds2", "cdq-shrink", "gptq", "gptq-groups"],
)
def test_shared_sigma_work_changes_no_bit_of_any_band(method, options, spec):
    weight, sigma = _problem(0, dtype=torch.float32)
    diagonal = sigma.diagonal().clone()
    alone, together = _bands_alone_and_shared(method, weight, sigma, spec, options)
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)
        assert torch.equal(a.grid.scale, b.grid.scale) and a.objective == b.objective
    assert torch.equal(sigma.diagonal(), diagonal)  # a shrunk diagonal is put back


@pytest.mark.parametrize(
    "options, spec",
    [({}, GridSpec(3)), ({"rounds": 2, "shrink": 0.3}, GridSpec(4, 16)), ({}, GridSpec.of_type("Q4_K"))],
    ids=["cdq", "cdq-rounds2-shrink", "cdq-gguf"],
)
def test_bands_in_lockstep_are_the_bands_alone_and_hold_one_phase_of_sigma_work(options, spec, monkeypatch):
    """cdq's bands run side by side through its phases (each start, then the sweeps: what
    :func:`cdq_cli.pipeline._solve_bands` does) give every band the bits it gets alone, and
    between phases the shared work of the finished phase is dropped: the first start's GPTQ factor
    before the second start factors Σ, and the second's before the sweeps permute Σ."""
    weight, sigma = _problem(6, rows=24, columns=256, dtype=torch.float32)
    bands = [(0, 5), (5, 17), (17, 24)]
    alone = [run_solver("cdq", weight[lo:hi], sigma, spec, options) for lo, hi in bands]
    dropped = []
    release = bands_module.release

    def spy():
        dropped.append(sorted(key[0] + (":actorder" if key[2] is True else "") for key in _entries()))
        release()

    monkeypatch.setattr(bands_module, "release", spy)
    diagonal = sigma.diagonal().clone()
    with shared(sigma):
        phased = lockstep([run_solver_phases("cdq", weight[lo:hi], sigma, spec, options) for lo, hi in bands])
        kept = sorted(key[0] for key in _entries())
    for a, b in zip(alone, phased, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)
        assert torch.equal(a.grid.scale, b.grid.scale) and a.objective == b.objective
    assert dropped == [["gptq"], ["gptq:actorder"]]  # each start's factor, alone, after its phase
    # the sweeps' permuted Σ (and with rounds > 1 the restarts' act-order factor) in the last phase
    assert kept == (["cd-shared", "gptq"] if options.get("rounds") else ["cd-shared"])
    assert torch.equal(sigma.diagonal(), diagonal)  # a shrunk diagonal is put back at every pause


def _entries():
    return list(bands_module._SHARED.get().entries)


def test_lockstep_runs_each_phase_of_every_solve_before_the_next():
    log = []

    def solve(name, phases):
        for phase in range(phases):
            log.append((phase, name))
            yield
        return name

    assert lockstep([solve("a", 2), solve("b", 3), solve("c", 0)]) == ["a", "b", "c"]
    assert log == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "b")]
    assert finish(solve("d", 2)) == "d"


def test_shared_sigma_work_on_a_gguf_type_changes_no_bit():
    weight, sigma = _problem(2, rows=12, columns=256, dtype=torch.float32)
    alone, together = _bands_alone_and_shared(
        "cdq", weight, sigma, GridSpec.of_type("Q4_K"), {}, [(0, 4), (4, 12)]
    )
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)


def test_shared_fp_target_factor_changes_no_bit():
    weight, sigma = _problem(3)
    residual = 0.01 * weight  # W (C − Σ) for C = Σ + 0.01 I
    alone = [fp_target(weight[lo:hi], sigma, residual[lo:hi], 0.01, 0.25) for lo, hi in BANDS]
    with shared(sigma):
        together = [fp_target(weight[lo:hi], sigma, residual[lo:hi], 0.01, 0.25) for lo, hi in BANDS]
    assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))


def test_a_different_sigma_is_never_served_the_shared_work():
    weight, sigma = _problem(4, dtype=torch.float32)
    other = sigma * 1.5
    spec = GridSpec(3)
    with shared(sigma):
        run_solver("gptq", weight, sigma, spec, {})
        inside = run_solver("gptq", weight, other, spec, {})
    assert torch.equal(inside.codes, run_solver("gptq", weight, other, spec, {}).codes)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_gptq_and_rtn_bands_make_the_whole_layers_choices(method):
    weight, sigma = _problem(1, dtype=torch.float32)
    whole = solve(method, weight, sigma, bits=3)
    for lo, hi in BANDS:
        band = solve(method, weight[lo:hi], sigma, bits=3)
        assert torch.equal(band.codes, whole.codes[lo:hi]), (lo, hi)
        assert torch.allclose(band.weight, whole.weight[lo:hi], rtol=2e-5, atol=0), (lo, hi)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_row_objectives_are_each_rows_objective(act_order):
    """GPTQ's free objective (‖e‖² less the damping term) holds row by row."""
    weight, sigma = _problem(5)
    result = solve("gptq", weight, sigma, bits=3, act_order=act_order)
    error = weight - result.weight
    exact = ((error @ sigma) * error).sum(dim=1)
    assert torch.allclose(result.row_objective, exact, rtol=1e-9)
    assert result.objective == pytest.approx(float(result.row_objective.sum()), rel=1e-15)


@pytest.mark.parametrize("rows", [1, 7, 192, 256, 257, 576, 1536, 5632, 28672])
def test_row_bands_cover_the_rows_in_few_aligned_bands(rows):
    for device, most in (("cpu", 256), ("cuda", 4096)):
        bands = row_bands(rows, device)
        assert bands[0][0] == 0 and bands[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(bands, bands[1:], strict=False))
        assert all(hi - lo <= most for lo, hi in bands)
        assert len(bands) == -(-rows // most)  # as few as the limit allows
        assert all(lo % 8 == 0 for lo, _ in bands)
        assert even_bands(rows, len(bands)) == bands  # what a report's band count rebuilds
