"""Export a cdq output folder as one GGUF file: what llama.cpp, Ollama and LM Studio run.

The folder must come from ``cdq quantize --format gguf --type T``: its quantized layers are on
GGUF block types' grids (their table entries name the ``block_type``), so the file carries the
solver's own codes and stored scales, packed as ggml's blocks (:mod:`.gguf_blocks`), nothing
re-rounded. Everything else is written as llama.cpp's converter and quantizer write it:

* the metadata of ``convert_hf_to_gguf.py`` for the Llama family (``LlamaForCausalLM``): the
  ``llama.*`` hyperparameters, ``general.file_type`` of ``T``, the tokenizer
  (:mod:`.gguf_vocab`); tensor names from the gguf package's map (``blk.N.attn_q.weight``...), and
  the converter's row permutation of ``q_proj``/``k_proj`` for llama.cpp's rotary embedding
  (``LlamaModel.permute``: every row keeps its blocks, so the codes move with their rows);
* norms and other 1-D tensors as F32; a 2-D weight the folder holds in full precision gets the
  type llama.cpp's quantizer gives it (:mod:`cdq_cli.gguf_mix`), quantized as llama.cpp quantizes
  without an importance matrix (the embeddings and head of a ``--format gguf`` run are already
  quantized that way by the run itself, so the file and the folder hold the same numbers), or F16
  where llama.cpp falls back to F16 (a width not a multiple of 32).

Refused before anything is written (one line): a folder that is not a causal LM of the Llama
family, a layer on a uniform grid (not a GGUF type), a ``--type`` other than the run's, a tokenizer
llama.cpp would read differently (:class:`~.gguf_vocab.VocabError`), outliers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import gguf_mix
from ..solvers import GridSpec
from ..solvers.gguf import codes_of, grid_of
from ..solvers.gguf_types import BLOCK_TYPES
from ..solvers.llama_fit import fit_parts
from .exports import ExportError, default_dest, read_json, refuse_same_folder
from .files import atomic_folder, check_output_dir
from .folder import OutputWeights
from .gguf_blocks import pack
from .gguf_vocab import VocabError, read_vocab
from .layer import spec_of
from .names import REPORT

# model_type -> (architectures the converter's LlamaModel registers, GGUF architecture)
FAMILIES = {"llama": (("LlamaForCausalLM", "LLaMAForCausalLM"), "llama")}
GGML_QUANT_VERSION = 2
ENGINES = (
    "llama.cpp, Ollama, LM Studio (any llama.cpp-based runtime); transformers (gguf_file=..., dequantized)"
)


@dataclass
class GGUFSummary:
    """What was written, for the CLI's message and ``--json``."""

    dest: Path
    file: Path
    gguf_type: str
    types: dict[str, int]
    fallbacks: list[str]
    size: int
    engines: str = ENGINES

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.dest),
            "format": "gguf",
            "file": str(self.file),
            "type": self.gguf_type,
            "tensor_types": self.types,
            "fallbacks": self.fallbacks,
            "bytes": self.size,
            "engines": self.engines,
        }


def check_family(config: Mapping[str, Any]) -> str:
    """The GGUF architecture of a model config, or a one-line refusal naming the families written."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    family = FAMILIES.get(str(model_type))
    # a config without architectures (a model loaded from a GGUF file) is judged by its model_type
    if family is None or (architectures and not any(a in family[0] for a in architectures)):
        written = ", ".join(f"{name} ({'/'.join(archs[:1])})" for name, (archs, _) in FAMILIES.items())
        raise ExportError(
            f"the GGUF export writes the {written} family; this model is {model_type!r} "
            f"({', '.join(architectures) or 'no architectures listed'})"
        )
    return family[1]


def preflight(layers: Mapping[str, tuple[tuple[int, ...], GridSpec]], *, method: str) -> None:
    """Refuse, before any work, what a GGUF file cannot hold."""
    if method == "quantease-outlier":
        raise ExportError(f"--method {method} keeps full-precision outliers, which a GGUF file cannot hold")
    for name, (shape, spec) in layers.items():
        if len(shape) != 2:
            raise ExportError(f"{name}: the GGUF export holds Linear layers (weight shape {list(shape)})")
        if spec.block_type is None:
            raise ExportError(f"{name} is on a uniform grid: GGUF needs --format gguf --type T")


def check_tokenizer(folder: Path, config: Mapping[str, Any]) -> None:
    """The tokenizer files in ``folder`` make a vocabulary llama.cpp reads as the model does."""
    try:
        read_vocab(folder, dict(config))
    except VocabError as exc:
        raise ExportError(str(exc)) from None


def file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


@dataclass
class _Tensor:
    """One tensor of the file: its name, type, shape (rows, columns or 1-D) and how to make it."""

    name: str
    qtype: str  # a block type, F16 or F32
    shape: tuple[int, ...]
    source: str  # the folder's state-dict name
    layer: str | None  # the stored layer holding it, if quantized in the folder
    rows: np.ndarray | None = None  # row permutation (q/k rope permutation)

    @property
    def nbytes(self) -> int:
        if self.qtype == "F32":
            return 4 * int(np.prod(self.shape))
        if self.qtype == "F16":
            return 2 * int(np.prod(self.shape))
        return BLOCK_TYPES[self.qtype].bytes_for(self.shape[0], self.shape[1])


def export_gguf(
    source: Path | str,
    dest: Path | str | None = None,
    *,
    gguf_type: str | None = None,
    overwrite: bool = False,
) -> GGUFSummary:
    """Write ``<dest>/model-<TYPE>.gguf`` for the cdq output folder ``source`` (atomically)."""
    try:
        import gguf
    except ImportError:
        raise ExportError("the GGUF export needs the gguf package: pip install 'cdq[gguf]'") from None
    source = Path(source).absolute()
    dest = Path(dest).absolute() if dest is not None else default_dest(source, "gguf")
    refuse_same_folder(source, dest, "gguf")
    stored = OutputWeights(source)
    table = stored.table
    if table.get("kind", "causal-lm") != "causal-lm":
        raise ExportError(f"{source} holds a {table.get('kind')!r} model; GGUF is for causal LMs")
    config = read_json(source / "config.json")
    arch = check_family(config)
    recorded = table.get("gguf_type")
    if gguf_type is None:
        gguf_type = recorded
    if gguf_type is None:
        raise ExportError(f"{source} was not quantized for GGUF: run cdq quantize --format gguf --type T")
    try:
        gguf_type = gguf_mix.check_type(gguf_type)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if recorded is not None and gguf_mix.check_type(recorded) != gguf_type:
        raise ExportError(
            f"{source} was quantized as --type {recorded}; it exports as {recorded}, not {gguf_type}"
        )
    specs = {name: spec_of(name, meta) for name, meta in stored.layer_meta.items()}
    preflight({n: (shape, spec) for n, (spec, shape, _) in specs.items()}, method=str(table.get("method")))
    try:
        vocab = read_vocab(source, config)
    except VocabError as exc:
        raise ExportError(str(exc)) from None
    plan, fallbacks = _plan(stored, config, gguf_type, gguf)
    check_output_dir(dest, overwrite=overwrite, protect=[source])
    name = file_name(gguf_type)
    with atomic_folder(dest, overwrite=overwrite, protect=[source]) as tmp:
        writer = gguf.GGUFWriter(tmp / name, arch)
        _metadata(writer, config, gguf_type, source, read_json(source / REPORT))
        vocab.add_to(writer)
        for item in plan:
            quantized = item.qtype not in ("F16", "F32")
            byte_shape = (item.shape[0], item.nbytes // item.shape[0]) if quantized else item.shape
            dtype = np.uint8 if quantized else (np.float16 if item.qtype == "F16" else np.float32)
            raw = gguf.GGMLQuantizationType[item.qtype] if quantized else None
            writer.add_tensor_info(item.name, byte_shape, np.dtype(dtype), item.nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _tensor_data(stored, plan):
            writer.write_tensor_data(data)
        writer.close()
    types: dict[str, int] = {}
    for item in plan:
        types[item.qtype] = types.get(item.qtype, 0) + 1
    return GGUFSummary(dest, dest / name, gguf_type, types, fallbacks, (dest / name).stat().st_size)


def _hf_config(config: Mapping[str, Any]) -> tuple[int, int, int]:
    n_head = int(config["num_attention_heads"])
    return int(config["num_hidden_layers"]), n_head, int(config.get("num_key_value_heads") or n_head)


def _plan(
    stored: OutputWeights, config: Mapping[str, Any], gguf_type: str, gguf: Any
) -> tuple[list[_Tensor], list[str]]:
    """Every tensor of the file, in llama.cpp's order (non-block tensors, then block by block)."""
    n_layers, n_head, n_kv = _hf_config(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = "lm_head.weight" in stored.aliases or bool(config.get("tie_word_embeddings", False))
    shapes = {name: tuple(meta["shape"]) for name, meta in stored.layer_meta.items()}
    model = gguf_mix.ModelShape(n_layers, n_head // n_kv, tied)
    recorded = stored.table.get("gguf_layers") or {}
    items: list[_Tensor] = []
    fallbacks: list[str] = []
    for source in stored.names():
        if tied and source == "lm_head.weight":
            continue  # tied: llama.cpp reads the embeddings as the head
        module, _, suffix = source.rpartition(".")
        mapped = names.get_name(module)
        if mapped is None:
            if source.endswith("rotary_emb.inv_freq"):
                continue
            raise ExportError(f"{source} has no GGUF name in the Llama layout")
        gguf_name = f"{mapped}.{suffix}"
        layer = stored.params.get(source)
        if layer is not None:
            qtype = _block_type_of(stored, layer)
            shape = shapes[layer]
        else:
            shape = _stored_shape(stored, source)
            if len(shape) == 1 or gguf_name.endswith("_norm.weight"):
                qtype = "F32"
            elif recorded.get(module) == gguf_mix.F16:  # --skip, or a width no type fits: as the run kept it
                qtype = gguf_mix.F16
            else:
                wanted = gguf_mix.mix_type(gguf_type, module, shape[1], model)
                qtype = gguf_mix.with_fallback(wanted, shape[1])
                if qtype != wanted:
                    fallbacks.append(f"{gguf_name}: {wanted} -> {qtype} (width {shape[1]})")
        rows = None  # the converter permutes q/k weights and biases alike
        if module.endswith("self_attn.q_proj"):
            rows = _rope_rows(shape[0], n_head)
        elif module.endswith("self_attn.k_proj"):
            rows = _rope_rows(shape[0], n_kv)
        items.append(_Tensor(gguf_name, qtype, tuple(shape), source, layer, rows))
    order = {"token_embd": 0, "output_norm": 1, "output": 2}

    def key(item: _Tensor) -> tuple[int, int, str]:
        head = item.name.split(".")[0]
        if head == "blk":
            return (1, int(item.name.split(".")[1]), item.name)
        return (0, order.get(head, 3), item.name)

    return sorted(items, key=key), fallbacks


def _block_type_of(stored: OutputWeights, layer: str) -> str:
    kind = stored.layer_meta[layer].get("block_type")
    if kind is None:
        raise ExportError(f"{layer} is on a uniform grid: GGUF needs --format gguf --type T")
    return str(kind)


def _stored_shape(stored: OutputWeights, name: str) -> tuple[int, ...]:
    """The shape of a plain tensor of the folder, from its shard's header (nothing read)."""
    from safetensors import safe_open

    name = stored.aliases.get(name, name)
    with safe_open(str(stored.folder / stored.files[name]), framework="pt") as fh:
        return tuple(fh.get_slice(name).get_shape())


def _rope_rows(rows: int, heads: int) -> np.ndarray:
    """The converter's ``LlamaModel.permute`` as a row index: row r of the file is row
    ``index[r]`` of the Hugging Face weight."""
    index = np.arange(rows).reshape(heads, 2, rows // heads // 2)
    return index.swapaxes(1, 2).reshape(rows)


def _tensor_data(stored: OutputWeights, plan: list[_Tensor]) -> Iterator[np.ndarray]:
    for item in plan:
        if item.layer is not None:
            layer = stored.layer(item.layer)
            codes, parts = layer.codes(), dict(layer.parts or {})
        elif item.qtype in ("F16", "F32"):
            tensor = stored.tensor(item.source).to(torch.float32)
            if item.rows is not None:
                tensor = tensor[torch.from_numpy(item.rows)]
            yield tensor.numpy().astype(np.float16 if item.qtype == "F16" else np.float32)
            continue
        else:  # a full-precision matrix llama.cpp quantizes: as it does without an importance matrix
            weight = stored.tensor(item.source).to(torch.float32)
            parts = fit_parts(weight, item.qtype)
            codes = codes_of(weight, grid_of(GridSpec.of_type(item.qtype), parts))
        if item.rows is not None:
            index = torch.from_numpy(item.rows)
            codes = codes[index]
            parts = {key: value[index] for key, value in parts.items()}
        yield pack(item.qtype, codes, parts)


def _metadata(writer: Any, config: Mapping[str, Any], gguf_type: str, source: Path, report: Mapping) -> None:
    """The converter's general.* and llama.* keys (TextModel/LlamaModel.set_gguf_parameters)."""
    n_layers, n_head, n_kv = _hf_config(config)
    writer.add_type("model")
    writer.add_name(source.name)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_block_count(n_layers)
    if (n_ctx := config.get("max_position_embeddings")) is not None:
        writer.add_context_length(int(n_ctx))
    writer.add_embedding_length(int(config["hidden_size"]))
    if (n_ff := config.get("intermediate_size")) is not None:
        writer.add_feed_forward_length(int(n_ff))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta"))
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in (None, "default"):
        raise ExportError(f"the GGUF export writes default rotary embeddings; this model's are {rope_type!r}")
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if (eps := config.get("rms_norm_eps")) is not None:
        writer.add_layer_norm_rms_eps(float(eps))
    if (head_dim := config.get("head_dim")) is not None:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(gguf_mix.file_type_id(gguf_type))
    rope_dim = config.get("head_dim") or int(config["hidden_size"]) // n_head
    writer.add_rope_dimension_count(int(rope_dim))
