"""The ``cdq`` command line: ``cdq quantize`` and ``cdq eval``.

Every user error ends as ONE line ``error: ...`` on stderr and a non-zero exit (2: bad input,
1: runtime failure, 130: interrupted), never a traceback; ``CDQ_DEBUG=1`` re-raises instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import typer

from .models.timm_models import is_vision_target
from .output_cli import ExportFormat
from .output_cli import register as register_output_commands
from .presets import apply_config, provenance, solver_options
from .solvers import SOLVERS, method_options

app = typer.Typer(
    name="cdq",
    help="Post-training weight quantization by coordinate descent (QuantEase, COMQ; RTN and GPTQ baselines).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

Method = Enum("Method", {name: name for name in SOLVERS}, type=str)  # type: ignore[misc]


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class SigmaDType(str, Enum):
    float32 = "float32"
    float64 = "float64"


class UsageError(ValueError):
    """Bad command-line input."""


@app.command()
def quantize(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hugging Face folder, .gguf file or hub id."),
    method: Method = typer.Option(
        Method("cdq"), help="Layer solver (cdq: best of GPTQ starts, then CD with grid refits)."
    ),
    bits: int = typer.Option(4, help="Weight bits: 2, 3, 4, 8; 16 = no quantization (plumbing check)."),
    group_size: int | None = typer.Option(None, help="Columns per scale group (default: one per row)."),
    sym: bool = typer.Option(False, "--sym/--asym", help="Symmetric grid."),
    per_layer: bool = typer.Option(False, "--per-layer", help="One scale for the whole layer (COMQ)."),
    calib: str = typer.Option(
        "c4", help="Calibration text: c4, wikitext2, ptb, or a local .txt/.jsonl/folder."
    ),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int | None = typer.Option(None, help="Tokens per window (default: min(2048, model context))."),
    seed: int = typer.Option(0, help="Calibration sampling seed."),
    output: Path | None = typer.Option(None, help="Output folder (default: <model>-<method>-w<bits>[g<G>])."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:N (default: cuda if available)."),
    dtype: DType = typer.Option(DType.auto, help="Model dtype (auto: float32 on CPU, float16 on CUDA)."),
    sigma_dtype: SigmaDType = typer.Option(SigmaDType.float32, help="Σ accumulation dtype."),
    batch_size: int = typer.Option(8, help="Calibration windows per forward."),
    fp_inputs: bool = typer.Option(
        False, "--fp-inputs", help="Feed each block full-precision inputs (COMQ)."
    ),
    true_sequential: bool = typer.Option(True, help="Collect Σ per sequential group inside a block."),
    option: list[str] = typer.Option([], "--option", "-o", help="Solver option KEY=VALUE (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (summary + output) on stdout."),
    eval_data: str | None = typer.Option(None, "--eval", help="Also report perplexity on this text."),
    eval_max_windows: int | None = typer.Option(None, help="Score at most this many --eval windows."),
    eval_seqlen: int | None = typer.Option(None, help="--eval window length (default: min(2048, context))."),
    checkpoint: str | None = typer.Option(None, help="Vision: local timm weights (.pth/.safetensors)."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="Vision: timm create_model KEY=VALUE."),
    quantize_embed: bool = typer.Option(False, "--quantize-embed", help="Vision: quantize the stem too."),
    quantize_head: bool = typer.Option(False, "--quantize-head", help="Vision: quantize the classifier too."),
    augment: bool = typer.Option(False, "--augment", help="Vision: calibrate on augmented images (COMQ)."),
    config: Path | None = typer.Option(
        None, "--config", is_eager=True, callback=apply_config, help="YAML preset; flags given here win."
    ),
    out_format: ExportFormat = typer.Option(
        ExportFormat.native, "--format", help="gptq: also export GPTQ to <output>-gptq (docs/results.md)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last saved block."),
) -> None:
    """Quantize every Linear layer of the model's blocks and write a packed checkpoint + report.json."""
    from . import report as reports
    from .calib import calibration_windows, load_texts, text_fingerprint
    from .checkpoint import check_output_dir, save_quantized, write_json_atomic
    from .evaluate import default_seqlen
    from .models import adapter_for, load_causal_lm
    from .pipeline import NO_QUANTIZATION, Settings, quantize_model, validate
    from .solvers import SUPPORTED_BITS
    from .ui import Reporter

    began, started = time.perf_counter(), reports.now()
    command = shlex.join(["cdq", *(ctx.obj or {}).get("argv", sys.argv[1:])])
    # Everything that can be checked without the model is checked first: fail in seconds, not hours.
    if bits not in (*SUPPORTED_BITS, NO_QUANTIZATION):
        raise UsageError(f"--bits {bits} is not supported: choose one of 2, 3, 4, 8 (16 = no quantization)")
    if group_size is not None and group_size <= 0:
        raise UsageError(f"--group-size must be positive, got {group_size}")
    for flag, value, least in (
        ("--nsamples", nsamples, 1),
        ("--batch-size", batch_size, 1),
        ("--seqlen", seqlen, 2),
    ):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    options = parse_options(method.value, option, base=solver_options(ctx))
    target = torch.device(resolve_device(device))
    out = (output or Path(default_output(model, method.value, bits, group_size))).absolute()
    check_output_dir(out, overwrite=overwrite)
    gptq_out = export_dest(out, out_format, overwrite=overwrite)
    if is_vision_target(model, checkpoint):  # timm classifiers: images, not text (docs/vision.md)
        if gptq_out is not None or resume:
            raise UsageError("--format gptq and --resume are for causal LMs, not vision models")
        from .vision_cli import VisionJob, quantize_vision

        quantize_vision(
            VisionJob(command, model, method.value, bits, group_size, sym, per_layer, calib, nsamples, seed,
                      out, target, getattr(torch, sigma_dtype.value), batch_size, fp_inputs, true_sequential,
                      options, overwrite, quiet, as_json, eval_data, checkpoint, model_arg, quantize_embed,
                      quantize_head, augment)
        )  # fmt: skip
        return
    texts = load_texts(calib)
    held_out = evaluation_texts(eval_data) if eval_data is not None else None

    ui = Reporter(quiet=quiet)
    if quiet or as_json:
        _silence_transformers()
    try:
        ui.note(f"loading {model}")
        lm, tokenizer = load_causal_lm(model, dtype=model_dtype(dtype, target), device="cpu")
        adapter = adapter_for(lm)
        settings = Settings(
            method=method.value,
            bits=bits,
            group_size=group_size,
            sym=sym,
            per_layer=per_layer,
            options=options,
            true_sequential=true_sequential,
            fp_inputs=fp_inputs,
            device=str(target),
            sigma_dtype=getattr(torch, sigma_dtype.value),
        )
        layers = validate(lm, adapter, settings)
        if gptq_out is not None:
            from .export_gptq import preflight

            shapes = {name: tuple(layer.weight.shape) for name, layer in layers.items()}
            preflight(
                shapes, bits=bits, group_size=group_size, sym=sym, per_layer=per_layer, method=method.value
            )
        length = seqlen or default_seqlen(lm)
        context = default_seqlen(lm, cap=sys.maxsize)
        if length > context:
            raise UsageError(f"--seqlen {length} exceeds the model's context of {context} tokens")
        ui.note(f"calibration: {nsamples} x {length} tokens from {calib} (seed {seed})")
        windows = calibration_windows(texts, tokenizer, nsamples=nsamples, seqlen=length, seed=seed)
        eval_length = eval_seqlen or default_seqlen(lm)
        fp_ppl = None
        if held_out is not None:
            # The same windows, before quantization: the user sees what the bits cost.
            ui.note(f"evaluating full-precision perplexity on {eval_data}")
            fp_ppl = evaluate_ppl(
                lm, tokenizer, held_out, seqlen=eval_length, device=target, max_windows=eval_max_windows
            )
            lm.to("cpu")
        from .resume import open_checkpointer

        checkpointer = open_checkpointer(
            out, model, lm, windows, settings, batch_size=batch_size, resume=resume, note=ui.note
        )
        outcome = quantize_model(
            lm, adapter, windows.split(batch_size), settings, progress=ui, checkpointer=checkpointer
        )
    finally:
        ui.close()
    calibration = {
        "source": calib,
        "sha256": text_fingerprint(texts),
        "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        "nsamples": nsamples,
        "seqlen": length,
        "seed": seed,
        "tokens": outcome.tokens,
    }
    report = reports.build(
        model=model,
        family=adapter.name,
        dtype=str(next(lm.parameters()).dtype).removeprefix("torch."),
        settings=settings,
        seed=seed,
        calibration=calibration,
        rows=outcome.rows,
        device=target,
        command=command,
        started=started,
        ended=reports.now(),
        wall_seconds=time.perf_counter() - began,
    )
    report["run"].update(
        batch_size=batch_size,
        config=provenance(ctx),
        resumed_blocks=checkpointer.blocks_restored if checkpointer is not None else 0,
    )
    info = {
        "method": report["run"]["method"],
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "model": model,
    }
    ui.note(f"writing {out}")
    save_quantized(
        out, lm, outcome.layers, tokenizer=tokenizer, report=report, info=info, overwrite=overwrite
    )
    if checkpointer is not None:
        checkpointer.finish()
    if held_out is not None:
        ui.note(f"evaluating perplexity on {eval_data}")
        lm.to(target)
        ppl = evaluate_ppl(
            lm, tokenizer, held_out, seqlen=eval_length, device=target, max_windows=eval_max_windows
        )
        report["evaluation"] = {"data": eval_data, **ppl, "fp_ppl": fp_ppl["ppl"], "fp": fp_ppl}
        write_json_atomic(out / "report.json", report)
    exported = export_after_quantize(out, gptq_out, overwrite=overwrite, note=ui.note)
    emit_quantize_result(out, report, as_json=as_json, exported=exported)


@app.command("eval")
def evaluate(
    target: str = typer.Argument(..., help="A model (folder, .gguf, hub id) or a cdq output folder."),
    data: str = typer.Option(..., help="Text: wikitext2, ptb, c4, or a local .txt/.jsonl/folder."),
    seqlen: int | None = typer.Option(None, help="Window length (default: min(2048, model context))."),
    max_windows: int | None = typer.Option(None, help="Score at most this many windows."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:N (default: cuda if available)."),
    dtype: DType = typer.Option(DType.auto, help="Model dtype for plain models (auto: float32 on CPU)."),
    batch_size: int = typer.Option(8, help="Windows per forward (does not change the result)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    checkpoint: str | None = typer.Option(None, help="Vision: local timm weights (.pth/.safetensors)."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="Vision: timm create_model KEY=VALUE."),
) -> None:
    """Perplexity (GPTQ protocol) of a model or of a cdq output folder."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if as_json:
        _silence_transformers()
    from .checkpoint import is_quantized_folder, load_quantized
    from .evaluate import default_seqlen
    from .models import load_causal_lm

    where = torch.device(resolve_device(device))
    if is_vision_target(target, checkpoint):  # top-1/top-5 (+ agreement) on images (docs/vision.md)
        from .vision_cli import eval_vision

        eval_vision(
            target, data, checkpoint=checkpoint, model_args=model_arg, device=where, batch_size=batch_size,
            as_json=as_json,
        )  # fmt: skip
        return
    texts = evaluation_texts(data)
    if is_quantized_folder(target):
        model, tokenizer = load_quantized(target, device=where)
        if tokenizer is None:
            raise UsageError(f"{target} holds no tokenizer")
    else:
        model, tokenizer = load_causal_lm(target, dtype=model_dtype(dtype, where), device=where)
    result = evaluate_ppl(
        model,
        tokenizer,
        texts,
        seqlen=seqlen or default_seqlen(model),
        device=where,
        max_windows=max_windows,
        batch_size=batch_size,
    )
    shown = {"target": target, "data": data, **result}
    if as_json:
        print(json.dumps(shown, allow_nan=True))
        return
    from rich.console import Console

    Console(highlight=False, soft_wrap=True).print(
        f"{target} on {data}: perplexity [bold]{result['ppl']:.4f}[/bold] "
        f"({result['windows']} windows x {result['seqlen']} tokens, {result['protocol']})"
    )


def evaluation_texts(data: str) -> list[str]:
    """Texts of an evaluation source (named sources read their evaluation split)."""
    from .calib import EVAL_SPLITS, load_texts

    return load_texts(data, split=EVAL_SPLITS.get(data.lower()))


def evaluate_ppl(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    seqlen: int,
    device: torch.device,
    max_windows: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Perplexity (GPTQ protocol) of ``model`` on ``texts``, as a JSON-ready dict."""
    from .calib import evaluation_ids
    from .evaluate import perplexity

    ids = evaluation_ids(texts, tokenizer)
    result = perplexity(
        model, ids, seqlen=seqlen, max_windows=max_windows, device=device, batch_size=batch_size
    )
    return result.to_dict()


def export_dest(out: Path, out_format: ExportFormat, *, overwrite: bool) -> Path | None:
    """Where ``--format gptq`` exports (a sibling of the native folder), checked before any work."""
    if out_format is not ExportFormat.gptq:
        return None
    from .checkpoint import check_output_dir
    from .export_gptq import default_dest

    dest = default_dest(out)
    check_output_dir(dest, overwrite=overwrite)
    return dest


def export_after_quantize(
    out: Path, dest: Path | None, *, overwrite: bool, note: Any
) -> dict[str, Any] | None:
    """The GPTQ export of a just-written output folder; its failure names the kept native output."""
    if dest is None:
        return None
    from .export_gptq import ExportError, export_gptq

    note(f"exporting GPTQ to {dest}")
    try:
        summary = export_gptq(out, dest, overwrite=overwrite)
    except ExportError as exc:
        raise ExportError(f"{exc} (the native output {out} was written: try cdq export on it)") from None
    return summary.to_dict()


def emit_quantize_result(
    out: Path, report: dict[str, Any], *, as_json: bool, exported: dict[str, Any] | None = None
) -> None:
    """What `cdq quantize` prints for a language model (see ``emit_outcome``)."""
    summary, run = report["summary"], report["run"]
    group = f"g{run['group_size']}" if run["group_size"] else ""
    headline = None
    if summary["layers"]:  # the error figures exist only when something was quantized
        headline = (
            f"quantized {summary['layers']} layers with {run['method']} w{run['bits']}{group} in "
            f"{summary['wall_seconds']:.1f}s: "
            f"mean relative error {summary['mean_relative_error']:.4g}, "
            f"error vs RTN (geometric mean) {summary['geomean_error_vs_rtn']:.3f}x"
        )
    evaluated = None
    if "evaluation" in report:
        ev = report["evaluation"]
        evaluated = (
            f"perplexity on {ev['data']}: full precision {ev['fp_ppl']:.4f}, "
            f"quantized [bold]{ev['ppl']:.4f}[/bold] ({ev['windows']} windows x {ev['seqlen']} tokens)"
        )
    extra, after = {}, []
    if exported is not None:
        extra["export"] = exported
        after = [f"wrote {exported['output']} (GPTQ {exported['checkpoint_format']})"]
        after.append(f"runs in: {exported['engines']}")
    emit_outcome(
        out, report, as_json=as_json, headline=headline, evaluated=evaluated, extra=extra, after=after
    )


def emit_outcome(
    out: Path,
    report: dict[str, Any],
    *,
    as_json: bool,
    headline: str | None,
    evaluated: str | None,
    extra: dict[str, Any] | None = None,
    after: list[str] | None = None,
) -> None:
    """A finished quantization on stdout: one JSON object, or a few human lines.

    ``headline`` describes the quantization (None: nothing was quantized, ``--bits 16``),
    ``evaluated`` the evaluation when there was one; ``extra`` goes into the JSON object before
    ``evaluation``, ``after`` are lines printed after ``wrote OUT``.
    """
    summary = report["summary"]
    if as_json:
        payload = {"output": str(out), "report": str(out / "report.json"), **summary, **(extra or {})}
        if "evaluation" in report:
            payload["evaluation"] = report["evaluation"]
        print(json.dumps(payload, allow_nan=True))
        return
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    if headline is not None:
        console.print(headline)
    else:
        console.print(f"no quantization (--bits 16): ran {report['run']['model']} block by block")
    if evaluated is not None:
        console.print(evaluated)
    console.print(f"wrote {out}")
    for line in after or []:
        console.print(line)


def parse_options(method: str, items: list[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` strings to solver options (ints, floats, bools, none), checked against the solver;
    they override ``base`` (a preset's ``options:``) key by key."""
    options: dict[str, Any] = dict(base or {})
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        options[key] = _parse_value(raw.strip())
    unknown = sorted(set(options) - set(method_options(method)))
    if unknown:
        raise UsageError(
            f"unknown option(s) {', '.join(unknown)} for method {method!r}; "
            f"it accepts: {', '.join(method_options(method)) or 'none'}"
        )
    return options


def _parse_value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def default_output(model: str, method: str, bits: int, group_size: int | None) -> str:
    base = Path(model.rstrip("/")).name
    base = base.removesuffix(".gguf") or "model"
    return f"{base}-{method}-w{bits}{f'g{group_size}' if group_size else ''}"


def resolve_device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    return str(device)


def model_dtype(choice: DType, device: torch.device) -> torch.dtype:
    if choice is DType.auto:
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, choice.value)


register_output_commands(app)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turn every failure into one stderr line and an exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        result = app(args=args, prog_name="cdq", standalone_mode=False, obj={"argv": args})
        code = result if isinstance(result, int) else 0
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        if _debug():
            raise
        _error("interrupted")
        return 130
    except typer.TyperException as exc:  # command-line usage errors (unknown option, bad value...)
        if type(exc).__name__ != "NoArgsIsHelpError":  # typer already printed the help
            _error(exc.format_message())
        return getattr(exc, "exit_code", 2)
    except ValueError as exc:
        if _debug():
            raise
        _error(str(exc))
        return 2
    except OSError as exc:
        if _debug():
            raise
        _error(str(exc))
        return 1
    except Exception as exc:  # an unexpected failure: still one line (CDQ_DEBUG=1 for the traceback)
        if _debug():
            raise
        _error(f"{type(exc).__name__}: {exc} (set CDQ_DEBUG=1 for the traceback)")
        return 1
    if code == 130:  # typer turns Ctrl-C inside a command into a silent exit code 130
        _error("interrupted")
    return code


def _silence_transformers() -> None:
    """Keep stderr clean for machine-readable runs (no "Loading weights" bars)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _debug() -> bool:
    return os.environ.get("CDQ_DEBUG", "") not in ("", "0")


def _error(message: str) -> None:
    text = " ".join(str(message).split()) or "unknown error"
    print(f"error: {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
