"""Export a cdq output folder to the GPTQ checkpoint layout that transformers and serving engines read.

Per quantized Linear ``NAME`` (``W`` is (out, in), ``G`` = number of groups)::

    NAME.qweight  int32 (in·bits/32, out)  codes packed along the INPUT dim, one little-endian bit
                                            stream per output column (value k in stream bits
                                            k·bits … k·bits+bits−1; 3-bit values straddle words)
    NAME.qzeros   int32 (G, out·bits/32)   zero-points packed the same way along the OUTPUT dim
    NAME.scales   float16 (G, out)
    NAME.g_idx    int32 (in,)              column // group_size (all 0 per channel): desc_act false
    NAME.bias     as stored                 (only if the layer has one)

Everything else (embeddings, norms, lm_head) is copied as it is; ``config.json`` gains a
``quantization_config`` block (``quant_method`` "gptq"), ``quantize_config.json`` (read by auto-gptq
and vLLM) is written beside it, and the tokenizer files are copied.

Zero-point convention. The classic format (``checkpoint_format`` "gptq", "v1"), which auto-gptq
wrote and which transformers/optimum, gptqmodel, vLLM, TGI and exllama read, stores ``z − 1`` in
``qzeros``; every kernel adds the 1 back, so ``Ŵ = scale·(q − (stored_zero + 1))``. (auto-gptq's
packer subtracted 1 before packing; gptqmodel converts v1 → its internal "gptq_v2" on load by adding
``0x11111111``-style constants to whole int32 words.) Hence v1 can hold ``z ∈ [1, 2^bits]`` per
field, but a stored ``z − 1 = 2^bits − 1`` makes gptqmodel's word-wide addition carry into the next
field, so the range every v1 reader agrees on is ``z ∈ [1, 2^bits − 1]``. cdq's min–max and refitted
grids can give ``z = 0`` (a group whose weights are all ≥ 0): such a layer is REFUSED by name with
``checkpoint_format`` "gptq" — never silently shifted or re-rounded — and ``--checkpoint-format
gptq_v2`` writes gptqmodel's v2 layout instead (zero stored as is, ``z ∈ [0, 2^bits − 1]``), which
only gptqmodel (transformers with the gptqmodel backend) loads. v1 is the default because it is the
one the engines read. (Convention checked against gptqmodel 7.7.0's v1 → v2 loader code and by
loading exports with transformers + optimum + gptqmodel; see tests/test_export.py.)

Other decisions: symmetric grids must have ``z = 2^(bits−1)`` (kernels such as Marlin ignore
``qzeros`` when ``sym`` is true); per-layer grids (one scale) are exported as per-channel scales that
are all equal (``group_size`` −1), which is exact; outliers, Conv2d layers, mixed grids across layers,
widths the packing cannot hold (``in`` not a multiple of 32, ``out·bits`` not a multiple of 32) and
group sizes transformers' loader (gptqmodel) does not take (it takes 16, 32, ..., 1024) are refused
before anything is written. GPTQ stores scales in float16, so the exported model computes
``fp16(scale)·(q − z)``: the difference from cdq's own weights is the float16 rounding of the
scales (reported as ``max_scale_rounding``), nothing else.

Mixture-of-experts models (transformers 5's fused experts, 3-D ``gate_up_proj``/``down_proj``) are
refused before any work: written per expert under the checkpoint's names (as the
compressed-tensors export writes them), transformers' GPTQ loader (optimum 2.3 + gptqmodel 7.7)
replaces only ``nn.Linear`` modules, has no conversion that fuses per-expert ``qweight``/``qzeros``/
``scales`` into the experts, and so leaves the experts uninitialized (its load report lists them
MISSING) while the per-expert tensors go unused: a model that loads wrong. (gptqmodel's own
``GPTQModel.load`` defuses the experts, but under ``mlp.experts.E.gate_proj`` names of its own even
for Mixtral, whose checkpoints and vLLM say ``block_sparse_moe.experts.E.w1``.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..solvers import GridSpec
from ..solvers.packing import pack, packed_length, unpack
from .exporting import (
    OUTLIER_METHODS,
    ExportError,
    ExportFormat,
    copy_companions,
    merged_transform,
    read_json,
    refuse_gguf_grids,
    refuse_same_folder,
    write_json,
)
from .files import atomic_folder, check_output_dir
from .folder import OutputWeights
from .layer import QuantizedLayer, spec_of
from .names import GPTQ_CONFIG, REPORT
from .shards import ShardWriter

__all__ = ["FORMAT", "ExportError", "ExportSummary", "export_gptq", "gptq_tensors", "preflight"]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# What transformers' GPTQ loader (optimum + gptqmodel, every kernel it picks on CPU or GPU) takes;
# per channel (group_size −1) too. Marlin kernels (vLLM, SGLang, TGI) take 32, 64, 128 or −1.
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
MARLIN_GROUP_SIZES = (None, 32, 64, 128)
MIXED = (
    "GPTQ's quantization_config describes one grid for every Linear of every block (transformers' "
    "GPTQ loader, optimum, ignores GPTQModel's per-layer 'dynamic' field): use --format compressed-tensors"
)


@dataclass
class ExportSummary:
    """What was written, for the CLI's message and ``--json``."""

    dest: Path
    layers: int
    bits: int
    group_size: int
    sym: bool
    checkpoint_format: str
    max_scale_rounding: float
    engines: str

    def to_dict(self) -> dict[str, Any]:
        grid = f"group {self.group_size}" if self.group_size > 0 else "per channel"
        return {
            "output": str(self.dest),
            "format": "gptq",
            "headline": (
                f"GPTQ ({self.checkpoint_format}), {self.bits}-bit, {grid}, "
                f"{'sym' if self.sym else 'asym'}, {self.layers} layers; scales in float16 "
                f"(max relative rounding {self.max_scale_rounding:.2g})"
            ),
            "checkpoint_format": self.checkpoint_format,
            "layers": self.layers,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "max_scale_rounding": self.max_scale_rounding,
            "engines": self.engines,
        }


def check_settings(
    shapes: Mapping[str, tuple[int, ...]], spec: GridSpec, method: str, checkpoint_format: str = "gptq"
) -> None:
    """Refuse, before any work, what the format cannot hold (everything but the zero-point range)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ExportError(
            f"unknown GPTQ checkpoint format {checkpoint_format!r}: choose {' or '.join(CHECKPOINT_FORMATS)}"
        )
    if method in OUTLIER_METHODS:
        raise ExportError(
            f"--method {method} keeps full-precision outliers, which the GPTQ format cannot hold"
        )
    if spec.group_size is not None and spec.group_size not in GROUP_SIZES:
        raise ExportError(
            f"group size {spec.group_size}: transformers' GPTQ loader (gptqmodel) takes group sizes "
            f"{', '.join(map(str, GROUP_SIZES))} or per channel; use --format compressed-tensors"
        )
    for name, shape in shapes.items():
        check_shape(name, tuple(shape), spec.bits)


def preflight(
    layers: Mapping[str, tuple[tuple[int, ...], GridSpec]],
    *,
    skipped: Sequence[str] = (),
    method: str,
    checkpoint_format: str = "gptq",
    model_type: str | None = None,
    kept: Sequence[str] = (),
) -> None:
    """:func:`check_settings` for ``cdq quantize --format gptq``: ``layers`` are the layers the run
    will quantize (name -> (shape, grid)), ``skipped`` the run's --skip patterns; one grid for all
    of them, none kept in full precision (``model_type`` and ``kept``, which the formats share,
    change nothing here: fused experts are refused whatever the family)."""
    refuse_gguf_grids({name: spec for name, (_, spec) in layers.items()}, "GPTQ")
    if skipped:
        raise ExportError(f"--skip {skipped[0]!r} keeps layers in full precision, which {MIXED}")
    specs = {spec for _, spec in layers.values()}
    if len(specs) > 1:
        raise ExportError(f"--layer gives layers different grids, which {MIXED}")
    spec = next(iter(specs))
    check_settings({name: shape for name, (shape, _) in layers.items()}, spec, method, checkpoint_format)


def check_shape(name: str, shape: tuple[int, ...], bits: int) -> None:
    if len(shape) == 3:
        raise ExportError(
            f"{name}: fused experts {list(shape)} do not load from a GPTQ checkpoint: transformers' GPTQ "
            "loader (optimum + gptqmodel) leaves its fused experts uninitialized rather than read "
            "per-expert GPTQ weights; use --format compressed-tensors"
        )
    if len(shape) != 2:
        raise ExportError(f"{name}: the GPTQ format holds Linear layers only (weight shape {list(shape)})")
    out, columns = shape
    if columns % 32:
        raise ExportError(
            f"{name}: input width {columns} is not a multiple of 32, which GPTQ's qweight packing needs"
        )
    if out * bits % 32:
        step = 32 // _gcd(bits, 32)
        raise ExportError(
            f"{name}: output width {out} is not a multiple of {step}, which {bits}-bit qzeros packing needs"
        )


def gptq_tensors(layer: QuantizedLayer, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of one stored layer (refuses what the format cannot hold)."""
    spec = layer.spec
    check_shape(layer.name, layer.shape, spec.bits)
    if layer.outlier_count:
        raise ExportError(
            f"{layer.name}: {layer.outlier_count} full-precision outliers cannot be stored in the GPTQ format"
        )
    out, columns = layer.shape
    zeros = layer.zeros.to(torch.float64)
    if not bool((zeros == zeros.round()).all()):
        raise ExportError(f"{layer.name}: non-integer zero-points cannot be stored in the GPTQ format")
    zeros = zeros.to(torch.int64)
    if spec.sym and not bool((zeros == 2 ** (spec.bits - 1)).all()):
        raise ExportError(f"{layer.name}: a symmetric grid must have zero-point {2 ** (spec.bits - 1)}")
    low = 1 if checkpoint_format == "gptq" else 0
    bad = (zeros < low) | (zeros > spec.maxq)
    if bool(bad.any()):
        hint = (
            "; use --checkpoint-format gptq_v2 (gptqmodel only) to store it as is"
            if checkpoint_format == "gptq" and int(zeros.min()) >= 0
            else ""
        )
        raise ExportError(
            f"{layer.name}: {int(bad.sum())} zero-point(s) outside [{low}, {spec.maxq}] "
            f"(min {int(zeros.min())}), which checkpoint format {checkpoint_format!r} cannot store{hint}"
        )
    scales = layer.scales.to(torch.float16)
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise ExportError(f"{layer.name}: scales do not fit in float16 (zero, negative or overflowing)")
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    words = out * spec.bits // 32
    group = spec.group_size or columns
    return {
        # cdq packs codes along the input dim per output row; GPTQ's bit stream runs along the input
        # dim per output COLUMN, which is the same stream, transposed.
        "qweight": layer.qweight.T.contiguous(),
        # pack() pads to 32 values; the padding words are zero and beyond out·bits/32.
        "qzeros": pack(stored_zeros.T.contiguous(), spec.bits)[:, :words].contiguous(),
        "scales": scales.T.contiguous(),
        "g_idx": (torch.arange(columns, dtype=torch.int32) // group).to(torch.int32),
    }


def export_gptq(
    source: Path | str,
    dest: Path | str | None = None,
    *,
    checkpoint_format: str = "gptq",
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> ExportSummary:
    """Write the GPTQ checkpoint of the cdq output folder ``source`` to ``dest`` (atomically), one
    tensor at a time into shards of at most ``max_shard_bytes`` (None: one file)."""
    source = Path(source).absolute()
    dest = Path(dest).absolute() if dest is not None else FORMAT.default_dest(source)
    refuse_same_folder(source, dest, "GPTQ")
    stored = OutputWeights(source)
    table = stored.table
    if table.get("kind", "causal-lm") != "causal-lm":
        raise ExportError(
            f"{source} holds a {table.get('kind')!r} model; GPTQ export is for causal LMs (transformers)"
        )
    if not stored.layer_meta:
        raise ExportError(f"{source} has no quantized layers (--bits 16?); nothing to export")
    specs = {name: spec_of(name, meta) for name, meta in stored.layer_meta.items()}
    refuse_gguf_grids({name: spec for name, (spec, _, _) in specs.items()}, "GPTQ")
    if len({spec for spec, _, _ in specs.values()}) != 1:
        raise ExportError(f"layers use different grids (--layer), which {MIXED}")
    skipped = table.get("skipped") or []
    if skipped:
        raise ExportError(f"{skipped[0]} was kept in full precision (--skip), which {MIXED}")
    spec = next(iter(specs.values()))[0]
    method = str(table.get("method", "unknown"))
    check_settings({n: shape for n, (_, shape, _) in specs.items()}, spec, method, checkpoint_format)
    check_output_dir(dest, overwrite=overwrite, protect=[source])
    config = read_json(source / "config.json")
    if not config:
        raise ExportError(f"{source} has no config.json; the GPTQ export needs the model's config")
    tied = bool(config.get("tie_word_embeddings", False))
    report = read_json(source / REPORT)
    transform = merged_transform(table, "GPTQ")
    block = quantization_config(spec, method, report.get("run", {}), checkpoint_format, transform)
    config["quantization_config"] = block

    rounding = 0.0
    with atomic_folder(dest, overwrite=overwrite, protect=[source]) as tmp:
        shards = ShardWriter(tmp, max_shard_bytes)
        for name in stored.names():
            if name in stored.params:  # a quantized layer: its GPTQ tensors
                layer = stored.layer(stored.params[name])
                shards.write(
                    {f"{layer.name}.{leaf}": t for leaf, t in gptq_tensors(layer, checkpoint_format).items()}
                )
                exact = layer.scales.to(torch.float64)
                rounding = max(
                    rounding,
                    float(((layer.scales.to(torch.float16).to(torch.float64) - exact) / exact).abs().max()),
                )
            elif not (tied and name == "lm_head.weight" and name in stored.aliases):
                shards.write({name: stored.tensor(name)})  # transformers re-ties a tied head from config
        shards.close()
        write_json(tmp / "config.json", config)
        write_json(tmp / GPTQ_CONFIG, {**block, "model_file_base_name": "model"})
        copy_companions(source, tmp)
    return ExportSummary(
        dest=dest,
        layers=len(stored.layer_meta),
        bits=spec.bits,
        group_size=block["group_size"],
        sym=spec.sym,
        checkpoint_format=checkpoint_format,
        max_scale_rounding=rounding,
        engines=engines_note(spec.bits, spec.sym, checkpoint_format, spec.group_size),
    )


def quantization_config(
    spec: GridSpec,
    method: str,
    run: Mapping[str, Any],
    checkpoint_format: str = "gptq",
    transform: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json (also the body of quantize_config.json)."""
    grid = (
        "per_layer (exported as per-channel scales that are all equal)"
        if spec.per_layer
        else (f"group {spec.group_size}" if spec.group_size else "per_channel")
    )
    return {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size or -1,
        "desc_act": False,
        "sym": spec.sym,
        "static_groups": False,
        "true_sequential": bool(run.get("true_sequential", True)),
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "meta": {
            "quantizer": [f"cdq:{__version__}"],
            "cdq_method": method,
            "cdq_options": dict(run.get("options", {})),
            "cdq_grid": grid,
            "cdq_zero_point": "v1: qzeros hold z - 1" if checkpoint_format == "gptq" else "v2: qzeros hold z",
            # --transform, merged into the weights: nothing for a loader to do
            "cdq_transform": dict(transform or {"name": "none"}),
        },
    }


def engines_note(bits: int, sym: bool, checkpoint_format: str, group_size: int | None = None) -> str:
    """Which runtimes can run the export just written (a hint for the user, printed by the CLI):
    transformers' loader takes every export cdq writes (:func:`check_settings` refuses the rest);
    Marlin kernels want 4/8-bit symmetric grids of group 32/64/128 or per channel."""
    if checkpoint_format == "gptq_v2":
        return (
            "gptq_v2 loads in gptqmodel only (transformers with optimum + gptqmodel) and cdq eval; "
            "vLLM, TGI and exllama read v1 ('gptq') checkpoints only"
        )
    if bits in (4, 8):
        if sym and group_size in MARLIN_GROUP_SIZES:
            fast = "including their Marlin kernels"
        else:
            fast = "their Marlin kernels need --sym and group size 32, 64 or 128 or per channel"
        return f"{bits}-bit GPTQ v1: transformers (optimum + gptqmodel), cdq eval, vLLM, SGLang, TGI ({fast})"
    return (
        f"{bits}-bit GPTQ v1: transformers with optimum + gptqmodel (its torch kernel) and cdq eval; most "
        "serving engines and fast kernels (Marlin, exllama v2) take 4/8-bit only"
    )


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


# -- reading --------------------------------------------------------------------------------------

READ_LEAVES = ("qweight", "qzeros", "scales", "g_idx")


def unpack_gptq(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    *,
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out, in), scales (out, G), zero-points (out, G), column groups (in,)) of one GPTQ
    layer (``tensors`` by leaf name: qweight, qzeros, scales, g_idx), read with cdq's own unpacking:
    ``W[o, i] = scale[o, g(i)]·(code[o, i] − zero[o, g(i)])`` with the v1 zero-points one more than
    stored (the module doc). A missing g_idx means ``i // group_size`` (``group_size`` −1: one group)."""
    try:
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    except KeyError as exc:
        raise ExportError(f"{name}: GPTQ tensor {exc} missing") from None
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2 or scales.dim() != 2:
        raise ExportError(f"{name}: qweight and qzeros must be int32 matrices (another pack_dtype?)")
    groups, out = scales.shape
    columns = qweight.shape[0] * 32 // bits
    if qweight.shape[0] * 32 % bits or qweight.shape[1] != out:
        raise ExportError(f"{name}: qweight {tuple(qweight.shape)} is not {bits}-bit codes of {out} outputs")
    if tuple(qzeros.shape) != (groups, -(-out * bits // 32)):
        raise ExportError(f"{name}: qzeros {tuple(qzeros.shape)} does not hold {groups}x{out} zero-points")
    codes = unpack(_padded(qweight.T, columns, bits), bits, columns).to(torch.uint8)  # cdq stream, transposed
    stored = unpack(_padded(qzeros, out, bits), bits, out)
    zeros = (stored + 1 if checkpoint_format == "gptq" else stored).T
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(columns) // (group_size if group_size > 0 else columns)
    g_idx = g_idx.to(torch.int64).reshape(-1)
    if g_idx.numel() != columns or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ExportError(f"{name}: g_idx does not map {columns} input rows to {groups} groups")
    return codes, scales.T, zeros, g_idx


def _padded(words: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Words of ``count`` packed values, padded to cdq's whole 32-value blocks."""
    return torch.nn.functional.pad(words.contiguous(), (0, packed_length(count, bits) - words.shape[-1]))


FORMAT = ExportFormat(
    name="gptq",
    suffix="-gptq",
    description="GPTQ (qweight/qzeros/scales/g_idx): transformers, vLLM, TGI, exllama",
    preflight=preflight,
    export=export_gptq,
    options={"checkpoint_format": CHECKPOINT_FORMATS},
)
