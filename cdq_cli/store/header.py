"""Byte-stable safetensors files: the same tensors and metadata always give the same bytes.

safetensors (Rust) writes the ``__metadata__`` map in hash-map order, which changes from process to
process, so two identical runs would write different headers. :func:`sort_metadata` rewrites the
header in place with the metadata keys sorted; the tensors (already in a fixed order) and the
header's length are unchanged, so the file stays valid for every reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


def sort_metadata(path: Path | str) -> None:
    """Sort the ``__metadata__`` keys of a safetensors file's header, in place."""
    with open(path, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(length)
        header = json.loads(raw)
        if len(header.get("__metadata__") or {}) < 2:
            return
        # Only rewrite when Python reproduces the writer's JSON exactly (compact, raw UTF-8); a future
        # writer with another layout keeps its (valid) file, and the reproducibility tests catch it.
        if _dump(header) != raw.rstrip(b" "):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        fresh = _dump(header)
        fh.seek(8)
        fh.write(fresh + b" " * (length - len(fresh)))


def _dump(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
