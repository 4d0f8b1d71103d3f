"""One quantized layer as it is stored: packed codes, grid, outliers, and how to dequantize it.

Output folders and resume journals store a layer ``NAME`` the same way: ``NAME.qweight`` (int32,
codes packed along the input dim), ``NAME.scales``, ``NAME.zeros`` and, when outliers were kept,
``NAME.outliers_idx`` / ``NAME.outliers_val`` (COO).

A layer on a GGUF block type's grid (its table entry names the ``block_type``) stores, instead of
``scales``/``zeros``, the type's own stored scales: ``NAME.gguf_d`` (float16 per block) and, as
the type has them, ``NAME.gguf_dmin``, ``NAME.gguf_m`` (float16 per block) and
``NAME.gguf_scales``, ``NAME.gguf_mins`` (int16 per sub-block); its grid is
:func:`cdq_cli.solvers.gguf.grid_of` of those, bit for bit what llama.cpp computes from the file.

The pipeline writes ``QuantizedLayer.dequantize()`` into the model and the checkpoint reader calls
the same function on the stored tensors, so the reloaded weights are bit-for-bit the ones the
in-memory model used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..solvers import SUPPORTED_BITS, Grid, GridSpec, QuantResult
from ..solvers.gguf import grid_of
from ..solvers.gguf_types import BLOCK_TYPES
from ..solvers.packing import pack, packed_length, unpack

# A GGUF layer's stored scales, by part name (solvers.gguf): leaf, dtype, one per block or sub-block.
GGUF_PARTS = {
    "d": ("gguf_d", torch.float16, "block"),
    "dmin": ("gguf_dmin", torch.float16, "block"),
    "m": ("gguf_m", torch.float16, "block"),
    "scales": ("gguf_scales", torch.int16, "group"),
    "mins": ("gguf_mins", torch.int16, "group"),
}
LEAVES = ("qweight", "scales", "zeros", "outliers_idx", "outliers_val") + tuple(
    leaf for leaf, _, _ in GGUF_PARTS.values()
)


@dataclass
class QuantizedLayer:
    """Storage form of a solver result. ``shape`` is the layer weight's shape (Conv2d: 4-D)."""

    name: str
    spec: GridSpec
    shape: tuple[int, ...]
    qweight: torch.Tensor  # int32 (out, packed), codes packed along the input dim
    scales: torch.Tensor  # (out, n_groups), the solver's dtype
    zeros: torch.Tensor  # (out, n_groups), integer-valued, same dtype as scales
    outliers_idx: torch.Tensor | None = None  # int64 (2, nnz): row, column
    outliers_val: torch.Tensor | None = None  # (nnz,), scales' dtype
    parts: dict[str, torch.Tensor] | None = None  # a GGUF type's stored scales (scales/zeros derive)

    @property
    def rows(self) -> int:
        return matrix_shape(self.shape)[0]

    @property
    def columns(self) -> int:
        return matrix_shape(self.shape)[1]

    @property
    def outlier_count(self) -> int:
        return 0 if self.outliers_val is None else int(self.outliers_val.numel())

    @classmethod
    def from_result(cls, name: str, result: QuantResult, shape: tuple[int, ...]) -> QuantizedLayer:
        """Pack a solver result on the CPU."""
        idx = val = None
        if result.outliers is not None and bool((result.outliers != 0).any()):
            dense = result.outliers.detach().cpu()
            idx = dense.nonzero().T.contiguous()
            val = dense[idx[0], idx[1]].contiguous()
        parts = None
        if result.grid.parts is not None:
            parts = {key: value.detach().cpu().contiguous() for key, value in result.grid.parts.items()}
        return cls(
            name=name,
            spec=result.grid.spec,
            shape=tuple(shape),
            qweight=pack(result.codes.detach().cpu(), result.grid.spec.bits),
            scales=result.grid.scale.detach().cpu().contiguous(),
            zeros=result.grid.zero.detach().cpu().contiguous(),
            outliers_idx=idx,
            outliers_val=val,
            parts=parts,
        )

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.spec.bits, self.columns, torch.uint8)

    def dequantize(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Ŵ = grid.dequantize(codes) + outliers, in the scales' dtype, shaped like the layer weight."""
        grid = self.grid().to(device)
        weight = grid.dequantize(self.codes().to(device))
        if self.outliers_idx is not None and self.outliers_val is not None:
            dense = torch.zeros_like(weight)
            dense[self.outliers_idx[0].to(device), self.outliers_idx[1].to(device)] = self.outliers_val.to(
                device
            )
            weight = weight + dense
        return weight.reshape(self.shape)

    def grid(self) -> Grid:
        """The layer's grid (a GGUF type's from its stored scales)."""
        if self.parts is not None:
            return grid_of(self.spec, self.parts)
        return Grid(self.spec, self.scales, self.zeros)

    def metadata(self) -> dict:
        """JSON description for the checkpoint's quantization table (stacked experts also name
        the 3-D parameter they replace; a GGUF layer its ``block_type``)."""
        extra = {"param": self.name} if len(self.shape) == 3 else {}
        if self.spec.block_type is not None:
            extra["block_type"] = self.spec.block_type
        return {
            **extra,
            "bits": self.spec.bits,
            "group_size": self.spec.group_size,
            "sym": self.spec.sym,
            "per_layer": self.spec.per_layer,
            "shape": list(self.shape),
            "outliers": self.outlier_count,
        }


def param_key(name: str, meta: dict[str, Any]) -> str:
    """The state-dict entry a stored layer replaces: ``NAME.weight`` (Linear, Conv2d), or the
    fused experts' 3-D parameter itself."""
    return str(meta.get("param", f"{name}.weight"))


def matrix_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(rows, columns) of the matrix a weight is quantized as: a Linear's (out, in); a Conv2d's
    (out, in·kh·kw); stacked experts (E, out, in) as E·out rows of ``in`` columns (every row has
    its own grid, so stacking changes nothing)."""
    if len(shape) == 3:
        return shape[0] * shape[1], shape[2]
    return shape[0], math.prod(shape[1:])


class LayerRecordError(ValueError):
    """A stored layer whose description and tensors disagree (one line naming the layer)."""


def spec_of(name: str, meta: Any) -> tuple[GridSpec, tuple[int, ...], int]:
    """(grid spec, weight shape, outlier count) of a layer's table entry, every value checked
    against what cdq writes: bits in {2, 3, 4, 8}, a positive group size dividing the width,
    booleans, a 2-D or 4-D shape of positive integers."""

    def fail(what: str) -> LayerRecordError:
        return LayerRecordError(f"layer {name}: {what}")

    if not isinstance(meta, dict):
        raise fail("its description is not a mapping")
    bits, group, sym, per_layer = (meta.get(k) for k in ("bits", "group_size", "sym", "per_layer"))
    shape, outliers = meta.get("shape"), meta.get("outliers", 0)
    if type(bits) is not int or (bits not in SUPPORTED_BITS and meta.get("block_type") is None):
        raise fail(f"bits {bits!r} is not one of {', '.join(map(str, SUPPORTED_BITS))}")
    if (
        not isinstance(shape, list)
        or len(shape) not in (2, 3, 4)
        or any(type(d) is not int or d < 1 for d in shape)
    ):
        raise fail(f"shape {shape!r} is not a list of 2 to 4 positive integers")
    width = matrix_shape(shape)[1]
    if group is not None and (type(group) is not int or group < 1 or width % group):
        raise fail(f"group size {group!r} does not divide the layer's width {width}")
    if "param" in meta and meta["param"] != name:
        raise fail(f"param {meta['param']!r} is not the layer itself")
    if type(sym) is not bool or type(per_layer or False) is not bool or (per_layer and group is not None):
        raise fail(f"sym {sym!r} / per_layer {per_layer!r} are not a valid pair of booleans")
    if type(outliers) is not int or outliers < 0:
        raise fail(f"outlier count {outliers!r} is not a non-negative integer")
    kind = meta.get("block_type")
    if kind is not None:
        found = BLOCK_TYPES.get(kind) if isinstance(kind, str) else None
        if found is None:
            raise fail(f"block type {kind!r} is not one of {', '.join(BLOCK_TYPES)}")
        spec = GridSpec.of_type(found.name)
        if (bits, group, sym, bool(per_layer)) != (spec.bits, spec.group_size, spec.sym, False):
            raise fail(f"bits/group_size/sym do not describe a {found.name} grid")
        if width % found.block or outliers:
            raise fail(f"a {found.name} layer needs a width divisible by {found.block} and no outliers")
        return spec, tuple(shape), outliers
    return GridSpec(bits, group, sym, bool(per_layer)), tuple(shape), outliers


def check_record(layer: QuantizedLayer, outliers: int) -> None:
    """The layer's tensors have exactly the sizes its grid and shape imply, and valid values."""
    rows, columns, spec = layer.rows, layer.columns, layer.spec
    groups = spec.n_groups(columns)
    if spec.block_type is not None:
        _check_gguf_record(layer)
        return
    expected = {
        "qweight": ((rows, packed_length(columns, spec.bits)), (torch.int32,)),
        "scales": ((rows, groups), _FLOATS),
        "zeros": ((rows, groups), _FLOATS),
    }
    for leaf, (shape, dtypes) in expected.items():
        tensor = getattr(layer, leaf)
        if tuple(tensor.shape) != shape or tensor.dtype not in dtypes:
            raise LayerRecordError(
                f"layer {layer.name}: {leaf} is {tensor.dtype} {tuple(tensor.shape)}, but {spec.bits}-bit "
                f"codes of a {list(layer.shape)} weight need {dtypes[0]} {shape}"
            )
    if not bool(torch.isfinite(layer.scales).all()) or not bool((layer.scales > 0).all()):
        raise LayerRecordError(f"layer {layer.name}: scales must be finite and positive")
    zeros = layer.zeros
    if not bool(((zeros >= 0) & (zeros <= spec.maxq) & (zeros == zeros.round())).all()):
        raise LayerRecordError(f"layer {layer.name}: zero-points must be integers in [0, {spec.maxq}]")
    idx, val = layer.outliers_idx, layer.outliers_val
    if outliers == 0 and idx is None and val is None:
        return
    if idx is None or val is None:
        raise LayerRecordError(f"layer {layer.name}: {outliers} outliers declared, their tensors missing")
    if idx.dtype != torch.int64 or tuple(idx.shape) != (2, outliers) or tuple(val.shape) != (outliers,):
        raise LayerRecordError(f"layer {layer.name}: outlier tensors do not hold {outliers} entries")
    if outliers and (int(idx.min()) < 0 or int(idx[0].max()) >= rows or int(idx[1].max()) >= columns):
        raise LayerRecordError(f"layer {layer.name}: outlier positions lie outside the weight")


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def gguf_part_names(block_type: str) -> tuple[str, ...]:
    """The stored-scale parts of a GGUF type (see the module docstring)."""
    kind = BLOCK_TYPES[block_type]
    names = ["d"]
    if kind.k_quant:
        names += ["scales"] if kind.symmetric else ["dmin", "scales", "mins"]
    elif not kind.symmetric:
        names.append("m")
    return tuple(names)


def _check_gguf_record(layer: QuantizedLayer) -> None:
    """A GGUF layer's codes and stored scales have the type's sizes, dtypes and ranges."""
    kind = BLOCK_TYPES[layer.spec.block_type]
    rows, columns = layer.rows, layer.columns
    where = f"layer {layer.name}"
    if (
        tuple(layer.qweight.shape) != (rows, packed_length(columns, kind.bits))
        or layer.qweight.dtype != torch.int32
    ):
        raise LayerRecordError(
            f"{where}: qweight does not hold {kind.bits}-bit codes of a {list(layer.shape)} weight"
        )
    parts = layer.parts or {}
    if set(parts) != set(gguf_part_names(kind.name)):
        raise LayerRecordError(f"{where}: a {kind.name} layer stores {', '.join(gguf_part_names(kind.name))}")
    for key, value in parts.items():
        _, dtype, per = GGUF_PARTS[key]
        count = columns // (kind.block if per == "block" else kind.group)
        if tuple(value.shape) != (rows, count) or value.dtype != dtype:
            raise LayerRecordError(
                f"{where}: {key} must be {dtype} ({rows}, {count}), got {value.dtype} {tuple(value.shape)}"
            )
        if dtype == torch.float16 and not bool(torch.isfinite(value).all()):
            raise LayerRecordError(f"{where}: {key} has non-finite values")
    if kind.k_quant:
        if kind.signed_scales:
            low, high = -(2 ** (kind.scale_bits - 1)), 2 ** (kind.scale_bits - 1) - 1
        else:
            low, high = 0, 2**kind.scale_bits - 1
        for key in ("scales", "mins"):
            if key in parts and not bool(((parts[key] >= low) & (parts[key] <= high)).all()):
                raise LayerRecordError(f"{where}: {key} outside [{low}, {high}], the {kind.name} width")


def write_layer_tensors(layer: QuantizedLayer, tensors: dict[str, torch.Tensor]) -> None:
    """Add ``layer``'s stored tensors to a safetensors dict (outliers only when kept)."""
    name = layer.name
    tensors[f"{name}.qweight"] = layer.qweight.contiguous()
    if layer.parts is not None:
        for key, value in layer.parts.items():
            leaf, dtype, _ = GGUF_PARTS[key]
            tensors[f"{name}.{leaf}"] = value.to(dtype).contiguous()
        return
    tensors[f"{name}.scales"] = layer.scales.contiguous()
    tensors[f"{name}.zeros"] = layer.zeros.contiguous()
    if layer.outliers_idx is not None and layer.outliers_val is not None:
        tensors[f"{name}.outliers_idx"] = layer.outliers_idx.contiguous()
        tensors[f"{name}.outliers_val"] = layer.outliers_val.contiguous()


def read_packed_layer(
    fh: Any, name: str, spec: GridSpec, shape: tuple[int, ...], keys: set[str]
) -> QuantizedLayer:
    """One layer's packed tensors from an open safetensors file (``keys``: the file's keys)."""
    if spec.block_type is not None:
        parts = {}
        for key in gguf_part_names(spec.block_type):
            leaf = f"{name}.{GGUF_PARTS[key][0]}"
            if leaf not in keys:
                raise LayerRecordError(f"layer {name}: {leaf} is missing")
            parts[key] = fh.get_tensor(leaf)
        layer = QuantizedLayer(name, spec, shape, fh.get_tensor(f"{name}.qweight"), None, None, parts=parts)
        _check_gguf_record(layer)
        grid = layer.grid()
        layer.scales, layer.zeros = grid.scale, grid.zero
        return layer
    has_outliers = f"{name}.outliers_idx" in keys
    return QuantizedLayer(
        name=name,
        spec=spec,
        shape=shape,
        qweight=fh.get_tensor(f"{name}.qweight"),
        scales=fh.get_tensor(f"{name}.scales"),
        zeros=fh.get_tensor(f"{name}.zeros"),
        outliers_idx=fh.get_tensor(f"{name}.outliers_idx") if has_outliers else None,
        outliers_val=fh.get_tensor(f"{name}.outliers_val") if has_outliers else None,
    )
