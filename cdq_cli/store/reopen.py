"""Reopening a causal LM from a quantized folder: cdq's own output folder, or a GPTQ or
compressed-tensors checkpoint (cdq's exports or another tool's), lazily (the model's skeleton from
its config on the meta device, each tensor read and dequantized from the folder when its block
runs) or whole.

The folder is checked before anything is built: its tables (:class:`~.folder.OutputWeights`, or
the export's quantization_config for :class:`~.exported.ExportedWeights`), no code of its own
(:func:`cdq_cli.trust.refuse_remote_code`), and that its tensors are exactly the ones the config's
model has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..trust import refuse_remote_code
from .exported import ExportedWeights, quantization_block, undecodable
from .folder import DTYPES, CheckpointError, OutputWeights, tied_names
from .names import WEIGHTS

LANGUAGE_KIND = "causal-lm"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class Reopened:
    """A causal LM reopened from a folder: its skeleton (parameters on the meta device, computed
    buffers real), its tokenizer (None when the folder holds none) and the folder's tensors,
    which :class:`~cdq_cli.placement.Placement` reads block by block."""

    model: nn.Module
    tokenizer: Any
    weights: Any  # OutputWeights or ExportedWeights

    def close(self) -> None:
        close = getattr(self.weights, "close", None)
        if close is not None:
            close()


def open_output(folder: Path | str) -> Reopened:
    """The causal LM in the cdq output folder ``folder``, opened lazily (see the module doc)."""
    folder = Path(folder)
    weights = OutputWeights(folder)
    if weights.table.get("kind") != LANGUAGE_KIND:
        raise CheckpointError(
            f"{folder} holds a {weights.table.get('kind')!r} model; only causal LMs load here"
        )
    refuse_remote_code(folder)
    return _lazy(folder, _skeleton(folder, weights.dtype), weights, ties={})


def is_quantized_checkpoint(target: str | Path) -> bool:
    """A model folder whose config.json carries a quantization_config (a GPTQ or compressed-tensors
    export, or another quantized checkpoint): opened by :func:`open_exported`, never lazily through
    transformers' disk offload, which leaves quantized weights on the meta device."""
    return quantization_block(Path(target)) is not None


def open_exported(folder: Path | str) -> Reopened | None:
    """A quantized checkpoint folder (config.json has a quantization_config). A GPTQ or
    compressed-tensors one opens like a cdq output folder: the plain model's skeleton from
    config.json (its quantization_config set aside) on the meta device, each block's layers
    decoded by cdq when its turn comes (:mod:`.exported`), so scoring it needs memory for about one
    block. None for any other (activation quantization, sparsity, other methods): cdq cannot
    decode it, and the caller loads it whole through transformers, which runs it as its quantizer
    defines."""
    folder = Path(folder)
    block = quantization_block(folder)
    if block is None:
        raise CheckpointError(f"{folder / 'config.json'} has no quantization_config")
    refuse_remote_code(folder)
    if undecodable(block) is not None:
        return None
    model = _skeleton(folder, None)
    model.tie_weights()  # a tied head is not stored (transformers re-ties it from the config)
    classes = {name: [c.__name__ for c in type(m).__mro__] for name, m in model.named_modules()}
    dtype = next(model.parameters()).dtype
    weights = ExportedWeights(folder, block, dtype, classes, model_type=model.config.model_type)
    return _lazy(folder, model, weights, ties=tied_names(model))


def load_whole(opened: Any, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """A lazily opened model (a :class:`Reopened`, or anything with ``model``, ``tokenizer``,
    ``weights`` and ``close``) with every tensor read from its source (ties re-made), on the CPU,
    floating-point tensors in ``dtype`` (None: as stored; quantized layers are decoded straight
    into it): (model, tokenizer or None); one already held whole (``weights`` None) as it is."""
    if opened.weights is None:
        return opened.model.eval(), opened.tokenizer
    stored = set(opened.weights.names())
    state = {
        name: opened.weights.tensor(name, dtype if tensor.is_floating_point() else None)
        for name, tensor in opened.model.state_dict().items()
        if name in stored
    }
    ties = {name: target for name, target in tied_names(opened.model).items() if name not in stored}
    opened.model.load_state_dict(state, assign=True, strict=False)
    opened.model.tie_weights()
    for name, target in ties.items():  # what the source leaves to the tie: check that it holds
        if opened.model.get_parameter(name) is not opened.model.get_parameter(target):
            raise CheckpointError(f"{name} is not stored and transformers did not tie it to {target}")
    opened.close()
    return opened.model.eval(), opened.tokenizer


def load_quantized(folder: Path | str, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """Rebuild a causal LM from a cdq output folder, whole, on the CPU: (model, tokenizer or None),
    in ``dtype`` (None: the stored dtype; quantized layers are dequantized straight into it)."""
    return load_whole(open_output(folder), dtype)


def _skeleton(folder: Path, dtype: torch.dtype | None) -> nn.Module:
    """The model of ``folder``'s config.json on the meta device (computed buffers real), without
    any quantization the config describes (the weights source decodes it); ``dtype`` None: the
    config's own."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        if dtype is None:  # the config's dtype, from the allow-list (never getattr(torch, <file text>))
            stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
            name = str(stored).removeprefix("torch.")
            if name not in DTYPES:
                raise ValueError(f"dtype {stored!r} is not one of {', '.join(DTYPES)}")
            dtype = DTYPES[name]
        with init_empty_weights(include_buffers=False):  # parameters on meta; computed buffers real
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"cannot build the model from {folder / 'config.json'}: {exc}") from None


def _lazy(folder: Path, model: nn.Module, weights: Any, *, ties: dict[str, str]) -> Reopened:
    """``model`` (a meta skeleton) with ``weights`` as its source, after checking that the source
    holds exactly the model's tensors (a name ``ties`` maps to a stored one may be missing:
    transformers ties it), its persistent buffers read, and the folder's tokenizer."""
    from transformers import AutoTokenizer

    expected = set(model.state_dict())
    stored = set(weights.names())
    missing = sorted(name for name in expected - stored if ties.get(name) not in stored)
    unexpected = sorted(stored - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS} does not match config.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, buffer in list(model.named_buffers()):  # persistent buffers come from the folder
        if buffer.device.type != "meta" and name in stored:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, weights.tensor(name))
    tokenizer = None
    if any((folder / name).exists() for name in _TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the tokenizer saved in {folder}: {exc}") from None
    return Reopened(model.eval(), tokenizer, weights)
