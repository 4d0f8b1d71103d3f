"""Layer solvers: pure tensor math, no knowledge of models.

Public API::

    from cdq_cli.solvers import solve
    result = solve("quantease", weight, sigma, bits=3, group_size=128)
    result.weight     # dequantized (out, in) tensor, outliers included
    result.objective  # tr((W − Ŵ) Σ (W − Ŵ)ᵀ)
"""

from __future__ import annotations

from .grid import SUPPORTED_BITS, Grid, GridSpec, fit_minmax
from .registry import (
    DEFAULT_METHOD,
    METHODS,
    Method,
    Option,
    check_options,
    find_method,
    method_options,
    run_solver,
    run_solver_phases,
    run_unweighted,
    solve,
)
from .result import QuantResult, objective
from .sigma import SigmaAccumulator

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "SUPPORTED_BITS",
    "Grid",
    "GridSpec",
    "Method",
    "Option",
    "QuantResult",
    "SigmaAccumulator",
    "check_options",
    "find_method",
    "fit_minmax",
    "method_options",
    "objective",
    "run_solver",
    "run_solver_phases",
    "run_unweighted",
    "solve",
]
