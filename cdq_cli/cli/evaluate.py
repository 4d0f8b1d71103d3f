"""``cdq eval``: its options, and one call to :func:`cdq_cli.run.evaluate`."""

from __future__ import annotations

import sys

import typer

from ..run import EvalRequest
from ..run import evaluate as run_evaluate
from ..run.plan import DType, Offload
from .printing import show_evaluation
from .progress import quiet_libraries


def evaluate(
    target: str = typer.Argument(
        ...,
        metavar="TARGET",
        help="A model (folder, .gguf, hub id, timm/NAME), a cdq output folder, or a GPTQ or "
        "compressed-tensors folder (cdq's exports included).",
    ),
    data: str | None = typer.Option(
        None,
        metavar="SOURCE",
        help="Text: wikitext2, ptb, c4, or a local .txt/.jsonl file or folder; for vision models a "
        "labelled image folder or imagenet-sample.",
    ),
    tasks: str | None = typer.Option(
        None,
        metavar="LIST",
        help="Zero-shot accuracy through lm-evaluation-harness instead: comma-separated task names "
        "(hellaswag,arc_easy), task YAML files or folders of them (needs the zeroshot extra).",
    ),
    limit: int | None = typer.Option(None, help="--tasks: score at most this many items per task."),
    trust_task_code: bool = typer.Option(
        False,
        "--trust-task-code",
        help="--tasks: let local task files run code of their own (!function tags, metrics loaded "
        "through HF evaluate, unsandboxed templates). Without it such a task is refused.",
    ),
    seqlen: int | None = typer.Option(None, help="Window length (default: min(2048, model context))."),
    max_windows: int | None = typer.Option(None, help="Score at most this many windows."),
    device: str | None = typer.Option(
        None, metavar="DEVICE", help="cpu, cuda, cuda:N (default: cuda if available)."
    ),
    dtype: DType = typer.Option(
        DType.auto,
        help="Compute dtype of the blocks (auto: float32 on a CPU, the stored dtype on a GPU that runs it "
        "natively).",
    ),
    batch_size: int = typer.Option(8, help="Windows per forward (does not change the result)."),
    offload_activations: Offload = typer.Option(
        Offload.auto, help="Keep activations on the CPU (always), the device (never) or as fits (auto)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    checkpoint: str | None = typer.Option(
        None, metavar="FILE", help="Vision: local timm weights (.pth/.safetensors)."
    ),
    model_arg: list[str] = typer.Option(
        [], "--model-arg", metavar="KEY=VALUE", help="Vision: timm create_model argument (repeatable)."
    ),
) -> None:
    """Perplexity (GPTQ protocol) of a language model, top-1/top-5 of an image classifier, or
    zero-shot accuracy on lm-eval tasks (--tasks), for a model or a cdq output folder."""
    if as_json or not sys.stderr.isatty():
        quiet_libraries()
    request = EvalRequest(
        target=target, data=data, seqlen=seqlen, max_windows=max_windows, device=device,
        dtype=dtype.value, batch_size=batch_size, offload_activations=offload_activations.value,
        checkpoint=checkpoint, model_args=model_arg, tasks=tasks, limit=limit,
        trust_task_code=trust_task_code,
    )  # fmt: skip
    show_evaluation(run_evaluate(request), as_json=as_json)
