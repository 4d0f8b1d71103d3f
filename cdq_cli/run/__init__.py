"""One quantization run for every model kind, and one evaluation.

:func:`quantize` is the whole of ``cdq quantize``: settle the request (every check that needs no
model), read the data sources, load the model, validate the layers, calibrate, score the
full-precision model (with ``--eval``), quantize block by block (resumable), build the report,
write the output folder, score the quantized model, export. What differs between language and
vision models is a :class:`~cdq_cli.run.kinds.ModelKind`. Nothing here prints: progress goes to
the ``progress`` callback as :class:`~cdq_cli.records.Event`\\ s, the result comes back as a
:class:`Finished`; the command line renders both.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..records import Event, Progress, silent
from .kinds import ModelKind, kind_of
from .plan import EvalRequest, Plan, QuantizeRequest, UsageError, plan_sources, resolve_device, settle

__all__ = [
    "EvalRequest",
    "Finished",
    "Plan",
    "QuantizeRequest",
    "UsageError",
    "evaluate",
    "kind_of",
    "quantize",
    "settle",
]


@dataclass
class Finished:
    """A finished quantization: where it was written, its report, and the export summary if any."""

    output: Path
    report: dict[str, Any]
    kind: str
    export: dict[str, Any] | None = None


def quantize(request: QuantizeRequest, progress: Progress = silent) -> Finished:
    """Run ``cdq quantize`` (see the module docstring); raises one-line ``ValueError``/``OSError``."""
    from ..models.base import non_finite_tensors
    from ..pipeline import quantize_model, validate
    from ..store import report as reports
    from ..store.folder import save_quantized, write_json_atomic
    from ..store.journal import open_journal
    from ..store.names import REPORT

    began, started = time.perf_counter(), reports.now()

    def note(text: str) -> None:
        progress(Event("note", text=text))

    plan = settle(request)
    kind = kind_of(request.target, request.checkpoint)
    _check_kind(kind, plan)
    data = kind.read_data(plan)
    loaded = kind.load(plan, note)
    bad = non_finite_tensors(loaded.model)
    if bad:  # found now, not after hours of solving the blocks before it
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UsageError(f"{request.target}: tensor {bad[0]}{more} holds NaN/Inf values")
    layers = validate(loaded.model, loaded.adapter, plan.settings)
    kind.preflight(plan, layers)
    calibration = kind.calibrate(loaded, data, plan, note)
    fp = None
    if request.eval_data is not None:  # the same data, before quantization: what the bits cost
        note(f"evaluating the full-precision model on {request.eval_data}")
        fp = kind.score(loaded, data, plan)
    journal = None
    if kind.resumable:
        journal = open_journal(
            plan.output,
            request.target,
            loaded.model,
            calibration.identity,
            plan.settings,
            batch_size=request.batch_size,
            resume=request.resume,
            note=note,
        )
    with _guarded(journal, bad_input_discards=True):
        outcome = quantize_model(
            loaded.model,
            loaded.adapter,
            calibration.batches,
            plan.settings,
            progress=progress,
            journal=journal,
        )
    report = reports.build(
        model=request.target,
        family=loaded.adapter.name,
        dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        settings=plan.settings,
        seed=request.seed,
        calibration=calibration.describe,
        rows=outcome.rows,
        device=plan.device,
        command=request.command,
        started=started,
        ended=reports.now(),
        wall_seconds=time.perf_counter() - began,
    )
    report["run"].update(batch_size=request.batch_size, config=request.config)
    if journal is not None:
        report["run"]["resumed_blocks"] = journal.blocks_restored
    report.update(kind.report_sections(loaded, plan))
    info = {
        "method": report["run"]["method"],
        "bits": plan.settings.bits,
        "group_size": plan.settings.group_size,
        "sym": plan.settings.sym,
        "model": request.target,
        **kind.table_info(loaded, plan),
    }
    note(f"writing {plan.output}")
    with _guarded(journal, bad_input_discards=False):
        save_quantized(
            plan.output,
            loaded.model,
            outcome.layers,
            tokenizer=loaded.tokenizer,
            report=report,
            info=info,
            overwrite=request.overwrite,
            protect=plan_sources(request),
            kind=kind.name,
        )
    if journal is not None:
        journal.finish()
    if fp is not None:
        note(f"evaluating the quantized model on {request.eval_data}")
        try:
            quantized = kind.score(loaded, data, plan, reference=fp.reference)
        except ValueError as exc:
            raise ValueError(f"{exc} (the output {plan.output} was written)") from None
        report["evaluation"] = kind.evaluation(plan, quantized, fp)
        write_json_atomic(plan.output / REPORT, report)
    exported = _export(plan, note)
    return Finished(plan.output, report, kind.name, exported)


def evaluate(request: EvalRequest) -> dict[str, Any]:
    """Run ``cdq eval``: perplexity of a language model, top-1 of a classifier (JSON-ready dict)."""
    if request.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {request.batch_size}")
    device = resolve_device(request.device)
    kind = kind_of(request.target, request.checkpoint)
    return kind.evaluate_target(request, device)


@contextmanager
def _guarded(journal: Any, *, bad_input_discards: bool) -> Iterator[None]:
    """Keep the resume journal where resuming helps (a full disk, Ctrl-C, SIGTERM: the error then
    says ``--resume``); drop it when the run failed on bad input, which resuming would repeat."""
    try:
        yield
    except ValueError:
        if journal is not None and bad_input_discards:
            journal.discard()
        raise
    except (OSError, KeyboardInterrupt) as exc:
        hint = journal.resume_hint() if journal is not None else None
        if hint is not None:
            exc.cdq_hint = hint  # type: ignore[union-attr]
        raise


def _check_kind(kind: ModelKind, plan: Plan) -> None:
    if (plan.export_dest is not None and not kind.exports) or (plan.request.resume and not kind.resumable):
        raise UsageError("--format gptq and --resume are for causal LMs, not vision models")


def _export(plan: Plan, note: Any) -> dict[str, Any] | None:
    """The GPTQ export of the just-written output folder; its failure names the kept output."""
    if plan.export_dest is None:
        return None
    from ..store.gptq import ExportError, export_gptq

    note(f"exporting GPTQ to {plan.export_dest}")
    try:
        summary = export_gptq(plan.output, plan.export_dest, overwrite=plan.request.overwrite)
    except ExportError as exc:
        raise ExportError(
            f"{exc} (the native output {plan.output} was written: try cdq export on it)"
        ) from None
    return summary.to_dict()
