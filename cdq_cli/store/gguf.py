"""Export a cdq output folder as one GGUF file: what llama.cpp, Ollama and LM Studio run.

The folder must come from ``cdq quantize --format gguf --type T``: its quantized layers are on
GGUF block types' grids (their table entries name the ``block_type``), so the file carries the
solver's own codes and stored scales, packed as ggml's blocks (:mod:`.gguf_blocks`), nothing
re-rounded. Everything else is written as llama.cpp's converter and quantizer write it:

* the metadata of ``convert_hf_to_gguf.py`` for the families in :data:`FAMILIES` (the Llama family:
  ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``MixtralForCausalLM``, a Llama with experts;
  Qwen2-MoE; Qwen3-MoE): the ``<arch>.*`` hyperparameters,
  ``general.file_type`` of ``T``, the tokenizer (:mod:`.gguf_vocab`); tensor names from the gguf
  package's map (``blk.N.attn_q.weight``...); for the Llama family the converter's row permutation
  of ``q_proj``/``k_proj`` for llama.cpp's rotary embedding (``LlamaModel.permute``: every row keeps
  its blocks, so the codes move with their rows); fused experts (E, 2I, H) / (E, H, I) as the
  converter splits them (``ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``: the rows of each
  expert, so again the codes move with their rows), the router (``ffn_gate_inp``) in F32;
  Qwen2-MoE's shared expert as ``ffn_{gate,up,down}_shexp`` and its one-row gate
  (``ffn_gate_inp_shexp``) in F32, 1-D as llama-quantize writes it (never quantized, by the run
  either: :func:`.gguf_mix.never_quantized`);
* norms and other 1-D tensors as F32; a 2-D weight the folder holds in full precision gets the
  type llama.cpp's quantizer gives it (:mod:`.gguf_mix`), quantized as llama.cpp quantizes
  without an importance matrix (the embeddings and head of a ``--format gguf`` run are already
  quantized that way by the run itself, so the file and the folder hold the same numbers), or F16
  where llama.cpp falls back to F16 (a width not a multiple of 32);
* a ``--transform`` (merged into the weights) as the key ``cdq.transform`` (its JSON), as the other
  exports record it in their configs; one that needs operations at inference time is refused.

Refused before anything is written (one line): a folder that is not a causal LM of one of those
families (or a Qwen3-MoE / Qwen2-MoE whose routing, dense blocks or attention llama.cpp computes
otherwise), a layer on a uniform grid (not a GGUF type), a ``--type`` other than the run's, a
tokenizer llama.cpp would read differently (:class:`~.gguf_vocab.VocabError`), outliers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..solvers import GridSpec
from ..solvers.gguf import codes_of, grid_of
from ..solvers.gguf_types import BLOCK_TYPES
from ..solvers.llama_fit import fit_parts
from . import gguf_mix
from .exporting import (
    OUTLIER_METHODS,
    ExportError,
    ExportFormat,
    merged_transform,
    read_json,
    refuse_same_folder,
)
from .files import atomic_folder, check_output_dir
from .folder import OutputWeights
from .gguf_blocks import pack
from .gguf_vocab import VocabError, read_vocab
from .layer import spec_of

AS_RUN = "as-run"  # cdq export --format gguf without --type: the type the run was quantized for


@dataclass(frozen=True)
class GGUFFamily:
    """How the converter writes a model type: the Hugging Face architectures its class registers,
    the GGUF architecture, whether q/k rows are permuted for llama.cpp's rope (LlamaModel only)."""

    architectures: tuple[str, ...]
    arch: str  # GGUF architecture name (gguf.MODEL_ARCH_NAMES)
    model_arch: str  # gguf.MODEL_ARCH member
    permute_qk: bool


# model_type -> family, as convert_hf_to_gguf.py's LlamaModel (Mixtral: a Llama with experts),
# Qwen2MoeModel and Qwen3MoeModel write them
FAMILIES = {
    "llama": GGUFFamily(("LlamaForCausalLM", "LLaMAForCausalLM"), "llama", "LLAMA", True),
    "mistral": GGUFFamily(("MistralForCausalLM",), "llama", "LLAMA", True),
    "mixtral": GGUFFamily(("MixtralForCausalLM",), "llama", "LLAMA", True),
    "qwen2_moe": GGUFFamily(("Qwen2MoeForCausalLM",), "qwen2moe", "QWEN2MOE", False),
    "qwen3_moe": GGUFFamily(("Qwen3MoeForCausalLM",), "qwen3moe", "QWEN3MOE", False),
}
GGML_QUANT_VERSION = 2
# 2-D tensors the converter writes in F32 and llama-quantize leaves so: norms, the experts' router,
# Qwen2-MoE's shared-expert gate (converter: FFN_GATE_INP, FFN_GATE_INP_SHEXP)
_F32_NAMES = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
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
        types = ", ".join(f"{count} {kind}" for kind, count in sorted(self.types.items()))
        fallbacks = "".join(f"; fallback (as llama.cpp): {line}" for line in self.fallbacks)
        return {
            "output": str(self.dest),
            "format": "gguf",
            "headline": (
                f"{self.file.name}, GGUF {self.gguf_type}, {self.size:,} bytes; tensors: {types}{fallbacks}"
            ),
            "file": str(self.file),
            "type": self.gguf_type,
            "tensor_types": self.types,
            "fallbacks": self.fallbacks,
            "bytes": self.size,
            "engines": self.engines,
        }


def check_family(config: Mapping[str, Any]) -> GGUFFamily:
    """The GGUF family of a model config, or a one-line refusal naming the families written."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    family = FAMILIES.get(str(model_type))
    # a config without architectures (a model loaded from a GGUF file) is judged by its model_type
    if family is None or (architectures and not any(a in family.architectures for a in architectures)):
        written = ", ".join(family.architectures[0] for family in FAMILIES.values())
        raise ExportError(
            f"the GGUF export writes {written}; this model is {model_type!r} "
            f"({', '.join(architectures) or 'no architectures listed'})"
        )
    if family.arch == "qwen3moe" and not config.get("norm_topk_prob", False):
        raise ExportError(
            "llama.cpp's qwen3moe always renormalizes the top-k routing weights, and this model does not "
            "(norm_topk_prob false): its GGUF file would compute something else"
        )
    if family.arch == "qwen2moe":
        _check_qwen2moe(config)
    return family


def _check_qwen2moe(config: Mapping[str, Any]) -> None:
    """What llama.cpp's qwen2moe graph computes (src/models/qwen2moe.cpp): every block a MoE block
    with a shared expert, the top-k routing weights not renormalized, full attention everywhere."""
    n_layers = int(config["num_hidden_layers"])
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or ())
    dense |= {i for i in range(n_layers) if step <= 0 or (i + 1) % step}
    if dense:
        raise ExportError(
            f"llama.cpp's qwen2moe has experts in every block, and this model's blocks {sorted(dense)} "
            "are dense (decoder_sparse_step / mlp_only_layers): its GGUF file would not load"
        )
    if config.get("norm_topk_prob", False):
        raise ExportError(
            "llama.cpp's qwen2moe never renormalizes the top-k routing weights, and this model does "
            "(norm_topk_prob true): its GGUF file would compute something else"
        )
    if config.get("use_sliding_window", False):
        raise ExportError(
            "llama.cpp's qwen2moe attends to the whole context, and this model uses sliding-window "
            "attention (use_sliding_window true): its GGUF file would compute something else"
        )


def preflight(
    layers: Mapping[str, tuple[tuple[int, ...], GridSpec]],
    *,
    method: str,
    skipped: Sequence[str] = (),
    model_type: str | None = None,
    kept: Sequence[str] = (),
) -> None:
    """Refuse, before any work, what a GGUF file cannot hold (``skipped``/``kept`` layers are
    written in F16, as llama.cpp keeps them; the family is checked from the model's config by the
    run, :func:`check_family`)."""
    if method in OUTLIER_METHODS:
        raise ExportError(f"--method {method} keeps full-precision outliers, which a GGUF file cannot hold")
    for name, (shape, spec) in layers.items():
        if len(shape) == 4:
            raise ExportError(f"{name}: the GGUF export holds Linear layers (weight shape {list(shape)})")
        if spec.block_type is None:
            raise ExportError(f"{name} is on a uniform grid: GGUF needs --format gguf --type T")


def check_tokenizer(folder: Path, config: Mapping[str, Any]) -> None:
    """The tokenizer files in ``folder`` make a vocabulary llama.cpp reads as the model does."""
    try:
        read_vocab(folder, dict(config), llama=check_family(config).arch == "llama")
    except VocabError as exc:
        raise ExportError(str(exc)) from None


def file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


@dataclass
class _Tensor:
    """One tensor of the file: its name, type, shape ((rows, columns), (experts, rows, columns) or
    1-D) and how to make it: rows ``rows`` (an index into the source's rows, as a (rows, columns)
    matrix; None: all, in order) of the folder's tensor ``source``."""

    name: str
    qtype: str  # a block type, F16 or F32
    shape: tuple[int, ...]
    source: str  # the folder's state-dict name
    layer: str | None  # the stored layer holding it, if quantized in the folder
    rows: np.ndarray | None = None  # q/k rope permutation, or one half of fused gate/up experts

    @property
    def nbytes(self) -> int:
        if self.qtype == "F32":
            return 4 * int(np.prod(self.shape))
        if self.qtype == "F16":
            return 2 * int(np.prod(self.shape))
        return BLOCK_TYPES[self.qtype].bytes_for(int(np.prod(self.shape[:-1])), self.shape[-1])


def export_gguf(
    source: Path | str,
    dest: Path | str | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    type: str | None = AS_RUN,
) -> GGUFSummary:
    """Write ``<dest>/model-<TYPE>.gguf`` for the cdq output folder ``source`` (atomically): one
    file, whatever ``max_shard_bytes`` says. ``type`` (``--type``): :data:`AS_RUN` (or None) is
    the run's, and any other is refused (the layers were solved on the run's grids)."""
    gguf_type = type
    try:
        import gguf
    except ImportError:
        raise ExportError("the GGUF export needs the gguf package: pip install 'cdq[gguf]'") from None
    source = Path(source).absolute()
    dest = Path(dest).absolute() if dest is not None else FORMAT.default_dest(source)
    refuse_same_folder(source, dest, "gguf")
    stored = OutputWeights(source)
    table = stored.table
    if table.get("kind", "causal-lm") != "causal-lm":
        raise ExportError(f"{source} holds a {table.get('kind')!r} model; GGUF is for causal LMs")
    config = read_json(source / "config.json")
    family = check_family(config)
    transform = merged_transform(table, "GGUF")  # --transform: merged into the weights, or refused
    recorded = table.get("gguf_type")
    if gguf_type in (None, AS_RUN):
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
        vocab = read_vocab(source, config, llama=family.arch == "llama")
    except VocabError as exc:
        raise ExportError(str(exc)) from None
    plan, fallbacks = _plan(stored, config, gguf_type, gguf, family)
    check_output_dir(dest, overwrite=overwrite, protect=[source])
    name = file_name(gguf_type)
    with atomic_folder(dest, overwrite=overwrite, protect=[source]) as tmp:
        writer = gguf.GGUFWriter(tmp / name, family.arch)
        _metadata(writer, config, gguf_type, source, family)
        if transform.get("name", "none") != "none":  # what the weights went through (readers ignore it)
            writer.add_string(TRANSFORM_KEY, json.dumps(transform, sort_keys=True))
        vocab.add_to(writer)
        for item in plan:
            quantized = item.qtype not in ("F16", "F32")
            rows = int(np.prod(item.shape[:-1]))
            byte_shape = (*item.shape[:-1], item.nbytes // rows) if quantized else item.shape
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
    stored: OutputWeights, config: Mapping[str, Any], gguf_type: str, gguf: Any, family: GGUFFamily
) -> tuple[list[_Tensor], list[str]]:
    """Every tensor of the file, in llama.cpp's order (non-block tensors, then block by block)."""
    n_layers, n_head, n_kv = _hf_config(config)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.model_arch), n_layers)
    tied = "lm_head.weight" in stored.aliases or bool(config.get("tie_word_embeddings", False))
    shapes = {name: tuple(meta["shape"]) for name, meta in stored.layer_meta.items()}
    experts = int(config.get("num_local_experts", config.get("num_experts")) or 0)
    model = gguf_mix.ModelShape(n_layers, n_head // n_kv, tied, experts)
    recorded = stored.table.get("gguf_layers") or {}
    items: list[_Tensor] = []
    fallbacks: list[str] = []
    for source in stored.names():
        if tied and source == "lm_head.weight":
            continue  # tied: llama.cpp reads the embeddings as the head
        module, _, suffix = source.rpartition(".")
        layer = stored.params.get(source)
        shape = shapes[layer] if layer is not None else _stored_shape(stored, source)
        for target, rows, out_shape in _targets(module, suffix, shape, family, n_head, n_kv):
            mapped = names.get_name(target)
            if mapped is None:
                if source.endswith("rotary_emb.inv_freq"):
                    continue
                raise ExportError(f"{source} has no GGUF name in llama.cpp's {family.arch} layout")
            gguf_name = f"{mapped}.weight" if target != module else f"{mapped}.{suffix}"
            if layer is None and len(out_shape) == 2 and out_shape[0] == 1:
                # one row (Qwen2-MoE's shared-expert gate): llama-quantize writes it 1-D, as ggml
                # counts dimensions (ggml_n_dims), and transformers' reader expects that
                out_shape = out_shape[1:]
            if layer is not None:
                qtype = _block_type_of(stored, layer)
            elif len(out_shape) == 1 or gguf_name.endswith(_F32_NAMES):
                qtype = "F32"  # as the converter: 1-D tensors, norms, the routers
            elif recorded.get(module) == gguf_mix.F16:  # --skip, or a width no type fits: as the run kept it
                qtype = gguf_mix.F16
            else:
                wanted = gguf_mix.mix_type(gguf_type, module, out_shape[-1], model)
                qtype = gguf_mix.with_fallback(wanted, out_shape[-1])
                if qtype != wanted:
                    fallbacks.append(f"{gguf_name}: {wanted} -> {qtype} (width {out_shape[-1]})")
            items.append(_Tensor(gguf_name, qtype, out_shape, source, layer, rows))
    order = {"token_embd": 0, "output_norm": 1, "output": 2}

    def key(item: _Tensor) -> tuple[int, int, str]:
        head = item.name.split(".")[0]
        if head == "blk":
            return (1, int(item.name.split(".")[1]), item.name)
        return (0, order.get(head, 3), item.name)

    return sorted(items, key=key), fallbacks


def _targets(
    module: str, suffix: str, shape: tuple[int, ...], family: GGUFFamily, n_head: int, n_kv: int
) -> list[tuple[str, np.ndarray | None, tuple[int, ...]]]:
    """(name to map, rows taken, shape in the file) of each file tensor made from one folder
    tensor: the tensor itself (q/k rows permuted for the Llama family's rope), or the two halves of
    fused gate/up experts (E, 2I, H) → ffn_gate_exps and ffn_up_exps (E, I, H) (the converter's
    split: gate first)."""
    if module.endswith("mlp.experts") and suffix == "gate_up_proj":
        experts, double, width = shape
        half = double // 2
        base = np.arange(experts).reshape(-1, 1) * double
        gate = (base + np.arange(half)).reshape(-1)
        return [
            (f"{module}.gate_proj", gate, (experts, half, width)),
            (f"{module}.up_proj", gate + half, (experts, half, width)),
        ]
    if module.endswith("mlp.experts") and suffix == "down_proj":
        return [(f"{module}.down_proj", None, tuple(shape))]
    rows = None  # the converter permutes q/k weights and biases alike
    if family.permute_qk and module.endswith("self_attn.q_proj"):
        rows = _rope_rows(shape[0], n_head)
    elif family.permute_qk and module.endswith("self_attn.k_proj"):
        rows = _rope_rows(shape[0], n_kv)
    return [(module, rows, tuple(shape))]


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
        columns = item.shape[-1]
        if item.layer is not None:
            layer = stored.layer(item.layer)
            codes, parts = layer.codes(), dict(layer.parts or {})
        else:
            tensor = (
                stored.tensor(item.source).to(torch.float32).reshape(-1, columns)
                if len(item.shape) > 1
                else (stored.tensor(item.source).to(torch.float32))
            )
            if item.qtype in ("F16", "F32"):
                if item.rows is not None:
                    tensor = tensor[torch.from_numpy(item.rows)]
                values = tensor.reshape(item.shape).numpy()
                yield values.astype(np.float16 if item.qtype == "F16" else np.float32)
                continue
            # a full-precision matrix llama.cpp quantizes: as it does without an importance matrix
            parts = fit_parts(tensor, item.qtype)
            codes = codes_of(tensor, grid_of(GridSpec.of_type(item.qtype), parts))
        if item.rows is not None:
            index = torch.from_numpy(item.rows)
            codes = codes[index]
            parts = {key: value[index] for key, value in parts.items()}
        blocks = pack(item.qtype, codes, parts)
        yield blocks.reshape(*item.shape[:-1], blocks.shape[-1])


# The --transform the weights went through (hadamard, awq: merged, nothing added at run time), as
# JSON; llama.cpp and transformers ignore keys outside their architectures' names.
TRANSFORM_KEY = "cdq.transform"


def _metadata(
    writer: Any, config: Mapping[str, Any], gguf_type: str, source: Path, family: GGUFFamily
) -> None:
    """The converter's general.* and <arch>.* keys (TextModel.set_gguf_parameters, with
    LlamaModel's and Qwen2MoeModel's additions; Mixtral's expert width is its intermediate_size,
    written as feed_forward_length)."""
    n_layers, n_head, n_kv = _hf_config(config)
    writer.add_type("model")
    writer.add_name(source.name)
    writer.add_quantization_version(GGML_QUANT_VERSION)
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
    if (experts := config.get("num_local_experts", config.get("num_experts"))) is not None:
        writer.add_expert_count(int(experts))
    if (used := config.get("num_experts_per_tok")) is not None:
        writer.add_expert_used_count(int(used))
    if (head_dim := config.get("head_dim")) is not None:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(gguf_mix.file_type_id(gguf_type))
    if family.arch == "llama":  # LlamaModel.set_gguf_parameters
        writer.add_vocab_size(int(config["vocab_size"]))
        rope_dim = config.get("head_dim") or int(config["hidden_size"]) // n_head
        writer.add_rope_dimension_count(int(rope_dim))
    if (moe_ff := config.get("moe_intermediate_size")) is not None:  # Qwen2MoeModel.set_gguf_parameters
        writer.add_expert_feed_forward_length(int(moe_ff))
    if (shared_ff := config.get("shared_expert_intermediate_size")) is not None:
        writer.add_expert_shared_feed_forward_length(int(shared_ff))


FORMAT = ExportFormat(
    name="gguf",
    suffix="-gguf",
    description="one GGUF file on llama.cpp's block types (llama.cpp, Ollama, LM Studio); needs --type T",
    preflight=preflight,
    export=export_gguf,
    options={"type": (AS_RUN, *gguf_mix.FILE_TYPES)},
)
