"""``cdq quantize --nproc N``: run N processes on this machine through torch.distributed's own
launcher (what ``torchrun --standalone --nproc-per-node N -m cdq_cli quantize ...`` does).

Everything that can be checked is checked before a process starts (:func:`launch_run`): every
flag, the output, that the model is a causal LM, that each process gets a calibration batch, a CPU
core or a GPU of its own; the launcher then holds the output's lock for the workers. The workers
inherit this process's stdout, so rank 0's result appears as usual; the launcher's own logging is
kept off the terminal. A failed run ends with ONE line: a worker hands its error to the launcher
(:data:`~.errors.REPORT_ENV`) instead of printing it, and the launcher says rank 0's own error if it
had one, else the first other process's own error, else which process stopped first and how; the
resume hint only when a journal was saved and no process failed on bad input (exit 2). Ctrl-C and
SIGTERM end the run with 130 and 143 (the launcher stops the workers).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from . import errors

# A worker stuck in a collective gets this long after SIGTERM, then SIGKILL.
SHUTDOWN_SECONDS = int(os.environ.get("CDQ_SHUTDOWN_S", "30"))


def under_torchrun() -> bool:
    from ..parallel import env_world

    return env_world() > 1


def rank() -> int:
    from ..parallel import env_rank

    return env_rank()


def without_nproc(argv: list[str]) -> list[str]:
    """The command line with ``--nproc N`` / ``--nproc=N`` removed (what every worker runs)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        out.append(item)
    return out


def launch_run(request: Any, nproc: int, argv: list[str]) -> int:
    """Check ``request`` for ``nproc`` processes, lock its output, run the workers; the exit code."""
    from ..run import check_launch, output_locks
    from ..store.files import LOCK_OWNER_ENV

    plan = check_launch(request, nproc)
    with output_locks(plan):
        return launch(nproc, argv, output=plan.output, env={LOCK_OWNER_ENV: str(os.getpid())})


def launch(
    nproc: int, argv: list[str], *, output: Path | None = None, env: dict[str, str] | None = None
) -> int:
    """Run ``cdq`` with ``argv`` (``--nproc`` removed) in ``nproc`` processes; their exit code.
    ``output`` is the run's output (its journal decides the resume hint); ``env`` is added to the
    workers' environment."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from ..cleanup import set_resume_hint
    from . import set_stop_grace

    for name in list(logging.root.manager.loggerDict):  # each module's logger sets its own level
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    set_stop_grace(SHUTDOWN_SECONDS + 10.0)  # the launcher's own shutdown of the workers comes first
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"cdq-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        shutdown_timeout=SHUTDOWN_SECONDS,
    )
    reports = Path(tempfile.mkdtemp(prefix="cdq-launch-"))
    added = {**(env or {}), errors.REPORT_ENV: str(reports)}
    saved = {key: os.environ.get(key) for key in added}
    os.environ.update(added)
    # the watchdog's line (a launcher stuck past its grace) carries the journal's hint too
    set_resume_hint(lambda: _journal_hint(output))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "cdq_cli", *without_nproc(argv))
    except SignalException as exc:
        code = 143 if exc.sigval == signal.SIGTERM else 130
        errors.error("terminated" if code == 143 else "interrupted", code=code, hint=_journal_hint(output))
        return code
    except ChildFailedError as exc:
        return _failed(exc, _read_reports(reports), nproc, output)
    except KeyboardInterrupt as exc:  # outside torch's handlers: said by cdq's own (cdq_cli.cli.stoppable)
        exc.cdq_hint = _journal_hint(output)  # type: ignore[attr-defined]
        raise
    finally:
        set_resume_hint(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(reports, ignore_errors=True)
    return 0


def _failed(exc: Any, reports: dict[int, dict], nproc: int, output: Path | None) -> int:
    """The one line (and exit code) of a run whose workers failed."""
    own = [rank for rank in sorted(reports) if reports[rank].get("own")]
    bad_input = any(report.get("code") == 2 for report in reports.values()) or any(
        failure.exitcode == 2 for failure in exc.failures.values()
    )
    hint = None if bad_input else _journal_hint(output)
    if own:
        chosen = reports[0] if 0 in own else reports[own[0]]
        code = int(chosen.get("code", 1))
        line = str(chosen.get("line", "error: the run failed")).removeprefix("error: ")
        errors.error(line, code=code, hint=None if code == 2 or "--resume" in line else hint)
        return code
    local, failure = exc.get_first_failure()  # the process that went first: the cause
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    code = failure.exitcode if failure.exitcode > 0 else 1
    errors.error(f"the run stopped: process {local} of {nproc} ended with {how}", code=code, hint=hint)
    return code


def _read_reports(folder: Path) -> dict[int, dict]:
    found: dict[int, dict] = {}
    for path in folder.glob("rank-*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            found[int(record["rank"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _journal_hint(output: Path | None) -> str | None:
    if output is None:
        return None
    from ..store.journal import saved_hint

    return saved_hint(output)
