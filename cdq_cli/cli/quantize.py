"""``cdq quantize``: its options, and one call to :func:`cdq_cli.run.quantize`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from ..run import QuantizeRequest, UsageError
from ..run import quantize as run_quantize
from ..run.plan import DType, GGUFType, Method, Offload, OutputFormat, SigmaDType, Transform
from ..solvers import DEFAULT_METHOD
from ..store.exports import FORMATS
from .launch import launch_run, rank, under_torchrun
from .presets import apply_config, provenance, solver_options
from .printing import show_quantized
from .progress import Reporter, quiet_libraries


def quantize(
    ctx: typer.Context,
    model: str = typer.Argument(
        ...,
        metavar="MODEL",
        help="A causal LM (Hugging Face folder, .gguf file, hub id) or a timm image classifier "
        "(timm/NAME, NAME, or any MODEL with --checkpoint).",
    ),
    method: Method = typer.Option(
        Method(DEFAULT_METHOD),
        help="Layer solver; `cdq methods` lists each with its summary and -o options.",
    ),
    bits: int = typer.Option(4, help="Weight bits: 2, 3, 4, 8; 16 = no quantization (plumbing check)."),
    group_size: int | None = typer.Option(None, help="Columns per scale group (default: one per row)."),
    sym: bool = typer.Option(False, "--sym/--asym", help="Symmetric grid."),
    per_layer: bool = typer.Option(False, "--per-layer", help="One scale for the whole layer (COMQ)."),
    skip: list[str] = typer.Option(
        [],
        "--skip",
        metavar="PATTERN",
        help="Keep layers whose full name matches this regex (re.search) in full precision (repeatable).",
    ),
    layer: list[str] = typer.Option(
        [],
        "--layer",
        metavar="PATTERN=SPEC",
        help="Give matching layers their own grid, SPEC = BITS[gGROUP|ch][sym|asym], e.g. 8, 4g128, "
        "3g64sym (repeatable; the last match wins; docs/cli.md).",
    ),
    calib: str = typer.Option(
        "c4",
        metavar="SOURCE",
        help="Calibration data: c4, wikitext2, ptb, or a local .txt/.jsonl file or folder of them; "
        "for vision models a folder of images (class subfolders or flat), imagenet-sample or hf:NAME.",
    ),
    nsamples: int = typer.Option(128, help="Calibration windows (vision: images)."),
    seqlen: int | None = typer.Option(None, help="Tokens per window (default: min(2048, model context))."),
    seed: int = typer.Option(0, help="Calibration sampling seed."),
    output: Path | None = typer.Option(
        None,
        metavar="FOLDER",
        help="Output folder (default: <model>-<method>-w<bits>[g<G>]).",
    ),
    device: str | None = typer.Option(
        None, metavar="DEVICE", help="cpu, cuda, cuda:N (default: cuda if available)."
    ),
    dtype: DType = typer.Option(
        DType.auto,
        help="Compute dtype of the blocks (auto: float32 on a CPU, the checkpoint's on a GPU that runs it "
        "natively); weights stay in the checkpoint's dtype at rest and in the output.",
    ),
    sigma_dtype: SigmaDType = typer.Option(SigmaDType.float32, help="Σ accumulation dtype."),
    batch_size: int = typer.Option(8, help="Calibration windows per forward."),
    fp_inputs: bool = typer.Option(
        False, "--fp-inputs", help="Feed each block full-precision inputs (COMQ)."
    ),
    true_sequential: bool = typer.Option(True, help="Collect Σ per sequential group inside a block."),
    transform: Transform = typer.Option(
        Transform.none,
        help="Equivalence transform before quantizing, exact in full precision: hadamard (rotate the "
        "residual stream and each head's values, merged), awq (activation-aware channel scales).",
    ),
    option: list[str] = typer.Option(
        [],
        "--option",
        "-o",
        metavar="KEY=VALUE",
        help="Solver option (repeatable); `cdq methods` lists every method's keys, types and ranges.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing output folder that cdq wrote (nothing else)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (summary + output) on stdout."),
    eval_data: str | None = typer.Option(
        None,
        "--eval",
        metavar="SOURCE",
        help="Also evaluate before and after: perplexity on this text, or top-1 on labelled images.",
    ),
    eval_max_windows: int | None = typer.Option(None, help="Score at most this many --eval windows."),
    eval_seqlen: int | None = typer.Option(None, help="--eval window length (default: min(2048, context))."),
    checkpoint: str | None = typer.Option(
        None, metavar="FILE", help="Vision: local timm weights (.pth/.safetensors)."
    ),
    model_arg: list[str] = typer.Option(
        [], "--model-arg", metavar="KEY=VALUE", help="Vision: timm create_model argument (repeatable)."
    ),
    quantize_embed: bool = typer.Option(False, "--quantize-embed", help="Vision: quantize the stem too."),
    quantize_head: bool = typer.Option(False, "--quantize-head", help="Vision: quantize the classifier too."),
    augment: bool = typer.Option(False, "--augment", help="Vision: calibrate on augmented images (COMQ)."),
    config: Path | None = typer.Option(
        None, "--config", is_eager=True, callback=apply_config, help="YAML preset; flags given here win."
    ),
    out_format: OutputFormat = typer.Option(
        OutputFormat("native"),
        "--format",
        help=f"{' / '.join(FORMATS)}: also export to "
        f"{' / '.join('<output>' + fmt.suffix for fmt in FORMATS.values())} (docs/results.md).",
    ),
    gguf_type: GGUFType | None = typer.Option(  # type: ignore[valid-type]
        None,
        "--type",
        metavar="T",
        help="With --format gguf: Q4_K_M, Q5_K_M, Q3_K_M, Q2_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q6_K "
        "(llama.cpp's per-tensor rules) or Q3_K, Q4_K, Q5_K (every tensor); --layer PATTERN=TYPE overrides.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last saved block."),
    nproc: int = typer.Option(
        1,
        "--nproc",
        metavar="N",
        help="Run N processes on this machine (torch.distributed; torchrun for more).",
    ),
    max_shard_size: str = typer.Option(
        "5GB", metavar="SIZE", help="Largest output shard (e.g. 5GB, 500MB); more make an indexed set."
    ),
    offload_activations: Offload = typer.Option(
        Offload.auto,
        help="Keep calibration activations on the CPU (always), the device (never) or as fits (auto).",
    ),
) -> None:
    """Quantize a causal LM or a timm image classifier block by block; write a packed checkpoint
    and report.json (docs: README.md, docs/vision.md, docs/results.md)."""
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    request = QuantizeRequest(
        target=model, method=method.value, bits=bits, group_size=group_size, sym=sym, per_layer=per_layer,
        skip=skip, layer=layer, options={**solver_options(ctx), **parse_assignments(option)}, calib=calib,
        nsamples=nsamples, seqlen=seqlen, seed=seed, output=output, device=device, dtype=dtype.value,
        sigma_dtype=sigma_dtype.value, batch_size=batch_size, fp_inputs=fp_inputs,
        true_sequential=true_sequential, transform=transform.value, overwrite=overwrite, resume=resume,
        eval_data=eval_data,
        eval_max_windows=eval_max_windows, eval_seqlen=eval_seqlen, export_format=out_format.value,
        gguf_type=gguf_type.value if gguf_type is not None else None,
        max_shard_size=max_shard_size, offload_activations=offload_activations.value,
        checkpoint=checkpoint, model_args=model_arg, quantize_embed=quantize_embed,
        quantize_head=quantize_head, augment=augment,
        command=shlex.join(["cdq", *(ctx.obj or {}).get("argv", sys.argv[1:])]), config=provenance(ctx),
    )  # fmt: skip
    if nproc > 1 and not under_torchrun():
        raise typer.Exit(launch_run(request, nproc, (ctx.obj or {}).get("argv", sys.argv[1:])))
    follower = rank() > 0  # under torchrun, the leader (rank 0) alone reports
    if quiet or as_json or follower or not sys.stderr.isatty():
        quiet_libraries()
    reporter = Reporter(quiet=quiet or follower)
    try:
        finished = run_quantize(request, reporter)
    finally:
        reporter.close()
    if not follower:
        show_quantized(finished, as_json=as_json)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``-o KEY=VALUE`` strings as {key: raw value}; the solver registry types and checks them."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        options[key] = raw.strip()
    return options
