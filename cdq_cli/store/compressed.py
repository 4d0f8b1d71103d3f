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
* **Asymmetric grids load dequantized, and only as one grid.** compressed-tensors (0.20) builds a
  compressed model's zero-point slots unpacked, (out, G), while checkpoints store them packed,
  (ceil(out·b/32), G), as its own compressor writes them and vLLM reads them; so transformers'
  default (compressed) load of any asymmetric pack-quantized checkpoint, llm-compressor's own
  included, fails on a size mismatch. An export with an asymmetric grid therefore sets
  ``"dequantize": true`` in its quantization_config: the ``CompressedTensorsConfig`` field with
  which transformers (5.x) dequantizes the weights while loading, through compressed-tensors'
  decompressor (which unpacks the packed zero-points); vLLM and compressed-tensors' own config
  ignore the key. That path decodes every dense layer with ONE config group (transformers'
  ``get_dense_scheme``), so an asymmetric export with several grids would load wrong or not at all
  (``tensor column shape must be divisible by the given group_size``): it is refused before any
  work. Symmetric exports, mixed grids included, load compressed, as they are.
* **Mixture of experts.** transformers 5's fused experts (3-D ``experts.gate_up_proj`` and
  ``experts.down_proj``, one layer each in cdq's folder) are written one matrix per expert and
  projection, each as a Linear above, under the names the family's checkpoints use (and so does
  every other tensor of the model): ``block_sparse_moe.experts.E.w1/w3/w2`` for Mixtral,
  ``mlp.experts.E.gate_proj/up_proj/down_proj`` for Qwen2/3-MoE and OLMoE (:mod:`.experts`, with
  the gate/up split in transformers' own fusing order). The routers are 2-D weights left in full
  precision, so ``ignore`` names them (vLLM's Qwen3-MoE router takes the quantization config
  unless ``ignore`` says otherwise). transformers loads such a checkpoint by decoding every
  expert while it fuses them (``CompressedTensorsDequantize``, even on the default compressed
  load): with ONE config group for all experts (``get_experts_scheme``: the first group whose
  ``re:`` targets mention "experts", else the first that targets a class), without their
  zero-points, and only packed. So the experts must share one symmetric grid, none may be kept
  in full precision, and with several config groups the one transformers picks must be theirs:
  anything else is refused before any work (tests/test_moe_export.py loads Mixtral and
  Qwen3-MoE exports, mixed grids included).
* **Which engine runs it** (:func:`engines_note`, printed after every export) is worked out from
  the grids actually written, and each claim about transformers is what tests/test_compressed.py
  and tests/test_moe_export.py load: every grid, group layout and mix of them the export accepts.

Refused (one line): outliers, Conv2d layers (4-D weights), fused experts of a family whose
checkpoint names cdq does not know, or with several grids, an asymmetric grid or kept in full
precision (above), vision models, several grids of which one is asymmetric (above), symmetric grids
whose zero-point is not ``2^(b−1)``, scales the model's dtype cannot hold.
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
from ..solvers.packing import pack, packed_length, unpack
from .experts import (
    LAYOUTS,
    ExpertLayout,
    expert_layer,
    gate_up_halves,
    is_fused_name,
    is_fused_param,
    layout_for,
)
from .exporting import (
    OUTLIER_METHODS,
    ExportError,
    ExportFormat,
    copy_companions,
    merged_transform,
    read_json,
    refuse_gguf_grids,
    refuse_same_folder,
    rounded_experts,
    rounded_note,
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
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # what vLLM runs as one matrix
VLLM_PLAIN = ".shared_expert_gate"  # vLLM's Qwen2-MoE builds it as torch.nn.Linear: never quantized


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
    experts: dict[str, Any] | None = None
    rounded_experts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        grids = ", ".join(
            f"{g['bits']}-bit {'group ' + str(g['group_size']) if g['group_size'] else 'per channel'} "
            f"{'sym' if g['sym'] else 'asym'} ({g['layers']} layers)"
            for g in self.grids
        )
        kept = f"; {len(self.ignored)} matrices kept as they are" if self.ignored else ""
        experts = ""
        if self.experts:
            experts = (
                f"; {self.experts['fused']} fused-experts layers written as {self.experts['matrices']} "
                f"per-expert matrices ({self.experts['names']})"
            )
        return {
            "output": str(self.dest),
            "format": "compressed-tensors",
            "headline": (
                f"compressed-tensors {FORMAT_LAYOUT}, {grids}{kept}{experts}; scales in {self.scale_dtype} "
                f"(max relative rounding {self.max_scale_rounding:.2g}){rounded_note(self.rounded_experts)}"
            ),
            "layout": FORMAT_LAYOUT,
            "layers": self.layers,
            "grids": self.grids,
            "ignore": self.ignored,
            "scale_dtype": self.scale_dtype,
            "max_scale_rounding": self.max_scale_rounding,
            "engines": self.engines,
            "experts": self.experts,
            "rounded_experts": self.rounded_experts,
        }


def preflight(
    layers: Mapping[str, tuple[tuple[int, ...], GridSpec]],
    *,
    method: str,
    skipped: Sequence[str] = (),
    model_type: str | None = None,
    kept: Sequence[str] = (),
) -> None:
    """Refuse, before any work, what the format cannot hold (the values are checked on export);
    ``model_type`` names the checkpoint layout of fused experts (:mod:`.experts`), ``kept`` are the
    layers kept in full precision."""
    if method in OUTLIER_METHODS:
        raise ExportError(
            f"--method {method} keeps full-precision outliers, which compressed-tensors cannot hold"
        )
    refuse_gguf_grids({name: spec for name, (_, spec) in layers.items()}, "compressed-tensors")
    plain = [name for name in kept if is_fused_name(name)]
    if plain:
        raise ExportError(
            f"{plain[0]}: fused experts kept in full precision (--skip) do not load in transformers "
            "from a compressed-tensors checkpoint (its loader decodes every expert as packed); "
            "quantize the experts or export without --skip"
        )
    experts = {name: (shape, spec) for name, (shape, spec) in layers.items() if is_fused_param(name, shape)}
    for name, (shape, _spec) in layers.items():
        if name not in experts:
            check_shape(name, shape)
    if experts:
        check_experts(experts, model_type)
    grids = {_grid_key(spec) for _shape, spec in layers.values()}
    if len(grids) > 1 and any(not sym for _bits, _group, sym in grids):
        shown = ", ".join(_shown(key) for key in sorted(grids, key=str))
        raise ExportError(
            f"compressed-tensors: layers with different grids ({shown}), one of them asymmetric, do not "
            "load in transformers (it loads asymmetric checkpoints only dequantized, and dequantizes "
            "every layer with one grid); make every grid symmetric (--sym, or SPEC ...sym) or give "
            "every layer the same grid"
        )


def check_experts(experts: Mapping[str, tuple[tuple[int, ...], GridSpec]], model_type: str | None) -> None:
    """Fused experts (name -> (shape (E, out, in), grid)) the export can write per expert: a family
    whose checkpoint names are known, one grid for all of them, symmetric. transformers (5.x)
    decodes compressed-tensors experts while fusing them, with ONE config group for every expert
    (``get_experts_scheme``) and without their zero-points (its decoder passes only weight_packed,
    weight_scale and weight_shape), so other experts would load wrong or not at all."""
    first = next(iter(experts))
    layout_for(model_type, first)
    for name, (shape, _spec) in experts.items():
        gate_up_halves(name, shape)
    grids = {_grid_key(spec) for _shape, spec in experts.values()}
    if len(grids) > 1:
        shown = ", ".join(_shown(key) for key in sorted(grids, key=str))
        raise ExportError(
            f"compressed-tensors: fused experts with different grids ({shown}) do not load in transformers "
            "(it decodes every expert with one config group's grid); give every experts layer the same grid"
        )
    if not next(iter(grids))[2]:
        raise ExportError(
            f"compressed-tensors: asymmetric experts ({_shown(next(iter(grids)))}) do not load in "
            "transformers (its experts decoder reads no zero-points); make the experts' grid symmetric "
            "(--sym, or a --layer rule such as experts=4g32sym)"
        )


def _shown(key: tuple[int, int | None, bool]) -> str:
    bits, group, sym = key
    return f"{bits}-bit {f'g{group}' if group else 'per channel'} {'sym' if sym else 'asym'}"


def check_shape(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ExportError(
            f"{name}: compressed-tensors' pack-quantized export holds Linear layers and fused experts "
            f"only (weight shape {list(shape)})"
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
    (atomically), one tensor at a time into shards of at most ``max_shard_bytes`` (None: one file).
    Fused experts are written one matrix per expert under the names the model's checkpoints use
    (:mod:`.experts`); so is every other tensor of such a model (Mixtral: ``block_sparse_moe``)."""
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
    config = read_json(source / "config.json")
    if not config:
        raise ExportError(
            f"{source} has no config.json; the compressed-tensors export needs the model's config"
        )
    model_type = config.get("model_type")
    specs = {name: spec_of(name, meta) for name, meta in stored.layer_meta.items()}
    fused = [name for name in stored.names() if is_fused_name(name)]
    preflight(
        {n: (shape, spec) for n, (spec, shape, _) in specs.items()},
        method=str(table.get("method")),
        model_type=model_type,
        kept=[name for name in fused if name not in stored.params],
    )
    layout = layout_for(model_type, fused[0]) if fused else LAYOUTS.get(str(model_type))
    check_output_dir(dest, overwrite=overwrite, protect=[source])
    tied = bool(config.get("tie_word_embeddings", False))
    report = read_json(source / REPORT)
    transform = merged_transform(table, "compressed-tensors")
    dtype = stored.dtype

    rounding = 0.0
    packed: dict[str, tuple[GridSpec, tuple[int, ...], int]] = {}  # checkpoint module -> its grid
    matrices: list[str] = []  # modules holding a plain 2-D weight: not quantized, so ignored
    written: list[str] = []
    per_expert = 0  # matrices written for fused experts
    with atomic_folder(dest, overwrite=overwrite, protect=[source]) as tmp:
        shards = ShardWriter(tmp, max_shard_bytes)

        def write(tensors: dict[str, torch.Tensor]) -> None:
            shards.write(tensors)
            written.extend(tensors)

        for name in stored.names():
            if name in stored.params:  # a quantized layer: its packed tensors
                layer = stored.layer(stored.params[name])
                exact = layer.scales.to(torch.float64)
                rounding = max(
                    rounding, float(((layer.scales.to(dtype).to(torch.float64) - exact) / exact).abs().max())
                )
                parts = _matrices(layer, layout)
                per_expert += len(parts) if len(layer.shape) == 3 else 0
                for part in parts:
                    write({f"{part.name}.{leaf}": t for leaf, t in compressed_tensors(part, dtype).items()})
                    packed[part.name] = (part.spec, part.shape, 0)
                continue
            tensor = stored.tensor(name)
            key = layout.checkpoint_name(name) if layout is not None else name
            if tensor.dim() == 2 and key.endswith(".weight"):
                matrices.append(key.removesuffix(".weight"))
            if tied and name == "lm_head.weight" and name in stored.aliases:
                continue  # a tied head is re-tied by transformers from the config
            write({key: tensor})
        shards.close()
        block = quantization_config(
            packed, matrices, written + [f"{m}.weight" for m in matrices], report.get("run", {}), transform
        )
        config["quantization_config"] = block
        write_json(tmp / "config.json", config)
        copy_companions(source, tmp)
    experts = None
    if fused and layout is not None:
        experts = {"fused": len(fused), "matrices": per_expert, "names": layout.describe()}
    return CompressedSummary(
        dest=dest,
        layers=len(packed),
        grids=_grid_rows(packed),
        ignored=block["ignore"],
        scale_dtype=str(dtype).removeprefix("torch."),
        max_scale_rounding=rounding,
        engines=engines_note(packed, block["ignore"]),
        experts=experts,
        rounded_experts=rounded_experts(report),
    )


def _matrices(layer: QuantizedLayer, layout: ExpertLayout | None) -> list[QuantizedLayer]:
    """A stored layer as the checkpoint's matrices: itself (renamed to the checkpoint's name), or
    one per expert and projection for fused experts."""
    if len(layer.shape) == 3:
        assert layout is not None  # the preflight refused fused experts of unknown families
        return [expert_layer(layer, piece) for piece in layout.split(layer.name, layer.shape)]
    if layout is not None:
        layer = QuantizedLayer(
            layout.checkpoint_name(layer.name), layer.spec, layer.shape, layer.qweight, layer.scales,
            layer.zeros, layer.outliers_idx, layer.outliers_val,
        )  # fmt: skip
    return [layer]


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
    block = {
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
    if any(not sym for _bits, _group, sym in by_grid):
        block["dequantize"] = True  # transformers' compressed load cannot hold packed zero-points
    _check_experts_group(groups, by_grid)
    return block


_EXPERT_MODULE = re.compile(r"\.experts\.\d+\.")


def _check_experts_group(groups: Mapping[str, Mapping[str, Any]], by_grid: Mapping[tuple, list[str]]) -> None:
    """transformers decodes every per-expert matrix with the config group it takes for the experts
    (``get_experts_scheme``: the first group with an ``re:`` target mentioning "experts", else the
    first with a class-name target such as "Linear"): that group must hold the experts' grid."""
    grids = {key for key, members in by_grid.items() if any(_EXPERT_MODULE.search(m) for m in members)}
    if not grids:
        return
    chosen = next(
        (g for g in groups.values() if any(t.startswith("re:") and "experts" in t for t in g["targets"])),
        None,
    ) or next((g for g in groups.values() if any(not t.startswith("re:") for t in g["targets"])), None)
    if chosen is None:
        chosen = next(iter(groups.values()))
    weights = chosen["weights"]
    if grids != {(weights["num_bits"], weights["group_size"], weights["symmetric"])}:
        raise ExportError(
            "compressed-tensors: transformers would decode the experts with another config group's grid "
            "(their names cannot be told apart from the other layers'); give the experts the grid of "
            "the layers around them"
        )


def engines_note(specs: Mapping[str, tuple[GridSpec, tuple[int, ...], int]], ignored: list[str]) -> str:
    """Which runtimes run the export just written, worked out from its grids (printed after every
    export): transformers (how it loads), cdq eval, and vLLM (whether its compressed-tensors WNA16
    scheme takes these grids: 4/8-bit, zero-points only at 4 bits, one grid across the layers it
    fuses; Marlin kernels want group sizes 32/64/128 or per channel; its fused-MoE schemes take
    symmetric experts, and some releases read the experts' grid from a "Linear" config group,
    which only a one-grid export has)."""
    keys = {_grid_key(spec) for spec, _, _ in specs.values()}
    bits = sorted({b for b, _, _ in keys})
    asymmetric = sorted({b for b, _, sym in keys if not sym})
    if asymmetric:
        transformers = (
            "transformers + compressed-tensors (dequantized while loading: the config says dequantize: "
            "true, as compressed-tensors' compressed model has no room for packed zero-points)"
        )
    else:
        transformers = "transformers + compressed-tensors (loads compressed, decompressed on use)"
    if 3 in bits:
        transformers += "; 3-bit needs compressed-tensors >= 0.18 (older releases pack 3-bit differently)"
    parts = [transformers, "cdq eval"]
    low = [b for b in bits if b not in (4, 8)]
    wide = [b for b in asymmetric if b != 4]
    split = _split_fused(specs, ignored)
    if low:
        parts.append(f"vLLM: no ({'/'.join(map(str, low))}-bit: its compressed-tensors kernels take 4/8-bit)")
    elif wide:
        parts.append(
            f"vLLM: no ({'/'.join(map(str, wide))}-bit asymmetric: its zero-point kernels take 4-bit)"
        )
    elif split:
        parts.append(f"vLLM: no (it fuses {split} and needs one grid for all of them)")
    elif plain := next((name for name in specs if name.endswith(VLLM_PLAIN)), None):
        parts.append(
            f"vLLM: no (its model keeps {plain.rpartition('.')[2]} a plain torch Linear, which loads no "
            f"packed weight: --skip {plain.rpartition('.')[2]})"
        )
    else:
        odd = sorted({g for _, g, _ in keys if g is not None and g not in (32, 64, 128)})
        marlin = f"; its Marlin kernels take group 32/64/128 or per channel, not {odd}" if odd else ""
        experts = any(_EXPERT_MODULE.search(name) for name in specs)
        if experts and len(keys) > 1:
            marlin += (
                "; releases whose fused-MoE scheme reads the experts' grid from a 'Linear' config group "
                "need one grid for the whole model"
            )
        parts.append(f"vLLM (compressed-tensors WNA16{', experts as fused MoE' if experts else ''}{marlin})")
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


# -- reading --------------------------------------------------------------------------------------

READ_LEAVES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def unpack_compressed(
    tensors: Mapping[str, torch.Tensor], name: str, *, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes (out, in), scales (out, G), zero-points (out, G), column groups (in,) or None) of
    one pack-quantized layer (``tensors`` by leaf name: weight_packed, weight_scale, weight_shape,
    weight_zero_point when asymmetric, weight_g_idx when act-ordered), read with cdq's own
    unpacking; ``W[o, i] = scale[o, g(i)]·(code[o, i] − zero[o, g(i)])`` (see the module doc).
    None groups: column i is in group ``i // (in / G)``."""
    try:
        out, columns = (int(v) for v in tensors["weight_shape"].tolist())
        packed, scales = tensors["weight_packed"], tensors["weight_scale"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{name}: pack-quantized tensors missing or malformed ({exc})") from None
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out, _words(columns, bits)):
        raise ExportError(
            f"{name}: weight_packed is {packed.dtype} {tuple(packed.shape)}, but {bits}-bit codes of an "
            f"[{out}, {columns}] weight need int32 {(out, _words(columns, bits))}"
        )
    scales = scales.reshape(1, 1).expand(out, 1) if scales.numel() == 1 else scales.reshape(out, -1)
    groups = scales.shape[1]
    codes = unpack(_padded(packed, columns, bits), bits, columns).to(torch.uint8)  # bits <= 8
    if symmetric:
        zeros = torch.full((out, groups), 2 ** (bits - 1), dtype=torch.int64)
    else:
        stored = tensors.get("weight_zero_point")
        expected = (_words(out, bits), groups)
        if stored is None or stored.dtype != torch.int32 or tuple(stored.shape) != expected:
            raise ExportError(f"{name}: an asymmetric grid needs weight_zero_point int32 {expected}")
        zeros = unpack(_padded(stored.T, out, bits), bits, out).T  # packed down the output dim
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64).reshape(-1)
        if g_idx.numel() != columns or (columns and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups)):
            raise ExportError(f"{name}: weight_g_idx does not map {columns} columns to {groups} groups")
    elif columns % groups:
        raise ExportError(f"{name}: {groups} scale groups do not divide the layer's {columns} columns")
    return codes, scales, zeros, g_idx


def _padded(words: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Packed words truncated to ceil(count·bits/32), padded back to cdq's whole 32-value blocks."""
    return torch.nn.functional.pad(words.contiguous(), (0, packed_length(count, bits) - words.shape[-1]))


FORMAT = ExportFormat(
    name="compressed-tensors",
    suffix="-ct",
    description="compressed-tensors pack-quantized (what llm-compressor writes and vLLM serves)",
    preflight=preflight,
    export=export_compressed,
)
