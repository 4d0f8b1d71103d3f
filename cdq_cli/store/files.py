"""Writing files so that nothing is lost: atomic folders and JSON files, the manifest that marks a
folder as cdq's, and the rules for what ``--overwrite`` may replace.

Every folder cdq writes is built under a temporary name, fsynced, then renamed into place, so an
interrupted run never leaves a folder that looks complete; its manifest (:data:`MANIFEST`) lists
every file cdq put there, and only such a folder, holding nothing else, is ever replaced.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .names import MANIFEST


class OutputExistsError(ValueError):
    """The output folder exists and is not empty (pass --overwrite)."""


class WriteError(OSError):
    """Writing the output failed (full disk, permissions); ``str()`` is one line for the CLI."""

    def __str__(self) -> str:
        return str(self.strerror)


def check_output_dir(dest: Path, *, overwrite: bool, protect: Sequence[Path | str] = ()) -> None:
    """Refuse, before any work, to write where something could be lost.

    A non-empty existing ``dest`` is replaced only with ``overwrite`` and only when cdq wrote it:
    its manifest (:data:`~cdq_cli.store.names.MANIFEST`) is there and every entry of the folder
    is listed in it. Never, even with ``overwrite``: a file, the current folder or a folder
    holding it, and anything in ``protect`` (the source model) or a folder holding it.
    """
    dest = Path(dest).absolute()
    if dest.exists() and not dest.is_dir():
        raise OutputExistsError(f"output path {dest} exists and is not a folder")
    real = dest.resolve()
    here = Path.cwd().resolve()
    if real == here or real in here.parents:
        raise OutputExistsError(f"refusing to write to {dest}: it is the current folder or holds it")
    for path in protect:
        source = Path(path).expanduser().absolute().resolve()
        if real == source or real in source.parents:
            raise OutputExistsError(
                f"refusing to write to {dest}: it is {path}, which cdq reads, or holds it"
            )
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(
            f"output folder {dest} exists and is not empty (use --overwrite to replace a folder cdq wrote)"
        )
    written = read_manifest(dest)
    if written is None:
        raise OutputExistsError(
            f"refusing to replace {dest}: cdq did not write it (no {MANIFEST}); remove it yourself or "
            "choose another --output"
        )
    foreign = sorted(entry.name for entry in dest.iterdir() if entry.name not in written or entry.is_dir())
    if foreign:
        raise OutputExistsError(
            f"refusing to replace {dest}: it holds {foreign[0]!r}, which cdq did not write"
            + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
        )


def read_manifest(folder: Path) -> set[str] | None:
    """The names cdq wrote in ``folder`` (its manifest, itself included), or None without one."""
    path = Path(folder) / MANIFEST
    try:
        names = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return {*names, MANIFEST}


def add_to_manifest(folder: Path, name: str) -> None:
    """Record that cdq wrote ``name`` into ``folder`` (a folder without a manifest is left alone)."""
    written = read_manifest(folder)
    if written is not None and name not in written:
        write_json_atomic(Path(folder) / MANIFEST, {"files": sorted((written - {MANIFEST}) | {name})})


def _write_manifest(folder: Path) -> None:
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_file())
    (folder / MANIFEST).write_text(json.dumps({"files": names}, indent=1) + "\n", encoding="utf-8")


@contextmanager
def atomic_folder(
    dest: Path, *, overwrite: bool = False, protect: Sequence[Path | str] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success write its manifest, fsync it and rename it to
    ``dest`` (which :func:`check_output_dir` allows).

    Any exception (KeyboardInterrupt included) removes the temporary folder and leaves ``dest``
    as it was. A full disk becomes a one-line ``OSError``.
    """
    dest = Path(dest).absolute()
    check_output_dir(dest, overwrite=overwrite, protect=protect)
    tmp = make_work_folder(dest)
    try:
        yield tmp
        publish(tmp, dest, overwrite=overwrite, protect=protect)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(exc, dest) from exc
        raise


def make_work_folder(dest: Path) -> Path:
    """A new hidden sibling of ``dest`` to build it in (``.NAME.tmp-XXXX``)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as exc:
        raise write_error(exc, dest) from exc


def publish(work: Path, dest: Path, *, overwrite: bool, protect: Sequence[Path | str] = ()) -> None:
    """Put the finished folder ``work`` in place as ``dest``: write its manifest, fsync it, check
    again that ``dest`` may be replaced, rename (the old ``dest`` is set aside, then removed)."""
    dest = Path(dest).absolute()
    try:
        _write_manifest(work)
        _fsync_tree(work, chmod=True)
        check_output_dir(dest, overwrite=overwrite, protect=protect)
        _replace(work, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise write_error(exc, dest) from exc


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON next to ``path`` then rename over it (readers never see a partial file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(exc, path) from exc
        raise


def _replace(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` (allowed by the caller) is set aside first."""
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rmdir(old)
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path, *, chmod: bool = False) -> None:
    """fsync every file and folder under ``root``; ``chmod`` gives them the usual umask modes
    (mkdtemp and some writers create private 0700/0600 entries)."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _dirs, files in os.walk(root):
        if chmod:
            os.chmod(folder, 0o777 & ~umask)
        for name in files:
            path = os.path.join(folder, name)
            if chmod:
                os.chmod(path, 0o666 & ~umask)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def write_error(exc: OSError, where: Path) -> WriteError:
    """``exc`` as a one-line :class:`WriteError` naming ``where`` (a full disk said plainly)."""
    if isinstance(exc, WriteError):
        return exc
    if exc.errno == errno.ENOSPC:
        return WriteError(errno.ENOSPC, f"no space left on device while writing {where}")
    reason = exc.strerror or str(exc)
    return WriteError(
        exc.errno, f"cannot write {where}: {reason}" + (f" ({exc.filename})" if exc.filename else "")
    )
