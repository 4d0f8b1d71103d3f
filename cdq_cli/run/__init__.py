"""One quantization run for every model kind, and one evaluation.

:func:`quantize` is the whole of ``cdq quantize``: settle the request (every check that needs no
model), read the data sources, open the model (lazily when it can: weights stay on disk until
their block runs), check every tensor for NaN/Inf, validate the layers, calibrate, score the
full-precision model (with ``--eval``), quantize block by block while the output folder is
written shard by shard (resumable), build the report, put the folder in place, score what was
written, export. What differs between language and vision models is a
:class:`~cdq_cli.run.kinds.ModelKind`. Nothing here prints: progress goes to the ``progress``
callback as :class:`~cdq_cli.records.Event`\\ s, the result comes back as a :class:`Finished`;
the command line renders both.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..parallel import Ranks
from ..records import Event, Progress, silent
from .kinds import Loaded, ModelKind, kind_of
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
    began = time.perf_counter()

    def note(text: str) -> None:
        progress(Event("note", text=text))

    from ..parallel import close, from_environment

    plan = settle(request)
    ranks, plan.settings.device = from_environment(plan.settings.device)  # torchrun: this rank's part
    try:
        kind = kind_of(request.target, request.checkpoint)
        _check_kind(kind, plan, ranks)
        data = kind.read_data(plan)
        loaded = kind.load(plan, note if ranks.leader else lambda text: None)
        try:
            return _quantize_loaded(
                plan, kind, data, loaded, progress if ranks.leader else silent, note, began, ranks
            )
        finally:
            loaded.close()
    finally:
        close(ranks)


def _quantize_loaded(
    plan: Plan,
    kind: ModelKind,
    data: Any,
    loaded: Loaded,
    progress: Progress,
    note: Any,
    began: float,
    ranks: Ranks,
) -> Finished:
    from ..pipeline import quantize_model, validate
    from ..placement import Placement
    from ..store import report as reports
    from ..store.files import make_work_folder, write_json_atomic
    from ..store.folder import OutputBuilder, tied_names, write_companions
    from ..store.journal import open_journal
    from ..store.names import REPORT

    request, started = plan.request, reports.now()
    if not ranks.leader:
        note = lambda text: None  # noqa: E731 (one voice: the leader's)
    problem = _non_finite(loaded, request.target) if ranks.leader else None  # read once, by one rank
    problem = ranks.broadcast(problem)
    if problem is not None:
        raise UsageError(problem)
    layers = validate(loaded.model, loaded.adapter, plan.settings)
    kind.preflight(plan, layers)
    calibration = kind.calibrate(loaded, data, plan, note)
    fp = None
    if request.eval_data is not None:  # the same data, before quantization: what the bits cost
        note(f"evaluating the full-precision model on {request.eval_data}")
        fp = kind.score(loaded, data, plan, ranks=ranks)
    journal = None
    if kind.resumable and ranks.leader:
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
    placement = Placement(loaded.model, plan.device, loaded.weights)
    if not ranks.leader:  # the other ranks compute; the leader writes
        return _follow(plan, kind, data, loaded, calibration, fp, placement, progress, ranks)
    work = journal.output_folder() if journal is not None else make_work_folder(plan.output)
    builder = OutputBuilder(
        work, dest=plan.output, ties=tied_names(loaded.model), max_shard_bytes=plan.max_shard_bytes
    )

    def sink(index: int, block: nn.Module, records: dict) -> bool:
        prefix = loaded.adapter.block_name(index)
        if not prefix or _submodule(loaded.model, prefix) is not block:  # a vision stem/head view
            return False
        builder.add_state(block.state_dict(prefix=f"{prefix}.", keep_vars=True).items(), records)
        return True

    try:
        with _guarded(journal, bad_input_discards=True):
            outcome = quantize_model(
                loaded.model,
                loaded.adapter,
                calibration.batches,
                plan.settings,
                progress=progress,
                journal=journal,
                placement=placement,
                sink=sink,
                ranks=ranks,
            )
        report = reports.build(
            model=request.target,
            family=loaded.adapter.name,
            dtype=str(loaded.dtype).removeprefix("torch."),
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
        report["run"]["parallel"] = _parallel_section(ranks)
        if journal is not None:
            report["run"]["resumed_blocks"] = journal.blocks_restored
        report.update(kind.report_sections(loaded, plan))
        if outcome.unquantized:  # named, never skipped in silence
            report["not_quantized"] = {
                "why": "not a Linear, Conv2d or fused-experts layer (e.g. a router): kept in full precision",
                "layers": outcome.unquantized,
            }
            note(f"kept in full precision (not a layer type cdq quantizes): {_patterns(outcome.unquantized)}")
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
            _write_remaining(loaded.model, placement, builder, outcome.layers)
            builder.finish(
                plan.output,
                info=info,
                kind=kind.name,
                dtype=loaded.dtype,
                extras=lambda folder: write_companions(folder, loaded.model, loaded.tokenizer, report),
                overwrite=request.overwrite,
                protect=plan_sources(request),
                order=list(dict.fromkeys(row.layer for row in outcome.rows)),
            )
    except BaseException:
        if journal is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if journal is not None:
        journal.finish()
    ranks.barrier()  # the output is in place: every rank may read it
    if fp is not None:
        note(f"evaluating the quantized model on {request.eval_data}")
        try:
            quantized = kind.score(
                loaded, data, plan, reference=fp.reference, written=plan.output, ranks=ranks
            )
        except ValueError as exc:
            raise ValueError(f"{exc} (the output {plan.output} was written)") from None
        report["evaluation"] = kind.evaluation(plan, quantized, fp)
        write_json_atomic(plan.output / REPORT, report)
    exported = _export(plan, note)
    ranks.barrier()
    return Finished(plan.output, report, kind.name, exported)


def _follow(
    plan: Plan,
    kind: ModelKind,
    data: Any,
    loaded: Loaded,
    calibration: Any,
    fp: Any,
    placement: Any,
    progress: Progress,
    ranks: Ranks,
) -> Finished:
    """A rank other than the leader: the same blocks on its batches, its share of the layers, the
    same collectives, and nothing written."""
    from ..pipeline import quantize_model

    quantize_model(
        loaded.model,
        loaded.adapter,
        calibration.batches,
        plan.settings,
        progress=silent,
        placement=placement,
        sink=lambda index, block, records: True,
        ranks=ranks,
    )
    ranks.gather_values(ranks.solve_seconds)  # the leader's report lists every rank's solve time
    ranks.barrier()  # the leader has put the output in place
    if fp is not None:
        kind.score(loaded, data, plan, reference=fp.reference, written=plan.output, ranks=ranks)
    ranks.barrier()
    return Finished(plan.output, {}, kind.name)


def _parallel_section(ranks: Ranks) -> dict[str, Any]:
    """For report.json: the world, its backend, each rank's solve time and layers."""
    seconds = ranks.gather_values(ranks.solve_seconds)
    layers = [sum(1 for r in ranks.assignments.values() if r == rank) for rank in range(ranks.world)]
    return {
        "world_size": ranks.world,
        "backend": ranks.backend or "none",
        "solve_seconds": [round(value, 3) for value in seconds],
        "layers_per_rank": layers,
    }


def evaluate(request: EvalRequest) -> dict[str, Any]:
    """Run ``cdq eval``: perplexity of a language model, top-1 of a classifier, or zero-shot
    accuracy on lm-eval tasks (JSON-ready dict)."""
    if request.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {request.batch_size}")
    if (request.data is None) == (request.tasks is None):
        raise UsageError(
            "cdq eval takes --data SOURCE (perplexity, top-1) or --tasks LIST (zero-shot accuracy)"
        )
    if request.limit is not None and (request.tasks is None or request.limit < 1):
        raise UsageError("--limit is a positive number of items per --tasks task")
    if request.trust_task_code and request.tasks is None:
        raise UsageError("--trust-task-code is for --tasks (it lets local task files run their own code)")
    device = resolve_device(request.device)
    kind = kind_of(request.target, request.checkpoint)
    return kind.evaluate_target(request, device)


def _non_finite(loaded: Loaded, target: str) -> str | None:
    """NaN/Inf anywhere in the model is refused now, not after hours of solving the blocks before
    it: every tensor of the checkpoint is read once (slice by slice for a lazy model). The error
    message, or None."""
    import torch

    if loaded.weights is None:
        parts = ((name, [t]) for name, t in loaded.model.state_dict().items())
    else:  # slice by slice where the source can: a scan never holds a whole tensor
        chunks = getattr(loaded.weights, "chunks", None)
        parts = (
            (name, chunks(name) if chunks else [loaded.weights.tensor(name)])
            for name in loaded.weights.names()
        )
    bad = [
        name
        for name, pieces in parts
        if any(torch.is_floating_point(p) and not bool(torch.isfinite(p).all()) for p in pieces)
    ]
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"{target}: tensor {bad[0]}{more} holds NaN/Inf values"


def _write_remaining(model: nn.Module, placement: Any, builder: Any, layers: dict) -> None:
    """Write what the blocks did not (embeddings, final norm, head; everything of a model whose
    units are not its own submodules), one owning module at a time (read from disk when lazy)."""
    for prefix, owner, names in _remaining(model, builder.written, builder.ties):
        with placement.using([owner], device=placement.home):
            state = owner.state_dict(prefix=f"{prefix}." if prefix else "", keep_vars=True)
            builder.add_state(((name, state[name]) for name in names), layers)
    builder.add_state(((name, None) for name in builder.ties), {})  # tied: recorded as aliases


def _remaining(
    model: nn.Module, written: set[str], ties: dict[str, str]
) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """The state-dict entries not written yet (ties aside), grouped by the module that owns them,
    in order: (its name, the module, the entries' full names)."""
    groups: dict[str, list[str]] = {}
    for name in model.state_dict(keep_vars=True):
        if name not in written and name not in ties:
            groups.setdefault(name.rpartition(".")[0], []).append(name)
    for owner, names in groups.items():
        yield owner, model.get_submodule(owner), names


def _patterns(names: list[str]) -> str:
    """``model.layers.*.mlp.gate.weight (32x)`` for names that differ only in block numbers."""
    import re

    counts: dict[str, int] = {}
    for name in names:
        key = re.sub(r"\.\d+\.", ".*.", name, count=1)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{key} ({count}x)" if count > 1 else key for key, count in counts.items())


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


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
        elif journal is not None:
            journal.discard()  # no block was finished: nothing to resume, nothing left behind
        raise


def _check_kind(kind: ModelKind, plan: Plan, ranks: Ranks) -> None:
    if plan.export_dest is not None and not kind.exports:
        raise UsageError(f"--format {plan.request.export_format} is for causal LMs, not vision models")
    if plan.request.resume and not kind.resumable:
        raise UsageError("--resume is for causal LMs, not vision models")
    if ranks.active and not kind.resumable:
        raise UsageError("several processes (torchrun, --nproc) quantize causal LMs, not vision models")


def _export(plan: Plan, note: Any) -> dict[str, Any] | None:
    """The export (--format) of the just-written output folder; its failure names the kept output."""
    if plan.export_dest is None:
        return None
    from ..store.exports import ExportError, export

    fmt = plan.request.export_format
    note(f"exporting {fmt} to {plan.export_dest}")
    try:
        summary = export(
            fmt,
            plan.output,
            plan.export_dest,
            overwrite=plan.request.overwrite,
            max_shard_bytes=plan.max_shard_bytes,
        )
    except ExportError as exc:
        kept = f"the native output {plan.output} was written: try cdq export on it"
        raise ExportError(f"{exc} ({kept})") from None
    return summary.to_dict()
