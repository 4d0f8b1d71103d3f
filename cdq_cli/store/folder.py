"""The output folder: written while the run goes (never held whole), read back bit for bit.

Layout of a cdq output folder::

    model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json
                         per quantized layer NAME: NAME.qweight (int32, codes packed along the input
                         dim with solvers.packing.pack), NAME.scales, NAME.zeros, NAME.bias (if any),
                         NAME.outliers_idx / NAME.outliers_val (COO, only if outliers were kept);
                         every other tensor (embeddings, norms, lm_head...) as it is. Each shard's
                         metadata ``cdq_layers`` holds the table entries of the layers it stores.
    quantization.json    the marker: format, settings, and per quantized layer bits/group/sym/shape
    config.json, tokenizer files, report.json, .cdq-manifest.json (the files cdq wrote)

:class:`OutputBuilder` streams tensors into shards as blocks finish (:mod:`.shards`), in a work
folder that is completed (table, companions), then renamed into place when everything is written
(:func:`~cdq_cli.store.files.publish`).
:class:`OutputWeights` reads a folder back, by tensor name, one tensor at a time, after checking
that the table and the shards agree and that every layer's packed tensors have exactly the sizes
its bits and shape imply.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .files import make_work_folder, publish, write_error
from .layer import (
    LEAVES,
    LayerRecordError,
    QuantizedLayer,
    check_record,
    param_key,
    read_packed_layer,
    spec_of,
    write_layer_tensors,
)
from .names import MARKER, QUANTIZED, WEIGHTS, WEIGHTS_INDEX
from .shards import ShardWriter, read_tensor, shard_files

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
LAYERS_KEY = "cdq_layers"  # a shard's metadata: the table entries of the layers it holds
LEGACY_KEY = "cdq_quantization"  # single-file outputs of cdq before sharding: the whole table


class CheckpointError(ValueError):
    """A folder that is not a readable cdq output."""


class OutputBuilder:
    """Builds an output folder in ``work`` as tensors come; :meth:`finish` puts it in place.

    Quantized layers are written as their packed record (:meth:`add_layer`), everything else as
    it is (:meth:`add_tensor`); ``ties`` ({name: name it is tied to}, from :func:`tied_names`)
    are recorded as aliases instead of being written twice. Shards hold at most
    ``max_shard_bytes`` (None: one file). ``dtypes`` ({name: dtype}, from :func:`stored_dtypes`)
    is what each tensor is stored in: a tensor handed over in another floating dtype (a block
    computed in float32, say, from a bf16 checkpoint) is written back in its own.
    """

    def __init__(
        self,
        work: Path,
        *,
        dest: Path | None = None,
        ties: Mapping[str, str] | None = None,
        max_shard_bytes: int | None = None,
        dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        self.dest = Path(dest) if dest is not None else Path(work)  # named in error messages
        self.dtypes = dict(dtypes or {})
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.shards = ShardWriter(self.work, max_shard_bytes)
        self.ties = dict(ties or {})
        self.layers: dict[str, dict[str, Any]] = {}
        self.aliases: dict[str, str] = {}
        self.written: set[str] = set()  # state-dict names covered (quantized weights included)

    def add_layer(self, record: QuantizedLayer) -> None:
        group: dict[str, torch.Tensor] = {}
        write_layer_tensors(record, group)
        meta = record.metadata()
        self._write(group, {LAYERS_KEY: {record.name: meta}})
        self.layers[record.name] = meta
        self.written.add(param_key(record.name, meta))

    def add_tensor(self, name: str, tensor: torch.Tensor | None) -> None:
        """Write ``name`` (a tied name is recorded as an alias; its ``tensor`` may be None)."""
        if name in self.ties:  # tied to another tensor: safetensors stores no sharing
            self.aliases[name] = self.ties[name]
        elif tensor is None:
            raise ValueError(f"no tensor for {name}")
        else:
            stored = self.dtypes.get(name, tensor.dtype)
            if tensor.is_floating_point() and stored.is_floating_point:
                tensor = tensor.to(stored)
            self._write({name: tensor.detach()})
        self.written.add(name)

    def _write(self, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        try:
            self.shards.write(tensors, metadata)
        except OSError as exc:  # a full disk: one line naming the output
            raise write_error(exc, self.dest) from exc

    def add_state(
        self, tensors: Iterable[tuple[str, torch.Tensor]], layers: Mapping[str, QuantizedLayer]
    ) -> None:
        """Write ``(name, tensor)`` pairs of a state dict, a quantized layer's record in place of the
        tensor it replaces (``layers`` by layer name)."""
        replaced = {param_key(name, layer.metadata()): layer for name, layer in layers.items()}
        for name, tensor in tensors:
            if name in self.written:
                continue
            if name in replaced:
                self.add_layer(replaced[name])
            else:
                self.add_tensor(name, tensor)

    def complete(
        self,
        *,
        info: dict[str, Any],
        kind: str,
        dtype: torch.dtype,
        extras: Callable[[Path], None] | None = None,
        order: Sequence[str] = (),
    ) -> Path:
        """Close the shards, write quantization.json (layers listed in ``order``, the solve order,
        then any others) and ``extras`` (config, tokenizer...): the work folder is then a complete
        output folder that is not in place yet (it can be read back, e.g. to score it); returns it."""
        try:
            self.shards.close()
        except OSError as exc:
            raise write_error(exc, self.dest) from exc
        ranked = {name: rank for rank, name in enumerate(order)}
        self.layers = dict(sorted(self.layers.items(), key=lambda item: ranked.get(item[0], len(ranked))))
        table = {
            "format": FORMAT,
            "version": VERSION,
            "kind": kind,
            "dtype": str(dtype).removeprefix("torch."),
            "packing": PACKING,
            **info,
            "aliases": self.aliases,
            "layers": self.layers,
        }
        (self.work / MARKER).write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
        if extras is not None:
            extras(self.work)
        return self.work

    def publish(self, dest: Path, *, overwrite: bool = False, protect: Sequence[Path | str] = ()) -> Path:
        """Put the completed work folder in place as ``dest`` (:func:`~cdq_cli.store.files.publish`)."""
        dest = Path(dest).absolute()
        publish(self.work, dest, overwrite=overwrite, protect=protect, kind=QUANTIZED)
        return dest


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
    max_shard_bytes: int | None = None,
) -> Path:
    """Write the output folder of a model held in memory (the streaming run uses
    :class:`OutputBuilder` directly): its state dict with ``layers`` in place of their weights."""
    from .files import check_output_dir

    dest = Path(dest).absolute()
    check_output_dir(dest, overwrite=overwrite, protect=protect, kind=QUANTIZED)
    work = make_work_folder(dest)
    try:
        builder = OutputBuilder(work, dest=dest, ties=tied_names(model), max_shard_bytes=max_shard_bytes)
        builder.add_state(model.state_dict(keep_vars=True).items(), layers)
        builder.complete(
            info=info or {},
            kind=kind,
            dtype=next(model.parameters()).dtype,
            extras=lambda folder: write_companions(folder, model, tokenizer, report),
            order=list(layers),
        )
        return builder.publish(dest, overwrite=overwrite, protect=protect)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(exc, dest) from exc
        raise


def write_companions(
    folder: Path, model: nn.Module, tokenizer: Any, report: dict[str, Any] | None = None
) -> None:
    """What travels with the weights: config, generation config, tokenizer (and report.json when
    given: the run writes its report itself, once it is complete)."""
    config = getattr(model, "config", None)
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if hasattr(generation, "save_pretrained"):
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if report is not None:
        from .report import write

        write(folder, report)


# -- reading ------------------------------------------------------------------------------------


def is_quantized_folder(path: Path | str) -> bool:
    return (Path(path) / MARKER).is_file()


def orphaned_output(path: Path | str) -> bool:
    """True for a folder whose weights cdq wrote (their metadata carries cdq's table) but whose
    quantization.json is gone: loading it as a plain model would leave its layers random."""
    folder = Path(path)
    if not folder.is_dir() or (folder / MARKER).exists():
        return False
    if not ((folder / WEIGHTS).is_file() or (folder / WEIGHTS_INDEX).is_file()):
        return False
    try:
        for name in sorted(set(shard_files(folder).values())):
            with safe_open(str(folder / name), framework="pt") as fh:
                metadata = fh.metadata() or {}
                if LAYERS_KEY in metadata or LEGACY_KEY in metadata:
                    return True
    except Exception:  # unreadable: the loader will say so
        return False
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


class OutputWeights:
    """A cdq output folder's tensors by state-dict name, read one at a time (quantized layers
    dequantized, aliases resolved): the :class:`~cdq_cli.records.Weights` source of a lazily
    reloaded model, and the reader behind every other read of an output folder.

    Opening checks the folder before anything is used: the table's allow-lists, that the layer
    entries in the shards' metadata equal quantization.json's, that every tensor the index names
    is in its shard, and that no packed tensor lacks a table entry.
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.table = read_table(self.folder)
        self.dtype = table_dtype(self.table)
        self.layer_meta: dict[str, dict] = self.table["layers"]
        self.aliases: dict[str, str] = self.table.get("aliases", {})
        try:
            self.files = shard_files(self.folder)
            self._check_shards()
        except CheckpointError:
            raise
        except Exception as exc:  # a truncated or corrupt file: safetensors, OS and JSON errors alike
            why = _first_line(exc)
            raise CheckpointError(
                why if str(self.folder) in why else f"cannot read {self._where()}: {why}"
            ) from None
        self.params = {param_key(name, meta): name for name, meta in self.layer_meta.items()}

    def names(self) -> list[str]:
        """Every state-dict name the folder restores, in the order stored (aliases last)."""
        names = []
        for key in self.files:
            owner, _, leaf = key.rpartition(".")
            if owner in self.layer_meta and leaf in LEAVES:
                if leaf == "qweight":
                    names.append(param_key(owner, self.layer_meta[owner]))
                continue
            names.append(key)
        return names + [alias for alias in self.aliases if alias not in names]

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` in ``dtype`` (None: the stored model's); a quantized layer is
        dequantized straight into it (Ŵ in float32 is exact, not rounded to the stored dtype first)."""
        if name in self.aliases:
            return self.tensor(self.aliases[name], dtype)
        if name in self.params:
            return self.layer(self.params[name]).dequantize().to(dtype or self.dtype)
        return self._read(name, dtype)

    def layer(self, name: str) -> QuantizedLayer:
        """Layer ``name``'s packed record, its sizes checked exactly."""
        meta = self.layer_meta[name]
        try:
            spec, shape, outliers = spec_of(name, meta)
            path = self.folder / self.files[f"{name}.qweight"]
            with safe_open(str(path), framework="pt") as fh:
                layer = read_packed_layer(fh, name, spec, shape, set(fh.keys()))
            check_record(layer, outliers)
        except LayerRecordError as exc:
            raise CheckpointError(f"{self._where()}: {exc}") from None
        except Exception as exc:
            raise CheckpointError(f"cannot read {self._where()}: {_first_line(exc)}") from None
        return layer

    def layers(self) -> dict[str, QuantizedLayer]:
        return {name: self.layer(name) for name in self.layer_meta}

    def _read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"{self._where()} holds no tensor {name}")
        path = self.folder / self.files[name]
        try:
            return read_tensor(path, name, dtype)  # slice by slice: no whole memory map on top of the copy
        except Exception as exc:
            raise CheckpointError(f"cannot read {path}: {_first_line(exc)}") from None

    def _check_shards(self) -> None:
        declared: dict[str, dict] = {}
        legacy = False
        for shard in sorted(set(self.files.values())):
            path = self.folder / shard
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                keys = set(fh.keys())
            missing = [name for name, file in self.files.items() if file == shard and name not in keys]
            if missing:
                raise CheckpointError(f"{path} lacks {missing[0]}, which {WEIGHTS_INDEX} places there")
            if LEGACY_KEY in metadata:
                legacy = True
                if json.loads(metadata[LEGACY_KEY]) != self.table:
                    raise self._disagree(path)
                continue
            entries = json.loads(metadata.get(LAYERS_KEY, "{}"))
            for name, meta in entries.items():
                if f"{name}.qweight" not in keys:
                    raise self._disagree(path)
                declared[name] = meta
        if not legacy and declared != self.layer_meta:
            raise self._disagree(
                self.folder / (WEIGHTS if len(set(self.files.values())) == 1 else WEIGHTS_INDEX)
            )
        stray = sorted(
            {key.rpartition(".")[0] for key in self.files if key.rpartition(".")[2] in LEAVES}
            - set(self.layer_meta)
        )
        if stray:
            raise CheckpointError(
                f"{self._where()} holds packed tensors of {stray[0]}, which {MARKER} does not list"
            )

    def _disagree(self, path: Path) -> CheckpointError:
        return CheckpointError(
            f"{path} and {self.folder / MARKER} disagree about the quantization "
            "(one of them was edited or replaced); refusing to load either"
        )

    def _where(self) -> Path:
        return self.folder / (WEIGHTS if (self.folder / WEIGHTS).is_file() else WEIGHTS_INDEX)


def read_layers(folder: Path | str) -> dict[str, QuantizedLayer]:
    """The stored quantized layers of a cdq output folder (packed form), checked."""
    return OutputWeights(folder).layers()


def quantized_state_dict(folder: Path | str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A plain state dict of the stored model: quantized layers dequantized, aliases restored."""
    weights = OutputWeights(folder)
    state = {name: weights.tensor(name) for name in weights.names()}
    return {name: t.to(dtype) for name, t in state.items()} if dtype is not None else state


def stored_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """{state-dict name: dtype} of ``model`` as it is stored (call it before any block is placed:
    a lazy skeleton's meta tensors carry the checkpoint's dtypes)."""
    return {name: tensor.dtype for name, tensor in model.state_dict(keep_vars=True).items()}


def tied_names(model: nn.Module) -> dict[str, str]:
    """{name: earlier name} of state-dict entries that are the same tensor (tied embeddings), found
    while the model holds every tensor (so identities are unique): the same object, or for real
    tensors the same storage, offset, shape and dtype."""
    first: dict[Any, str] = {}
    ties: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        keys: list[Any] = [("object", id(tensor))]
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage().data_ptr()
            keys.append((tensor.device, storage, tensor.storage_offset(), tensor.shape, tensor.dtype))
        target = next((first[key] for key in keys if key in first), None)
        if target is not None:
            ties[name] = target
            continue
        for key in keys:
            first[key] = name
    return ties


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
