"""The GGUF parts of a ``cdq quantize --format gguf --type T`` run outside the block pipeline.

* :func:`resolve`: once the model's layers are known, every layer's GGUF type (llama.cpp's rules
  for ``T``, a ``--layer`` rule's type, llama.cpp's width fallbacks, F16 for ``--skip``), recorded
  in the run's settings, whose ``grid_for`` then gives each layer its type's grid.
* :func:`preflight`: before any work, the model family and its tokenizer must be ones the GGUF
  export writes as llama.cpp reads them (the tokenizer is saved to a temporary folder, exactly as
  the output folder will hold it, and read back the way the export reads it).
* :func:`quantize_embeddings`: the token embeddings (and an untied head) get the type llama.cpp's
  quantizer gives them for ``T`` (usually Q6_K or Q8_0), quantized as llama.cpp quantizes them
  without an importance matrix (its reference fit and nearest rounding: an embedding row is looked
  up, not multiplied by activations, so there is no Σ to solve against). The output folder then
  holds the same numbers as the GGUF file, and ``--eval`` scores what llama.cpp will run.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..records import LayerRow, Settings
from ..solvers import GridSpec, QuantResult
from ..solvers.gguf import codes_of, grid_of
from ..solvers.llama_fit import fit_parts
from ..store import gguf_mix
from ..store.layer import QuantizedLayer
from .plan import UsageError


def resolve(settings: Settings, shapes: dict[str, tuple[int, ...]]) -> tuple[Settings, list[str]]:
    """``settings`` with every layer's GGUF type (``shapes``: the quantizable layers' weight shapes
    by full name; fused experts (E, out, in)): a ``--layer`` rule's type, else llama.cpp's rules
    for ``--type`` (:mod:`cdq_cli.store.gguf_mix`), then llama.cpp's width fallback; ``--skip``
    and a width no type fits: None (kept in full precision, F16 in the file). Also the fallbacks,
    one line each, for the run to show. Called before any work."""
    assert settings.gguf_type is not None
    model = gguf_mix.model_shape(shapes, tied=False)
    resolved: dict[str, str | None] = {}
    notes: list[str] = []
    for name, shape in shapes.items():
        columns = shape[-1]
        layer = name.split("[", 1)[0]
        skipped = any(rule.spec is None and rule.matches(layer) for rule in settings.overrides)
        if skipped or gguf_mix.never_quantized(layer):
            resolved[layer] = None
            continue
        wanted = gguf_mix.mix_type(settings.gguf_type, layer, columns, model)
        for rule in settings.overrides:
            if rule.grid is not None and rule.matches(layer):
                wanted = str(rule.grid.block_type)
        final = gguf_mix.with_fallback(wanted, columns)
        if final != wanted:
            notes.append(f"{layer}: width {columns} does not take {wanted}: {final}, as llama.cpp does")
        resolved[layer] = None if final == gguf_mix.F16 else final
    return replace(settings, gguf_layers=resolved), notes


def table_info(settings: Settings) -> dict[str, Any]:
    """The quantization table's record of every layer's GGUF type (F16: kept in full precision),
    which the GGUF export follows."""
    if settings.gguf_layers is None:
        return {}
    return {"gguf_layers": {name: kind or gguf_mix.F16 for name, kind in settings.gguf_layers.items()}}


def preflight(model: nn.Module, tokenizer: Any) -> None:
    """Refuse (one line, before any work) a family or tokenizer the GGUF export cannot write."""
    from ..store.exports import ExportError
    from ..store.gguf import check_family, check_tokenizer

    config = model.config.to_dict() if hasattr(model, "config") else {}
    try:
        check_family(config)
        if tokenizer is None:
            raise ExportError("a GGUF file needs the model's tokenizer, and this model has none")
        with tempfile.TemporaryDirectory(prefix="cdq-gguf-tokenizer-") as folder:
            tokenizer.save_pretrained(folder)
            add_sentencepiece_model(Path(folder), tokenizer)
            check_tokenizer(Path(folder), config)
    except ExportError as exc:
        raise UsageError(str(exc)) from None


def add_sentencepiece_model(folder: Path, tokenizer: Any) -> None:
    """Put the sentencepiece model the tokenizer was read from (the model folder's
    ``tokenizer.model``) beside the saved tokenizer: transformers does not save it, and llama.cpp's
    converter reads the pieces' scores from it (without it a SentencePiece vocabulary gets no
    scores, and llama.cpp would split text differently)."""
    source = getattr(tokenizer, "vocab_file", None)
    if isinstance(source, str) and Path(source).name == "tokenizer.model" and Path(source).is_file():
        if not (folder / "tokenizer.model").exists():
            shutil.copyfile(source, folder / "tokenizer.model")


def quantize_embeddings(
    model: nn.Module, placement: Any, settings: Settings
) -> tuple[dict[str, QuantizedLayer], list[LayerRow], list[str]]:
    """Stored records, report rows and notes for the embeddings and an untied head (see the module
    docstring); the model's own tensors are replaced by what was stored."""
    assert settings.gguf_type is not None and settings.gguf_layers is not None
    names = {id(module): name for name, module in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    shape = gguf_mix.ModelShape(0, 1, tied)  # the rules for these two read only the tie
    records: dict[str, QuantizedLayer] = {}
    rows: list[LayerRow] = []
    notes: list[str] = []
    for module in [embed] if tied or head is None else [embed, head]:
        name = names[id(module)]
        began = time.perf_counter()
        with placement.using([module], device=placement.home):
            weight = module.weight.detach().to(torch.float32)
            columns = weight.shape[1]
            wanted = gguf_mix.mix_type(settings.gguf_type, name, columns, shape)
            kind = gguf_mix.with_fallback(wanted, columns)
            if kind != wanted:
                notes.append(f"{name}: width {columns} does not take {wanted}: {kind}, as llama.cpp does")
            if kind == gguf_mix.F16:
                continue
            spec = GridSpec.of_type(kind)
            grid = grid_of(spec, fit_parts(weight, kind))
            codes = codes_of(weight, grid)
            approx = grid.dequantize(codes)
            error = float((weight - approx).double().pow(2).sum())
            result = QuantResult("llama.cpp", approx, codes, grid, error, error)
            records[name] = QuantizedLayer.from_result(name, result, tuple(weight.shape))
            if module.weight.device.type != "meta":
                module.weight.data.copy_(approx.to(module.weight.dtype))
        energy = float(weight.double().pow(2).sum())
        rows.append(
            LayerRow(
                name=name,
                shape=list(weight.shape),
                bits=spec.bits,
                group_size=spec.group_size,
                sym=spec.sym,
                method="llama.cpp",
                error=error,
                relative_error=error / energy if energy > 0 else 0.0,
                rtn_error=None,  # it IS round-to-nearest: no ratio for the report's summary
                objective_start=error,
                sweeps=0,
                seconds=time.perf_counter() - began,
                outliers=0,
                tokens=0,
                note="llama.cpp's own quantization (no Σ: errors are plain squared errors of the weights)",
                block_type=kind,
            )
        )
    return records, rows, notes
