"""The layer solvers, one declared :class:`Method` each, and the typing of their options.

Every solver is a pure function ``solver(weight, sigma, spec, **options) -> QuantResult``. A
:class:`Method` record declares, once, everything the rest of cdq needs to know about it: its name,
the function, its user-facing options (type, range or choices, a label for messages), a one-line
summary (``cdq methods``, ``--help``) and the sweeps it typically runs (the rank assignment's cost
estimate). :data:`METHODS` is the one list; the command line, the plan's checks, ``cdq methods`` and
the rank assignment all read it. Adding a solver is its module plus one entry here.

:func:`check_options` is the one place that turns option values (strings from ``-o KEY=VALUE``,
typed values from a preset or from Python) into the solver's typed arguments, or refuses them with
one line naming the option.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import gguf
from .bands import finish
from .cd import ORDERS
from .cdq import GGUF_SHRINK, REFITS, cdq_phases, solve_cdq
from .comq import solve_comq
from .gptq import solve_gptq
from .grid import GridSpec, check_weight
from .outliers import INNER_SOLVERS, solve_quantease_outlier
from .quantease import PRESETS, solve_quantease
from .result import QuantResult, check_problem
from .rtn import solve_rtn
from .starts import START_POINTS
from .target import FP_SHARE, TARGETS


@dataclass(frozen=True)
class Option:
    """One solver option: ``kind`` is int, float, bool, choice or choices (a comma list).

    ``low``/``high`` bound numbers (``open_low``/``open_high``: strict bounds); ``choices`` lists
    the allowed words; ``optional``: the value may be ``none`` (the solver then picks, e.g. from
    its preset); ``solver`` False: an option of the layer problem the driver builds (``target``),
    checked here but not passed to the solve function, whose ``default`` it then declares.
    """

    label: str
    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    solver: bool = True
    default: Any = None

    def describe(self) -> str:
        if self.kind in ("choice", "choices"):
            text = ("a comma list of " if self.kind == "choices" else "one of ") + ", ".join(self.choices)
        elif self.kind == "bool":
            text = "true or false"
        else:
            text = "an integer" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.open_low else '['}{_num(self.low)}, {_num(self.high)}"
                text += ")" if self.open_high else "]"
            elif self.low is not None:
                text += f" {'>' if self.open_low else '>='} {_num(self.low)}"
        return text + (" or none" if self.optional else "")


@dataclass(frozen=True)
class Method:
    """One layer solver, declared once: ``name`` (``--method``), ``solve`` (the pure function),
    ``options`` (every keyword option a user may set, and nothing internal), ``summary`` (one
    line for ``cdq methods`` and ``--help``), ``sweeps``: how many passes over the layer it
    typically makes, and ``factorizations``: how many columns x columns Cholesky factorizations
    and inverses it makes (GPTQ: one per GPTQ start); both are factors of its cost estimate
    (:meth:`cost`). ``fixed_grid``: the keyword through which ``solve`` takes a fixed grid (a GGUF
    block type's, :func:`run_solver`; None: the method cannot solve on one, e.g. it keeps
    full-precision outliers). ``needs_sigma`` False: its Ŵ does not depend on Σ (RTN), so it
    can be solved without one (:func:`run_unweighted`) and the driver measures the report's
    objective from the layer's inputs instead of collecting Σ (:mod:`cdq_cli.pipeline`).
    ``revision``: raised whenever the method's result for the same W, Σ, grid and options changes
    (a new default, a changed rule); it is part of ``--resume``'s fingerprint, so that a run is
    never finished by a solver that would have solved its first blocks differently. ``row_bands``:
    a layer's rows may be solved in bands (rows never interact in its objective; the bands are the
    same in every run, and ranks may share them: :mod:`cdq_cli.solvers.bands`). ``phases``: the
    same solve as a generator that pauses where the Σ-only work made so far is no longer needed
    (:func:`run_solver_phases`; a layer's bands run through it in lockstep, :func:`.bands.lockstep`)."""

    name: str
    solve: Callable[..., QuantResult]
    summary: str
    sweeps: float
    options: Mapping[str, Option] = field(default_factory=dict)
    fixed_grid: str | None = None
    factorizations: float = 0.0
    needs_sigma: bool = True
    revision: int = 1
    row_bands: bool = False
    phases: Callable[..., Generator[None, None, QuantResult]] | None = None

    def cost(self, rows: int, columns: int, options: Mapping[str, Any]) -> float:
        """Estimated solve time of one layer, in arbitrary units (the rank assignment's estimate
        before a layer of that shape was timed; :class:`cdq_cli.parallel.Costs`): rows x columns²
        per sweep, times the sweeps (``-o sweeps`` when given) plus one for the RTN comparison,
        plus columns³ per factorization (which is why a wide down_proj costs more than its
        rows x columns² says: 576 x 1536 factors a 1536² Σ twice in cdq)."""
        sweeps = float(options.get("sweeps") or self.sweeps)
        starts = options.get("starts")
        if starts is not None:  # cdq's -o starts: each GPTQ start factors Σ once
            factorizations = float(sum("gptq" in start for start in starts))
        else:
            factorizations = self.factorizations
        return rows * columns**2 * (1.0 + sweeps) + factorizations * columns**3


_ORDER = Option("visiting order", "choice", choices=ORDERS)
_BLOCK = Option("block size", "int", low=1)
_DAMPING = Option("damping", "float", low=0)
# -o target=fp: quantize against the full-precision model's outputs (solvers.target; the driver
# captures the statistics and hands the solver W* in place of W)
_TARGET = Option("objective target", "choice", choices=TARGETS, solver=False, default="quantized")
# cdq's default: it wins on every model measured (BENCHMARKS.md, "-o target=fp as cdq's default");
# it yields to target=quantized where it cannot apply (records.Settings.target)
_CDQ_TARGET = replace(_TARGET, default="fp")
# -o fp_share: how far toward the full-precision inputs target=fp's target is taken (GPTAQ's α)
_FP_SHARE = Option(
    "share of the full-precision inputs in target=fp",
    "float",
    low=0,
    high=1,
    open_low=True,
    solver=False,
    default=FP_SHARE,
)

# The solvers, in the order ``cdq methods`` lists them.
METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "rtn", solve_rtn, "round-to-nearest baseline", sweeps=0.0, fixed_grid="grid", needs_sigma=False
        ),
        Method(
            "gptq",
            solve_gptq,
            "GPTQ baseline",
            sweeps=1.0,
            fixed_grid="fixed_grid",
            factorizations=1.0,
            # 2: layers solved in bands of rows (solvers.bands); 3: act order damps by the mean of
            # Σ's own diagonal (was the permuted copy's: the same value up to its last bits)
            revision=3,
            row_bands=True,
            options={
                "damping": _DAMPING,
                "block_size": _BLOCK,
                "act_order": Option("act order", "bool"),
                "target": _TARGET,
                "fp_share": _FP_SHARE,
            },
        ),
        Method(
            "quantease",
            solve_quantease,
            "QuantEase: cyclic coordinate descent on a fixed min-max grid",
            sweeps=30.0,
            fixed_grid="grid",
            revision=2,  # 2: its -o start=gptq-actorder as gptq's revision 3 / cdq's 4 (last bits)
            options={
                "preset": Option("QuantEase preset", "choice", choices=PRESETS),
                "sweeps": Option("sweeps", "int", low=0, optional=True),
                "order": _ORDER,
                "start": Option("start point", "choice", choices=START_POINTS, optional=True),
                "relaxed": Option("relaxed sweeps", "bool", optional=True),
                "block_size": _BLOCK,
                "damping": _DAMPING,
                "target": _TARGET,
                "fp_share": _FP_SHARE,
            },
        ),
        Method(
            "quantease-outlier",
            solve_quantease_outlier,
            "QuantEase keeping a sparse full-precision outlier matrix",
            sweeps=14.0,
            revision=2,  # 2: its -o start=gptq-actorder as gptq's revision 3 / cdq's 4 (last bits)
            options={
                "outlier_fraction": Option("outlier fraction", "float", low=0, high=1, open_high=True),
                "structured": Option("structured outliers", "bool"),
                "iterations": Option("iterations", "int", low=0),
                "final_sweeps": Option("final sweeps", "int", low=0),
                "order": _ORDER,
                "start": Option("start point", "choice", choices=START_POINTS),
                "block_size": _BLOCK,
                "damping": _DAMPING,
                "inner": Option("inner solver", "choice", choices=INNER_SOLVERS),
            },
        ),
        Method(
            "comq",
            solve_comq,
            "COMQ: CD over codes and scales in greedy order",
            sweeps=3.0,
            fixed_grid="grid",
            # 2: its -o start=gptq-actorder and GGUF refits as gptq's revision 3 / cdq's 4 (last bits)
            revision=2,
            options={
                "scalar": Option("COMQ scalar λ", "float", low=0, open_low=True),
                "iterations": Option("outer iterations", "int", low=1),
                "sweeps": Option("sweeps", "int", low=0),
                "order": _ORDER,
                "update_scales": Option("scale updates", "bool"),
                "start": Option("start point", "choice", choices=START_POINTS),
                "block_size": _BLOCK,
                "damping": _DAMPING,
            },
        ),
        Method(
            "cdq",
            solve_cdq,
            "cdq's own (default): best of GPTQ starts, then CD sweeps with grid refits",
            sweeps=8.0,
            fixed_grid="grid",
            factorizations=2.0,  # its two default GPTQ starts
            # 2: -o shrink defaults to GGUF_SHRINK on a GGUF type's grid (was 0); 3: layers solved
            # in bands of rows (solvers.bands); 4: the act-order start's damping as gptq's revision 3,
            # the refits' sums of Σ in float64 taken a few rows at a time (last bits)
            revision=4,
            row_bands=True,
            phases=cdq_phases,
            options={
                "starts": Option(
                    "start points", "choices", choices=tuple(s for s in START_POINTS if s != "weight")
                ),
                "order": _ORDER,
                "sweeps": Option("sweeps", "int", low=0),
                "refit": Option("grid refit", "choice", choices=REFITS),
                "block_size": _BLOCK,
                "damping": _DAMPING,
                "tolerance": Option("tolerance", "float", low=0, high=1, open_high=True),
                "rounds": Option("rounds", "int", low=1),
                "shrink": Option(
                    f"Σ shrinkage toward its diagonal (none: {GGUF_SHRINK:g} on a GGUF type's grid, else 0)",
                    "float",
                    low=0,
                ),
                "target": _CDQ_TARGET,
                "fp_share": _FP_SHARE,
            },
        ),
    )
}
DEFAULT_METHOD = "cdq"

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def find_method(name: str) -> Method:
    """The declared :class:`Method` called ``name``; one-line ``ValueError`` naming the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}") from None


def option_default(method: str, name: str) -> Any:
    """The value option ``name`` of ``method`` takes when not given: the solve function's keyword
    default (its ``phases``' when it has them), or the declared default of an option the driver
    consumes."""
    declared = find_method(method)
    option = declared.options[name]
    if not option.solver:
        return option.default
    return inspect.signature(declared.phases or declared.solve).parameters[name].default


def method_options(name: str) -> list[str]:
    """Names of the options method ``name`` accepts."""
    return list(find_method(name).options)


def check_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` as the solver's typed keyword arguments; ``ValueError`` (one line) naming the
    first unknown option or bad value. Strings are parsed (``"4"`` → 4, ``"true"`` → True,
    ``"none"`` → None, ``"gptq,rtn"`` → a list for comma-list options)."""
    accepted = find_method(method).options
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for method {method!r}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )
    return {name: _value(method, name, accepted[name], value) for name, value in options.items()}


def solve(
    method: str,
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec | None = None,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool = False,
    per_layer: bool = False,
    **options: Any,
) -> QuantResult:
    """Quantize one layer ``weight`` (out, in) given ``sigma`` = X Xᵀ (in, in).

    The grid is ``spec``, or built from ``bits``/``group_size``/``sym``/``per_layer``. Raises
    ``ValueError`` with a one-line message for bad input: unknown method or option, a bad option
    value, a bit width outside {2, 3, 4, 8}, a group size that does not divide the input width,
    NaN/Inf in the weight or Σ, a Σ of the wrong shape, or an all-zero Σ. Computation runs on
    ``weight``'s device and dtype (Σ is moved there).

    The layer's own target ‖(W − Ŵ) X‖² is solved, for every method: cdq's default in a run,
    ``-o target=fp``, needs the full-precision model's inputs too, which one layer's W and Σ do not
    carry (the driver solves for :func:`cdq_cli.solvers.target.fp_target` in place of W there).
    """
    if spec is None:
        if bits is None:
            raise ValueError("solve needs a grid: pass spec=GridSpec(...) or bits=")
        spec = GridSpec(bits=bits, group_size=group_size, sym=sym, per_layer=per_layer)
    checked = check_options(method, options)
    if checked.get("target", "quantized") != "quantized" or "fp_share" in checked:
        raise ValueError(
            "target=fp (and its fp_share) needs the full-precision inputs' statistics: solve on "
            "cdq_cli.solvers.target.fp_target(weight, sigma, residual, damping, share) instead of the weight"
        )
    return run_solver(method, weight, sigma, spec, checked)


def run_solver(
    method: str, weight: torch.Tensor, sigma: torch.Tensor, spec: GridSpec, options: Mapping[str, Any]
) -> QuantResult:
    """:func:`solve` for options already returned by :func:`check_options` (the driver's path:
    options are checked once, when the run's settings are made)."""
    return finish(run_solver_phases(method, weight, sigma, spec, options, phased=False))


def run_solver_phases(
    method: str,
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    options: Mapping[str, Any],
    *,
    phased: bool = True,
) -> Generator[None, None, QuantResult]:
    """:func:`run_solver` as a generator: through the method's ``phases`` when it has them (and
    ``phased``), pausing where they pause; in one step otherwise. The caller holds the
    :func:`.bands.shared` block the phases' Σ-only work is kept in (:func:`.bands.lockstep`)."""
    declared = find_method(method)
    solver = declared.phases if phased and declared.phases is not None else declared.solve
    options = {key: value for key, value in options.items() if declared.options[key].solver}
    if not torch.is_floating_point(weight):
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    check_problem(weight, sigma)
    spec.n_groups(weight.shape[1])
    sigma = sigma.to(weight.device, weight.dtype)
    extra = {}
    if spec.block_type is not None:
        # A GGUF block type: every solver works on the type's exact grid, starting from llama.cpp's
        # own choice of the stored scales weighted by diag Σ (solvers.gguf).
        if declared.fixed_grid is None:
            able = ", ".join(name for name, m in METHODS.items() if m.fixed_grid is not None)
            raise ValueError(
                f"method {method} keeps full-precision outliers, which a GGUF file cannot hold: "
                f"choose one of {able}"
            )
        grid = gguf.fit(weight, spec, gguf.importance_of(sigma)).to(weight.device, weight.dtype)
        extra = {declared.fixed_grid: grid}
    if solver is declared.solve:
        return solver(weight, sigma, spec, **options, **extra)
    return (yield from solver(weight, sigma, spec, **options, **extra))


def run_unweighted(
    method: str, weight: torch.Tensor, spec: GridSpec, options: Mapping[str, Any]
) -> QuantResult:
    """:func:`run_solver` without Σ, for a method that declares ``needs_sigma`` False: the same
    Ŵ, codes and grid as :func:`run_solver` gives on any Σ, with ``objective`` and
    ``objective_start`` NaN (not measured: the caller measures ``‖(W − Ŵ) X‖²`` from the layer's
    inputs). A GGUF block type is refused: its grid is fitted weighted by diag Σ (:mod:`.gguf`)."""
    declared = find_method(method)
    if declared.needs_sigma:
        raise ValueError(f"method {method} needs Σ: solve it with run_solver")
    if spec.block_type is not None:
        raise ValueError(
            f"a GGUF block type ({spec.block_type}) fits its grid on diag Σ: solve it with run_solver"
        )
    options = {key: value for key, value in options.items() if declared.options[key].solver}
    if not torch.is_floating_point(weight):
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    check_weight(weight)
    spec.n_groups(weight.shape[1])
    return declared.solve(weight, None, spec, **options)


def _value(method: str, name: str, option: Option, value: Any) -> Any:
    def bad(got: Any) -> ValueError:
        return ValueError(
            f"{option.label} (option {name} of {method}) must be {option.describe()}, got {got!r}"
        )

    raw = value.strip() if isinstance(value, str) else value
    if option.optional and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null"))):
        return None
    if option.kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise bad(value)
    if option.kind == "choice":
        if isinstance(raw, str) and raw in option.choices:
            return raw
        raise bad(value)
    if option.kind == "choices":
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise bad(value)
        items = [item.strip() if isinstance(item, str) else item for item in items]
        if not items or any(item not in option.choices for item in items):
            raise bad(value)
        return tuple(items)
    number: int | float
    if option.kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise bad(value)
        try:
            number = int(raw)
        except ValueError:
            raise bad(value) from None
    else:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise bad(value)
        try:
            number = float(raw)
        except ValueError:
            raise bad(value) from None
        if not math.isfinite(number):
            raise bad(value)
    low_ok = option.low is None or (number > option.low if option.open_low else number >= option.low)
    high_ok = option.high is None or (number < option.high if option.open_high else number <= option.high)
    if not (low_ok and high_ok):
        raise bad(value)
    return number


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
