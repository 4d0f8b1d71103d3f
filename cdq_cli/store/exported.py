"""Quantized checkpoints in other layouts, read back as plain weights one tensor at a time: the
:class:`~cdq_cli.records.Weights` source with which ``cdq eval`` scores a GPTQ or compressed-tensors
folder (cdq's own exports, or what auto-gptq, gptqmodel or llm-compressor wrote) block by block,
with memory for about one block, like a cdq output folder.

Decoded here, with cdq's own unpacking (:func:`~cdq_cli.solvers.packing.unpack`), for every Linear
stored packed (``NAME.qweight`` / ``NAME.weight_packed``)::

    W[o, i] = scale[o, g(i)] · (code[o, i] − zero[o, g(i)])

* compressed-tensors ``pack-quantized`` groups of integer weights without activation quantization
  (:func:`.compressed.unpack_compressed`; what cdq writes, and llm-compressor's W4A16/W8A16);
  each layer's bits and symmetry come from the one config group whose ``targets`` match it (its
  name, a ``re:`` pattern, or its class) and which does not ``ignore`` it, as compressed-tensors
  itself resolves them;
* GPTQ, ``checkpoint_format`` gptq (v1: zero-points stored minus one) or gptq_v2
  (:func:`.gptq.unpack_gptq`), act-order ``g_idx`` included.

W is computed in float32 (float64 for float64 scales) from scales widened exactly, then cast to the
model's dtype once. That is the same arithmetic as cdq's own
:meth:`~cdq_cli.store.layer.QuantizedLayer.dequantize`, so an export holding cdq's codes,
zero-points and scales gives bit-for-bit the weights of the cdq folder it came from; where the
format stores scales in a narrower dtype (GPTQ: float16), the weights are cdq's codes on those
rounded scales, exactly (the export reports the rounding as ``max_scale_rounding``).

Anything else (activation or KV-cache quantization, sparsity, transforms, other formats and
methods) is not the weight-only arithmetic above: :func:`undecodable` names why, and the caller
loads such a folder through transformers instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .compressed import READ_LEAVES as COMPRESSED_LEAVES
from .compressed import unpack_compressed
from .experts import LAYOUTS, ExpertLayout
from .exporting import ExportError
from .folder import CheckpointError
from .gptq import READ_LEAVES as GPTQ_LEAVES
from .gptq import unpack_gptq
from .shards import read_tensor, shard_files


def quantization_block(folder: Path | str) -> dict[str, Any] | None:
    """``quantization_config`` of a model folder's config.json, or None (no config, not quantized)."""
    config = Path(folder) / "config.json"
    if not Path(folder).is_dir() or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config}: {exc}") from None
    block = data.get("quantization_config") if isinstance(data, dict) else None
    return block if isinstance(block, dict) else None


def undecodable(block: Mapping[str, Any]) -> str | None:
    """Why ``block`` (a quantization_config) is not a weight-only GPTQ or pack-quantized
    checkpoint that :class:`ExportedWeights` reads, or None when it is."""
    method = block.get("quant_method")
    if method == "gptq":
        layout = block.get("checkpoint_format") or "gptq"
        if layout not in ("gptq", "gptq_v2"):
            return f"GPTQ checkpoint format {layout!r}"
        if not _bits_ok(block.get("bits")):
            return f"{block.get('bits')!r}-bit GPTQ"
        if str(block.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
            return f"GPTQ pack_dtype {block.get('pack_dtype')!r}"
        if block.get("dynamic"):
            return "per-module GPTQ overrides ('dynamic')"
        return None
    if method == "compressed-tensors":
        for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
            if block.get(key):
                return f"compressed-tensors {key}"
        if block.get("quantization_status", "compressed") != "compressed":
            return f"compressed-tensors status {block.get('quantization_status')!r}"
        groups = block.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            return "compressed-tensors without config_groups"
        for name, group in groups.items():
            layout = (group or {}).get("format") or block.get("format")
            if layout != "pack-quantized":
                return f"compressed-tensors format {layout!r} ({name})"
            if group.get("input_activations") or group.get("output_activations"):
                return f"activation quantization ({name})"
            weights = group.get("weights") or {}
            if (
                weights.get("type", "int") != "int"
                or not _bits_ok(weights.get("num_bits", 8))
                or weights.get("dynamic")
                or weights.get("strategy") not in ("channel", "group", "tensor")
                or (weights.get("strategy") == "tensor" and not weights.get("symmetric", True))
            ):
                return f"compressed-tensors weights {weights.get('type')} {weights.get('strategy')} ({name})"
        return None
    return f"quant_method {method!r}"


def _bits_ok(bits: Any) -> bool:
    return type(bits) is int and 1 <= bits <= 8


def dequantize_columns(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale[o, g(i)]·(code[o, i] − zero[o, g(i)])`` for (out, in) codes and (out, G) scales and
    zero-points; ``groups`` maps columns to groups (None: consecutive columns of equal groups).
    Computed in float32 (float64 for float64 scales), the arithmetic of cdq's own grids
    (:meth:`~cdq_cli.solvers.Grid.dequantize`), broadcast per group when the groups are
    consecutive, gathered per column otherwise (act-order)."""
    rows, columns = codes.shape
    count = scales.shape[1]
    work = torch.float64 if scales.dtype == torch.float64 else torch.float32
    scales, zeros = scales.to(work), zeros.to(work)
    consecutive = torch.arange(columns) // max(columns // count, 1)
    if columns % count == 0 and (groups is None or torch.equal(groups, consecutive)):
        grouped = codes.reshape(rows, count, columns // count).to(work)
        return (scales.unsqueeze(-1) * (grouped - zeros.unsqueeze(-1))).reshape(rows, columns)
    if groups is None:
        raise ValueError(f"{count} groups do not divide {columns} columns: a column-to-group map is needed")
    return scales[:, groups] * (codes.to(work) - zeros[:, groups])


class ExportedWeights:
    """A GPTQ or compressed-tensors folder's tensors by the plain model's state-dict names
    (``NAME.weight`` for every packed layer, dequantized when read; everything else as stored, float
    tensors in the model's ``dtype``). ``classes`` maps each module name of the model to the names
    of its classes (the MRO), for config groups that target a class such as ``Linear``.

    For a mixture-of-experts ``model_type`` (:mod:`.experts`), the checkpoint's per-expert matrices
    (packed or plain) are read back into transformers 5's fused parameters, ``gate_up_proj[e] =
    cat(gate[e], up[e])`` and ``down_proj[e] = down[e]``, and every other name is mapped back to
    the model's (Mixtral: ``block_sparse_moe`` -> ``mlp``); a per-expert matrix counts as a
    ``Linear`` for the config groups, as it is one in the checkpoint's layout."""

    def __init__(
        self,
        folder: Path | str,
        block: Mapping[str, Any],
        dtype: torch.dtype,
        classes: Mapping[str, Sequence[str]],
        model_type: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.block = dict(block)
        self.dtype = dtype
        why = undecodable(self.block)
        if why is not None:
            raise CheckpointError(f"{self.folder}: cdq does not decode {why}")
        self.gptq = self.block["quant_method"] == "gptq"
        self.leaves = GPTQ_LEAVES if self.gptq else COMPRESSED_LEAVES
        self.marker = self.leaves[0]
        try:
            self.files = shard_files(self.folder)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        self.layout: ExpertLayout | None = LAYOUTS.get(str(model_type))
        # fused parameter -> {(expert, "gate"/"up"/"down"): the checkpoint module holding it}
        self.experts: dict[str, dict[tuple[int, str], str]] = {}
        self._expert_keys: dict[str, str] = {}  # per-expert checkpoint key -> its fused parameter
        if self.layout is not None:
            self._find_experts(self.layout)
        owners = [key.rpartition(".")[0] for key in self.files if key.rpartition(".")[2] == self.marker]
        expert_owners = {owner for parts in self.experts.values() for owner in parts.values()}
        self.layers = {
            owner: self._grid(
                owner, ("Linear",) if owner in expert_owners else classes.get(self._model(owner), ())
            )
            for owner in owners
        }
        self.params = {
            f"{self._model(owner)}.weight": owner for owner in self.layers if owner not in expert_owners
        }

    def _model(self, key: str) -> str:
        """A checkpoint name as the model names it."""
        return self.layout.model_name(key) if self.layout is not None else key

    def _find_experts(self, layout: ExpertLayout) -> None:
        pattern = layout.expert_pattern()
        projections = {layout.gate: "gate", layout.up: "up", layout.down: "down"}
        for key in self.files:
            found = pattern.match(key)
            if found is None:
                continue
            if found["leaf"] not in (*self.leaves, "weight"):
                raise CheckpointError(
                    f"{self.folder}: {key} is not a tensor of a fused expert's weight (cdq fuses "
                    "weights only)"
                )
            param = layout.fused_param(found["owner"], found["projection"])
            owner = key.rpartition(".")[0]
            self._expert_keys[key] = param
            self.experts.setdefault(param, {})[(int(found["expert"]), projections[found["projection"]])] = (
                owner
            )

    def names(self) -> list[str]:
        names = []
        fused: set[str] = set()
        for key in self.files:
            if key in self._expert_keys:
                if self._expert_keys[key] not in fused:
                    fused.add(self._expert_keys[key])
                    names.append(self._expert_keys[key])
                continue
            owner, _, leaf = key.rpartition(".")
            if owner in self.layers and leaf in self.leaves:
                if leaf == self.marker:
                    names.append(f"{self._model(owner)}.weight")
                continue
            names.append(self._model(key))
        return names

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` in ``dtype`` (None: the checkpoint's); a packed layer is decoded (in
        float32) and converted once."""
        dtype = dtype or self.dtype
        if name in self.experts:
            return self.fused(name).to(dtype)
        if name in self.params:
            return self.layer(self.params[name]).to(dtype)
        key = self.layout.checkpoint_name(name) if self.layout is not None else name
        tensor = self._read(key)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    def fused(self, param: str) -> torch.Tensor:
        """Fused experts ``param`` (E, out, in) from the checkpoint's per-expert matrices: each
        expert's gate rows above its up rows (``gate_up_proj``), or its down matrix."""
        parts = self.experts[param]
        count = 1 + max(expert for expert, _ in parts)
        wanted = ("down",) if param.endswith(".down_proj") else ("gate", "up")
        missing = [(e, p) for e in range(count) for p in wanted if (e, p) not in parts]
        if missing:
            expert, projection = missing[0]
            raise CheckpointError(
                f"{self.folder}: the experts of {param} are incomplete (no {projection} projection "
                f"of expert {expert})"
            )
        matrices = [torch.cat([self._matrix(parts[(expert, p)]) for p in wanted]) for expert in range(count)]
        if len({tuple(m.shape) for m in matrices}) != 1:
            raise CheckpointError(f"{self.folder}: the experts of {param} differ in shape")
        return torch.stack(matrices)

    def _matrix(self, owner: str) -> torch.Tensor:
        """One checkpoint matrix: decoded when packed, as stored otherwise."""
        if owner in self.layers:
            return self.layer(owner)
        return self._read(f"{owner}.weight").to(torch.float32)

    def layer(self, owner: str) -> torch.Tensor:
        """Layer ``owner``'s weight, dequantized (float32, or float64 for float64 scales)."""
        tensors = {
            leaf: self._read(f"{owner}.{leaf}") for leaf in self.leaves if f"{owner}.{leaf}" in self.files
        }
        bits, sym, group_size = self.layers[owner]
        try:
            if self.gptq:
                layout = self.block.get("checkpoint_format") or "gptq"
                unpacked = unpack_gptq(
                    tensors, owner, bits=bits, group_size=group_size, checkpoint_format=layout
                )
            else:
                unpacked = unpack_compressed(tensors, owner, bits=bits, symmetric=sym)
        except ExportError as exc:
            raise CheckpointError(f"{self.folder}: {exc}") from None
        return dequantize_columns(*unpacked)

    def close(self) -> None:
        """Nothing to release (every read opens and closes its shard)."""

    def _read(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"{self.folder} holds no tensor {name}")
        path = self.folder / self.files[name]
        try:
            return read_tensor(path, name)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise CheckpointError(
                f"cannot read {path}: {text[0][:200] if text else type(exc).__name__}"
            ) from None

    def _grid(self, owner: str, classes: Sequence[str]) -> tuple[int, bool, int]:
        """(bits, symmetric, group size or −1) of a packed layer, from the quantization config."""
        if self.gptq:
            return (
                int(self.block["bits"]),
                bool(self.block.get("sym", True)),
                int(self.block.get("group_size") or -1),
            )
        ignored = self.block.get("ignore") or []
        try:
            return self._scheme(owner, classes, ignored)
        except re.error as exc:
            raise CheckpointError(
                f"{self.folder}: a config target is not a valid 're:' pattern ({exc})"
            ) from None

    def _scheme(self, owner: str, classes: Sequence[str], ignored: Sequence[str]) -> tuple[int, bool, int]:
        if _matches(owner, classes, ignored):
            raise CheckpointError(f"{self.folder}: {owner} is stored packed but its config ignores it")
        found = {
            (
                int(weights.get("num_bits", 8)),
                bool(weights.get("symmetric", True)),
                int(weights.get("group_size") or -1),
            )
            for group in self.block["config_groups"].values()
            if _matches(owner, classes, group.get("targets") or [])
            for weights in [group.get("weights") or {}]
        }
        if len(found) != 1:
            what = (
                "no config group targets it"
                if not found
                else "several config groups with different grids target it"
            )
            raise CheckpointError(f"{self.folder}: {owner} is stored packed but {what}")
        return found.pop()


def _matches(name: str, classes: Sequence[str], targets: Sequence[str]) -> bool:
    """compressed-tensors' matching: a target is the module's name, ``re:PATTERN`` (``re.match``
    on the name), or the name of one of its classes."""
    for target in targets:
        target = str(target)
        if target.startswith("re:"):
            if re.match(target.removeprefix("re:"), name):
                return True
        elif target == name or target in classes:
            return True
    return False
