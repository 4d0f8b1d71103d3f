"""The output folder: write it atomically, read it back bit for bit.

Layout of a cdq output folder::

    model.safetensors    per quantized layer NAME: NAME.qweight (int32, codes packed along the input
                         dim with solvers.packing.pack), NAME.scales, NAME.zeros, NAME.bias (if any),
                         NAME.outliers_idx / NAME.outliers_val (COO, only if outliers were kept);
                         every other tensor (embeddings, norms, lm_head...) as it is
    quantization.json    the marker: format, settings, and per quantized layer bits/group/sym/shape
                         (also stored in the safetensors metadata under "cdq_quantization")
    config.json, tokenizer files, report.json

The folder is built in a hidden sibling (``.NAME.tmp-XXXX``), fsynced, then renamed into place, so
an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..solvers import GridSpec
from .header import sort_metadata
from .layer import LEAVES, QuantizedLayer, read_packed_layer, write_layer_tensors
from .names import MARKER, REPORT, WEIGHTS

FORMAT = "cdq-packed"
VERSION = 1
PACKING = "codes along the input dim as one little-endian bit stream in int32 words (cdq_cli.solvers.packing)"


class OutputExistsError(ValueError):
    """The output folder exists and is not empty (pass --overwrite)."""


class CheckpointError(ValueError):
    """A folder that is not a readable cdq output."""


class WriteError(OSError):
    """Writing the output failed (full disk, permissions); ``str()`` is one line for the CLI."""

    def __str__(self) -> str:
        return str(self.strerror)


def check_output_dir(dest: Path, *, overwrite: bool) -> None:
    """Refuse early, before any work, to clobber an existing non-empty folder or a file."""
    if dest.exists() and not dest.is_dir():
        raise OutputExistsError(f"output path {dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {dest} exists and is not empty (use --overwrite to replace it)"
        )


@contextmanager
def atomic_folder(dest: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success fsync it and rename it to ``dest``.

    Any exception (KeyboardInterrupt included) removes the temporary folder and leaves ``dest``
    as it was. A full disk becomes a one-line ``OSError``.
    """
    dest = Path(dest).absolute()
    check_output_dir(dest, overwrite=overwrite)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as exc:
        raise _one_line(exc, dest) from exc
    try:
        yield tmp
        _fsync_tree(tmp, chmod=True)
        _replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _one_line(exc, dest) from exc
        raise


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
            raise _one_line(exc, path) from exc
        raise


def save_quantized(
    dest: Path,
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    *,
    tokenizer: Any = None,
    report: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
    kind: str = "causal-lm",
) -> Path:
    """Write the whole output folder atomically; ``info`` adds run settings to the marker.

    ``kind`` names how to rebuild the model (:func:`load_quantized` handles ``causal-lm``; other
    kinds rebuild their model themselves and load :func:`quantized_state_dict` into it).
    """
    dest = Path(dest).absolute()
    tensors, aliases = _tensors(model, layers)
    table = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "packing": PACKING,
        **(info or {}),
        "aliases": aliases,
        "layers": {name: layer.metadata() for name, layer in layers.items()},
    }
    with atomic_folder(dest, overwrite=overwrite) as tmp:
        save_file(
            tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "cdq_quantization": json.dumps(table)}
        )
        sort_metadata(tmp / WEIGHTS)  # safetensors writes metadata in random order: same run, same bytes
        (tmp / MARKER).write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
        config = getattr(model, "config", None)
        if hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if hasattr(generation, "save_pretrained"):
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return dest


def is_quantized_folder(path: Path | str) -> bool:
    return (Path(path) / MARKER).is_file()


def read_kind(path: Path | str) -> str | None:
    """The model kind an output folder holds (``causal-lm``, ``timm-classifier``), or None when
    ``path`` is not a readable cdq output folder (no error: callers only route on it)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def read_table(folder: Path | str) -> dict[str, Any]:
    marker = Path(folder) / MARKER
    try:
        table = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a cdq output folder (no {MARKER})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {marker}: {exc}") from None
    if table.get("format") != FORMAT or table.get("version") != VERSION:
        raise CheckpointError(f"{marker}: unsupported format {table.get('format')!r} v{table.get('version')}")
    return table


def read_layers(folder: Path | str) -> dict[str, QuantizedLayer]:
    """The stored quantized layers of a cdq output folder (packed form)."""
    table = read_table(folder)
    path = Path(folder) / WEIGHTS
    layers: dict[str, QuantizedLayer] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            for name, meta in table["layers"].items():
                spec = GridSpec(meta["bits"], meta["group_size"], meta["sym"], meta.get("per_layer", False))
                layers[name] = read_packed_layer(fh, name, spec, tuple(meta["shape"]), keys)
    except (OSError, KeyError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    return layers


def quantized_state_dict(folder: Path | str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A plain state dict of the stored model: quantized layers dequantized, aliases restored."""
    table = read_table(folder)
    layers = read_layers(folder)
    dtype = dtype or getattr(torch, table["dtype"])
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as fh:
        for key in fh.keys():
            owner, _, leaf = key.rpartition(".")
            if owner in layers and leaf in LEAVES:
                continue
            state[key] = fh.get_tensor(key)
    for name, layer in layers.items():
        state[f"{name}.weight"] = layer.dequantize().to(dtype)
    for alias, target in table.get("aliases", {}).items():
        state[alias] = state[target]
    return state


def _tensors(
    model: nn.Module, layers: dict[str, QuantizedLayer]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (shared ones once, with an alias table) from the model and packed layers."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    replaced = {f"{name}.weight" for name in layers}
    for key, value in model.state_dict().items():
        if key in replaced:
            continue
        identity = (
            value.device,
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            value.shape,
            value.dtype,
        )
        if identity in seen:  # tied weights (lm_head = embeddings): safetensors stores no shared memory
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach().cpu().contiguous()
    for layer in layers.values():
        write_layer_tensors(layer, tensors)
    return tensors, aliases


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


def _one_line(exc: OSError, where: Path) -> WriteError:
    if isinstance(exc, WriteError):
        return exc
    if exc.errno == errno.ENOSPC:
        return WriteError(errno.ENOSPC, f"no space left on device while writing {where}")
    reason = exc.strerror or str(exc)
    return WriteError(
        exc.errno, f"cannot write {where}: {reason}" + (f" ({exc.filename})" if exc.filename else "")
    )
