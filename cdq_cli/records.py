"""The records the driver and the storage share: what to do (Settings), what was done (LayerRow),
progress events, and a saved partial run (ResumeState).

This module is the contract between ``pipeline`` (which fills these in) and ``store`` (which
writes and reads them); neither imports the other's internals.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import regex
import torch

from .solvers import SUPPORTED_BITS, GridSpec, check_options

if TYPE_CHECKING:
    from .store.layer import QuantizedLayer

NO_QUANTIZATION = 16


@dataclass
class Settings:
    """What to do to every layer: one object from the command line to the solver.

    ``grid`` is the validated grid spec (None: ``--bits 16``, run the block plumbing without
    quantizing); ``overrides`` the ``--skip``/``--layer`` rules, parsed and compiled once, so that
    :meth:`grid_for` resolves any layer's grid (None: kept in full precision); ``options`` the
    method's solver options, already typed and range-checked (:func:`cdq_cli.solvers.check_options`);
    ``device`` where blocks are solved.
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

    @classmethod
    def make(
        cls,
        method: str = "cdq",
        bits: int = 4,
        group_size: int | None = None,
        sym: bool = False,
        per_layer: bool = False,
        options: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        skip: Sequence[str] = (),
        layer: Sequence[str] = (),
        **rest: Any,
    ) -> Settings:
        """Settings from flag-like values: the grid built by :func:`grid_spec`, the ``--skip`` /
        ``--layer`` rules by :func:`layer_rules`, the options typed and checked by
        :func:`cdq_cli.solvers.check_options` (``ValueError``, one line, on bad input)."""
        grid = grid_spec(bits, group_size, sym, per_layer)
        checked = check_options(method, options or {}) if grid is not None else dict(options or {})
        if grid is None and (skip or layer):
            raise ValueError(
                "--skip and --layer choose layers to quantize differently; --bits 16 quantizes none"
            )
        rules = layer_rules(grid, skip, layer) if grid is not None else ()
        return cls(
            method=method, grid=grid, options=checked, device=torch.device(device), overrides=rules, **rest
        )

    def grid_for(self, name: str) -> GridSpec | None:
        """The grid of layer ``name`` (a full name; ``NAME[e]``, one expert of fused experts, is
        NAME's): the last ``--layer`` rule that matches it, else the run's grid; None when a
        ``--skip`` rule matches it (kept in full precision) or nothing is quantized."""
        if self.grid is None:
            return None
        layer = name.split("[", 1)[0]
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
        }


def grid_spec(bits: int, group_size: int | None, sym: bool, per_layer: bool) -> GridSpec | None:
    """The one grid spec of a run, from its flags (None for ``--bits 16``: no quantization)."""
    if bits == NO_QUANTIZATION:
        return None
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"--bits {bits} is not supported: choose one of 2, 3, 4, 8 (16 = no quantization)")
    if group_size is not None and group_size <= 0:
        raise ValueError(f"--group-size must be positive, got {group_size}")
    if per_layer and group_size is not None:
        raise ValueError("--per-layer means one scale for the whole layer; it cannot have a --group-size")
    return GridSpec(bits, group_size, sym, per_layer)


LAYER_SPEC = re.compile(r"^(?P<bits>\d+)(?:g(?P<group>\d+)|(?P<channel>ch))?(?P<sym>sym|asym)?$")
SPEC_GRAMMAR = (
    "BITS[gGROUP|ch][sym|asym], e.g. 8, 4g128, 3g64sym, 8ch (bits 2, 3, 4 or 8; gGROUP: one scale per "
    "GROUP columns, ch: one per output row; what is left out comes from --group-size/--sym)"
)


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
            },
        }


def layer_rules(default: GridSpec, skip: Sequence[str], layer: Sequence[str]) -> tuple[LayerRule, ...]:
    """The ``--skip`` and ``--layer`` rules of a run, checked: every pattern compiles, every SPEC
    follows :data:`SPEC_GRAMMAR` and makes a valid grid (one-line ``ValueError`` otherwise)."""
    rules = []
    for pattern in skip:
        rules.append(LayerRule(_pattern("--skip", pattern, pattern), None, None))
    for item in layer:
        pattern, sep, spec = str(item).rpartition("=")
        if not sep or not pattern.strip():
            raise ValueError(f"--layer expects PATTERN=SPEC, got {item!r}")
        spec = spec.strip()
        rules.append(LayerRule(_pattern("--layer", pattern, item), spec, parse_layer_spec(spec, default)))
    return tuple(rules)


def parse_layer_spec(spec: str, default: GridSpec) -> GridSpec:
    """The grid a ``--layer`` SPEC gives (see :data:`SPEC_GRAMMAR`); what the SPEC leaves out comes
    from ``default`` (the run's --group-size, --sym, --per-layer)."""
    found = LAYER_SPEC.match(spec.lower())
    if not found:
        raise ValueError(f"--layer SPEC {spec!r} is not {SPEC_GRAMMAR}")
    bits = int(found["bits"])
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"--layer SPEC {spec!r}: {bits} bits is not one of 2, 3, 4, 8 "
            "(--skip keeps a layer in full precision)"
        )
    group, per_layer = default.group_size, default.per_layer
    if found["group"] is not None:
        group, per_layer = int(found["group"]), False
        if group < 1:
            raise ValueError(f"--layer SPEC {spec!r}: the group size must be positive")
    elif found["channel"]:
        group, per_layer = None, False
    sym = default.sym if found["sym"] is None else found["sym"] == "sym"
    return GridSpec(bits, group, sym, per_layer)


def _pattern(flag: str, pattern: str, shown: str) -> str:
    """``pattern`` checked: Python's ``re`` syntax (what the docs promise), matched by the ``regex``
    package, which takes the same syntax and can stop a search that runs too long."""
    try:
        re.compile(pattern)
        _compiled(pattern)
    except (re.error, regex.error) as exc:
        raise ValueError(f"{flag} {shown!r}: not a valid regular expression ({exc})") from None
    return pattern


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

    @property
    def layer(self) -> str:
        """The stored layer the row belongs to (``NAME[e]``, one expert of fused experts: NAME)."""
        return self.name.split("[", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


@dataclass
class ResumeState:
    """A saved partial run: the first ``blocks_done`` blocks' report rows and stored layers."""

    blocks_done: int
    rows: list[LayerRow]
    layers: dict[str, QuantizedLayer]


class Weights(Protocol):
    """Where a lazily loaded model's tensors come from, by state-dict name (a checkpoint's shards,
    a cdq output folder); implemented in :mod:`cdq_cli.models.lazy` and :mod:`cdq_cli.store.folder`."""

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in the model's dtype, on the CPU, read now."""
        ...

    def names(self) -> list[str]:
        """Every tensor name the source holds."""
        ...


class Journal(Protocol):
    """Persists finished blocks so a killed run can resume (implemented by :mod:`cdq_cli.store.journal`)."""

    def resume_state(self) -> ResumeState | None: ...

    def on_block_done(self, index: int, rows: list[LayerRow], layers: dict[str, QuantizedLayer]) -> None: ...
