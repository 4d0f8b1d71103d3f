"""What the commands print on stdout: a finished quantization and an evaluation, as one JSON
object (``--json``) or a few human lines. Progress and errors go to stderr elsewhere."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from ..run import Finished
from ..store.names import REPORT


def show_quantized(finished: Finished, *, as_json: bool) -> None:
    """A finished ``cdq quantize``."""
    out, report = finished.output, finished.report
    summary = report["summary"]
    if as_json:
        payload: dict[str, Any] = {"output": str(out), "report": str(out / REPORT), **summary}
        if finished.export is not None:
            payload["export"] = finished.export
        if "evaluation" in report:
            payload["evaluation"] = report["evaluation"]
        if report.get("warnings"):
            payload["warnings"] = report["warnings"]
        print_json(payload)
        return
    console = Console(highlight=False, soft_wrap=True)
    headline = _headline(finished) if summary["layers"] else None  # error figures exist only then
    if headline is not None:
        console.print(headline)
    else:
        console.print(f"no quantization (--bits 16): ran {report['run']['model']} block by block")
    if "evaluation" in report:
        console.print(_evaluated(finished))
    console.print(f"wrote {out}")
    if finished.export is not None:
        export = finished.export
        console.print(f"wrote {export['output']}: {export['headline']}")
        console.print(f"runs in: {export['engines']}")


def show_evaluation(result: dict[str, Any], *, as_json: bool) -> None:
    """A finished ``cdq eval``: perplexity, top-1/top-5 with agreement, or per-task accuracy."""
    if as_json:
        print_json(result)
        return
    console = Console(highlight=False, soft_wrap=True)
    if "tasks" in result:
        for task in result["tasks"]:
            shown = ", ".join(
                f"{name} [bold]{m['value']:.4f}[/bold]"
                + (f" ± {m['stderr']:.4f}" if m["stderr"] is not None else "")
                for name, m in task["metrics"].items()
                if m["value"] is not None
            )
            console.print(f"{result['target']} on {task['task']}: {shown} ({task['samples']} items)")
        console.print(f"{result['protocol']}; model {result['model']}")
        return
    target, data = result["target"], result["data"]
    if "ppl" in result:
        console.print(
            f"{target} on {data}: perplexity [bold]{result['ppl']:.4f}[/bold] "
            f"({result['windows']} windows x {result['seqlen']} tokens, {result['protocol']})"
        )
        return
    agree = f", agreement with FP {result['agreement']:.2%}" if result["agreement"] is not None else ""
    note = result.get("note")
    console.print(
        f"{target} on {data}: top-1 [bold]{result['top1']:.2%}[/bold], top-{result['k']} {result['top5']:.2%}"
        f"{agree} ({result['images']} images)" + (f"; {note}" if note else "")
    )


def print_json(payload: dict[str, Any]) -> None:
    """One strict JSON object on stdout: NaN or Infinity are never printed (an error instead)."""
    try:
        text = json.dumps(payload, allow_nan=False)
    except ValueError:
        raise ValueError("a result is NaN or infinite; refusing to print it as JSON") from None
    print(text)


def _headline(finished: Finished) -> str:
    summary, run = finished.report["summary"], finished.report["run"]
    errors = (
        f"mean relative error {summary['mean_relative_error']:.4g}, "
        f"error vs RTN (geometric mean) {summary['geomean_error_vs_rtn']:.3f}x"
    )
    group = f"g{run['group_size']}" if run["group_size"] else ""
    grid = f"GGUF {run['gguf_type']}" if run.get("gguf_type") else f"w{run['bits']}{group}"
    return (
        f"quantized {summary['layers']} layers of {run['model']} ({run['family']}) with {run['method']} "
        f"{grid} in {summary['wall_seconds']:.1f}s: {errors}"
    )


def _evaluated(finished: Finished) -> str:
    """The before/after line of ``--eval``: by the metric the evaluation holds (perplexity for a
    language model, top-1 with agreement for a classifier)."""
    ev = finished.report["evaluation"]
    if "ppl" in ev:
        return (
            f"perplexity on {ev['data']}: full precision {ev['fp']['ppl']:.4f}, "
            f"quantized [bold]{ev['ppl']:.4f}[/bold] ({ev['windows']} windows x {ev['seqlen']} tokens)"
        )
    return (
        f"top-1 on {ev['data']}: [bold]{ev['top1']:.2%}[/bold] (FP {ev['fp']['top1']:.2%}), "
        f"agreement with FP {ev['agreement']:.2%} ({ev['images']} images)"
    )
