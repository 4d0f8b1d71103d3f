"""Layer solvers: pure tensor math, no knowledge of models.

Public API::

    from cdq_cli.solvers import solve
    result = solve("quantease", weight, sigma, bits=3, group_size=128)
    result.weight     # dequantized (out, in) tensor, outliers included
    result.objective  # tr((W − Ŵ) Σ (W − Ŵ)ᵀ)
"""

from __future__ import annotations

from .grid import SUPPORTED_BITS, Grid, GridSpec, fit_minmax
from .registry import OPTIONS, SOLVERS, check_options, method_options, run_solver, solve
from .result import QuantResult, objective
from .sigma import SigmaAccumulator

__all__ = [
    "OPTIONS",
    "SOLVERS",
    "SUPPORTED_BITS",
    "Grid",
    "GridSpec",
    "QuantResult",
    "SigmaAccumulator",
    "check_options",
    "fit_minmax",
    "method_options",
    "objective",
    "run_solver",
    "solve",
]
