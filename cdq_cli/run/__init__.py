"""One quantization run for every model kind, and one evaluation.

:func:`quantize` is the whole of ``cdq quantize``: settle the request (every check that needs no
model; the processes of a torchrun run joined), read the data sources, open the model (lazily
when it can: weights stay on disk until their block runs), check every tensor for NaN/Inf,
validate the layers, calibrate, score the full-precision model (with ``--eval``), quantize block
by block while the output folder is written shard by shard (resumable), complete the folder,
score what was written, render the report once, put the folder in place, export. What differs
between language and vision models is a :class:`~cdq_cli.run.kinds.ModelKind` (:func:`kind_of`
picks it). Nothing here prints: progress goes to the ``progress`` callback as
:class:`~cdq_cli.records.Event`\\ s, the result comes back as a :class:`Finished`; the command
line renders both.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..parallel import Ranks, close
from ..records import Event, Progress, RunRecord, silent
from .kinds import Loaded, ModelKind
from .language import LanguageModels
from .plan import (
    EvalRequest,
    Plan,
    QuantizeRequest,
    UsageError,
    check_compute_dtype,
    check_processes,
    plan_sources,
    resolve_device,
    settle,
)
from .vision import VisionModels

__all__ = [
    "EvalRequest",
    "Finished",
    "Plan",
    "QuantizeRequest",
    "UsageError",
    "check_launch",
    "evaluate",
    "kind_of",
    "output_locks",
    "quantize",
    "settle",
]


@dataclass
class Finished:
    """A finished quantization: where it was written, its report, and the export summary if any."""

    output: Path
    report: dict[str, Any]
    export: dict[str, Any] | None = None


def kind_of(target: str, checkpoint: str | None = None) -> ModelKind:
    """The kind of ``target``: a timm classifier for ``timm/NAME``, any target with
    ``--checkpoint``, an output folder holding one, or a plain name timm knows; else a causal LM."""
    from ..models.timm_models import KIND, is_timm_architecture
    from ..store.folder import read_kind

    path = Path(target).expanduser()
    if checkpoint is not None or target.startswith("timm/"):
        return VisionModels()
    if path.exists():
        return VisionModels() if read_kind(path) == KIND else LanguageModels()
    return VisionModels() if is_timm_architecture(target) else LanguageModels()


def quantize(request: QuantizeRequest, progress: Progress = silent) -> Finished:
    """Run ``cdq quantize`` (see the module docstring); raises one-line ``ValueError``/``OSError``.

    The output (and the export's folder) is locked for the whole run, by the process that writes
    it: a second run with the same ``--output`` fails at once instead of mixing its files in."""
    began = time.perf_counter()
    refuse_quantized_source(request.target)
    plan = settle(request)
    ranks = plan.ranks
    if not ranks.leader:  # one voice: the leader's
        progress = silent

    def note(text: str) -> None:
        progress(Event("note", text=text))

    try:
        kind = kind_of(request.target, request.checkpoint)
        _check_kind(kind, plan)
        with output_locks(plan) if ranks.leader else nullcontext():  # the leader writes the output
            data = kind.read_data(plan)
            loaded = kind.load(plan, note)
            try:
                return _quantize_loaded(plan, kind, data, loaded, progress, note, began)
            finally:
                loaded.close()
    finally:
        close(ranks)


def check_launch(request: QuantizeRequest, nproc: int) -> Plan:
    """Everything ``cdq quantize --nproc N`` can check before it starts a process: the request
    (:func:`settle`), the model's kind and state, and that ``nproc`` processes can all work."""
    refuse_quantized_source(request.target)
    plan = settle(request)
    if not kind_of(request.target, request.checkpoint).resumable:
        raise UsageError("several processes (torchrun, --nproc) quantize causal LMs, not vision models")
    check_processes(request, nproc, plan.device)
    return plan


@contextmanager
def output_locks(plan: Plan) -> Iterator[None]:
    """Hold the locks of the run's output and export folders (one run per output)."""
    from ..store.files import output_lock

    with ExitStack() as locks:
        for dest in (plan.output, plan.export_dest):
            if dest is not None:
                locks.enter_context(output_lock(dest))
        yield


def refuse_quantized_source(target: str) -> None:
    """A model that is already quantized (a cdq output folder, a GPTQ or compressed-tensors
    export, any folder whose config names a quantization) is refused by name, before any work."""
    from ..models.causal_lm import refuse_quantized
    from ..store.folder import is_quantized_folder, orphaned_output
    from ..store.names import MARKER

    path = Path(target).expanduser()
    if not path.is_dir():
        return
    if is_quantized_folder(path) or orphaned_output(path):
        raise UsageError(
            f"{target} is already quantized by cdq (a cdq output folder: its {MARKER} or weights say so); "
            "quantize the original model"
        )
    refuse_quantized(path)


def _quantize_loaded(
    plan: Plan, kind: ModelKind, data: Any, loaded: Loaded, progress: Progress, note: Any, began: float
) -> Finished:
    from ..models.base import quantizable_layers
    from ..pipeline import quantize_model, validate
    from ..placement import Placement
    from ..store import report as reports
    from ..store.files import make_work_folder
    from ..store.folder import OutputBuilder, stored_dtypes, tied_names
    from ..store.journal import open_journal

    request, ranks, started = plan.request, plan.ranks, reports.now()
    problem = _scan_weights(loaded, request.target) if ranks.leader else None  # read once, by one rank
    problem = ranks.broadcast(problem)
    if problem is not None:
        raise UsageError(problem)
    gguf_notes: list[str] = []
    if plan.settings.gguf_type is not None:  # every layer's GGUF type, before validate checks its grid
        from . import gguf as gguf_run

        settings, gguf_notes = gguf_run.resolve(plan.settings, _shapes(loaded))
        plan = replace(plan, settings=settings)
    layers, settings = validate(loaded.model, loaded.adapter, plan.settings)
    if settings.target != plan.settings.target:  # the default yields (records.Settings.target)
        note(
            f"the model has fused experts: --method {settings.method} quantizes against each layer's own "
            "outputs (-o target=quantized), not the full-precision model's (its default -o target=fp "
            "needs the two models to route tokens alike)"
        )
    plan = replace(plan, settings=settings)
    kind.preflight(plan, loaded, layers)
    if plan.settings.gguf_type is not None:  # the family and its tokenizer, as llama.cpp reads them
        gguf_run.preflight(loaded.model, loaded.tokenizer)
        for text in gguf_notes:
            note(text)
    calibration = kind.calibrate(loaded, data, plan, note)
    warnings = [
        *plan.settings.shadowed(quantizable_layers(loaded.adapter, loaded.model)),
        *calibration.warnings,
    ]
    for text in warnings:  # requests that would do less than they say: one line each, and in the report
        progress(Event("warning", text=text))
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
            compute_dtype=loaded.compute_dtype,
        )
    placement = Placement(loaded.model, plan.device, loaded.weights, dtype=loaded.compute)
    if not ranks.leader:  # the other ranks compute; the leader writes
        return _follow(plan, kind, data, loaded, calibration, fp, placement)
    work = journal.output_folder() if journal is not None else make_work_folder(plan.output)
    builder = OutputBuilder(
        work,
        dest=plan.output,
        ties=tied_names(loaded.model),
        max_shard_bytes=plan.max_shard_bytes,
        dtypes=stored_dtypes(loaded.model),
    )
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
                writer=builder,
                ranks=ranks,
            )
            if plan.settings.gguf_type is not None:  # embeddings and head: as llama.cpp quantizes them
                records, rows, texts = gguf_run.quantize_embeddings(loaded.model, placement, plan.settings)
                outcome.layers.update(records)
                outcome.rows.extend(rows)
                for text in texts:
                    note(text)
        record = RunRecord(
            model=request.target,
            family=loaded.adapter.name,
            dtype=str(loaded.dtype).removeprefix("torch."),
            compute_dtype=str(loaded.compute_dtype).removeprefix("torch."),
            settings=plan.settings,
            seed=request.seed,
            batch_size=request.batch_size,
            command=request.command,
            config=request.config,
            calibration=calibration.describe,
            rows=outcome.rows,
            unquantized=outcome.unquantized,
            parallel=_parallel_section(ranks),
            sections={**kind.report_sections(loaded, plan), **({"warnings": warnings} if warnings else {})},
            started=started,
            ended=reports.now(),
            wall_seconds=time.perf_counter() - began,
            peak_memory=reports.peak_memory(plan.device),
            resumed_blocks=journal.blocks_restored if journal is not None else None,
            transform=_transform_record(loaded, outcome),
        )
        if outcome.unquantized:
            note(f"kept in full precision (not a layer type cdq quantizes): {_patterns(outcome.unquantized)}")
        note(f"writing {plan.output}")
        with _guarded(journal, bad_input_discards=False):
            _write_remaining(loaded.model, placement, builder, outcome.layers)
            builder.complete(
                info={
                    **reports.table_entries(plan.settings),
                    "model": request.target,
                    **kind.table_info(loaded, plan),
                },
                kind=kind.name,
                dtype=loaded.dtype,
                extras=lambda folder: _companions(folder, loaded, plan),
                order=list(dict.fromkeys(row.layer for row in outcome.rows)),
            )
            failed = None
            if fp is not None:  # scored from the completed folder, before it is put in place
                note(f"evaluating the quantized model on {request.eval_data}")
                ranks.broadcast(work)
                try:
                    quantized = kind.score(
                        loaded, data, plan, reference=fp.reference, written=work, ranks=ranks
                    )
                    record = replace(record, evaluation=kind.evaluation(plan, quantized, fp))
                except ValueError as exc:
                    failed = exc
            report = reports.render(record)
            reports.write(work, report)
            builder.publish(plan.output, overwrite=request.overwrite, protect=plan_sources(request))
    except BaseException:
        if journal is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if journal is not None:
        journal.finish()
    if failed is not None:
        ranks.barrier()
        raise ValueError(f"{failed} (the output {plan.output} was written, without an evaluation)") from None
    exported = _export(plan, note)
    ranks.barrier()
    return Finished(plan.output, report, exported)


def _shapes(loaded: Loaded) -> dict[str, tuple[int, ...]]:
    """The weight shape of every quantizable layer, by full name (fused experts: (E, out, in))."""
    from ..models.base import quantizable_layers

    return {
        name: tuple(layer.shape if isinstance(layer, torch.Tensor) else layer.weight.shape)
        for name, layer in quantizable_layers(loaded.adapter, loaded.model).items()
    }


def _companions(folder: Path, loaded: Loaded, plan: Plan) -> None:
    """Tokenizer and configs beside the weights; a GGUF run adds the sentencepiece model, which
    llama.cpp's converter (and the GGUF export) read the pieces' scores from."""
    from ..store.folder import write_companions

    write_companions(folder, loaded.model, loaded.tokenizer)
    if plan.settings.gguf_type is not None:
        from .gguf import add_sentencepiece_model

        add_sentencepiece_model(folder, loaded.tokenizer)


def _follow(
    plan: Plan, kind: ModelKind, data: Any, loaded: Loaded, calibration: Any, fp: Any, placement: Any
) -> Finished:
    """A rank other than the leader: the same blocks on its batches, its share of the layers, the
    same collectives, and nothing written."""
    from ..pipeline import quantize_model

    ranks = plan.ranks
    quantize_model(
        loaded.model,
        loaded.adapter,
        calibration.batches,
        plan.settings,
        progress=silent,
        placement=placement,
        ranks=ranks,
    )
    ranks.gather_values(ranks.solve_seconds)  # the leader's report lists every rank's solve time
    if fp is not None:
        work = ranks.broadcast(None)  # the leader's completed folder, before it is put in place
        try:
            kind.score(loaded, data, plan, reference=fp.reference, written=work, ranks=ranks)
        except ValueError:
            pass  # the leader reports the failure
    ranks.barrier()
    return Finished(plan.output, {})


def _transform_record(loaded: Loaded, outcome: Any) -> dict[str, Any] | None:
    """What --transform did: its description, and the choices made block by block (awq)."""
    described = loaded.extra.get("transform")
    if described is None:
        return None
    return {**described, **({"blocks": outcome.transform_log} if outcome.transform_log else {})}


def _parallel_section(ranks: Ranks) -> dict[str, Any]:
    """For report.json: the world, its backend, each rank's solve time and units of work (layers,
    or bands of a layer's rows: ``band_owners`` says which rank solved each band), the solve
    phase's wall time and the imbalance the assignments predicted (max / mean load - 1)."""
    seconds = ranks.gather_values(ranks.solve_seconds)
    layers = [sum(1 for r in ranks.assignments.values() if r == rank) for rank in range(ranks.world)]
    balance = ranks.balance
    return {
        "world_size": ranks.world,
        "backend": ranks.backend or "none",
        "solve_seconds": [round(value, 3) for value in seconds],
        "layers_per_rank": layers,
        # the slowest rank's solve time per group, summed: what the block loop waited for
        "solve_phase_seconds": round(balance.critical, 3),
        "predicted_imbalance": round(balance.predicted_imbalance, 4),
        "band_owners": {unit: rank for unit, rank in ranks.assignments.items() if "[rows " in unit},
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
    if request.limit is not None and request.tasks is None:
        raise UsageError(
            "--limit counts the items of each --tasks task; with --data, --max-windows limits the windows"
        )
    if request.limit is not None and request.limit < 1:
        raise UsageError("--limit is a positive number of items per --tasks task")
    if request.trust_task_code and request.tasks is None:
        raise UsageError("--trust-task-code is for --tasks (it lets local task files run their own code)")
    device = resolve_device(request.device)
    check_compute_dtype(request.dtype, device)
    kind = kind_of(request.target, request.checkpoint)
    return kind.evaluate_target(request, device)


def _scan_weights(loaded: Loaded, target: str) -> str | None:
    """Every tensor of the checkpoint read once (slice by slice for a lazy model), now, not after
    hours of solving the blocks before it: NaN/Inf anywhere is refused, and so is a tensor whose
    shape or kind (floating point or not) differs from what the model's config makes it. The
    error message, or None."""
    import torch

    from ..solvers.grid import all_finite

    expected = loaded.model.state_dict(keep_vars=True)
    if loaded.weights is None:
        parts = ((name, [t]) for name, t in expected.items())
    else:  # slice by slice where the source can: a scan never holds a whole tensor
        chunks = getattr(loaded.weights, "chunks", None)
        parts = (
            (name, chunks(name) if chunks else [loaded.weights.tensor(name)])
            for name in loaded.weights.names()
        )
    where = getattr(loaded.weights, "where", lambda name: None)
    bad = []
    for name, pieces in parts:
        shape: tuple[int, ...] | None = None
        floating, finite = True, True
        for piece in pieces:  # slices along the first dimension
            if shape is None:
                shape, floating = tuple(piece.shape), torch.is_floating_point(piece)
            elif piece.dim():
                shape = (shape[0] + piece.shape[0], *shape[1:])
            finite = finite and (not floating or all_finite(piece))  # aminmax: one cheap pass
        model = expected.get(name)
        if model is not None and loaded.weights is not None and shape is not None:
            found = f" in {where(name)}" if where(name) else ""
            if shape != tuple(model.shape):
                return (
                    f"{target}: tensor {name}{found} has shape {list(shape)}, but the model's config makes "
                    f"it {list(model.shape)}"
                )
            if floating != torch.is_floating_point(model):
                kinds = ("floating-point", "integer") if floating else ("integer", "floating-point")
                return f"{target}: tensor {name}{found} holds {kinds[0]} values; the model expects {kinds[1]}"
        if not finite:
            bad.append(name)
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"{target}: tensor {bad[0]}{more} holds NaN/Inf values"


def _write_remaining(model: nn.Module, placement: Any, builder: Any, layers: dict) -> None:
    """Write what the blocks did not (embeddings, final norm, head; everything of a model whose
    units are not its own submodules), one owning module at a time (read from disk when lazy)."""
    for prefix, owner, names in _remaining(model, builder.written, builder.ties):
        with placement.using([owner], device=placement.home, stored=True):
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
    counts: dict[str, int] = {}
    for name in names:
        key = re.sub(r"\.\d+\.", ".*.", name, count=1)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{key} ({count}x)" if count > 1 else key for key, count in counts.items())


@contextmanager
def _guarded(journal: Any, *, bad_input_discards: bool) -> Iterator[None]:
    """Keep the resume journal where resuming helps (a full disk, out of memory, Ctrl-C, SIGTERM:
    the error then says ``--resume``); drop it when the run failed on bad input, which resuming
    would repeat."""
    try:
        yield
    except ValueError:
        if journal is not None and bad_input_discards:
            journal.discard()
        raise
    except (OSError, MemoryError, KeyboardInterrupt) as exc:  # a full disk, out of memory, Ctrl-C
        hint = journal.resume_hint() if journal is not None else None
        if hint is not None:
            exc.cdq_hint = hint  # type: ignore[union-attr]
        elif journal is not None:
            journal.discard()  # no block was finished: nothing to resume, nothing left behind
        raise


def _check_kind(kind: ModelKind, plan: Plan) -> None:
    if plan.export_dest is not None and not kind.exports:
        raise UsageError(f"--format {plan.request.export_format} is for causal LMs, not vision models")
    if plan.request.resume and not kind.resumable:
        raise UsageError("--resume is for causal LMs, not vision models")
    if plan.ranks.active and not kind.resumable:
        raise UsageError("several processes (torchrun, --nproc) quantize causal LMs, not vision models")
    if plan.settings.transform != "none" and not kind.transforms:
        raise UsageError(f"--transform {plan.settings.transform} is for causal LMs, not vision models")


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
