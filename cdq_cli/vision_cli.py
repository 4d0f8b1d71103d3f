"""``cdq quantize`` and ``cdq eval`` for timm image classifiers (``app.py`` routes vision targets here).

Same contract as the language-model path: everything checkable without the model is checked
first, errors are one-line ``ValueError``/``OSError`` for ``app.main``, the output folder is
written atomically, ``--json`` prints exactly one object on stdout.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

VISION_NOTES = {
    "batchnorm": "kept, not folded",
    "grouped_convs": (
        "grouped/depthwise convs: one problem per group with that group's own Σ "
        "((C_in/G)·kh·kw square; kh·kw for depthwise), solved by the chosen method; "
        "--per-layer means one scale per group there"
    ),
}


@dataclass
class VisionJob:
    """The options of one ``cdq quantize`` run on a vision model (already checked by ``app``)."""

    command: str
    model: str
    method: str
    bits: int
    group_size: int | None
    sym: bool
    per_layer: bool
    calib: str
    nsamples: int
    seed: int
    output: Path
    device: torch.device
    sigma_dtype: torch.dtype
    batch_size: int
    fp_inputs: bool
    true_sequential: bool
    options: dict[str, Any]
    overwrite: bool
    quiet: bool
    as_json: bool
    eval_data: str | None = None
    checkpoint: str | None = None
    model_args: list[str] = field(default_factory=list)
    quantize_embed: bool = False
    quantize_head: bool = False
    augment: bool = False


def quantize_vision(job: VisionJob) -> dict[str, Any]:
    """Quantize a timm classifier block by block; write the folder; return the report."""
    from . import report as reports
    from .calib.images import calibration_images, labelled_batches, open_images
    from .checkpoint import save_quantized, write_json_atomic
    from .evaluate_vision import top1
    from .models.timm_models import KIND, check_spec, data_config, load_timm
    from .models.vision import vision_adapter_for
    from .pipeline import Settings, quantize_model, validate
    from .ui import Reporter

    began, started = time.perf_counter(), reports.now()
    spec = timm_spec(job.model, job.checkpoint, job.model_args)
    check_spec(spec)
    if job.calib.lower() in ("c4", "wikitext2", "ptb"):
        raise ValueError(
            f"vision models calibrate on images, not {job.calib!r}: pass --calib IMAGE_FOLDER, "
            "imagenet-sample or hf:NAME[:split]"
        )
    images = open_images(job.calib, split="train")
    held_out = open_images(job.eval_data) if job.eval_data is not None else None
    if held_out is not None and held_out.labels is None:
        raise ValueError(f"--eval {job.eval_data}: cannot tell the images' classes (use class subfolders)")

    ui = Reporter(quiet=job.quiet)
    try:
        ui.note(f"loading timm model {spec.name}" + (f" from {spec.checkpoint}" if spec.checkpoint else ""))
        model = load_timm(spec)
        config = data_config(model)
        adapter = vision_adapter_for(
            model, quantize_embed=job.quantize_embed, quantize_head=job.quantize_head
        )
        settings = Settings(
            method=job.method,
            bits=job.bits,
            group_size=job.group_size,
            sym=job.sym,
            per_layer=job.per_layer,
            options=job.options,
            true_sequential=job.true_sequential,
            fp_inputs=job.fp_inputs,
            device=str(job.device),
            sigma_dtype=job.sigma_dtype,
        )
        validate(model, adapter, settings)
        used = min(job.nsamples, len(images)) if not job.augment else job.nsamples
        ui.note(
            f"calibration: {used} images from {job.calib} (seed {job.seed}"
            + (", augmented" if job.augment else "")
            + ")"
            + (f"; only {len(images)} available" if used < job.nsamples else "")
        )
        calib, indices = calibration_images(
            images, config, nsamples=job.nsamples, seed=job.seed, augment=job.augment
        )
        fp = None
        if held_out is not None:
            ui.note(f"evaluating the full-precision model on {job.eval_data}")
            model.to(job.device)
            fp = top1(model, labelled_batches(held_out, config, batch_size=32), device=job.device)
            model.to("cpu")
        outcome = quantize_model(model, adapter, calib.split(job.batch_size), settings, progress=ui)
    finally:
        ui.close()
    calibration = {
        "source": job.calib,
        "layout": images.layout,
        "sha256": images.fingerprint(),
        "images_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest(),
        "nsamples": job.nsamples,
        "images": len(indices),
        "seed": job.seed,
        "augment": job.augment,
        "transform": config,
    }
    report = reports.build(
        model=job.model,
        family=adapter.name,
        dtype="float32",
        settings=settings,
        seed=job.seed,
        calibration=calibration,
        rows=outcome.rows,
        device=job.device,
        command=job.command,
        started=started,
        ended=reports.now(),
        wall_seconds=time.perf_counter() - began,
    )
    report["vision"] = vision_section(adapter, spec)
    info = {
        "method": report["run"]["method"],
        "bits": job.bits,
        "group_size": job.group_size,
        "sym": job.sym,
        "model": job.model,
        "timm": {**spec.to_dict(), "data_config": config},
        "quantize_embed": job.quantize_embed,
        "quantize_head": job.quantize_head,
    }
    ui.note(f"writing {job.output}")
    save_quantized(
        job.output, model, outcome.layers, report=report, info=info, overwrite=job.overwrite, kind=KIND
    )
    if held_out is not None and fp is not None:
        ui.note(f"evaluating the quantized model on {job.eval_data}")
        model.to(job.device)
        result, _ = top1(
            model, labelled_batches(held_out, config, batch_size=32), reference=fp[1], device=job.device
        )
        report["evaluation"] = {"data": job.eval_data, **result.to_dict(), "fp": fp[0].to_dict()}
        write_json_atomic(job.output / "report.json", report)
    emit_quantized(job.output, report, as_json=job.as_json)
    return report


def eval_vision(
    target: str,
    data: str,
    *,
    checkpoint: str | None,
    model_args: list[str],
    device: torch.device,
    batch_size: int,
    as_json: bool,
) -> dict[str, Any]:
    """Top-1/top-5 of a timm model or a cdq output folder; agreement with the FP source model
    when the folder's source can be rebuilt (its checkpoint file still exists)."""
    from .calib.images import labelled_batches, open_images
    from .checkpoint import is_quantized_folder
    from .evaluate_vision import top1
    from .models.timm_models import TimmSpec, data_config, load_timm, load_vision_quantized

    images = open_images(data)
    if images.labels is None:
        raise ValueError(f"{data}: cannot tell the images' classes (use class subfolders or n<wnid>_ names)")
    reference, note = None, None
    if is_quantized_folder(target):
        if checkpoint is not None or model_args:
            raise ValueError("--checkpoint/--model-arg describe a plain model; a cdq folder knows its own")
        model, table = load_vision_quantized(target)
        config = table["timm"]["data_config"]
        source = TimmSpec.from_dict(table["timm"])
        if source.checkpoint is None:
            note = "no agreement: the source model had no checkpoint (random init)"
        elif not Path(source.checkpoint).is_file():
            note = f"no agreement: the source checkpoint {source.checkpoint} is gone"
        else:
            reference = load_timm(source)
    else:
        model = load_timm(timm_spec(target, checkpoint, model_args))
        config = data_config(model)
    reference_predictions = None
    if reference is not None:
        reference.to(device)
        _, reference_predictions = top1(
            reference, labelled_batches(images, config, batch_size=batch_size), device=device
        )
        del reference
    model.to(device)
    result, _ = top1(
        model,
        labelled_batches(images, config, batch_size=batch_size),
        reference=reference_predictions,
        device=device,
    )
    shown = {"target": target, "data": data, **result.to_dict()}
    if note:
        shown["note"] = note
    if as_json:
        print(json.dumps(shown))
        return shown
    from rich.console import Console

    agree = f", agreement with FP {result.agreement:.2%}" if result.agreement is not None else ""
    Console(highlight=False, soft_wrap=True, stderr=False).print(
        f"{target} on {data}: top-1 [bold]{result.top1:.2%}[/bold], top-{result.k} {result.top5:.2%}"
        f"{agree} ({result.images} images)" + (f"; {note}" if note else "")
    )
    return shown


def timm_spec(model: str, checkpoint: str | None, model_args: list[str]) -> Any:
    """The TimmSpec of a command line: architecture, ``--model-arg`` kwargs, absolute checkpoint."""
    from .models.timm_models import TimmSpec, parse_model_args, timm_name

    path = str(Path(checkpoint).expanduser().absolute()) if checkpoint is not None else None
    return TimmSpec(timm_name(model), parse_model_args(model_args), path)


def vision_section(adapter: Any, spec: Any) -> dict[str, Any]:
    """What the report says about the vision run: which parts stayed in full precision and why."""
    import timm

    return {
        "timm": timm.__version__,
        "architecture": spec.name,
        "checkpoint": spec.checkpoint,
        "embed": "quantized" if adapter.quantize_embed else "full precision",
        "embed_layers": adapter.layers("embed"),
        "head": "quantized" if adapter.quantize_head else "full precision",
        "head_layers": adapter.layers("head"),
        **VISION_NOTES,
    }


def emit_quantized(out: Path, report: dict[str, Any], *, as_json: bool) -> None:
    """What `cdq quantize` prints for a vision model (see ``cdq_cli.app.emit_outcome``)."""
    from .app import emit_outcome

    summary, run = report["summary"], report["run"]
    headline = None
    if summary["layers"]:  # the error figures exist only when something was quantized
        headline = (
            f"quantized {summary['layers']} layers of {run['model']} ({run['family']}) with {run['method']} "
            f"w{run['bits']} in {summary['wall_seconds']:.1f}s: mean relative error "
            f"{summary['mean_relative_error']:.4g}, error vs RTN (geometric mean) "
            f"{summary['geomean_error_vs_rtn']:.3f}x"
        )
    evaluated = None
    if "evaluation" in report:
        ev = report["evaluation"]
        evaluated = (
            f"top-1 on {ev['data']}: [bold]{ev['top1']:.2%}[/bold] (FP {ev['fp']['top1']:.2%}), "
            f"agreement with FP {ev['agreement']:.2%} ({ev['images']} images)"
        )
    emit_outcome(out, report, as_json=as_json, headline=headline, evaluated=evaluated)
