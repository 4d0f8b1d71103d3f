"""What differs between model kinds, as one small protocol.

A :class:`ModelKind` knows how to read its data sources, load its model, build its adapter, make
calibration batches, score a model, and what to add to the report and the output folder's table.
The run itself (:func:`cdq_cli.run.quantize`) is written once, against this protocol;
:mod:`cdq_cli.run.language` and :mod:`cdq_cli.run.vision` implement it, and
:func:`cdq_cli.run.kind_of` picks one for a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..models.base import Adapter
from ..records import Weights
from .plan import EvalRequest, Plan


@dataclass
class Loaded:
    """An opened model and what comes with it: its adapter, tokenizer, and (when it was opened
    lazily, as a skeleton on the meta device) the source its weights are read from; for vision,
    its spec and data config."""

    model: nn.Module
    adapter: Adapter
    tokenizer: Any = None
    weights: Weights | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    compute: torch.dtype | None = None  # what blocks are computed in (None: the stored dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model is stored in (a lazily opened checkpoint's own dtype; a model held
        whole: the dtype it was loaded in), which the output keeps."""
        return next(self.model.parameters()).dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype its blocks are computed in (:func:`cdq_cli.run.plan.compute_dtype`)."""
        return self.compute or self.dtype

    def close(self) -> None:
        close = getattr(self.weights, "close", None)
        if close is not None:
            close()


@dataclass
class Calibration:
    """Calibration batches (model inputs), the report's description of them, and the tensor whose
    bytes identify them (for the resume fingerprint)."""

    batches: list[torch.Tensor]
    describe: dict[str, Any]
    identity: torch.Tensor
    warnings: list[str] = field(default_factory=list)  # said once, kept in the report


@dataclass
class Score:
    """One evaluation: JSON-ready metrics, and what a later score compares against (vision: the
    full-precision model's predictions, for agreement)."""

    metrics: dict[str, Any]
    reference: Any = None


class ModelKind(Protocol):
    """One kind of model (causal LMs, timm classifiers): everything the run does differently."""

    name: str  # stored as the output folder's "kind"
    resumable: bool  # whether --resume is supported
    exports: bool  # whether --format gptq is supported
    transforms: bool  # whether --transform is supported

    def read_data(self, plan: Plan) -> Any:
        """Open the calibration and evaluation sources (before the model is loaded: fail fast)."""
        ...

    def load(self, plan: Plan, note: Any) -> Loaded: ...

    def preflight(self, plan: Plan, loaded: Loaded, layers: dict[str, nn.Module]) -> None:
        """Checks that need the model and its layers but no calibration (e.g. the export can hold
        them)."""
        ...

    def calibrate(self, loaded: Loaded, data: Any, plan: Plan, note: Any) -> Calibration: ...

    def score(
        self,
        loaded: Loaded,
        data: Any,
        plan: Plan,
        reference: Any = None,
        written: Path | None = None,
        ranks: Any = None,
    ) -> Score:
        """Evaluate the opened model on the evaluation data, or, with ``written``, the quantized
        model as it was written to that output folder (with several ``ranks``: each its share)."""
        ...

    def evaluation(self, plan: Plan, quantized: Score, full_precision: Score) -> dict[str, Any]:
        """The report's ``evaluation`` entry."""
        ...

    def report_sections(self, loaded: Loaded, plan: Plan) -> dict[str, Any]:
        """Extra top-level sections of report.json."""
        ...

    def table_info(self, loaded: Loaded, plan: Plan) -> dict[str, Any]:
        """Extra entries of the output folder's quantization table (what rebuilds the model)."""
        ...

    def evaluate_target(self, request: EvalRequest, device: torch.device) -> dict[str, Any]:
        """``cdq eval``: score a model or an output folder of this kind."""
        ...


def skipped_layers(loaded: Loaded, plan: Plan) -> list[str]:
    """The layers ``--skip`` keeps in full precision, by full name, in model order."""
    from ..models.base import quantizable_layers

    settings = plan.settings
    if not settings.overrides:
        return []
    return [
        name for name in quantizable_layers(loaded.adapter, loaded.model) if settings.grid_for(name) is None
    ]


def override_sections(loaded: Loaded, plan: Plan) -> dict[str, Any]:
    """report.json's ``skipped`` section (only when --skip kept layers in full precision)."""
    skipped = skipped_layers(loaded, plan)
    if not skipped:
        return {}
    rules = [rule.pattern for rule in plan.settings.overrides if rule.spec is None]
    return {"skipped": {"why": f"--skip {' '.join(rules)}: kept in full precision", "layers": skipped}}
