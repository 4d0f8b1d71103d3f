"""The records the driver and the storage share: what to do (Settings), what was done (LayerRow),
progress events, and a saved partial run (ResumeState).

This module is the contract between ``pipeline`` (which fills these in) and ``store`` (which
writes and reads them); neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .solvers import SUPPORTED_BITS, GridSpec, check_options

if TYPE_CHECKING:
    from .store.layer import QuantizedLayer

NO_QUANTIZATION = 16


@dataclass
class Settings:
    """What to do to every layer: one object from the command line to the solver.

    ``grid`` is the validated grid spec (None: ``--bits 16``, run the block plumbing without
    quantizing); ``options`` the method's solver options, already typed and range-checked
    (:func:`cdq_cli.solvers.check_options`); ``device`` where blocks are solved.
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
        **rest: Any,
    ) -> Settings:
        """Settings from flag-like values: the grid built by :func:`grid_spec`, the options typed and
        checked by :func:`cdq_cli.solvers.check_options` (``ValueError``, one line, on bad input)."""
        grid = grid_spec(bits, group_size, sym, per_layer)
        checked = check_options(method, options or {}) if grid is not None else dict(options or {})
        return cls(method=method, grid=grid, options=checked, device=torch.device(device), **rest)

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
    """A progress event. ``kind``: ``note`` (a status line in ``text``), ``start``, ``block``,
    ``layer`` (after a layer is solved, with its ``row``), ``done``."""

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
