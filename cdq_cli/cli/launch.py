"""``cdq quantize --nproc N``: run N processes on this machine through torch.distributed's own
launcher (what ``torchrun --standalone --nproc-per-node N -m cdq_cli quantize ...`` does).

The workers inherit this process's stdout and stderr, so rank 0's progress and result appear as
usual; the launcher's own logging is kept off the terminal, and a failed worker ends the run with
one line naming it (the other workers are stopped by the launcher, as torchrun does).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

# A worker stuck in a collective gets this long after SIGTERM, then SIGKILL.
SHUTDOWN_SECONDS = int(os.environ.get("CDQ_SHUTDOWN_S", "30"))


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


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


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``cdq`` with ``argv`` (``--nproc`` removed) in ``nproc`` processes; their exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
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
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "cdq_cli", *without_nproc(argv))
    except ChildFailedError as exc:
        failed = sorted(exc.failures.items())
        codes = [failure.exitcode for _, failure in failed]
        if all(code == 2 for code in codes):  # bad input: the workers have said what, in one line
            return 2
        local, failure = exc.get_first_failure()  # the process that went first: the cause
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(
            f"error: the run stopped: process {local} of {nproc} ended with {how}; blocks it finished "
            "are saved: run the same command with --resume to continue from the last one",
            file=sys.stderr,
            flush=True,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
