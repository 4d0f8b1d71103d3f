"""What a process must remove, or say, on every way out, even one that cannot unwind.

Temporary folders a run makes outside its output (the converted weights of a lazily opened
mixture-of-experts model) are named ``PREFIX-HOST-PID-XXXXXXXX`` in the temporary directory
(``$TMPDIR``), so that:

* the process removes its own when it ends normally, on an error, on Ctrl-C or SIGTERM
  (:func:`release`, and :func:`remove_all` for an exit that cannot unwind);
* a process killed outright (SIGKILL, a crash) leaves its folders to the next run on the same host,
  which removes those of dead processes when it makes its own (:func:`sweep_stale`). A folder is
  removed only when its name is exactly this pattern, it belongs to this user, and the process it
  names no longer exists.

Work folders beside an output are tracked (:func:`track`) while they exist, and the run's resume hint is
registered (:func:`set_resume_hint`), so that an exit forced while the process is stuck in a wait
(the command line's watchdog, after SIGTERM or Ctrl-C) removes them and still says how to resume.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

_LIVE: set[Path] = set()
_HINT: list[Callable[[], str | None]] = []


def scratch_folder(prefix: str, parent: Path | str | None = None) -> Path:
    """A new temporary folder ``PREFIX-HOST-PID-XXXXXXXX`` in ``parent`` (default: ``$TMPDIR``),
    tracked until :func:`release`; stale ones of dead processes are removed first."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep_stale(prefix, parent)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-{_host()}-{os.getpid()}-", dir=parent))
    _LIVE.add(path)
    return path


def release(path: Path | str | None) -> None:
    """Remove a folder made by :func:`scratch_folder` (any other path: only removed)."""
    if path is None:
        return
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    _LIVE.discard(path)


def track(path: Path | str) -> None:
    """Remove ``path`` on an exit that cannot unwind (until :func:`untrack`)."""
    _LIVE.add(Path(path))


def untrack(path: Path | str) -> None:
    _LIVE.discard(Path(path))


def set_resume_hint(hint: Callable[[], str | None] | None) -> None:
    """What to add to the error line of a stopped run (None: nothing)."""
    _HINT[:] = [hint] if hint is not None else []


def resume_hint() -> str | None:
    return _HINT[0]() if _HINT else None


def remove_all() -> None:
    """Remove every folder this process still holds (an exit that cannot unwind)."""
    for path in list(_LIVE):
        release(path)


def sweep_stale(prefix: str, parent: Path | str) -> list[Path]:
    """Remove the folders ``PREFIX-HOST-PID-*`` in ``parent`` of this host and user whose process
    is gone; return them."""
    pattern = re.compile(rf"{re.escape(prefix)}-{re.escape(_host())}-(\d+)-[A-Za-z0-9_]+")
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if not found or int(found.group(1)) == os.getpid() or _alive(int(found.group(1))):
            continue
        try:
            if not entry.is_dir() or entry.is_symlink() or entry.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
