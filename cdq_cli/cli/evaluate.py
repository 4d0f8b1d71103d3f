"""``cdq eval``: its options, and one call to :func:`cdq_cli.run.evaluate`."""

from __future__ import annotations

import typer

from ..run import EvalRequest
from ..run import evaluate as run_evaluate
from .choices import DType
from .printing import show_evaluation
from .progress import quiet_libraries


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
    if as_json:
        quiet_libraries()
    request = EvalRequest(
        target=target, data=data, seqlen=seqlen, max_windows=max_windows, device=device,
        dtype=dtype.value, batch_size=batch_size, checkpoint=checkpoint, model_args=model_arg,
    )  # fmt: skip
    show_evaluation(run_evaluate(request), as_json=as_json)
