"""The ``cdq`` command line: everything that parses options or prints.

Each command is its options plus one call into :mod:`cdq_cli.run` (or the storage layer); progress
goes to stderr (:mod:`.progress`), results to stdout (:mod:`.printing`). :func:`main` turns every
failure into ONE line ``error: ...`` on stderr and an exit code (2: bad input, 1: runtime
failure, 130: interrupted by Ctrl-C, 143: terminated by SIGTERM), never a traceback;
``CDQ_DEBUG=1`` re-raises instead. SIGTERM is handled like Ctrl-C: temporary files are removed,
finished blocks stay saved, and the line says how to ``--resume``.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import typer

from ..memory import tune_allocator
from .evaluate import evaluate
from .folders import compare, export, report
from .methods import methods
from .quantize import quantize

app = typer.Typer(
    name="cdq",
    help="Post-training weight quantization by coordinate descent (QuantEase, COMQ; RTN and GPTQ baselines).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: wraps at any width instead of cutting names off
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds (and cleans up) like Ctrl-C."""


class Stopped(Exception):
    """Ctrl-C or SIGTERM inside a command, carried past typer (which would turn it into a silent
    exit code) to :func:`main`, with the run's resume hint."""

    def __init__(self, terminated: bool, hint: str | None) -> None:
        super().__init__("terminated" if terminated else "interrupted")
        self.terminated = terminated
        self.cdq_hint = hint


def stoppable(command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise Stopped(isinstance(exc, Terminated), getattr(exc, "cdq_hint", None)) from None

    return run


app.command()(stoppable(quantize))
app.command("eval")(stoppable(evaluate))
app.command("export")(stoppable(export))
app.command("report")(stoppable(report))
app.command("compare")(stoppable(compare))
app.command("methods")(stoppable(methods))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turn every failure into one stderr line and an exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    tune_allocator()  # large tensors go back to the system when freed (cdq_cli.memory)
    previous = _on_sigterm()
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: list[str]) -> int:
    try:
        result = app(args=args, prog_name="cdq", standalone_mode=False, obj={"argv": args})
        code = result if isinstance(result, int) else 0
    except typer.Exit as exc:
        code = exc.exit_code
    except Stopped as exc:
        if _debug():
            raise
        _error(str(exc), exc)
        return 143 if exc.terminated else 130
    except (typer.Abort, KeyboardInterrupt) as exc:  # outside a command (while parsing, say)
        if _debug():
            raise
        terminated = isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)
        _error("terminated" if terminated else "interrupted")
        return 143 if terminated else 130
    except typer.TyperException as exc:  # command-line usage errors (unknown option, bad value...)
        if type(exc).__name__ != "NoArgsIsHelpError":  # typer already printed the help
            _error(exc.format_message())
        return getattr(exc, "exit_code", 2)
    except ValueError as exc:
        if _debug():
            raise
        _error(str(exc), exc)
        return 2
    except (OSError, MemoryError) as exc:  # the machine, not the input: a full disk, out of memory
        if _debug():
            raise
        _error(str(exc) or type(exc).__name__, exc)
        return 1
    except Exception as exc:  # an unexpected failure: still one line (CDQ_DEBUG=1 for the traceback)
        if _debug():
            raise
        _error(f"{type(exc).__name__}: {exc} (set CDQ_DEBUG=1 for the traceback)")
        return 1
    if code == 130:  # typer turns Ctrl-C inside a command into a silent exit code 130
        _error("interrupted")
    return code


def _on_sigterm() -> Any:
    """Install the SIGTERM handler (main thread only); return the one it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(_signum: int, _frame: Any) -> None:
        raise Terminated

    return signal.signal(signal.SIGTERM, terminate)


def _debug() -> bool:
    return os.environ.get("CDQ_DEBUG", "") not in ("", "0")


def _error(message: str, exc: BaseException | None = None) -> None:
    """``error: MESSAGE`` on one line, with how to resume when the run left a journal."""
    text = " ".join(str(message).split()) or "unknown error"
    if int(os.environ.get("RANK", "0")) > 0:  # a torchrun worker other than the leader
        text = f"rank {os.environ['RANK']}: {text}"
    hint = getattr(exc, "cdq_hint", None)
    if hint:
        text += f"; {hint}"
    print(f"error: {text}", file=sys.stderr, flush=True)
