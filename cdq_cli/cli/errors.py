"""How a command's failure is said: ONE line ``error: ...`` on stderr (and, with ``--json``, one
object ``{"error": ..., "exit_code": ...}`` on stdout), said once per process, whoever notices
first (the command, or the watchdog of a process stuck after Ctrl-C). A worker of
``cdq quantize --nproc`` hands its line to the launcher instead (:data:`REPORT_ENV`), which says
one line for the whole run (:mod:`.launch`).
"""

from __future__ import annotations

import json
import os
import sys
import threading

REPORT_ENV = "CDQ_LAUNCH_REPORTS"  # --nproc workers: the folder where each writes its failure

_STATE: dict[str, bool] = {"json": False, "reported": False}
_REPORTING = threading.Lock()


def begin(*, as_json: bool) -> None:
    """A new command: whether it prints JSON, and nothing said yet."""
    _STATE.update(json=as_json, reported=False)


def error(message: str, exc: BaseException | None = None, *, code: int, hint: str | None = None) -> None:
    """``error: MESSAGE`` on one line, with how to resume when the run left a journal (the
    exception's ``cdq_hint``, or ``hint``); nothing when this process has said its failure."""
    text = " ".join(str(message).split()) or "unknown error"
    if _rank() > 0:
        text = f"rank {_rank()}: {text}"  # a torchrun worker other than the leader
    hint = hint or getattr(exc, "cdq_hint", None)
    if hint and hint not in text:
        text += f"; {hint}"
    with _REPORTING:
        if _STATE["reported"]:
            return
        _STATE["reported"] = True
        if os.environ.get(REPORT_ENV) and _world() > 1:
            _hand_to_launcher(text, exc, code)
            return
        sys.stdout.flush()
        print(f"error: {text}", file=sys.stderr, flush=True)
        if _STATE["json"]:
            print(json.dumps({"error": text, "exit_code": code}), flush=True)


def _hand_to_launcher(text: str, exc: BaseException | None, code: int) -> None:
    """A ``--nproc`` worker's failure, written for the launcher, with whether it is this worker's
    own (not a consequence of another process stopping, nor of the launcher's stop signal)."""
    from ..parallel import PeerLost

    own = not isinstance(exc, (PeerLost, KeyboardInterrupt)) and code not in (130, 143)
    record = {"rank": _rank(), "code": code, "line": f"error: {text}", "own": own}
    path = os.path.join(os.environ[REPORT_ENV], f"rank-{_rank()}.json")
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(record, fh)
        os.replace(path + ".tmp", path)
    except OSError:  # the launcher's folder is gone: say it here
        print(f"error: {text}", file=sys.stderr, flush=True)


def _world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0) if _world() > 1 else 0
    except ValueError:
        return 0
