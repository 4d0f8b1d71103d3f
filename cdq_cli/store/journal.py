"""The resume journal: after every finished block, save what is needed to continue from the next one.

The journal is a hidden sibling folder of the output, ``.<OUTPUT>.partial/``::

    block-00000.safetensors   the packed layers of block 0 (one file per finished block)
    state.json                blocks done, the report rows so far, and the run's fingerprint

Each file is written to a temporary name, fsynced and renamed, and state.json is renamed last, so a
run killed at ANY instant (Ctrl-C, SIGKILL, power loss) leaves a consistent state: the blocks
state.json counts. The next block's input activations are NOT stored: ``--resume`` recaptures the
block-0 inputs and re-runs the finished blocks with their stored quantized weights, which is cheap
next to solving them, costs no disk, and reproduces the uninterrupted run's activations bit for
bit (same weights, same inputs, same kernels on the same device and thread count), so the final
model.safetensors is byte-identical. On success the work folder is removed.

The fingerprint is what must not change between the interrupted run and ``--resume``: the model
(path, config, and the size and mtime of its files), the calibration windows and batching, the
quantization settings (method options included), the cdq and torch versions and the method's
revision (:class:`~cdq_cli.solvers.registry.Method`: raised when its results change for the same
options, e.g. a new default). A mismatch is refused with a line naming what changed.

Test hooks: ``CDQ_TEST_KILL_AFTER_BLOCK=N`` makes the process SIGKILL itself right after block N's
state (0-based) is on disk, ``CDQ_TEST_TERM_AFTER_BLOCK=N`` sends it SIGTERM there, so tests can
stop a real run at a known point.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from ..cleanup import set_resume_hint
from ..records import LayerRow, Settings
from ..solvers import find_method
from ..solvers.target import FP_REVISION
from .layer import QuantizedLayer, check_record, read_packed_layer, spec_of, write_layer_tensors
from .names import JOURNAL_OUTPUT as OUTPUT
from .names import JOURNAL_STATE as STATE
from .names import journal_block, journal_folder

KILL_ENV = "CDQ_TEST_KILL_AFTER_BLOCK"
TERM_ENV = "CDQ_TEST_TERM_AFTER_BLOCK"
_BLOCK_FILE = re.compile(r"block-\d{5,}\.safetensors")
_SHARD_FILE = re.compile(r"\.shard-\d{5,}\.(data|safetensors)")
SCHEMA = "cdq-resume/1"


@dataclass
class ResumeState:
    """A saved partial run: the first ``blocks_done`` blocks' report rows and stored layers."""

    blocks_done: int
    rows: list[LayerRow]
    layers: dict[str, QuantizedLayer]


class ResumeError(ValueError):
    """Saved state that cannot be resumed (changed inputs, unreadable files); one line, exit 2."""


def fingerprint(
    model: str, lm: torch.nn.Module, windows: torch.Tensor, settings: Settings, **extra: Any
) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one, part by part (see the module doc)."""
    config = getattr(lm, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    config_dict = {k: v for k, v in config_dict.items() if k not in ("_name_or_path", "name_or_path")}
    model_id = {"path": _resolved(model), "files": _file_identity(model), "config": config_dict}
    calibration = {
        "windows_sha256": hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest(),
        "shape": list(windows.shape),
        **{k: v for k, v in extra.items() if k == "batch_size"},
    }
    run = {
        **settings.describe(),
        "dtype": str(next(lm.parameters()).dtype),
        **{k: v for k, v in extra.items() if k != "batch_size"},
    }
    return {
        "model": _digest(model_id),
        "calibration": _digest(calibration),
        "settings": json.loads(json.dumps(run, sort_keys=True, default=str)),
        "versions": {
            "cdq": __version__,
            "torch": torch.__version__,
            "solver": f"{settings.method} revision {find_method(settings.method).revision}"
            + (f", target=fp revision {FP_REVISION}" if settings.target == "fp" else ""),
        },
    }


class Journal:
    """Writes a state after every finished block and hands it back to a resumed run.

    Pass it to :func:`cdq_cli.pipeline.quantize_model`; call :meth:`finish` once the output is saved.
    """

    def __init__(
        self, output: Path, fingerprint: dict[str, Any], *, resume: bool, note: Callable[[str], None]
    ) -> None:
        self.folder = journal_folder(output)
        self.fingerprint = fingerprint
        self.note = note
        self.state: ResumeState | None = None
        set_resume_hint(self.resume_hint)  # said even by an exit that cannot unwind
        if resume:
            saved = self._read_state() if self.folder.exists() else None
            if saved is None:
                note(f"no saved state for {Path(output).name} (nothing to resume): starting fresh")
            else:
                self._check(saved["fingerprint"])
                self.state = self._load(saved)
                note(f"resuming: {self.state.blocks_done} finished block(s) restored from {self.folder}")
        elif self.folder.exists():
            if not is_journal(self.folder):
                raise ResumeError(
                    f"refusing to delete {self.folder}: it is not a cdq resume journal; "
                    "remove it yourself or choose another --output"
                )
            note(f"discarding the state of an unfinished earlier run ({self.folder}); --resume continues one")
            shutil.rmtree(self.folder, ignore_errors=True)

    def output_folder(self) -> Path:
        """A fresh folder inside the journal where the output is built (what an interrupted run
        left there is discarded: a resumed run writes the restored blocks again)."""
        folder = self.folder / OUTPUT
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder

    @property
    def blocks_restored(self) -> int:
        return self.state.blocks_done if self.state is not None else 0

    def resume_state(self) -> ResumeState | None:
        return self.state

    def on_block_done(self, index: int, rows: list[LayerRow], layers: dict[str, QuantizedLayer]) -> None:
        """Persist block ``index`` (its packed layers) and the rows so far; atomic, state last."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for layer in layers.values():
            write_layer_tensors(layer, tensors)
        meta = {"layers": json.dumps({name: layer.metadata() for name, layer in layers.items()})}
        _atomic(self.folder / journal_block(index), lambda tmp: save_file(tensors, tmp, metadata=meta))
        state = {
            "schema": SCHEMA,
            "blocks_done": index + 1,
            "fingerprint": self.fingerprint,
            "rows": [row.to_dict() for row in rows],
        }
        _atomic(self.folder / STATE, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=1) + "\n"))
        if os.environ.get(KILL_ENV) == str(index):  # test hook: die like a power loss would
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get(TERM_ENV) == str(index):  # test hook: be asked to stop, as a scheduler would
            os.kill(os.getpid(), signal.SIGTERM)

    def finish(self) -> None:
        """The output is saved: the journal is no longer needed."""
        set_resume_hint(None)
        if self.folder.exists() and is_journal(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self) -> None:
        """The run failed on bad input: resuming it cannot help, so its journal goes too."""
        self.finish()

    def resume_hint(self) -> str | None:
        """What to tell a user whose run stopped for a reason that resuming fixes (or None): read
        from the state on disk, what a ``--resume`` would find (a block whose state was published
        counts even when a Ctrl-C lands before this process could note it)."""
        return _saved_hint(self.folder)

    def _read_state(self) -> dict[str, Any] | None:
        path = self.folder / STATE
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResumeError(f"cannot read saved state {path}: {exc}; run without --resume") from None
        if not isinstance(saved, dict) or saved.get("schema") != SCHEMA:
            schema = saved.get("schema") if isinstance(saved, dict) else None
            raise ResumeError(f"{path}: unsupported state format {schema!r}; run without --resume")
        blocks, rows = saved.get("blocks_done"), saved.get("rows")
        if type(blocks) is not int or blocks < 0 or not isinstance(rows, list):
            raise ResumeError(f"{path}: not a valid resume state; run without --resume")
        if not isinstance(saved.get("fingerprint"), dict):
            raise ResumeError(f"{path}: the state has no fingerprint; run without --resume")
        return saved

    def _check(self, saved: dict[str, Any]) -> None:
        changed = []
        for part, label in (
            ("model", "model"),
            ("calibration", "calibration data"),
            ("versions", "cdq/torch/solver version"),
        ):
            if saved.get(part) != self.fingerprint[part]:
                changed.append(label)
        old, new = saved.get("settings", {}), self.fingerprint["settings"]
        diffs = [
            f"{k} {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
        if diffs:
            changed.append("settings (" + ", ".join(diffs) + ")")
        if changed:
            raise ResumeError(
                f"cannot resume: {'; '.join(changed)} changed since the interrupted run "
                f"(state in {self.folder}); run without --resume to start over"
            )

    def _load(self, saved: dict[str, Any]) -> ResumeState:
        blocks = saved["blocks_done"]
        try:
            rows = [LayerRow(**row) for row in saved["rows"]]
        except TypeError:
            raise ResumeError(
                f"{self.folder / STATE}: its report rows are not valid; run without --resume"
            ) from None
        found: dict[str, QuantizedLayer] = {}
        for index in range(blocks):
            path = self.folder / journal_block(index)
            try:
                with safe_open(str(path), framework="pt") as fh:
                    table = json.loads(fh.metadata()["layers"])
                    keys = set(fh.keys())
                    for name, meta in table.items():
                        spec, shape, outliers = spec_of(name, meta)
                        layer = read_packed_layer(fh, name, spec, shape, keys)
                        check_record(layer, outliers)
                        found[name] = layer
            except Exception as exc:  # truncated, corrupt or edited: safetensors, OS, JSON, record errors
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise ResumeError(f"cannot read saved block {path}: {first}; run without --resume") from None
        missing = [row.layer for row in rows if row.layer not in found]
        if missing:
            raise ResumeError(f"saved state in {self.folder} lacks layer {missing[0]}; run without --resume")
        # The report and the checkpoint list layers in solve order, which the rows keep.
        return ResumeState(blocks, rows, {row.layer: found[row.layer] for row in rows})


def saved_hint(output: Path) -> str | None:
    """The resume hint of ``output``'s journal as it is on disk (None: no finished block saved): what
    the ``--nproc`` launcher says, and the journal itself (:meth:`Journal.resume_hint`)."""
    return _saved_hint(journal_folder(output))


def _saved_hint(folder: Path) -> str | None:
    try:
        blocks = json.loads((folder / STATE).read_text(encoding="utf-8")).get("blocks_done")
    except (OSError, ValueError, AttributeError):
        return None
    if type(blocks) is not int or not blocks:
        return None
    return f"{blocks} finished block(s) are saved in {folder}: run the same command with --resume to continue"


def is_journal(folder: Path) -> bool:
    """True when every entry of ``folder`` is one a journal writes (state, block files, their
    temporaries, the output being built with its shard files): only such a folder is ever deleted."""
    stated = (Path(folder) / STATE).is_file()  # a state written by cdq: its output folder is cdq's too
    for entry in Path(folder).iterdir():
        if entry.name == OUTPUT and entry.is_dir():
            if not stated and not all(e.is_file() and _SHARD_FILE.fullmatch(e.name) for e in entry.iterdir()):
                return False
            continue
        name = entry.name.lstrip(".").split(".tmp-")[0]
        if not entry.is_file() or not (name == STATE or _BLOCK_FILE.fullmatch(name)):
            return False
    return True


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _resolved(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _file_identity(model: str) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of the model's files: a cheap stand-in for hashing weights."""
    path = Path(model).expanduser()
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    if not path.is_dir():
        return []
    entries = []
    for item in sorted(path.rglob("*")):
        if item.is_file() and not any(part.startswith(".") for part in item.relative_to(path).parts):
            stat = item.stat()
            entries.append((str(item.relative_to(path)), stat.st_size, stat.st_mtime_ns))
    return entries


def open_journal(
    output: Path,
    model: str,
    lm: torch.nn.Module,
    windows: torch.Tensor,
    settings: Settings,
    *,
    batch_size: int,
    resume: bool,
    note: Callable[[str], None],
    compute_dtype: torch.dtype | None = None,
) -> Journal | None:
    """The run's journal (None for ``--bits 16``, which has nothing to save); ``compute_dtype``:
    what the blocks are computed in, part of the fingerprint (their outputs depend on it)."""
    if not settings.quantizing:
        if resume:
            note("--resume: nothing to resume without quantization (--bits 16)")
        return None
    extra = {"compute_dtype": str(compute_dtype)} if compute_dtype is not None else {}
    return Journal(
        output,
        fingerprint(model, lm, windows, settings, batch_size=batch_size, **extra),
        resume=resume,
        note=note,
    )
