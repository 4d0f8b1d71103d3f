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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .header import sort_metadata
from .layer import (
    LEAVES,
    LayerRecordError,
    QuantizedLayer,
    check_record,
    read_packed_layer,
    spec_of,
    write_layer_tensors,
)
from .names import MANIFEST, MARKER, REPORT, WEIGHTS

KINDS = ("causal-lm", "timm-classifier")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
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
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as exc:
        raise _one_line(exc, dest) from exc
    try:
        yield tmp
        _write_manifest(tmp)
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
    protect: Sequence[Path | str] = (),
    kind: str = "causal-lm",
) -> Path:
    """Write the whole output folder atomically; ``info`` adds run settings to the marker;
    ``protect``: paths the output must never replace (the source model; see :func:`check_output_dir`).

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
    with atomic_folder(dest, overwrite=overwrite, protect=protect) as tmp:
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


def orphaned_output(path: Path | str) -> bool:
    """True for a folder whose model.safetensors cdq wrote (it carries cdq's table) but whose
    quantization.json is gone: loading it as a plain model would leave its layers random."""
    folder = Path(path)
    weights = folder / WEIGHTS
    if not folder.is_dir() or (folder / MARKER).exists() or not weights.is_file():
        return False
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return "cdq_quantization" in (fh.metadata() or {})
    except Exception:  # unreadable: the loader will say so
        return False


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
    """The output folder's quantization table, every value checked against what cdq writes."""
    marker = Path(folder) / MARKER
    try:
        table = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a cdq output folder (no {MARKER})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {marker}: {_first_line(exc)}") from None
    if not isinstance(table, dict):
        raise CheckpointError(f"{marker}: not a cdq quantization table")
    if table.get("format") != FORMAT or table.get("version") != VERSION:
        raise CheckpointError(f"{marker}: unsupported format {table.get('format')!r} v{table.get('version')}")
    if table.get("kind") not in KINDS:
        raise CheckpointError(f"{marker}: unknown model kind {table.get('kind')!r}")
    if table.get("dtype") not in DTYPES:
        raise CheckpointError(f"{marker}: dtype {table.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    layers, aliases = table.get("layers"), table.get("aliases", {})
    if not isinstance(layers, dict) or not isinstance(aliases, dict):
        raise CheckpointError(f"{marker}: 'layers' and 'aliases' must be mappings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{marker}: 'aliases' must map tensor names to tensor names")
    for name, meta in layers.items():
        try:
            spec_of(name, meta)
        except LayerRecordError as exc:
            raise CheckpointError(f"{marker}: {exc}") from None
    return table


def table_dtype(table: dict[str, Any]) -> torch.dtype:
    """The stored model's dtype (from the allow-list; never ``getattr(torch, <file content>)``)."""
    return DTYPES[table["dtype"]]


def read_layers(folder: Path | str) -> dict[str, QuantizedLayer]:
    """The stored quantized layers of a cdq output folder (packed form), checked: the table in
    model.safetensors equals quantization.json, every layer's tensors have exactly the sizes its
    bits and shape imply, and no packed tensor lacks a table entry."""
    table = read_table(folder)
    path = Path(folder) / WEIGHTS
    layers: dict[str, QuantizedLayer] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            embedded = (fh.metadata() or {}).get("cdq_quantization")
            if embedded is None or json.loads(embedded) != table:
                raise CheckpointError(
                    f"{path} and {Path(folder) / MARKER} disagree about the quantization "
                    "(one of them was edited or replaced); refusing to load either"
                )
            keys = set(fh.keys())
            for name, meta in table["layers"].items():
                spec, shape, outliers = spec_of(name, meta)
                layer = read_packed_layer(fh, name, spec, shape, keys)
                check_record(layer, outliers)
                layers[name] = layer
    except CheckpointError:
        raise
    except LayerRecordError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # a truncated or corrupt file: safetensors, OS and key errors alike
        raise CheckpointError(f"cannot read {path}: {_first_line(exc)}") from None
    stray = sorted({key.rpartition(".")[0] for key in keys if key.rpartition(".")[2] in LEAVES} - set(layers))
    if stray:
        raise CheckpointError(f"{path} holds packed tensors of {stray[0]}, which {MARKER} does not list")
    return layers


def quantized_state_dict(folder: Path | str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A plain state dict of the stored model: quantized layers dequantized, aliases restored."""
    table = read_table(folder)
    layers = read_layers(folder)
    dtype = dtype or table_dtype(table)
    state: dict[str, torch.Tensor] = {}
    path = Path(folder) / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                owner, _, leaf = key.rpartition(".")
                if owner in layers and leaf in LEAVES:
                    continue
                state[key] = fh.get_tensor(key)
    except Exception as exc:  # a truncated or corrupt file
        raise CheckpointError(f"cannot read {path}: {_first_line(exc)}") from None
    for name, layer in layers.items():
        state[f"{name}.weight"] = layer.dequantize().to(dtype)
    for alias, target in table.get("aliases", {}).items():
        if target not in state:
            raise CheckpointError(f"{path}: {alias} is an alias of {target}, which it does not hold")
        state[alias] = state[target]
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


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
