"""Terminal output for the CLI: progress (rich bar on a TTY, plain lines otherwise, or nothing).

Everything here writes to stderr, so stdout stays free for results (``--json`` prints exactly one
JSON object there).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..records import Event


class Reporter:
    """Receives pipeline events and status notes; renders them for a TTY, a log, or not at all."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.rich = not quiet and self.stream.isatty()
        self.console = Console(file=self.stream) if self.rich else None
        self._bar: Progress | None = None
        self._task = None
        self._began = time.perf_counter()

    def note(self, text: str) -> None:
        """A status line (loading, calibration, writing...)."""
        if self.quiet:
            return
        if self.console is not None:
            self.console.print(f"[dim]{text}[/dim]", highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        """A request that does less than it says: one line, even with --quiet (it is not progress)."""
        if self.console is not None:
            self.console.print(f"[yellow]warning:[/yellow] {text}", highlight=False, soft_wrap=True)
        else:
            print(f"warning: {text}", file=self.stream, flush=True)

    def __call__(self, event: Event) -> None:
        if event.kind == "warning":
            self.warn(event.text)
            return
        if self.quiet:
            return
        if event.kind == "note":
            self.note(event.text)
        elif self.rich:
            self._rich(event)
        else:
            self._plain(event)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _unit_total(self, event: Event) -> int:
        return event.layers or event.blocks

    def _rich(self, event: Event) -> None:
        if event.kind == "start":
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("capturing", total=self._unit_total(event), detail="")
            return
        if self._bar is None or self._task is None:
            return
        if event.kind == "block":
            self._bar.update(self._task, description=f"block {event.block + 1}/{event.blocks}")
            if not event.layers and event.block:
                self._bar.advance(self._task)
        elif event.kind == "layer" and event.row is not None:
            row = event.row
            ratio = f" ({row.error / row.rtn_error:.2f}x rtn)" if row.rtn_error else ""
            self._bar.update(
                self._task,
                completed=event.layers_done,
                detail=f"{_short(row.name)} err {row.error:.3g}{ratio}",
            )
        elif event.kind == "done":
            self._bar.update(self._task, completed=self._unit_total(event), detail="done")
            self.close()

    def _plain(self, event: Event) -> None:
        elapsed = time.perf_counter() - self._began
        if event.kind == "start":
            unit = f"{event.layers} layers" if event.layers else "no quantization"
            print(f"quantizing {event.blocks} blocks ({unit})", file=self.stream, flush=True)
        elif event.kind == "block":
            print(f"block {event.block + 1}/{event.blocks} [{elapsed:.1f}s]", file=self.stream, flush=True)
        elif event.kind == "layer" and event.row is not None:
            row = event.row
            ratio = f" rtn {row.rtn_error:.4g} ({row.error / row.rtn_error:.3f}x)" if row.rtn_error else ""
            print(
                f"  [{event.layers_done}/{event.layers}] {row.name} err {row.error:.4g}{ratio} "
                f"rel {row.relative_error:.3g} {row.seconds:.2f}s",
                file=self.stream,
                flush=True,
            )
        elif event.kind == "done":
            print(f"done in {elapsed:.1f}s", file=self.stream, flush=True)


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def quiet_libraries() -> None:
    """Keep stderr to cdq's own lines under --quiet/--json or when stderr is not a terminal: no
    "Loading weights" bars, no library logging below errors, no library warnings."""
    import logging as stdlib_logging
    import os
    import warnings

    import huggingface_hub
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = (
        "1"  # datasets is imported only if a named source is read
    )
    _silence_tqdm()  # lm-eval draws its own bars, asking for them explicitly
    for name in ("datasets", "accelerate"):
        stdlib_logging.getLogger(name).setLevel(stdlib_logging.ERROR)
    for library in ("transformers", "huggingface_hub", "datasets", "timm", "torch", "accelerate", "gguf"):
        warnings.filterwarnings("ignore", module=rf"{library}(\..*)?")


def _silence_tqdm() -> None:
    """Every tqdm bar off in this process, even those created with ``disable=False``."""
    from tqdm import std

    original = std.tqdm.__init__
    if getattr(original, "cdq_silenced", False):
        return

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    init.cdq_silenced = True  # type: ignore[attr-defined]
    std.tqdm.__init__ = init  # type: ignore[method-assign]
