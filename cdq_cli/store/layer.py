"""One quantized layer as it is stored: packed codes, grid, outliers, and how to dequantize it.

Output folders and resume journals store a layer ``NAME`` the same way: ``NAME.qweight`` (int32,
codes packed along the input dim), ``NAME.scales``, ``NAME.zeros`` and, when outliers were kept,
``NAME.outliers_idx`` / ``NAME.outliers_val`` (COO).

The pipeline writes ``QuantizedLayer.dequantize()`` into the model and the checkpoint reader calls
the same function on the stored tensors, so the reloaded weights are bit-for-bit the ones the
in-memory model used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..solvers import Grid, GridSpec, QuantResult
from ..solvers.packing import pack, unpack

LEAVES = ("qweight", "scales", "zeros", "outliers_idx", "outliers_val")


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

    @property
    def columns(self) -> int:
        return math.prod(self.shape[1:])

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
        return cls(
            name=name,
            spec=result.grid.spec,
            shape=tuple(shape),
            qweight=pack(result.codes.detach().cpu(), result.grid.spec.bits),
            scales=result.grid.scale.detach().cpu().contiguous(),
            zeros=result.grid.zero.detach().cpu().contiguous(),
            outliers_idx=idx,
            outliers_val=val,
        )

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.spec.bits, self.columns).to(torch.uint8)

    def dequantize(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Ŵ = grid.dequantize(codes) + outliers, in the scales' dtype, shaped like the layer weight."""
        grid = Grid(self.spec, self.scales.to(device), self.zeros.to(device))
        weight = grid.dequantize(self.codes().to(device))
        if self.outliers_idx is not None and self.outliers_val is not None:
            dense = torch.zeros_like(weight)
            dense[self.outliers_idx[0].to(device), self.outliers_idx[1].to(device)] = self.outliers_val.to(
                device
            )
            weight = weight + dense
        return weight.reshape(self.shape)

    def metadata(self) -> dict:
        """JSON description for the checkpoint's quantization table."""
        return {
            "bits": self.spec.bits,
            "group_size": self.spec.group_size,
            "sym": self.spec.sym,
            "per_layer": self.spec.per_layer,
            "shape": list(self.shape),
            "outliers": self.outlier_count,
        }


def write_layer_tensors(layer: QuantizedLayer, tensors: dict[str, torch.Tensor]) -> None:
    """Add ``layer``'s stored tensors to a safetensors dict (outliers only when kept)."""
    name = layer.name
    tensors[f"{name}.qweight"] = layer.qweight.contiguous()
    tensors[f"{name}.scales"] = layer.scales.contiguous()
    tensors[f"{name}.zeros"] = layer.zeros.contiguous()
    if layer.outliers_idx is not None and layer.outliers_val is not None:
        tensors[f"{name}.outliers_idx"] = layer.outliers_idx.contiguous()
        tensors[f"{name}.outliers_val"] = layer.outliers_val.contiguous()


def read_packed_layer(
    fh: Any, name: str, spec: GridSpec, shape: tuple[int, ...], keys: set[str]
) -> QuantizedLayer:
    """One layer's packed tensors from an open safetensors file (``keys``: the file's keys)."""
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
