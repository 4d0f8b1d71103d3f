"""The records the run, the driver and the storage share, as plain data: what to do (Settings, made
once from the flags by :func:`cdq_cli.run.plan.settle` and frozen), what was done (LayerRow, one
per solved matrix; RunRecord, the whole run), progress events, and where a lazily loaded model's
tensors come from (Weights).

This module is the contract between ``run``/``pipeline`` (which fill these in) and ``store`` (which
writes them out); it parses nothing and imports nothing of cdq but the grid's type.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import regex
import torch

from .solvers import GridSpec, find_method
from .solvers.registry import option_default

NO_QUANTIZATION = 16  # --bits 16: run the block plumbing without quantizing


@dataclass(frozen=True)
class Settings:
    """What to do to every layer: one object from the command line to the solver.

    ``grid`` is the validated grid spec (None: ``--bits 16``, run the block plumbing without
    quantizing); ``overrides`` the ``--skip``/``--layer`` rules, parsed and checked once, so that
    :meth:`grid_for` resolves any layer's grid (None: kept in full precision); ``options`` the
    method's solver options, already typed and range-checked (:func:`cdq_cli.solvers.check_options`);
    ``device`` where blocks are solved (this process's device under torchrun). Made by
    :func:`cdq_cli.run.plan.make_settings` from flag-like values; everything downstream trusts it.

    ``gguf_type``: a ``--format gguf --type T`` run's type (``grid`` is then its default block
    type's); ``gguf_layers``: every layer's own GGUF block type (None: kept in full precision),
    resolved once the model's layers are known (:func:`cdq_cli.run.gguf.resolve`: llama.cpp's
    per-tensor rules, ``--layer``, width fallbacks), which :meth:`grid_for` then follows.
    """

    method: str = "cdq"
    grid: GridSpec | None = field(default_factory=lambda: GridSpec(4))
    options: dict[str, Any] = field(default_factory=dict)
    true_sequential: bool = True
    fp_inputs: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sigma_dtype: torch.dtype = torch.float32
    compare_rtn: bool = True
    offload_activations: str = "auto"
    overrides: tuple[LayerRule, ...] = ()
    gguf_type: str | None = None
    gguf_layers: dict[str, str | None] | None = None
    transform: str = "none"  # --transform: an equivalence transform before quantization
    fused_experts: bool = False  # its quantized layers include fused experts (set by pipeline.validate)

    def grid_for(self, name: str) -> GridSpec | None:
        """The grid of layer ``name`` (a full name; ``NAME[e]``, one expert of fused experts, is
        NAME's): the last ``--layer`` rule that matches it, else the run's grid; None when a
        ``--skip`` rule matches it (kept in full precision) or nothing is quantized."""
        if self.grid is None:
            return None
        layer = name.split("[", 1)[0]
        if self.gguf_layers is not None and layer in self.gguf_layers:
            kind = self.gguf_layers[layer]
            return None if kind is None else GridSpec.of_type(kind)
        chosen: GridSpec | None = self.grid
        for rule in self.overrides:
            if rule.spec is not None and rule.matches(layer):
                chosen = rule.grid
        if any(rule.spec is None and rule.matches(layer) for rule in self.overrides):
            return None
        return chosen

    def check_overrides(self, names: Iterable[str]) -> None:
        """Every ``--skip``/``--layer`` pattern must match at least one of the model's layers
        (``names``: their full names); one line naming the first that matches none."""
        names = list(names)
        for rule in self.overrides:
            if not any(rule.matches(name) for name in names):
                example = f" (its layers are named like {names[0]})" if names else ""
                raise ValueError(f"{rule.flag} {rule.text!r} matches no layer of the model{example}")

    def shadowed(self, names: Iterable[str]) -> list[str]:
        """One warning per ``--layer`` rule that changes no layer of the model (``names``): every
        layer it matches is taken by a later ``--layer`` rule (the last match wins) or kept in full
        precision by a ``--skip``."""
        names = list(names)
        warnings = []
        for index, rule in enumerate(self.overrides):
            if rule.spec is None:
                continue
            others = [r for r in self.overrides[index + 1 :] if r.spec is not None]
            others += [r for r in self.overrides if r.spec is None]
            matched = [name for name in names if rule.matches(name)]
            takers = [next((r for r in others if r.matches(name)), None) for name in matched]
            if matched and all(taker is not None for taker in takers):
                by = ", ".join(dict.fromkeys(f"{r.flag} {r.text!r}" for r in takers if r is not None))
                warnings.append(
                    f"--layer {rule.text!r} changes no layer: every layer it matches is taken by {by} "
                    "(the last matching --layer wins, --skip over --layer)"
                )
        return warnings

    @property
    def target(self) -> str:
        """``-o target``: ``fp`` quantizes against the full-precision model's outputs (the driver
        captures two activation streams); ``quantized`` against the layer's own outputs on the
        quantized model's inputs. When not given, the method's default (cdq's is ``fp``), except
        where the full-precision target cannot apply, where the default is ``quantized``: with
        ``--fp-inputs`` (every layer is fed the full-precision model's inputs already) and on a
        model with fused experts (the two models route tokens to different experts, so their inputs
        do not pair up). Given explicitly there, it is refused (:func:`cdq_cli.run.plan.settle`,
        :func:`cdq_cli.pipeline.validate`)."""
        given = self.options.get("target")
        if given is not None:
            return str(given)
        if not self.quantizing or "target" not in find_method(self.method).options:
            return "quantized"
        if self.fp_inputs or self.fused_experts:
            return "quantized"
        return str(option_default(self.method, "target"))

    def for_model(self, fused_experts: bool) -> Settings:
        """These settings for a model that has fused experts or not (:attr:`target`'s default)."""
        return self if fused_experts == self.fused_experts else replace(self, fused_experts=fused_experts)

    @property
    def fp_share(self) -> float:
        """``-o fp_share`` (with ``target=fp``): how far toward the full-precision model's inputs
        the target's inputs are taken (:mod:`cdq_cli.solvers.target`, GPTAQ's α)."""
        given = self.options.get("fp_share")
        return float(option_default(self.method, "fp_share") if given is None else given)

    @property
    def quantizing(self) -> bool:
        return self.grid is not None

    @property
    def bits(self) -> int:
        return self.grid.bits if self.grid is not None else NO_QUANTIZATION

    @property
    def group_size(self) -> int | None:
        return self.grid.group_size if self.grid is not None else None

    @property
    def sym(self) -> bool:
        return self.grid.sym if self.grid is not None else False

    @property
    def per_layer(self) -> bool:
        return self.grid.per_layer if self.grid is not None else False

    def describe(self) -> dict[str, Any]:
        """JSON-ready form, for the report and the resume fingerprint."""
        return {
            "method": self.method if self.quantizing else "none",
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "per_layer": self.per_layer,
            "options": dict(self.options),
            "true_sequential": self.true_sequential,
            "fp_inputs": self.fp_inputs,
            "device": str(self.device),
            "sigma_dtype": str(self.sigma_dtype).removeprefix("torch."),
            "compare_rtn": self.compare_rtn,
            # only when given, so runs without overrides keep their resume fingerprints
            **({"overrides": [rule.describe() for rule in self.overrides]} if self.overrides else {}),
            **({"gguf_type": self.gguf_type, "gguf_layers": self.gguf_layers} if self.gguf_type else {}),
            **({"transform": self.transform} if self.transform != "none" else {}),
            # the share in force (its default changed from 1 to 0.25: such runs no longer resume)
            **({"fp_share": self.fp_share} if self.target == "fp" else {}),
        }


@dataclass(frozen=True)
class LayerRule:
    """One ``--skip PATTERN`` (``spec`` None: full precision) or ``--layer PATTERN=SPEC`` rule.
    ``PATTERN`` is a regular expression searched in full layer names (``re.search``: anchor with
    ``^``/``$``); ``grid`` is the rule's resolved grid."""

    pattern: str
    spec: str | None
    grid: GridSpec | None

    @property
    def flag(self) -> str:
        return "--skip" if self.spec is None else "--layer"

    @property
    def text(self) -> str:
        return self.pattern if self.spec is None else f"{self.pattern}={self.spec}"

    def matches(self, name: str) -> bool:
        """Whether the pattern is found in ``name``; a pattern that takes longer than
        :data:`PATTERN_SECONDS` on one name (nested repeats that backtrack without end) is a
        one-line ``ValueError`` naming it."""
        key = (self.pattern, name)
        found = _MATCHES.get(key)
        if found is None:
            try:
                found = _compiled(self.pattern).search(name, timeout=PATTERN_SECONDS) is not None
            except TimeoutError:
                raise ValueError(
                    f"{self.flag} {self.text!r} takes over {PATTERN_SECONDS:g} s to match the layer name "
                    f"{name} (nested repeats such as (a+)+ backtrack without end): simplify the pattern"
                ) from None
            _MATCHES[key] = found
        return found

    def describe(self) -> dict[str, Any]:
        grid = self.grid
        return {
            "flag": self.flag,
            "pattern": self.pattern,
            "spec": self.spec,
            "grid": None
            if grid is None
            else {
                "bits": grid.bits,
                "group_size": grid.group_size,
                "sym": grid.sym,
                "per_layer": grid.per_layer,
                **({"block_type": grid.block_type} if grid.block_type is not None else {}),
            },
        }


PATTERN_SECONDS = 1.0  # the longest one --skip/--layer pattern may take on one layer name
_PATTERNS: dict[str, regex.Pattern[str]] = {}
_MATCHES: dict[tuple[str, str], bool] = {}


def _compiled(pattern: str) -> regex.Pattern[str]:
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        compiled = _PATTERNS[pattern] = regex.compile(pattern)
    return compiled


@dataclass
class LayerRow:
    """One line of the report: how well one layer was quantized."""

    name: str
    shape: list[int]
    bits: int
    group_size: int | None
    sym: bool
    method: str
    error: float
    relative_error: float
    rtn_error: float | None
    objective_start: float
    sweeps: int
    seconds: float
    outliers: int
    tokens: int
    note: str | None = None  # e.g. an expert that got no calibration tokens, rounded instead
    block_type: str | None = None  # a GGUF type's grid (only written when set)
    # -o target=fp: ``error``/``rtn_error`` are the true ‖W X̃ − Ŵ X‖²; this is the solver's own
    # ‖(W* − Ŵ) X‖² (solvers.target), the scale ``objective_start`` is on
    solver_error: float | None = None
    # a layer solved in several bands of rows (solvers.bands): each band's seconds, in row order
    band_seconds: list[float] | None = None

    @property
    def layer(self) -> str:
        """The stored layer the row belongs to (``NAME[e]``, one expert of fused experts: NAME)."""
        return self.name.split("[", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        for optional in ("block_type", "band_seconds"):
            if row[optional] is None:
                del row[optional]
        return row


@dataclass
class Event:
    """A progress event. ``kind``: ``note`` (a status line in ``text``), ``warning`` (a request
    that does less than it says, in ``text``), ``start``, ``block``, ``layer`` (after a layer is
    solved, with its ``row``), ``done``."""

    kind: str
    block: int = 0
    blocks: int = 0
    layers_done: int = 0
    layers: int = 0
    row: LayerRow | None = None
    text: str = ""


class Progress(Protocol):
    def __call__(self, event: Event) -> None: ...


def silent(event: Event) -> None:
    """A progress sink that drops every event."""


class Weights(Protocol):
    """Where a lazily loaded model's tensors come from, by state-dict name (a checkpoint's shards,
    a cdq output folder); implemented in :mod:`cdq_cli.models.lazy` and :mod:`cdq_cli.store.folder`."""

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` on the CPU, read now, in ``dtype`` (None: the model's dtype),
        converted as it is read."""
        ...

    def names(self) -> list[str]:
        """Every tensor name the source holds."""
        ...


@dataclass(frozen=True)
class RunRecord:
    """One finished quantization run, everything its report says: rendered once into report.json
    by :func:`cdq_cli.store.report.render`.

    ``sections`` are the model kind's own top-level entries (``skipped``, ``vision``);
    ``unquantized`` the matrices in blocks that no quantizable layer type covers (routers...);
    ``dtype`` the dtype the model is stored in (and the output keeps), ``compute_dtype`` the one
    its blocks were computed in; ``parallel`` how the processes shared the work; ``transform`` what
    ``--transform`` did (its rotations, the head it untied, the scales it chose); ``peak_memory``
    the device's (or the process's) peak while quantizing; ``resumed_blocks`` how many blocks came
    from the journal (None: the run cannot resume); ``evaluation`` the before/after scores
    (``--eval``), None without.
    """

    model: str
    family: str
    dtype: str
    settings: Settings
    seed: int
    batch_size: int
    command: str
    config: dict[str, Any] | None
    calibration: dict[str, Any]
    rows: list[LayerRow]
    unquantized: list[str]
    parallel: dict[str, Any]
    sections: dict[str, Any]
    started: str
    ended: str
    wall_seconds: float
    peak_memory: dict[str, Any]
    resumed_blocks: int | None = None
    evaluation: dict[str, Any] | None = None
    compute_dtype: str | None = None  # what blocks were computed in (None: ``dtype``)
    transform: dict[str, Any] | None = None  # what --transform did (None: no transform)
