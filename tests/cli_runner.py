"""The one way tests run the ``cdq`` command line in-process: ``main`` with string arguments, and
what it printed."""

from __future__ import annotations

import pytest

from cdq_cli.cli import main


def cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``cdq ARGS...`` run by :func:`cdq_cli.cli.main`."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
