"""Reopening a causal LM from a cdq output folder: lazily (the model's skeleton from its config on
the meta device, each tensor read from the folder when its block runs) or whole.

The folder is checked before anything is built: its tables (:class:`~.folder.OutputWeights`), no
code of its own (:func:`cdq_cli.trust.refuse_remote_code`), and that its tensors are exactly the
ones the config's model has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..trust import refuse_remote_code
from .folder import CheckpointError, OutputWeights
from .names import WEIGHTS

LANGUAGE_KIND = "causal-lm"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class Reopened:
    """A causal LM reopened from an output folder: its skeleton (parameters on the meta device,
    computed buffers real), its tokenizer (None when the folder holds none) and the folder's
    tensors, which :class:`~cdq_cli.placement.Placement` reads block by block."""

    model: nn.Module
    tokenizer: Any
    weights: OutputWeights


def open_output(folder: Path | str) -> Reopened:
    """The causal LM in the cdq output folder ``folder``, opened lazily (see the module doc)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    weights = OutputWeights(folder)
    if weights.table.get("kind") != LANGUAGE_KIND:
        raise CheckpointError(
            f"{folder} holds a {weights.table.get('kind')!r} model; only causal LMs load here"
        )
    refuse_remote_code(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with init_empty_weights(include_buffers=False):  # parameters on meta; computed buffers real
            model = AutoModelForCausalLM.from_config(config, dtype=weights.dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot build the model from {folder / 'config.json'}: {exc}") from None
    expected = set(model.state_dict())
    stored = set(weights.names())
    if expected - stored or stored - expected:
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
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


def load_quantized(folder: Path | str, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """Rebuild a causal LM from a cdq output folder, whole, on the CPU: (model, tokenizer or None),
    in ``dtype`` (None: the stored dtype; quantized layers are dequantized straight into it)."""
    opened = open_output(folder)
    stored = opened.model.state_dict()
    state = {
        name: opened.weights.tensor(name, dtype if tensor.is_floating_point() else None)
        for name, tensor in stored.items()
    }
    opened.model.load_state_dict(state, assign=True)
    opened.model.tie_weights()
    return opened.model.eval(), opened.tokenizer
