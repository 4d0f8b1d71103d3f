"""Export a cdq output folder to compressed-tensors' ``pack-quantized`` layout: what llm-compressor
writes, what vLLM serves natively and transformers loads with the ``compressed-tensors`` package.

Per quantized Linear ``NAME`` (weight (out, in), ``G`` groups, ``b`` bits)::

    NAME.weight_packed      int32 (out, ceil(in·b/32))  codes along the INPUT dim, one little-endian
                                                        bit stream per output row: value k at stream
                                                        bits k·b … k·b+b−1 (3-bit values straddle
                                                        words); the tail of the last word is zero
    NAME.weight_scale       model dtype (out, G)        G = 1 per channel
    NAME.weight_zero_point  int32 (ceil(out·b/32), G)   asymmetric grids only: the zero-points packed
                                                        the same way along the OUTPUT dim
    NAME.weight_shape       int64 (2,)                  [out, in]
    NAME.bias               as stored                   (only if the layer has one)

Everything else (embeddings, norms, lm_head, layers kept in full precision) is copied as it is.

Conventions (read from compressed-tensors' own compressor and ``QuantizationArgs``, 0.18–0.20):

* **Values.** compressed-tensors quantizes to signed integers ``q ∈ [−2^(b−1), 2^(b−1) − 1]`` and
  packs ``q + 2^(b−1)``; zero-points likewise. cdq's codes ``c ∈ [0, 2^b − 1]`` and zero-points
  ``z`` are exactly those stored values, so ``W = scale·(q − zp) = scale·(c − z)``: no zero-point
  range is lost (unlike GPTQ v1's ``z − 1``). Symmetric grids store no zero-point (``zp = 0``, i.e.
  ``z = 2^(b−1)``, which cdq's symmetric grids always have).
* **Packing.** 32 consecutive values fill exactly ``b`` words (cdq's own :mod:`packing` stream),
  truncated to ``ceil(n·b/32)`` words. For 2, 4 and 8 bits this is also the layout of every older
  compressed-tensors; for 3 bits it is the dense layout of compressed-tensors ≥ 0.18 (0.17 and
  older put 10 values in a word and leave 2 bits empty, and would misread it).
* **Strategies.** Grouped grids are ``strategy: group``; per-channel and per-layer grids (one scale,
  written as equal per-channel scales, which is exact) are ``strategy: channel``.
* **Act-order.** cdq's act-order GPTQ (``--method gptq`` unless ``-o act_order=false``, and cdq's
  act-order starts) keeps every group on its natural columns ("static groups"), which is
  compressed-tensors' ``actorder: weight``:
  the checkpoint needs no ``weight_g_idx`` (an identity permutation). The ``group`` ordering that
  stored one was removed in compressed-tensors 0.19; cdq never produces it.
* **Which layers.** One grid for every quantized layer: ``targets: ["Linear"]`` and ``ignore``
  listing every other 2-D weight (lm_head, layers ``--skip`` kept). Mixed grids (``--layer``): one
  config group per grid, its targets the layers' names (``re:`` patterns where block indices
  generalise without catching another layer), so the groups never overlap.
* **Scales** are stored in the model's dtype, as llm-compressor does; for a float32 model that is
  exact, otherwise ``max_scale_rounding`` reports the largest relative change.

Refused (one line): outliers, Conv2d or fused-expert layers (3-D/4-D weights), vision models,
symmetric grids whose zero-point is not ``2^(b−1)``, scales the model's dtype cannot hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..solvers import GridSpec
from ..solvers.packing import pack
from .exporting import (
    ExportError,
    ExportFormat,
    copy_companions,
    merged_transform,
    read_json,
    refuse_same_folder,
    write_json,
)
from .files import atomic_folder, check_output_dir
from .folder import OutputWeights
from .layer import QuantizedLayer, spec_of
from .names import REPORT
from .shards import ShardWriter

FORMAT_LAYOUT = "pack-quantized"
# The compressed-tensors release whose layout this is (3-bit: dense packing since 0.18).
LAYOUT_VERSION = "0.18.0"
OUTLIER_METHODS = ("quantease-outlier",)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # what vLLM runs as one matrix


@dataclass
class CompressedSummary:
    """What was written, for the CLI's message and ``--json``."""

    dest: Path
    layers: int
    grids: list[dict[str, Any]]
    ignored: list[str]
    scale_dtype: str
    max_scale_rounding: float
    engines: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        grids = ", ".join(
            f"{g['bits']}-bit {'group ' + str(g['group_size']) if g['group_size'] else 'per channel'} "
            f"{'sym' if g['sym'] else 'asym'} ({g['layers']} layers)"
            for g in self.grids
        )
        kept = f"; {len(self.ignored)} matrices kept as they are" if self.ignored else ""
        return {
            "output": str(self.dest),
            "format": "compressed-tensors",
            "headline": (
                f"compressed-tensors {FORMAT_LAYOUT}, {grids}{kept}; scales in {self.scale_dtype} "
                f"(max relative rounding {self.max_scale_rounding:.2g})"
            ),
            "layout": FORMAT_LAYOUT,
            "layers": self.layers,
            "grids": self.grids,
            "ignore": self.ignored,
            "scale_dtype": self.scale_dtype,
            "max_scale_rounding": self.max_scale_rounding,
            "engines": self.engines,
        }


def preflight(
    layers: Mapping[str, tuple[tuple[int, ...], GridSpec]], *, method: str, skipped: Sequence[str] = ()
) -> None:
    """Refuse, before any work, what the format cannot hold (the values are checked on export)."""
    if method in OUTLIER_METHODS:
        raise ExportError(
            f"--method {method} keeps full-precision outliers, which compressed-tensors cannot hold"
        )
    for name, (shape, _spec) in layers.items():
        check_shape(name, shape)


def check_shape(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ExportError(
            f"{name}: compressed-tensors' pack-quantized export holds Linear layers only "
            f"(weight shape {list(shape)})"
        )


def compressed_tensors(layer: QuantizedLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """weight_packed, weight_scale, weight_zero_point (asymmetric) and weight_shape of one layer."""
    spec = layer.spec
    check_shape(layer.name, layer.shape)
    if layer.outlier_count:
        raise ExportError(
            f"{layer.name}: {layer.outlier_count} full-precision outliers cannot be stored in "
            "compressed-tensors"
        )
    out, columns = layer.shape
    zeros = layer.zeros.to(torch.float64)
    if not bool((zeros == zeros.round()).all()) or bool((zeros < 0).any()) or bool((zeros > spec.maxq).any()):
        raise ExportError(f"{layer.name}: zero-points must be integers in [0, {spec.maxq}]")
    middle = 2 ** (spec.bits - 1)
    if spec.sym and not bool((zeros == middle).all()):
        raise ExportError(f"{layer.name}: a symmetric grid must have zero-point {middle}")
    scales = layer.scales.to(dtype)
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise ExportError(
            f"{layer.name}: scales do not fit in {str(dtype).removeprefix('torch.')} (zero or overflowing)"
        )
    # (out, G); a per-layer grid is stored as per-channel scales that are all equal (exact)
    assert tuple(scales.shape) == (out, spec.n_groups(columns))
    tensors = {
        # cdq's qweight is this very bit stream, padded to whole 32-value blocks: drop the padding words
        "weight_packed": layer.qweight[:, : _words(columns, spec.bits)].contiguous(),
        "weight_scale": scales.contiguous(),
        "weight_shape": torch.tensor([out, columns], dtype=torch.int64),
    }
    if not spec.sym:
        stored = zeros.to(torch.int64).T.contiguous()  # (G, out): packed along the output dim
        tensors["weight_zero_point"] = pack(stored, spec.bits)[:, : _words(out, spec.bits)].T.contiguous()
    return tensors


def export_compressed(
    source: Path | str,
    dest: Path | str | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> CompressedSummary:
    """Write the compressed-tensors checkpoint of the cdq output folder ``source`` to ``dest``
    (atomically), one tensor at a time into shards of at most ``max_shard_bytes`` (None: one file)."""
    source = Path(source).absolute()
    dest = Path(dest).absolute() if dest is not None else FORMAT.default_dest(source)
    refuse_same_folder(source, dest, "compressed-tensors")
    stored = OutputWeights(source)
    table = stored.table
    if table.get("kind", "causal-lm") != "causal-lm":
        raise ExportError(
            f"{source} holds a {table.get('kind')!r} model; the compressed-tensors export is for causal "
            "LMs (transformers, vLLM)"
        )
    if not stored.layer_meta:
        raise ExportError(f"{source} has no quantized layers (--bits 16?); nothing to export")
    specs = {name: spec_of(name, meta) for name, meta in stored.layer_meta.items()}
    preflight({n: (shape, spec) for n, (spec, shape, _) in specs.items()}, method=str(table.get("method")))
    check_output_dir(dest, overwrite=overwrite, protect=[source])
    config = read_json(source / "config.json")
    if not config:
        raise ExportError(
            f"{source} has no config.json; the compressed-tensors export needs the model's config"
        )
    tied = bool(config.get("tie_word_embeddings", False))
    run = read_json(source / REPORT).get("run", {})
    transform = merged_transform(table, "compressed-tensors")
    dtype = stored.dtype

    rounding = 0.0
    matrices: list[str] = []  # modules holding a plain 2-D weight: not quantized, so ignored
    with atomic_folder(dest, overwrite=overwrite, protect=[source]) as tmp:
        shards = ShardWriter(tmp, max_shard_bytes)
        for name in stored.names():
            if name in stored.params:  # a quantized layer: its packed tensors
                layer = stored.layer(stored.params[name])
                tensors = compressed_tensors(layer, dtype)
                shards.write({f"{layer.name}.{leaf}": t for leaf, t in tensors.items()})
                exact = layer.scales.to(torch.float64)
                rounding = max(
                    rounding, float(((layer.scales.to(dtype).to(torch.float64) - exact) / exact).abs().max())
                )
                continue
            tensor = stored.tensor(name)
            if tensor.dim() == 2 and name.endswith(".weight"):
                matrices.append(name.removesuffix(".weight"))
            if not (tied and name == "lm_head.weight" and name in stored.aliases):
                shards.write({name: tensor})  # a tied head is re-tied by transformers from the config
        shards.close()
        block = quantization_config(specs, matrices, stored.names(), run, transform)
        config["quantization_config"] = block
        write_json(tmp / "config.json", config)
        copy_companions(source, tmp)
    grids = _grid_rows(specs)
    return CompressedSummary(
        dest=dest,
        layers=len(specs),
        grids=grids,
        ignored=block["ignore"],
        scale_dtype=str(dtype).removeprefix("torch."),
        max_scale_rounding=rounding,
        engines=engines_note(specs, block["ignore"]),
    )


def quantization_config(
    specs: Mapping[str, tuple[GridSpec, tuple[int, ...], int]],
    matrices: list[str],
    names: list[str],
    run: Mapping[str, Any],
    transform: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json's ``quantization_config`` block (the fields compressed-tensors itself writes,
    plus ``cdq_transform``: the ``--transform`` merged into the weights, which compressed-tensors
    ignores; its own ``transform_config`` is for transforms applied at inference, so it stays empty)."""
    by_grid: dict[tuple, list[str]] = {}
    for name, (spec, _, _) in specs.items():
        by_grid.setdefault(_grid_key(spec), []).append(name)
    options = run.get("options", {}) if isinstance(run, Mapping) else {}
    # GPTQ runs act-order unless -o act_order=false (static groups: the stored order is natural)
    gptq_order = run.get("method") == "gptq" and options.get("act_order", True) is True
    actorder = "weight" if options.get("act_order") is True or gptq_order else None
    modules = sorted({name.rpartition(".")[0] for name in names} | set(specs))
    groups = {}
    for number, (key, members) in enumerate(sorted(by_grid.items(), key=lambda item: -len(item[1]))):
        targets = ["Linear"] if len(by_grid) == 1 else _targets(members, modules)
        groups[f"group_{number}"] = {
            "targets": targets,
            "weights": _weights_args(key, actorder),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT_LAYOUT,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT_LAYOUT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(set(matrices) - set(specs)),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": LAYOUT_VERSION,
        "cdq_transform": dict(transform or {"name": "none"}),
    }


def engines_note(specs: Mapping[str, tuple[GridSpec, tuple[int, ...], int]], ignored: list[str]) -> str:
    """Which runtimes can run the export (printed after every export)."""
    bits = sorted({spec.bits for spec, _, _ in specs.values()})
    low = [b for b in bits if b not in (4, 8)]
    parts = []
    if not low:
        parts.append(
            "vLLM (compressed-tensors WNA16: 4/8-bit, grouped or per channel; its Marlin kernels want --sym)"
        )
    else:
        parts.append(
            f"vLLM: no ({'/'.join(map(str, low))}-bit: its compressed-tensors kernels take 4/8-bit only)"
        )
    parts.append(
        "transformers with the compressed-tensors package (dequantized on load"
        + (
            "; 3-bit needs compressed-tensors >= 0.18: older releases pack 3-bit differently)"
            if 3 in bits
            else ")"
        )
    )
    split = _split_fused(specs, ignored)
    if split:
        parts.append(f"vLLM fuses {split} and needs one grid for all of them")
    return "; ".join(parts)


def _split_fused(
    specs: Mapping[str, tuple[GridSpec, tuple[int, ...], int]], ignored: list[str]
) -> str | None:
    """The first set of layers vLLM runs as one matrix (q/k/v, gate/up) that got different grids."""
    grid = {name: _grid_key(spec) for name, (spec, _, _) in specs.items()}
    grid.update({name: None for name in ignored})
    for name in grid:
        parent, _, leaf = name.rpartition(".")
        for fused in FUSED:
            if leaf == fused[0]:
                members = [f"{parent}.{m}" for m in fused]
                found = {grid[m] for m in members if m in grid}
                if len(found) > 1:
                    return "/".join(fused) + f" (e.g. in {parent})"
    return None


def _grid_key(spec: GridSpec) -> tuple[int, int | None, bool]:
    """A grid as compressed-tensors sees it (a per-layer grid is a channel grid)."""
    return (spec.bits, spec.group_size, spec.sym)


def _weights_args(key: tuple[int, int | None, bool], actorder: str | None) -> dict[str, Any]:
    bits, group, sym = key
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "group_size": group,
        "strategy": "group" if group else "channel",
        "block_structure": None,
        "dynamic": False,
        "actorder": actorder,
        "observer": None,
        "observer_kwargs": {},
    }


def _grid_rows(specs: Mapping[str, tuple[GridSpec, tuple[int, ...], int]]) -> list[dict[str, Any]]:
    counts: dict[tuple, int] = {}
    for spec, _, _ in specs.values():
        counts[_grid_key(spec)] = counts.get(_grid_key(spec), 0) + 1
    return [
        {"bits": b, "group_size": g, "sym": s, "layers": n}
        for (b, g, s), n in sorted(counts.items(), key=lambda item: -item[1])
    ]


def _targets(members: list[str], modules: list[str]) -> list[str]:
    """Names matching exactly ``members`` among ``modules``: ``re:`` patterns with block indices
    generalised where that catches no other module, the plain name otherwise."""
    chosen = set(members)
    targets: list[str] = []
    for name in members:
        general = "^" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) + "$"
        if general != "^" + re.escape(name) + "$":
            compiled = re.compile(general)
            caught = {m for m in modules if compiled.match(m)}
            if caught <= chosen:
                if f"re:{general}" not in targets:
                    targets.append(f"re:{general}")
                continue
        targets.append(name)
    return targets


def _words(count: int, bits: int) -> int:
    return math.ceil(count * bits / 32)


FORMAT = ExportFormat(
    name="compressed-tensors",
    suffix="-ct",
    description="compressed-tensors pack-quantized (what llm-compressor writes and vLLM serves)",
    preflight=preflight,
    export=export_compressed,
)
