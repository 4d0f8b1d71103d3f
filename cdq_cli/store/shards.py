"""safetensors shards written as tensors come, in Hugging Face's layout, and read back by name.

A model is stored as ``model.safetensors``, or, when it exceeds the shard size, as
``model-00001-of-0000N.safetensors`` … plus ``model.safetensors.index.json`` (``weight_map``: tensor
name → shard file), the layout transformers and serving engines read.

:class:`ShardWriter` never holds a model, or even a shard, in memory: each tensor's bytes are
appended to the open shard's data file as soon as it is handed over, and a shard is finished
(header + data) when the next group of tensors would make it exceed the shard size. Groups (one
quantized layer's packed tensors, say) are never split across shards. The bytes depend only on
the tensors, their order, and the shard size: the same run always writes the same files.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .names import WEIGHTS, WEIGHTS_INDEX

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
DEFAULT_SHARD_SIZE = "5GB"
MAX_SIZE, MAX_SIZE_TEXT = 2**50, "1PiB"  # far past any model; keeps every size an exact int64


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000000`` (one-line ValueError)."""
    found = _SIZE.match(str(text))
    if not found:
        raise ValueError(f"cannot read the size {text!r}: write it like 5GB, 500MB or 2GiB")
    number, unit, suffix = found.groups()
    scale = (_BINARY if suffix and suffix.upper() == "IB" else _UNITS)[unit.upper()]
    if len(number) > 30:  # exact arithmetic below; no size worth writing has this many digits
        raise ValueError(f"the size {text.strip()[:40]}... is too large (at most {MAX_SIZE_TEXT})")
    value = int(Decimal(number) * scale)
    if value < 1:
        raise ValueError(f"a shard size must be positive, got {text!r}")
    if value > MAX_SIZE:
        raise ValueError(f"the size {text.strip()!r} is too large (at most {MAX_SIZE_TEXT})")
    return value


def shard_names(count: int) -> list[str]:
    """The file names of ``count`` shards (one: ``model.safetensors``)."""
    if count == 1:
        return [WEIGHTS]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


class ShardWriter:
    """Streams tensors into shards of at most ``max_bytes`` each (a larger single group gets a shard
    of its own). Every shard's ``__metadata__`` holds ``format: pt`` and whatever ``metadata`` the
    groups written into it asked for (JSON-merged under their keys)."""

    def __init__(self, folder: Path, max_bytes: int | None = None) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.weight_map: dict[str, int] = {}  # tensor name -> shard number (0-based)
        self.total_size = 0
        self._count = 0
        self._open: _OpenShard | None = None

    def write(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, dict] | None = None) -> None:
        """Append one group of tensors (kept in one shard); ``metadata``: {key: {entry: value}}
        merged into the shard's ``__metadata__[key]`` (stored as JSON)."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._open is not None and self.max_bytes is not None and self._open.size + size > self.max_bytes:
            self._finish_shard()
        if self._open is None:
            self._open = _OpenShard(self.folder / f".shard-{self._count:05d}", self._count)
            self._count += 1
        for name, tensor in tensors.items():
            if name in self.weight_map:
                raise ValueError(f"tensor {name} written twice")
            self._open.add(name, tensor)
            self.weight_map[name] = self._open.number
            self.total_size += tensor.numel() * tensor.element_size()
        for key, entries in (metadata or {}).items():
            self._open.metadata.setdefault(key, {}).update(entries)

    def close(self) -> list[str]:
        """Finish the last shard, give every shard its final name; return the file names."""
        if self._open is not None or self._count == 0:
            if self._open is None:  # nothing was written: one empty shard
                self._open = _OpenShard(self.folder / f".shard-{self._count:05d}", self._count)
                self._count += 1
            self._finish_shard()
        names = shard_names(self._count)
        for number, name in enumerate(names):
            os.replace(self.folder / f".shard-{number:05d}.safetensors", self.folder / name)
        if self._count > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: names[n] for name, n in sorted(self.weight_map.items())},
            }
            (self.folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return names

    def _finish_shard(self) -> None:
        assert self._open is not None
        self._open.finish()
        self._open = None


class _OpenShard:
    def __init__(self, stem: Path, number: int) -> None:
        self.number = number
        self.final = stem.with_name(stem.name + ".safetensors")
        self.data_path = stem.with_name(stem.name + ".data")
        self.data = open(self.data_path, "wb")  # noqa: SIM115 (closed in finish)
        self.entries: dict[str, dict[str, Any]] = {}
        self.metadata: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"cannot store {name}: dtype {tensor.dtype} is not supported")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
        if raw.numel():
            self.data.write(raw.numpy())  # the tensor's own bytes, no further copy
        nbytes = flat.numel() * flat.element_size()
        self.entries[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.size, self.size + nbytes],
        }
        self.size += nbytes

    def finish(self) -> None:
        self.data.close()
        metadata = {"format": "pt"}
        for key, entries in sorted(self.metadata.items()):
            metadata[key] = json.dumps(dict(sorted(entries.items())), separators=(",", ":"))
        header = {"__metadata__": dict(sorted(metadata.items())), **self.entries}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(self.final, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self.data_path.unlink()


def shard_files(folder: Path) -> dict[str, str]:
    """{tensor name: shard file name} of a stored model (one file, or an index and its shards)."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read {index}: {exc}") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and "/" not in v and v.endswith(".safetensors")
            for k, v in weight_map.items()
        ):
            raise ValueError(f"{index}: weight_map must map tensor names to shard files in the folder")
        return dict(weight_map)
    if not (folder / WEIGHTS).is_file():
        raise ValueError(f"{folder} holds neither {WEIGHTS} nor {WEIGHTS_INDEX}")
    with safe_open(str(folder / WEIGHTS), framework="pt") as fh:
        return {key: WEIGHTS for key in fh.keys()}


CHUNK_BYTES = 64 * 2**20  # how much of one tensor is read at a time


def tensor_chunks(path: Path | str, name: str, *, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """Tensor ``name`` of safetensors file ``path``, in consecutive slices along its first dim.

    The file is reopened for every slice, so the pages of its memory map that a slice touched are
    released before the next: reading a 1 GB tensor costs a slice of memory, not 1 GB of mapped
    file on top of the copy.
    """
    with safe_open(str(path), framework="pt") as fh:
        shape = fh.get_slice(name).get_shape()
    if not shape:
        with safe_open(str(path), framework="pt") as fh:
            yield fh.get_tensor(name)
        return
    row_bytes = max(1, math.prod(shape[1:]) * _itemsize(path, name))
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, shape[0], step):
        with safe_open(str(path), framework="pt") as fh:
            yield fh.get_slice(name)[start : start + step]


def read_tensor(path: Path | str, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tensor ``name`` of ``path``, read slice by slice into one buffer (see :func:`tensor_chunks`)."""
    with safe_open(str(path), framework="pt") as fh:
        sliced = fh.get_slice(name)
        shape, stored = sliced.get_shape(), _SAFE_DTYPES[sliced.get_dtype()]
    out = torch.empty(shape, dtype=dtype or stored)
    if not shape:
        out.copy_(next(tensor_chunks(path, name)))
        return out
    start = 0
    for chunk in tensor_chunks(path, name):
        out[start : start + chunk.shape[0]].copy_(chunk)
        start += chunk.shape[0]
    return out


def _itemsize(path: Path | str, name: str) -> int:
    with safe_open(str(path), framework="pt") as fh:
        return torch.empty(0, dtype=_SAFE_DTYPES[fh.get_slice(name).get_dtype()]).element_size()


_SAFE_DTYPES = {code: dtype for dtype, code in _DTYPES.items()}
