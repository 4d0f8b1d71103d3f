"""Which GGUF type each tensor gets: llama.cpp's quantizer rules (llama-quant.cpp,
``llama_tensor_get_type``), for the model families cdq writes as GGUF.

``--type T`` names either a llama.cpp file type (``llama-quantize MODEL T``), whose rules give some
tensors a wider type than the default, or a bare k-quant (``Q3_K``, ``Q4_K``, ``Q5_K``: every
tensor that type, as ``llama-quantize --pure``). The rules, as llama.cpp applies them to a dense
Llama (no experts, not Falcon):

* ``output.weight`` (and ``token_embd.weight`` when the embeddings are tied): Q6_K, or Q8_0 when
  the width is not a multiple of the default type's block (or the default is Q8_0);
  ``token_embd.weight`` otherwise keeps the default type;
* ``attn_v``: Q2_K → Q4_K when n_head/n_head_kv ≥ 4, else Q3_K; Q3_K_M → Q5_K in the first two
  layers, Q4_K after; Q4_K_M / Q5_K_M → Q6_K in the layers ``use_more_bits`` picks (the first and
  last eighth, and every third in between); on an 80-layer model (LLM_TYPE_70B) a Q3_K or Q4_K
  ``attn_v`` becomes Q5_K;
* ``ffn_down``: Q2_K → Q3_K; Q3_K_M → Q5_K in the first sixteenth, Q4_K after; Q4_K_M / Q5_K_M →
  Q6_K where ``use_more_bits``; Q4_0 / Q5_0 *with an importance matrix* → Q4_1 / Q5_1 in the first
  eighth (cdq always has calibration data, so its files take this rule: the same types, the same
  size as llama.cpp's importance-matrix file);
* ``attn_output``: Q2_K → Q3_K; Q3_K_M → Q4_K;
* a model with exactly 8 experts: ``attn_v`` and ``attn_k`` Q8_0, ``attn_output`` Q5_K for Q2_K,
  Q3_K_M and Q4_K_M (llama.cpp's Mixtral rules);
* experts (``ffn_*_exps``) and Qwen2-MoE's shared expert (``ffn_*_shexp``) take the rules of
  ``ffn_gate``/``ffn_up``/``ffn_down`` in their block (llama.cpp's category is a substring match and,
  with experts, the layer is read from the name); the shared expert's one-row gate is never
  quantized (:func:`never_quantized`).

A ``--layer`` rule (llama.cpp's ``--tensor-type``) replaces these for the layers it matches. Then,
for every tensor, llama.cpp's fallback: a row width that is not a multiple of the type's block
takes the type's fallback (Q2_K, Q3_K → Q4_0; Q4_K → Q5_0; Q5_K → Q5_1; Q6_K → Q8_0), and F16 when
that does not fit either (a width not a multiple of 32). Norms and other 1-D tensors are F32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..solvers.gguf_types import BLOCK_TYPES, fitting_type

# --type T: (default block type, llama.cpp file type id (LlamaFileType), rules apply)
FILE_TYPES: dict[str, tuple[str, int, bool]] = {
    "Q4_0": ("Q4_0", 2, True),
    "Q4_1": ("Q4_1", 3, True),
    "Q8_0": ("Q8_0", 7, True),
    "Q5_0": ("Q5_0", 8, True),
    "Q5_1": ("Q5_1", 9, True),
    "Q2_K": ("Q2_K", 10, True),
    "Q3_K": ("Q3_K", 11, False),
    "Q3_K_M": ("Q3_K", 12, True),
    "Q4_K": ("Q4_K", 14, False),
    "Q4_K_M": ("Q4_K", 15, True),
    "Q5_K": ("Q5_K", 16, False),
    "Q5_K_M": ("Q5_K", 17, True),
    "Q6_K": ("Q6_K", 18, True),
}
F16 = "F16"


def check_type(name: str) -> str:
    """``--type`` ``name`` in its canonical spelling; one-line ``ValueError`` naming the choices."""
    canonical = str(name).upper()
    if canonical not in FILE_TYPES:
        raise ValueError(
            f"--type {name!r} is not a GGUF type cdq writes: choose one of {', '.join(FILE_TYPES)}"
        )
    return canonical


def default_type(name: str) -> str:
    """The block type most tensors of ``--type name`` get."""
    return FILE_TYPES[check_type(name)][0]


def file_type_id(name: str) -> int:
    """``general.file_type`` of a ``--type name`` file (llama.cpp's LlamaFileType)."""
    return FILE_TYPES[check_type(name)][1]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's ``use_more_bits`` (C integer division)."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


# Hugging Face names of the Llama family → llama.cpp's tensor categories (tensor_get_category).
_CATEGORIES = (
    (re.compile(r"(^|\.)embed_tokens$"), "token_embd"),
    (re.compile(r"(^|\.)lm_head$"), "output"),
    (re.compile(r"\.self_attn\.q_proj$"), "attn_q"),
    (re.compile(r"\.self_attn\.k_proj$"), "attn_k"),
    (re.compile(r"\.self_attn\.v_proj$"), "attn_v"),
    (re.compile(r"\.self_attn\.o_proj$"), "attn_output"),
    (re.compile(r"\.mlp\.gate_proj$"), "ffn_gate"),
    (re.compile(r"\.mlp\.up_proj$"), "ffn_up"),
    (re.compile(r"\.mlp\.down_proj$"), "ffn_down"),
    # fused experts: gate/up become ffn_gate_exps and ffn_up_exps (the same rules), down ffn_down_exps
    (re.compile(r"\.mlp\.experts\.gate_up_proj$"), "ffn_gate"),
    (re.compile(r"\.mlp\.experts\.down_proj$"), "ffn_down"),
    # Qwen2-MoE's shared expert: ffn_gate_shexp, ffn_up_shexp, ffn_down_shexp (llama.cpp's category is
    # a substring match, so they take the rules of ffn_gate, ffn_up and ffn_down)
    (re.compile(r"\.mlp\.shared_expert\.gate_proj$"), "ffn_gate"),
    (re.compile(r"\.mlp\.shared_expert\.up_proj$"), "ffn_up"),
    (re.compile(r"\.mlp\.shared_expert\.down_proj$"), "ffn_down"),
)
# llama.cpp never quantizes these: Qwen2-MoE's shared-expert gate (1, H), ffn_gate_inp_shexp, one row
# (ggml_n_dims 1: tensor_allows_quantization says no, whatever the mix or --tensor-type); F32 in the file
_NEVER = re.compile(r"\.mlp\.shared_expert_gate$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def category(name: str) -> str:
    """The llama.cpp category of a layer (full Hugging Face module name); ``other`` if none."""
    for pattern, kind in _CATEGORIES:
        if pattern.search(name):
            return kind
    return "other"


def never_quantized(name: str) -> bool:
    """Whether llama.cpp keeps layer ``name`` (full Hugging Face module name) in F32 whatever the
    type: Qwen2-MoE's shared-expert gate."""
    return bool(_NEVER.search(name))


def layer_index(name: str) -> int | None:
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class ModelShape:
    """What the rules read of a model: its layer count, n_head / n_head_kv, tied embeddings."""

    n_layers: int
    n_gqa: int
    tied: bool
    n_expert: int = 0


def mix_type(mix: str, name: str, columns: int, shape: ModelShape) -> str:
    """The block type llama.cpp's rules give layer ``name`` for ``--type mix`` (before the width
    fallback); see the module docstring."""
    base, _, rules = FILE_TYPES[check_type(mix)]
    mix = check_type(mix)
    kind = category(name)
    if not rules:
        return base
    i = layer_index(name)
    n = shape.n_layers
    if kind == "output" or (shape.tied and kind == "token_embd"):
        if columns % BLOCK_TYPES[base].block:
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"
    new = base
    if kind == "attn_v" and i is not None:
        if mix == "Q2_K":
            new = "Q4_K" if shape.n_gqa >= 4 else "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new = "Q6_K"
        if n == 80 and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if shape.n_expert == 8:
            new = "Q8_0"
    elif kind == "attn_k" and shape.n_expert == 8:
        new = "Q8_0"
    elif kind == "ffn_down" and i is not None:
        if mix == "Q2_K":
            new = "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new = "Q6_K"
        elif mix in ("Q4_0", "Q5_0") and i < n // 8:
            new = "Q4_1" if mix == "Q4_0" else "Q5_1"
    elif kind == "attn_output":
        if shape.n_expert == 8:
            if mix in ("Q2_K", "Q3_K_M", "Q4_K_M"):
                new = "Q5_K"
        elif mix == "Q2_K":
            new = "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q4_K"
    return new


def with_fallback(wanted: str, columns: int) -> str:
    """llama.cpp's ``tensor_type_fallback``: ``wanted`` if the width fits its block, else its
    fallback type, else F16."""
    return fitting_type(wanted, columns) or F16


def model_shape(shapes: dict[str, tuple[int, ...]], tied: bool) -> ModelShape:
    """A :class:`ModelShape` from the quantized layers' weight shapes by full name (fused experts:
    (experts, rows, columns)): the layer count from the names, n_head / n_head_kv from the q and k
    projections' rows, the expert count from fused experts."""
    indices = [layer_index(name) for name in shapes]
    n_layers = max((i for i in indices if i is not None), default=-1) + 1
    q = next((shape[-2] for name, shape in shapes.items() if category(name) == "attn_q"), None)
    k = next((shape[-2] for name, shape in shapes.items() if category(name) == "attn_k"), None)
    n_gqa = q // k if q and k else 1
    n_expert = max((shape[0] for shape in shapes.values() if len(shape) == 3), default=0)
    return ModelShape(n_layers, n_gqa, tied, n_expert)
