"""Grouped and depthwise convolutions: one independent layer problem per group.

A Conv2d with ``groups = G`` maps each group of ``C_in/G`` input channels to its own ``C_out/G``
output channels, so the layer objective ``‖(W − Ŵ) X‖²`` splits into G problems, each with its own
``Σ_g`` over that group's ``(C_in/G)·kh·kw`` patch features. A depthwise conv (G = C_in) is the
extreme case: every output channel is a problem of ``kh·kw`` columns with a ``kh·kw × kh·kw`` Σ.

Σ is kept as one ``(G, c, c)`` tensor, filled with a batched product. Each group is solved by the
chosen method through :func:`cdq_cli.solvers.solve` (the same solver code as any other layer), and
the results are stacked along the output dimension, which is exactly the packed layout of the
layer's ``weight.flatten(1)`` (row r belongs to group ``r // (C_out/G)``).

Grid conventions for groups: a group size that is not smaller than a group's width means one
scale per output row; ``per_layer`` gives one scale per group (groups are separate problems, so a
scale shared across them would couple what the solvers treat as independent).
"""

from __future__ import annotations

import torch

from .grid import Grid, GridSpec
from .result import QuantResult, objective
from .rtn import solve_rtn


class GroupedSigmaAccumulator:
    """Σ_g = Σ X_g X_gᵀ for every group g at once: ``sigma`` has shape (groups, features, features)."""

    def __init__(
        self,
        groups: int,
        features: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.sigma = torch.zeros(groups, features, features, device=device, dtype=dtype)
        self.tokens = 0

    def add_columns(self, columns: torch.Tensor) -> None:
        """Fold in inputs of shape (groups, features, M): M samples (patches) of every group."""
        if columns.dim() != 3 or columns.shape[:2] != self.sigma.shape[:2]:
            raise ValueError(
                f"grouped inputs must be ({self.sigma.shape[0]}, {self.sigma.shape[1]}, M), "
                f"got {tuple(columns.shape)}"
            )
        columns = columns.to(self.sigma.device, self.sigma.dtype)
        self.sigma.baddbmm_(columns, columns.transpose(1, 2))
        self.tokens += columns.shape[2]


def group_spec(spec: GridSpec, columns: int, groups: int) -> GridSpec:
    """The grid each group's problem uses (see the module docstring); checks the group size."""
    if groups == 1:
        spec.n_groups(columns)
        return spec
    group_size = spec.group_size if spec.group_size is not None and spec.group_size < columns else None
    per_group = GridSpec(spec.bits, group_size, spec.sym, spec.per_layer)
    per_group.n_groups(columns)
    return per_group


def energy(weight: torch.Tensor, sigma: torch.Tensor) -> float:
    """``‖W X‖²`` from Σ: ``tr(W Σ Wᵀ)``, or the sum over groups for a (G, c, c) Σ (float64)."""
    if sigma.dim() == 2:
        return objective(weight, torch.zeros_like(weight), sigma)
    groups = sigma.shape[0]
    w = weight.reshape(groups, -1, sigma.shape[1])
    return sum(objective(w[g], torch.zeros_like(w[g]), sigma[g]) for g in range(groups))


def solve_grouped(
    method: str, weight: torch.Tensor, sigma: torch.Tensor, spec: GridSpec, options: dict
) -> QuantResult:
    """Quantize a grouped layer ``weight`` (out, c) given ``sigma`` (G, c, c), group by group.

    ``spec`` is the layer's grid (:func:`group_spec` gives each group's), ``options`` the method's
    checked options (:func:`cdq_cli.solvers.check_options`). A group whose Σ is all zero (its
    inputs were always zero: a dead channel) does not affect the output; it is rounded to its
    grid (RTN), as the solvers do for single dead columns.
    """
    from .registry import run_solver  # the checked entry point (imported here: it imports this module)

    groups = sigma.shape[0]
    rows, columns = weight.shape
    if sigma.dim() != 3 or sigma.shape[1:] != (columns, columns) or rows % groups:
        raise ValueError(
            f"grouped sigma must be (G, {columns}, {columns}) with G dividing {rows} rows, "
            f"got {tuple(sigma.shape)}"
        )
    spec = group_spec(spec, columns, groups)
    per = rows // groups
    sigma = sigma.to(weight.device, weight.dtype)
    if _whole(method, spec, options):
        result = solve_rtn(weight, None, spec)
        value = energy(weight - result.weight, sigma)
        result.objective = result.objective_start = value
        return result
    results: list[QuantResult] = []
    for g in range(groups):
        w, s = weight[g * per : (g + 1) * per], sigma[g]
        if bool((s.diagonal() > 0).any()):
            results.append(run_solver(method, w, s, spec, options))
        else:
            results.append(solve_rtn(w, s, spec))
    return stack_results(results, spec)


def solve_grouped_unweighted(
    method: str, weight: torch.Tensor, groups: int, spec: GridSpec, options: dict
) -> QuantResult:
    """:func:`solve_grouped` without Σ, for a method that declares ``needs_sigma`` False
    (:func:`cdq_cli.solvers.registry.run_unweighted`): the same Ŵ, codes and grid, with the
    objective NaN (the caller measures it from the layer's inputs). Every group is solved by the
    method itself; :func:`solve_grouped` rounds a group whose Σ is all zero to nearest instead,
    which for RTN is the same."""
    from .registry import run_unweighted

    rows, columns = weight.shape
    if rows % groups:
        raise ValueError(f"{groups} groups must divide the {rows} rows")
    spec = group_spec(spec, columns, groups)
    if _whole(method, spec, options):
        return run_unweighted(method, weight, spec, options)
    per = rows // groups
    results = [run_unweighted(method, weight[g * per : (g + 1) * per], spec, options) for g in range(groups)]
    return stack_results(results, spec)


def _whole(method: str, spec: GridSpec, options: dict) -> bool:
    """RTN never reads Σ and its grid is per row (unless ``per_layer``): one call on the whole
    layer gives the same result as one per group."""
    return method == "rtn" and not spec.per_layer and not options


def stack_results(results: list[QuantResult], spec: GridSpec) -> QuantResult:
    """One QuantResult for the whole layer from independent row blocks' results (conv groups,
    experts, bands of rows), stacked along rows."""
    stored = GridSpec(spec.bits, None, spec.sym) if spec.per_layer and len(results) > 1 else spec
    approx = torch.cat([r.weight for r in results])
    outliers = None
    if any(r.outliers is not None for r in results):
        outliers = torch.cat(
            [r.outliers if r.outliers is not None else torch.zeros_like(r.weight) for r in results]
        )
    grid = Grid(stored, torch.cat([r.grid.scale for r in results]), torch.cat([r.grid.zero for r in results]))
    if results[0].grid.parts is not None:  # a GGUF type: rows of stored scales and offsets stack too
        grid.offset = None if results[0].grid.offset is None else torch.cat([r.grid.offset for r in results])
        grid.parts = {key: torch.cat([r.grid.parts[key] for r in results]) for key in results[0].grid.parts}
    return QuantResult(
        method=results[0].method,
        weight=approx,
        codes=torch.cat([r.codes for r in results]),
        grid=grid,
        objective=sum(r.objective for r in results),
        objective_start=sum(r.objective_start for r in results),
        sweeps=max(r.sweeps for r in results),
        seconds=sum(r.seconds for r in results),
        outliers=outliers,
        row_objective=(
            torch.cat([r.row_objective for r in results])
            if all(r.row_objective is not None for r in results)
            else None
        ),
    )
