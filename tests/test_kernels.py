"""The fused in-block kernels (numba on CPU, Triton under its CPU interpreter) against the torch
reference: single kernel calls on fresh random inputs, exact ties, whole CD/GPTQ runs on random
problems and on the real stories260K layers, and the backend dispatcher.

Triton runs here through ``TRITON_INTERPRET=1`` (numpy under the hood, no GPU), which is slow per
operation, so its cases are small: few rows, one block per sweep, one or two sweeps.
"""

from __future__ import annotations

import pytest
import torch

from cdq_cli import kernels
from cdq_cli.kernels import CD, GPTQ, reference
from cdq_cli.solvers import Grid, GridSpec, fit_minmax
from cdq_cli.solvers.cd import cd_sweeps, order_permutation
from cdq_cli.solvers.gptq import solve_gptq

numba_missing = not kernels.available("numba")
triton_missing = not kernels.available("triton")


@pytest.fixture
def triton_interpret(monkeypatch):
    """Run the Triton kernel on CPU tensors through Triton's interpreter (no GPU needed)."""
    if triton_missing:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=["numba", "triton"])
def backend(request):
    """Each compiled backend in turn (Triton through its interpreter)."""
    if request.param == "numba" and numba_missing:
        pytest.skip("numba is not installed")
    if request.param == "triton":
        request.getfixturevalue("triton_interpret")
    return request.param


def _block_inputs(seed, rows, width, columns, groups, *, dead=(), dtype=torch.float64):
    """Random operands of one block call, transposed layout: x (B, R), hat and err (p, R), scale
    and zero (groups, R), the group of every column, mat (B, B), diag and dead (B,)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(width, rows, generator=gen, dtype=dtype)
    err = torch.randn(columns, rows, generator=gen, dtype=dtype)
    scale = torch.rand(groups, rows, generator=gen, dtype=dtype) * 0.5 + 0.1
    zero = torch.randint(0, 8, (groups, rows), generator=gen).to(dtype)
    codes = torch.randint(0, 8, (columns, rows), generator=gen).to(dtype)
    gidx_full = torch.arange(columns) // (columns // groups)
    hat = scale[gidx_full] * (codes - zero[gidx_full])
    mat = torch.randn(width, width, generator=gen, dtype=dtype) * 0.3
    diag = torch.rand(width, generator=gen, dtype=dtype) + 0.5
    dead_mask = torch.zeros(width, dtype=torch.bool)
    dead_mask[list(dead)] = True
    diag[dead_mask] = 0
    return x, hat, err, scale, zero, gidx_full, mat, diag, dead_mask


def _run_block(name, inputs, col0, width, *, rule, relax=False, start=0, stop=None):
    x, hat, err, scale, zero, gidx_full, mat, diag, dead = (t.clone() for t in inputs)
    out = torch.zeros_like(x)
    result = kernels.backend_module(name).block(
        kernels.Block(
            rule,
            x,
            out,
            hat,
            col0,
            scale,
            zero,
            gidx_full[col0 : col0 + width].contiguous(),
            mat,
            diag,
            7,
            relax=relax,
            start=start,
            stop=stop,
            dead=dead if rule == CD else None,
            err=err if rule == CD else None,
            sdiag=diag * 2 + 1 if rule == CD else None,
        )
    )
    if rule == CD:
        return x, hat, out, err, *result
    assert result is None
    return x, hat, out


@pytest.mark.parametrize(
    ("rule", "relax", "dead", "segment"),
    [
        (CD, False, (), None),
        (CD, False, (1, 6), None),  # dead columns: rounded W, no update
        (CD, True, (3,), None),  # relaxed: no rounding
        (GPTQ, False, (), None),
        (GPTQ, False, (), (3, 7)),  # a segment of the block (dynamic GPTQ groups stop the kernel)
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_block_call_equals_reference(backend, seed, rule, relax, dead, segment):
    """One kernel call on fresh random inputs (grouped grid, block in the middle of the matrix)."""
    rows, width, columns, groups, col0 = 37, 9, 24, 4, 12  # the block spans two groups
    inputs = _block_inputs(seed, rows, width, columns, groups, dead=dead)
    start, stop = segment if segment else (0, None)
    ref = _run_block("torch", inputs, col0, width, rule=rule, relax=relax, start=start, stop=stop)
    got = _run_block(backend, inputs, col0, width, rule=rule, relax=relax, start=start, stop=stop)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    hat = got[1]
    # Untouched outside the block (and outside the segment).
    lo, hi = col0 + start, col0 + (stop or width)
    torch.testing.assert_close(hat[:lo], inputs[1][:lo], rtol=0, atol=0)
    torch.testing.assert_close(hat[hi:], inputs[1][hi:], rtol=0, atol=0)
    if rule == CD:  # err += out in the block's columns only; dead columns untouched; a real count
        err, out = got[3], got[2]
        torch.testing.assert_close(err[lo:hi], inputs[2][lo:hi] + out, rtol=0, atol=0)
        torch.testing.assert_close(err[:lo], inputs[2][:lo], rtol=0, atol=0)
        torch.testing.assert_close(err[hi:], inputs[2][hi:], rtol=0, atol=0)
        for j in dead:
            assert torch.equal(hat[col0 + j], inputs[1][col0 + j]) and not out[j].any()
        assert int(got[5]) == int(torch.count_nonzero(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_round_half_to_even_like_grid_quantize(backend, dtype):
    """Exact ties: values half-way between two codes, odd and even zero-points. Every backend must
    round as Grid.quantize does, ``round(v / s) + z`` with half to even, not ``round(v / s + z)``.

    With Σ diagonal and the start Ŵ = W, G = 0, so every target is exactly W."""
    rows, columns = 16, 8
    scale = torch.full((rows, 1), 0.25, dtype=dtype)
    zero = torch.arange(rows, dtype=dtype).remainder(5).unsqueeze(1)  # odd and even zero-points
    halves = torch.arange(columns, dtype=dtype) - 3.5  # v / s = -3.5 … 3.5: all ties
    weight = (scale * halves).expand(rows, columns).contiguous()
    grid = Grid(GridSpec(bits=3), scale, zero)
    sigma = torch.diag(torch.arange(1, columns + 1, dtype=dtype))
    expected = grid.round(weight)
    assert not torch.equal(expected, scale * (torch.round(weight / scale + zero).clamp(0, 7) - zero))
    got, log = cd_sweeps(weight, sigma, grid, weight.clone(), sweeps=1, backend=backend)
    assert torch.equal(got, expected)
    ref, ref_log = cd_sweeps(weight, sigma, grid, weight.clone(), sweeps=1, backend="torch")
    assert torch.equal(ref, expected) and log.changed == ref_log.changed
    spec = GridSpec(bits=3)
    fixed = Grid(spec, scale.clone(), zero.clone())
    result = solve_gptq(weight, sigma, spec, fixed_grid=fixed, act_order=False)
    assert torch.equal(result.weight, expected)


def _exact_tie_problem():
    """Σ with unit diagonal and off-diagonals in {-1, 0, 1}, weights on quarter-steps of a grid
    with step 1/2: every G entry is a multiple of 1/4, so about half the targets are exact ties
    (Σ need not be PSD for this: the kernel's arithmetic is what is compared)."""
    gen = torch.Generator().manual_seed(3)
    rows, columns = 12, 10
    off = torch.randint(-1, 2, (columns, columns), generator=gen).double().triu(1)
    sigma = off + off.T
    sigma.fill_diagonal_(1.0)
    weight = torch.randint(-8, 9, (rows, columns), generator=gen).double() / 4
    zero = torch.randint(2, 6, (rows, 1), generator=gen).double()
    grid = Grid(GridSpec(bits=3), torch.full((rows, 1), 0.5).double(), zero)
    return weight, sigma, grid


def test_exact_tie_problem_has_ties(monkeypatch):
    """The problem below has teeth: rounding ties up instead of to even changes many entries."""
    weight, sigma, grid = _exact_tie_problem()
    start = grid.round(weight)
    run = dict(sweeps=2, backend="torch", block_size=10, stop_at_fixed_point=False)
    even, _ = cd_sweeps(weight, sigma, grid, start, **run)

    def half_up(values, scale, zero, maxq):
        return scale * (torch.floor(values / scale + 0.5).add_(zero).clamp_(0, maxq) - zero)

    monkeypatch.setattr(reference, "round_to_grid", half_up)
    up, _ = cd_sweeps(weight, sigma, grid, start, **run)
    assert int((even != up).sum()) >= 10


@pytest.mark.parametrize("block_size", [10, 4])
def test_ties_through_exact_updates(backend, block_size):
    """Ties reached through G's updates, where all arithmetic is exact: every backend must agree
    with the torch path bit for bit."""
    weight, sigma, grid = _exact_tie_problem()
    start = grid.round(weight)
    run = dict(sweeps=2, block_size=block_size, stop_at_fixed_point=False)
    ref, ref_log = cd_sweeps(weight, sigma, grid, start, backend="torch", **run)
    got, log = cd_sweeps(weight, sigma, grid, start, backend=backend, **run)
    assert torch.equal(got, ref)
    assert log.changed == ref_log.changed and log.gains == ref_log.gains


# --------------------------------------------------------------------------------------------
# Whole runs on random problems


def _all_runs(make, backend, order, schedule, group_size, dead, sweeps):
    p = make(5, 10, 24, dead=dead)
    grid = p.grid(3, group_size=group_size)
    start = grid.round(p.weight)
    perm = order_permutation(order, p.weight, p.sigma)
    runs = {
        name: cd_sweeps(
            p.weight,
            p.sigma,
            grid,
            start,
            sweeps=sweeps,
            order=perm,
            relaxed=schedule,
            block_size=24,
            backend=name,
            stop_at_fixed_point=False,
        )
        for name in ("torch", backend)
    }
    return p, grid, runs


@pytest.mark.parametrize(
    ("order", "schedule", "group_size", "dead"),
    [
        ("cyclic", None, None, ()),
        ("diag", [True, False], 8, (2, 17)),
        ("greedy", None, 8, ()),
        ("greedy", [True, False], None, (5,)),
    ],
)
def test_sweeps_equal_torch(problem, backend, order, schedule, group_size, dead):
    """Whole CD runs: same codes, same changed counts, same objectives (orders, relaxed sweeps,
    groups, dead columns)."""
    p, grid, runs = _all_runs(problem, backend, order, schedule, group_size, dead, sweeps=2)
    (ref, ref_log), (got, log) = runs["torch"], runs[backend]
    assert torch.equal(grid.quantize(got), grid.quantize(ref))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert log.changed == ref_log.changed
    assert log.objectives == pytest.approx(ref_log.objectives, rel=1e-10)
    assert log.objectives[-1] == pytest.approx(p.objective(got), rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("order", ["cyclic", "diag", "greedy"])
@pytest.mark.parametrize("block_size", [5, 16, 128])
def test_numba_runs_equal_torch(problem, seed, order, block_size):
    """Longer numba runs (several blocks, mixed schedule) against the torch path."""
    if numba_missing:
        pytest.skip("numba is not installed")
    p = problem(seed, 20, 40, dead=(7,))
    grid = p.grid(3, group_size=8)
    perm = order_permutation(order, p.weight, p.sigma)
    schedule = [False, True, False, False, True, False]
    runs = [
        cd_sweeps(
            p.weight,
            p.sigma,
            grid,
            grid.round(p.weight),
            sweeps=6,
            order=perm,
            relaxed=schedule,
            block_size=block_size,
            backend=name,
        )
        for name in ("torch", "numba")
    ]
    (ref, ref_log), (got, log) = runs
    assert torch.equal(grid.quantize(got), grid.quantize(ref))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert log.changed == ref_log.changed and log.relaxed == ref_log.relaxed
    assert log.objectives == pytest.approx(ref_log.objectives, rel=1e-10)


@pytest.mark.parametrize(
    ("spec", "act_order"),
    [(GridSpec(3), False), (GridSpec(3, group_size=8), False), (GridSpec(2, group_size=16), True)],
)
def test_gptq_equals_torch(problem, backend, spec, act_order):
    p = problem(2, 9, 32)
    ref = solve_gptq(p.weight, p.sigma, spec, act_order=act_order, block_size=32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kernels.ENV, backend)
        got = solve_gptq(p.weight, p.sigma, spec, act_order=act_order, block_size=32)
    assert torch.equal(got.codes, ref.codes)
    torch.testing.assert_close(got.weight, ref.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Real layers (stories260K, Σ from C4 text)


@pytest.mark.parametrize("order", ["diag", "greedy"])
def test_numba_equals_torch_on_real_layers(stories_layers, order):
    """Every real layer: 3 rounded sweeps from RTN at 3 bits per channel, and GPTQ."""
    if numba_missing:
        pytest.skip("numba is not installed")
    for layer in stories_layers:
        grid = fit_minmax(layer.weight, GridSpec(bits=3))
        perm = order_permutation(order, layer.weight, layer.sigma)
        start = grid.round(layer.weight)
        ref, ref_log = cd_sweeps(
            layer.weight, layer.sigma, grid, start, sweeps=3, order=perm, backend="torch"
        )
        got, log = cd_sweeps(layer.weight, layer.sigma, grid, start, sweeps=3, order=perm, backend="numba")
        assert torch.equal(grid.quantize(got), grid.quantize(ref)), layer.name
        assert log.changed == ref_log.changed, layer.name
        assert log.objectives == pytest.approx(ref_log.objectives, rel=1e-9), layer.name
    for layer in stories_layers[:7]:
        spec = GridSpec(bits=3)
        ref = solve_gptq(layer.weight, layer.sigma, spec, act_order=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(kernels.ENV, "numba")
            got = solve_gptq(layer.weight, layer.sigma, spec, act_order=True)
        assert torch.equal(got.codes, ref.codes), layer.name


def test_triton_equals_torch_on_a_real_layer(stories_layers, triton_interpret):
    """One real 64-input layer through the interpreter: one block, one rounded sweep, and a
    per-row (greedy) sweep on a few rows."""
    layer = next(layer for layer in stories_layers if layer.weight.shape[1] == 64)
    weight = layer.weight[:32]
    grid = fit_minmax(weight, GridSpec(bits=3))
    start = grid.round(weight)
    for order in ("diag", "greedy"):
        perm = order_permutation(order, weight, layer.sigma)
        runs = [
            cd_sweeps(weight, layer.sigma, grid, start, sweeps=1, order=perm, block_size=64, backend=name)
            for name in ("torch", "triton")
        ]
        (ref, ref_log), (got, log) = runs
        assert torch.equal(grid.quantize(got), grid.quantize(ref)), order
        assert log.changed == ref_log.changed
        assert log.objectives == pytest.approx(ref_log.objectives, rel=1e-10)


# --------------------------------------------------------------------------------------------
# Row spans: on the CPU every thread takes its own rows through the whole column loop


@pytest.fixture
def several_threads(monkeypatch):
    """Three torch threads and spans down to one row each, so small problems split over threads."""
    if numba_missing:
        pytest.skip("numba is not installed")
    from cdq_cli.kernels import threads

    saved = torch.get_num_threads()
    monkeypatch.setattr(threads, "MIN_ENTRIES", 1)
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(saved)


def test_spans_cut_rows_into_one_contiguous_range_per_thread():
    from cdq_cli.kernels import threads

    assert threads.spans(10, 1 << 20, 3) == [(0, 3), (3, 6), (6, 10)]
    assert threads.spans(2, 1 << 20, 4) == [(0, 1), (1, 2)]  # never an empty span
    assert threads.spans(100, 64, 2) == [(0, 100)]  # 6,400 entries: not worth a second thread
    assert threads.spans(4096, 64, 2) == [(0, 2048), (2048, 4096)]
    assert kernels.row_spans("torch", 4096, 4096) == [(0, 4096)]


def test_run_waits_for_every_job_and_restores_torch_threads(several_threads):
    from cdq_cli.kernels import threads

    seen = threads.run([torch.get_num_threads for _ in range(3)])
    assert seen == [1, 1, 1] and torch.get_num_threads() == 3
    # Jobs started from inside a job run in line (no deadlock on the busy pool).
    nested = threads.run([lambda: threads.run([torch.get_num_threads] * 3) for _ in range(3)])
    assert nested == [[1, 1, 1]] * 3
    finished = []

    def fails():
        raise RuntimeError("boom")

    def slow():
        torch.randn(200, 200) @ torch.randn(200, 200)
        finished.append(True)

    with pytest.raises(RuntimeError, match="boom"):  # the job already running ends first
        threads.run([slow, fails])
    assert finished == [True] and torch.get_num_threads() == 3
    # More jobs than threads: each thread takes the next one; results stay in order.
    assert threads.run([lambda i=i: i for i in range(10)], threads=2) == list(range(10))


@pytest.mark.parametrize(
    ("order", "schedule", "group_size", "dead"),
    [
        ("cyclic", None, None, ()),
        ("diag", [True, False, False], 8, (2, 17)),
        ("greedy", [True, False, False], 8, (5,)),
    ],
)
def test_row_spans_equal_one_thread(problem, several_threads, order, schedule, group_size, dead):
    """CD sweeps split over three threads (each its own rows, GEMMs and kernels) against one
    thread and against the torch reference: the same codes, counts and objectives."""
    p = problem(4, 23, 40, dead=dead)
    grid = p.grid(3, group_size=group_size)
    perm = order_permutation(order, p.weight, p.sigma)
    run = dict(sweeps=3, order=perm, relaxed=schedule, block_size=16, stop_at_fixed_point=False)
    start = grid.round(p.weight)
    split, split_log = cd_sweeps(p.weight, p.sigma, grid, start, backend="numba", **run)
    ref, ref_log = cd_sweeps(p.weight, p.sigma, grid, start, backend="torch", **run)
    torch.set_num_threads(1)
    one, one_log = cd_sweeps(p.weight, p.sigma, grid, start, backend="numba", **run)
    for got, log in ((split, split_log), (ref, ref_log)):
        assert torch.equal(grid.quantize(got), grid.quantize(one))
        torch.testing.assert_close(got, one, rtol=1e-10, atol=1e-12)
        assert log.changed == one_log.changed
        assert log.objectives == pytest.approx(one_log.objectives, rel=1e-10)


@pytest.mark.parametrize(
    ("spec", "act_order"),
    [(GridSpec(3), False), (GridSpec(3, group_size=12), False), (GridSpec(2, group_size=8), True)],
)
def test_gptq_row_spans_equal_one_thread(problem, several_threads, spec, act_order):
    """GPTQ split over three threads against one thread: the same codes, grids and objective
    (dynamic groups of 12 columns straddle the 16-column blocks)."""
    p = problem(5, 23, 48)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kernels.ENV, "numba")
        split = solve_gptq(p.weight, p.sigma, spec, act_order=act_order, block_size=16)
        torch.set_num_threads(1)
        one = solve_gptq(p.weight, p.sigma, spec, act_order=act_order, block_size=16)
    assert torch.equal(split.codes, one.codes)
    torch.testing.assert_close(split.weight, one.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split.scale, one.scale, rtol=1e-12, atol=1e-12)
    assert split.objective == pytest.approx(one.objective, rel=1e-12)


# --------------------------------------------------------------------------------------------
# The dispatcher


def test_dispatcher_picks_numba_on_cpu_and_honours_overrides(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.resolve(cpu) == ("torch" if numba_missing else "numba")
    assert kernels.resolve(cpu, "torch") == "torch"
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.resolve(cpu) == "torch"
    assert kernels.resolve(cpu, "auto") == ("torch" if numba_missing else "numba")
    monkeypatch.setenv(kernels.ENV, "fortran")
    with pytest.raises(ValueError, match="fortran"):
        kernels.resolve(cpu)


def test_dispatcher_falls_back_to_torch_without_numba(monkeypatch, problem):
    """cdq works without numba: the automatic choice becomes torch, and solving still runs."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    real = kernels.available
    monkeypatch.setattr(
        kernels, "available", lambda name: name == "torch" or (name != "numba" and real(name))
    )
    assert kernels.resolve(torch.zeros(1)) == "torch"
    with pytest.raises(RuntimeError, match="numba"):
        kernels.resolve(torch.zeros(1), "numba")
    p = problem(0, 6, 12)
    grid = p.grid(3)
    approx, log = cd_sweeps(p.weight, p.sigma, grid, grid.round(p.weight), sweeps=2)
    assert log.objectives[-1] == pytest.approx(p.objective(approx), rel=1e-10)


def test_forced_triton_needs_cuda_or_the_interpreter(monkeypatch):
    if triton_missing:
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.resolve(torch.zeros(1), "triton")


def test_reference_round_is_grid_quantize():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 16, generator=gen, dtype=torch.float64) * 2
    grid = fit_minmax(weight, GridSpec(bits=3, group_size=4))
    scale, zero = grid.expand(16)
    assert torch.equal(reference.round_to_grid(weight, scale, zero, 7), grid.round(weight))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("order", ["cyclic", "diag", "greedy"])
def test_inputs_are_never_modified(problem, rows, order):
    """Working copies only: a one-row layer's transposed view is contiguous, a trap for in-place ops."""
    p = problem(3, rows, 12, dead=(4,))
    grid = p.grid(3, group_size=4)
    start = grid.round(p.weight)
    saved = [t.clone() for t in (p.weight, p.sigma, start, grid.scale, grid.zero)]
    perm = order_permutation(order, p.weight, p.sigma)
    cd_sweeps(p.weight, p.sigma, grid, start, sweeps=2, order=perm, relaxed=[True, False])
    solve_gptq(p.weight, p.sigma, GridSpec(3, group_size=4), act_order=False)
    solve_gptq(p.weight, p.sigma, GridSpec(3), act_order=True, fixed_grid=p.grid(3))
    for before, after in zip(saved, (p.weight, p.sigma, start, grid.scale, grid.zero), strict=True):
        assert torch.equal(before, after)
