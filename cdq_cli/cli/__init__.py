"""The ``cdq`` command line: everything that parses options or prints.

Each command is its options plus one call into :mod:`cdq_cli.run` (or the storage layer); progress
goes to stderr (:mod:`.progress`), results to stdout (:mod:`.printing`). :func:`main` turns every
failure into ONE line ``error: ...`` on stderr and an exit code (2: bad input, 1: runtime
failure, 130: interrupted by Ctrl-C, 143: terminated by SIGTERM), never a traceback;
``CDQ_DEBUG=1`` re-raises instead. With ``--json`` the failure is also one JSON object on stdout,
``{"error": ..., "exit_code": ...}``. SIGTERM is handled like Ctrl-C: temporary files are removed,
finished blocks stay saved, and the line says how to ``--resume``; a process stuck in a wait that
Python cannot interrupt (a collective of several processes) is ended by a watchdog a few seconds
after the signal, with the same cleanup and the same line (:func:`_watchdog`).
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

from . import (
    errors,
    quiet_torch,  # noqa: F401 (first: before torch is imported)
)

# isort: split
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
    errors.begin(as_json="--json" in args)
    previous = _on_sigterm()
    unwatch = _watchdog()
    try:
        return _main(args)
    finally:
        if unwatch is not None:
            unwatch()
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
        code = 143 if exc.terminated else 130
        errors.error(str(exc), exc, code=code)
        return code
    except (typer.Abort, KeyboardInterrupt) as exc:  # outside a command (while parsing, say)
        if _debug():
            raise
        terminated = isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)
        code = 143 if terminated else 130
        errors.error("terminated" if terminated else "interrupted", code=code)
        return code
    except typer.TyperException as exc:  # command-line usage errors (unknown option, bad value...)
        code = getattr(exc, "exit_code", 2)
        if type(exc).__name__ != "NoArgsIsHelpError":  # typer already printed the help
            errors.error(exc.format_message(), code=code)
        return code
    except ValueError as exc:
        if _debug():
            raise
        errors.error(str(exc), exc, code=2)
        return 2
    except (OSError, MemoryError) as exc:  # the machine, not the input: a full disk, out of memory
        if _debug():
            raise
        errors.error(str(exc), exc, code=1)
        return 1
    except Exception as exc:  # an unexpected failure: still one line (CDQ_DEBUG=1 for the traceback)
        if _debug():
            raise
        errors.error(f"{type(exc).__name__}: {exc} (set CDQ_DEBUG=1 for the traceback)", exc, code=1)
        return 1
    if code == 130:  # typer turns Ctrl-C inside a command into a silent exit code 130
        errors.error("interrupted", code=code)
    return code


STOP_GRACE_ENV = "CDQ_STOP_GRACE_S"  # seconds the watchdog gives a stopped process to unwind
_GRACE = [float(os.environ.get(STOP_GRACE_ENV, "10"))]


def set_stop_grace(seconds: float) -> None:
    """How long the watchdog waits after Ctrl-C/SIGTERM before it ends the process itself."""
    _GRACE[0] = seconds


def _on_sigterm() -> Any:
    """Install the SIGTERM handler (main thread only); return the one it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(_signum: int, _frame: Any) -> None:
        raise Terminated

    return signal.signal(signal.SIGTERM, terminate)


def _watchdog() -> Callable[[], None] | None:
    """Make Ctrl-C and SIGTERM end the process even while it is stuck in a wait that Python cannot
    interrupt (a collective waiting on another process, a C library call): the signal handlers run
    only between Python bytecodes, so a thread is told of every signal (``signal.set_wakeup_fd``)
    and, when the process has not ended :func:`_GRACE` seconds later, removes its temporary
    folders, prints the one error line (with the resume hint) and ends it with 130/143. Returns
    the function that stops the watchdog (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    from ..cleanup import remove_all, resume_hint

    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:
        os.close(read)
        os.close(write)
        return None
    done = threading.Event()

    def watch() -> None:
        while True:
            try:
                got = os.read(read, 64)
            except OSError:
                return
            if done.is_set() or not got:
                return
            stops = [b for b in got if b in (signal.SIGINT, signal.SIGTERM)]
            if not stops or done.wait(_GRACE[0]):
                continue
            code = 143 if stops[-1] == signal.SIGTERM else 130
            remove_all()
            hint = resume_hint()
            errors.error("terminated" if code == 143 else "interrupted", code=code, hint=hint)
            os._exit(code)

    thread = threading.Thread(target=watch, name="cdq-watchdog", daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        signal.set_wakeup_fd(previous)
        os.write(write, b"\0")
        thread.join(1.0)
        os.close(write)
        if not thread.is_alive():
            os.close(read)

    return stop


def _debug() -> bool:
    return os.environ.get("CDQ_DEBUG", "") not in ("", "0")
