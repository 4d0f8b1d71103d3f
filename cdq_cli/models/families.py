"""Language-model families as data, and the one adapter that runs them all.

A family is declared as DATA (:class:`Family`: a few attribute paths and layer names); one generic
:class:`BlockAdapter` turns any family into the behaviour the pipeline needs. Adapters know nothing
of quantization math, and the pipeline knows nothing of model families.

Adding a family (a vision one, say) is a new :class:`Family` entry passed to :func:`register`::

    register(Family(name="vit", classes=("VisionTransformer",), blocks="blocks",
                    groups=(("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",)),
                    embeddings=("patch_embed", "cls_token", "pos_embed"), call={}))

Block-0 inputs are captured by the model's own forward (:func:`~cdq_cli.models.base.capture_first_inputs`),
so no family re-implements its model's preamble.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import (
    AdapterError,
    BlockInputs,
    capture_first_inputs,
    module_ids,
    outside,
    quantizable_names,
    resolve,
)


@dataclass(frozen=True)
class Readers:
    """Tensors that read one norm's output: ``norm`` (the norm module's name in the block), the
    ``layers`` fed its output (a Linear's module name, or a fused 3-D parameter's name; absent ones
    are skipped), and ``inspect``: the module whose output a scale search compares (AWQ)."""

    norm: str
    layers: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class Stream:
    """Where a family's residual stream is read and written: the layout an equivalence transform
    (a rotation of the stream, per-channel scales) needs, as names only.

    ``embedding``/``final_norm``/``head``: the embedding matrix, the last norm (module name) and the
    output head's matrix. ``readers``: per block, each norm and what reads its output.
    ``writers``: per block, the layers whose outputs are added to the stream (their biases follow).
    ``values``: the value projection and the attention output projection (a per-head rotation or
    scale between them is exact). ``inner``: pairs (A, B) where B's input is elementwise linear in
    A's output (``down(act(gate) · up)``, ``fc2(relu(fc1))`` for positive scales). ``untouched``:
    the other tensors of a block, which no transform changes (per-head q/k norms). ``norm``:
    ``rms`` (RMSNorm: rotation-invariant) or ``layer`` (LayerNorm: mean and bias, not rotation
    invariant). ``requires``: config values the layout holds for (e.g. pre-norm blocks)."""

    embedding: str
    final_norm: str
    head: str
    readers: tuple[Readers, ...]
    writers: tuple[str, ...]
    values: tuple[str, str]
    inner: tuple[tuple[str, str], ...] = ()
    untouched: tuple[str, ...] = ()
    norm: str = "rms"
    requires: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Family:
    """The layout of one model family, as names only.

    ``blocks``: attribute path of the ModuleList of blocks. ``groups``: the true-sequential groups of
    layer names inside a block, in execution order (layers of one group see the same inputs, so they
    share one calibration pass). ``embeddings``: modules (or parameters) the model runs before block
    0; they are moved to the device for the capture pass. ``head``: modules that turn the last
    block's output into the model's output, in order (absent ones are skipped), used to check the
    block chain against the model. ``call``: keyword arguments for the capture forward.
    """

    name: str
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    embeddings: tuple[str, ...] = ()
    head: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    call: dict[str, Any] = field(default_factory=lambda: {"use_cache": False})
    strict: bool = True  # every declared layer must be in every block (False: absent ones are skipped)
    stream: Stream | None = None  # the residual stream's layout (None: no equivalence transform)


# Llama-style blocks (RMSNorm before attention and MLP), dense or mixture-of-experts: one layout.
LLAMA_STREAM = Stream(
    embedding="model.embed_tokens.weight",
    final_norm="model.norm",
    head="lm_head.weight",
    readers=(
        Readers("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        Readers(
            "post_attention_layernorm",
            (
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.gate",  # a router
                "mlp.experts.gate_up_proj",
                "mlp.shared_expert.gate_proj",
                "mlp.shared_expert.up_proj",
                "mlp.shared_expert_gate",
            ),
            "mlp",
        ),
    ),
    writers=("self_attn.o_proj", "mlp.down_proj", "mlp.experts.down_proj", "mlp.shared_expert.down_proj"),
    values=("self_attn.v_proj", "self_attn.o_proj"),
    inner=(("mlp.up_proj", "mlp.down_proj"), ("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")),
    untouched=("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
)

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    embeddings=("model.embed_tokens", "model.rotary_emb"),
    head=("model.norm", "lm_head"),
    stream=LLAMA_STREAM,
)

OPT = Family(
    name="opt",
    model_types=("opt",),
    blocks="model.decoder.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    head=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    stream=Stream(
        embedding="model.decoder.embed_tokens.weight",
        final_norm="model.decoder.final_layer_norm",
        head="lm_head.weight",
        readers=(
            Readers(
                "self_attn_layer_norm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "self_attn",
            ),
            Readers("final_layer_norm", ("fc1",), "fc1"),
        ),
        writers=("self_attn.out_proj", "fc2"),
        values=("self_attn.v_proj", "self_attn.out_proj"),
        inner=(("fc1", "fc2"),),
        norm="layer",
        requires=(("do_layer_norm_before", True), ("activation_function", "relu")),
    ),
)

_ATTENTION = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))

MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    blocks="model.layers",
    groups=(*_ATTENTION, ("mlp.experts.gate_up_proj",), ("mlp.experts.down_proj",)),
    embeddings=("model.embed_tokens", "model.rotary_emb"),
    head=("model.norm", "lm_head"),
    stream=LLAMA_STREAM,
)

QWEN_MOE = Family(  # Qwen2-MoE (shared expert, some dense blocks), Qwen3-MoE, OLMoE
    name="qwen-moe",
    model_types=("qwen2_moe", "qwen3_moe", "olmoe"),
    blocks="model.layers",
    groups=(
        *_ATTENTION,
        (
            "mlp.experts.gate_up_proj",
            "mlp.shared_expert.gate_proj",
            "mlp.shared_expert.up_proj",
            "mlp.shared_expert_gate",
            "mlp.gate_proj",
            "mlp.up_proj",
        ),
        ("mlp.experts.down_proj", "mlp.shared_expert.down_proj", "mlp.down_proj"),
    ),
    embeddings=("model.embed_tokens", "model.rotary_emb"),
    head=("model.norm", "lm_head"),
    strict=False,
    stream=LLAMA_STREAM,
)

BLOOM = Family(
    name="bloom",
    model_types=("bloom",),
    blocks="transformer.h",
    groups=(
        ("self_attention.query_key_value",),
        ("self_attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    embeddings=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
    head=("transformer.ln_f", "lm_head"),
)

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` detectable by :func:`adapter_for` (later registrations win)."""
    FAMILIES[family.name] = family
    return family


for _family in (LLAMA, OPT, BLOOM, MIXTRAL, QWEN_MOE):
    register(_family)


class BlockAdapter:
    """The generic adapter: all behaviour, parameterised by a :class:`Family`."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self.name = family.name

    # -- layout ---------------------------------------------------------------------------------

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        found = resolve(model, self.family.blocks)
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise AdapterError(f"{self.name} model has no blocks at {self.family.blocks!r}")
        return list(found)

    def block_name(self, index: int) -> str:
        return f"{self.family.blocks}.{index}"

    def layer_groups(self, block: nn.Module) -> list[list[str]]:
        """Declared groups, checked against the block; quantizable layers left out form a last group."""
        present = quantizable_names(block)
        groups: list[list[str]] = []
        for group in self.family.groups:
            for name in group:
                if name not in present and self.family.strict:
                    raise AdapterError(
                        f"{self.name} block has no Linear/Conv2d layer {name!r} "
                        f"(found: {', '.join(present) or 'none'})"
                    )
            kept = [name for name in group if name in present]
            if kept:
                groups.append(kept)
        declared = {name for group in groups for name in group}
        extra = [name for name in present if name not in declared]
        if extra:
            groups.append(extra)
        return groups

    # -- running --------------------------------------------------------------------------------

    @torch.no_grad()
    def capture_block_inputs(
        self,
        model: nn.Module,
        batches: Iterable[torch.Tensor],
        device: torch.device,
        keep: Callable[[torch.Tensor], torch.Tensor] = lambda hidden: hidden,
    ) -> BlockInputs:
        """Run the model's own preamble on each batch and record what block 0 is called with."""
        return capture_first_inputs(
            self.blocks(model)[0],
            batches,
            lambda batch: model(batch, **self.family.call),
            device=device,
            name=self.name,
            clean=_without_cache,
            keep=keep,
        )

    def verify(self, model: nn.Module, batch: torch.Tensor) -> None:
        """Nothing to check up front: the family's layer names are checked by ``layer_groups``."""

    def run_block(self, block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        out = block(hidden, *args, **kwargs)
        if isinstance(out, (tuple, list)):  # BLOOM and older HF blocks return (hidden, attentions, ...)
            out = out[0]
        return out

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        found = [resolve(model, path, missing_ok=True) for path in self.family.head]
        return [module for module in found if isinstance(module, nn.Module)]

    @torch.no_grad()
    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        """The model's output computed from the last block's output (None if no head is declared)."""
        if not self.family.head:
            return None
        for path in self.family.head:
            module = resolve(model, path, missing_ok=True)
            if module is not None:
                hidden = module(hidden)
        return hidden

    def preamble(self, model: nn.Module) -> list[nn.Module | torch.Tensor]:
        """What runs before block 0: the declared modules/parameters, or everything outside the blocks."""
        if self.family.embeddings:
            found = [resolve(model, path, missing_ok=True) for path in self.family.embeddings]
            return [item for item in found if isinstance(item, (nn.Module, torch.Tensor))]
        return outside(model, module_ids(resolve(model, self.family.blocks)))


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The adapter of ``model``: by ``config.model_type``, then class name, then the generic fallback."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    class_names = {cls.__name__ for cls in type(model).__mro__}
    for family in reversed(list(FAMILIES.values())):
        if model_type in family.model_types or class_names & set(family.classes):
            return BlockAdapter(family)
    return generic_adapter(model)


def generic_adapter(model: nn.Module) -> BlockAdapter:
    """Fallback for unknown causal LMs: the largest ``*.layers``/``*.h``/``*.blocks`` list, one group."""
    candidates = [
        (len(module), name)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")
    ]
    if not candidates:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise AdapterError(f"unsupported model type {kind!r}: no list of blocks (layers/h/blocks) found")
    _, path = max(candidates)
    block = resolve(model, path)[0]
    names = tuple(quantizable_names(block))
    if not names:
        raise AdapterError(f"the blocks at {path!r} have no Linear layers to quantize")
    return BlockAdapter(Family(name="generic", blocks=path, groups=(names,)))


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop KV caches: calibration runs each window once, and a cache would grow across batches."""
    cleaned = {}
    for key, value in kwargs.items():
        if key in ("past_key_values", "past_key_value", "layer_past") or type(value).__name__.endswith(
            "Cache"
        ):
            value = None
        if key == "use_cache":
            value = False
        cleaned[key] = value
    return cleaned
