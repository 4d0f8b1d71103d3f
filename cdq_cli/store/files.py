"""Writing files so that nothing is lost: atomic folders and JSON files, the manifest that marks a
folder as cdq's, the rules for what ``--overwrite`` may replace, and the lock that lets one run at a
time write an output.

Every folder cdq writes is built under a temporary name, fsynced, then renamed into place, so an
interrupted run never leaves a folder that looks complete; its manifest (:data:`MANIFEST`) lists
every file cdq put there and what the folder is (a quantized output or an export), and only such a
folder, holding nothing else, is ever replaced, and only by a folder of its own kind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..cleanup import track, untrack
from .names import EXPORT, MANIFEST, MARKER, QUANTIZED, lock_file

# The longest name cdq derives from an output's (``.NAME.tmp-XXXXXXXX``, ``.NAME.old-XXXXXXXX``).
_TEMPORARY_EXTRA = len("..tmp-XXXXXXXX")
# A ``cdq quantize --nproc`` launcher that holds the output locks for its workers: its pid.
LOCK_OWNER_ENV = "CDQ_LOCK_OWNER"


class OutputExistsError(ValueError):
    """The output folder exists and is not empty (pass --overwrite)."""


class OutputBusyError(ValueError):
    """Another cdq run is writing the same output (exit 2, at once)."""


class WriteError(OSError):
    """Writing the output failed (full disk, permissions); ``str()`` is one line for the CLI."""

    def __str__(self) -> str:
        return str(self.strerror)


def check_output_dir(
    dest: Path, *, overwrite: bool, protect: Sequence[Path | str] = (), kind: str | None = None
) -> None:
    """Refuse, before any work, to write where something could be lost or cannot be written.

    A non-empty existing ``dest`` is replaced only with ``overwrite`` and only when cdq wrote it:
    its manifest (:data:`~cdq_cli.store.names.MANIFEST`) is there, every entry of the folder is
    listed in it, and (with ``kind``) it is a folder of that kind: a ``cdq quantize`` output is never
    replaced by an export, nor an export by a quantized output. Never, even with ``overwrite``: a
    file, the current folder or a folder holding it, anything in ``protect`` (the source model, the
    data), a folder holding one of them or a folder inside one. The location must be writable and
    its name short enough for the file system (with cdq's temporary names).
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
        if source in real.parents:
            raise OutputExistsError(f"refusing to write to {dest}: it is inside {path}, which cdq reads")
    check_location(dest)
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    written = read_manifest(dest)
    found = manifest_kind(dest)
    if written is not None and kind is not None and found != kind:
        raise OutputExistsError(
            f"refusing to replace {dest}: it is {_KIND_NAMES[found]}, not {_KIND_NAMES[kind]}; "
            "choose another --output"
        )
    if not overwrite:
        raise OutputExistsError(
            f"output folder {dest} exists and is not empty (use --overwrite to replace a folder cdq wrote)"
        )
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


_KIND_NAMES = {QUANTIZED: "a cdq quantize output folder", EXPORT: "a cdq export folder"}


def check_location(dest: Path) -> None:
    """Fail now, not after hours, when ``dest`` cannot be written: a name too long for the file
    system (with the temporary names cdq derives from it), or a location that is read-only, not a
    folder or not permitted (a temporary folder is tried in the nearest existing ancestor)."""
    dest = Path(dest).absolute()
    ancestor = dest.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    longest, path_max = _name_limits(ancestor)
    for part in dest.relative_to(ancestor).parts:
        extra = _TEMPORARY_EXTRA if part == dest.name else 0
        size = len(part.encode("utf-8", "surrogateescape")) + extra
        if size > longest:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            raise OutputExistsError(
                f"the output name {shown!r} is too long for the file system: {size - extra} bytes, at most "
                f"{longest - extra} here" + (" (cdq adds temporary suffixes to it)" if extra else "")
            )
    if len(str(dest).encode("utf-8", "surrogateescape")) + _TEMPORARY_EXTRA > path_max:
        raise OutputExistsError(f"the output path is too long for the file system (at most {path_max} bytes)")
    try:
        Path(tempfile.mkdtemp(prefix=".cdq-write-check-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise OutputExistsError(
            f"cannot write the output {dest}: {ancestor} is not writable ({exc.strerror})"
        ) from None


def _name_limits(folder: Path) -> tuple[int, int]:
    """(longest file name, longest path) in bytes on ``folder``'s file system."""
    limits = []
    for key, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits.append(int(os.pathconf(folder, key)))
        except (OSError, ValueError):
            limits.append(default)
    return limits[0], limits[1]


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


def manifest_kind(folder: Path) -> str | None:
    """What a folder cdq wrote holds (:data:`~cdq_cli.store.names.QUANTIZED` or ``EXPORT``), or
    None without a manifest. Manifests written before the kind was recorded: a folder with a
    quantization table is a quantized output, any other an export."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind in _KIND_NAMES:
        return kind
    if read_manifest(folder) is None:
        return None
    return QUANTIZED if (Path(folder) / MARKER).is_file() else EXPORT


def add_to_manifest(folder: Path, name: str) -> None:
    """Record that cdq wrote ``name`` into ``folder`` (a folder without a manifest is left alone)."""
    written = read_manifest(folder)
    if written is not None and name not in written:
        kind = manifest_kind(folder)
        write_json_atomic(
            Path(folder) / MANIFEST, {"files": sorted((written - {MANIFEST}) | {name}), "kind": kind}
        )


def _write_manifest(folder: Path, kind: str) -> None:
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_file())
    text = json.dumps({"files": names, "kind": kind}, indent=1) + "\n"
    (folder / MANIFEST).write_text(text, encoding="utf-8")


@contextmanager
def atomic_folder(
    dest: Path, *, overwrite: bool = False, protect: Sequence[Path | str] = (), kind: str = EXPORT
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success write its manifest, fsync it and rename it to
    ``dest`` (which :func:`check_output_dir` allows for a folder of ``kind``: the exports use this).

    Any exception (KeyboardInterrupt included) removes the temporary folder and leaves ``dest``
    as it was. A full disk becomes a one-line ``OSError``.
    """
    dest = Path(dest).absolute()
    check_output_dir(dest, overwrite=overwrite, protect=protect, kind=kind)
    tmp = make_work_folder(dest)
    try:
        yield tmp
        publish(tmp, dest, overwrite=overwrite, protect=protect, kind=kind)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(exc, dest) from exc
        raise


def make_work_folder(dest: Path) -> Path:
    """A new hidden sibling of ``dest`` to build it in (``.NAME.tmp-XXXX``)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as exc:
        raise write_error(exc, dest) from exc
    track(work)  # removed even by an exit that cannot unwind
    return work


def publish(
    work: Path, dest: Path, *, overwrite: bool, protect: Sequence[Path | str] = (), kind: str = QUANTIZED
) -> None:
    """Put the finished folder ``work`` in place as ``dest``: write its manifest (the folder's
    ``kind``), fsync it, check again that ``dest`` may be replaced, rename (the old ``dest`` is set
    aside, then removed). Only a whole, fsynced folder ever appears under ``dest``."""
    dest = Path(dest).absolute()
    try:
        _write_manifest(work, kind)
        _fsync_tree(work, chmod=True)
        check_output_dir(dest, overwrite=overwrite, protect=protect, kind=kind)
        _replace(work, dest)
        untrack(work)
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


# -- one run per output ------------------------------------------------------------------------

_HELD: dict[Path, int] = {}  # lock file -> its descriptor, for the locks this process holds


@contextmanager
def output_lock(dest: Path) -> Iterator[None]:
    """Hold the exclusive lock of output ``dest`` (:func:`~cdq_cli.store.names.lock_file`, a
    ``flock`` that the kernel releases when the process ends, however it ends) while the body runs.

    Another process holding it: :class:`OutputBusyError` at once, naming its pid. A lock this
    process holds already is held again for free; one held by the ``cdq quantize --nproc``
    launcher that started this process (:data:`LOCK_OWNER_ENV`) counts as held.
    """
    path = lock_file(dest)
    if path in _HELD or _held_by_launcher(path):
        yield
        return
    made = _missing_parents(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, Path(dest).absolute())
    except OSError as exc:
        _remove_empty(made)
        raise write_error(exc, Path(dest).absolute()) from exc
    except BaseException:
        _remove_empty(made)
        raise
    _HELD[path] = fd
    try:
        yield
    finally:
        del _HELD[path]
        try:
            path.unlink(missing_ok=True)  # while still held: a waiting opener sees another inode
        finally:
            os.close(fd)
            _remove_empty(made)


def _acquire(path: Path, dest: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise OutputBusyError(f"another cdq run (pid {owner}) is writing {dest}") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have removed the file after we opened it: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
            return fd
        os.close(fd)


def _held_by_launcher(path: Path) -> bool:
    """True when the process that started this one (the ``--nproc`` launcher, whose pid
    :data:`LOCK_OWNER_ENV` names) holds the lock at ``path``."""
    owner = os.environ.get(LOCK_OWNER_ENV, "")
    if not owner.isdigit() or int(owner) != os.getppid():
        return False
    try:
        return path.read_text(encoding="ascii").strip() == owner
    except (OSError, UnicodeDecodeError):
        return False


def _missing_parents(folder: Path) -> list[Path]:
    """The folders of ``folder``'s path that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one still in use (non-empty) stays
        try:
            folder.rmdir()
        except OSError:
            return
