"""The ``cdq`` command line: everything that parses options or prints.

Each command is its options plus one call into :mod:`cdq_cli.run` (or the storage layer); progress
goes to stderr (:mod:`.progress`), results to stdout (:mod:`.printing`). :func:`main` turns every
failure into ONE line ``error: ...`` on stderr and an exit code (2: bad input, 1: runtime
failure, 130: interrupted), never a traceback; ``CDQ_DEBUG=1`` re-raises instead.
"""

from __future__ import annotations

import os
import sys

import typer

from .evaluate import evaluate
from .folders import compare, export, report
from .quantize import quantize

app = typer.Typer(
    name="cdq",
    help="Post-training weight quantization by coordinate descent (QuantEase, COMQ; RTN and GPTQ baselines).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command()(quantize)
app.command("eval")(evaluate)
app.command("export")(export)
app.command("report")(report)
app.command("compare")(compare)


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


def _debug() -> bool:
    return os.environ.get("CDQ_DEBUG", "") not in ("", "0")


def _error(message: str) -> None:
    text = " ".join(str(message).split()) or "unknown error"
    print(f"error: {text}", file=sys.stderr, flush=True)
