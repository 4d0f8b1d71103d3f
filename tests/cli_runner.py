"""The one way tests run the ``cdq`` command line in-process: ``main`` with string arguments, and
what it printed."""

from __future__ import annotations

import pytest

from cdq_cli.cli import main


def cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``cdq ARGS...`` run by :func:`cdq_cli.cli.main`: only what
    the command printed (whatever a fixture printed before it, such as transformers' "Writing model
    shards" bar from ``save_pretrained``, is drained first)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
