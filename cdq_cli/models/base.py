"""What every adapter shares: the protocol the driver needs, block-0 inputs, and two helpers.

An adapter describes a model's LAYOUT (where its blocks are, which layers each block has, what
runs before block 0, how to call a block); it holds no quantization math and moves nothing
between devices: the driver places modules (:mod:`cdq_cli.placement`).

* :func:`outside` is the walker that finds the modules outside a set of blocks (the preamble and
  head of a language model, the stem of a vision model);
* :func:`capture_first_inputs` records what a model's own forward passes its first block
  (positional and keyword arguments: masks, position ids, rotary tables, ALiBi...) and stops the
  forward there, so no family re-implements its model's preamble.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

QUANTIZABLE = (nn.Linear, nn.Conv2d)
FUSED_PROJECTIONS = ("gate_up_proj", "down_proj")


class AdapterError(ValueError):
    """The model does not have the layout its adapter expects (a user-facing, one-line error)."""


@dataclass
class BlockInputs:
    """What block 0 receives for each calibration batch: hidden states plus everything else.

    ``args``/``kwargs`` are per batch; batches whose extras are identical share one object, so a
    causal mask or rotary table is stored once, not once per batch.
    """

    hidden: list[torch.Tensor]
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.hidden)


class Adapter(Protocol):
    """What the driver needs from a model family (language and vision adapters implement it)."""

    name: str

    def blocks(self, model: nn.Module) -> list[nn.Module]: ...

    def block_name(self, index: int) -> str: ...

    def layer_groups(self, block: nn.Module) -> list[list[str]]: ...

    def preamble(self, model: nn.Module) -> list[nn.Module | torch.Tensor]:
        """The modules and loose tensors that run before block 0 (placed by the driver)."""
        ...

    def verify(self, model: nn.Module, batch: torch.Tensor) -> None:
        """Fail (``AdapterError``) before any work when running the blocks one by one would not
        reproduce ``model(batch)``; the model is on its home device."""
        ...

    def capture_block_inputs(
        self,
        model: nn.Module,
        batches: Iterable[torch.Tensor],
        device: torch.device,
        keep: Callable[[torch.Tensor], torch.Tensor] = lambda hidden: hidden,
    ) -> BlockInputs:
        """Block 0's inputs for every batch (batches are sent to ``device``; the preamble is
        already there); ``keep`` stores each hidden state (on the CPU, say)."""
        ...

    def run_block(
        self, block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor: ...

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None: ...

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules :meth:`head` runs (placed by the driver)."""
        ...


class StopForward(Exception):
    """Raised by the block-0 pre-hook: the capture has what it needs, skip the rest of the model."""


def capture_first_inputs(
    first: nn.Module,
    batches: Iterable[torch.Tensor],
    forward: Callable[[torch.Tensor], Any],
    *,
    device: torch.device,
    name: str,
    clean: Callable[[dict[str, Any]], dict[str, Any]] = lambda kwargs: kwargs,
    keep: Callable[[torch.Tensor], torch.Tensor] = lambda hidden: hidden,
) -> BlockInputs:
    """Run ``forward(batch)`` for every batch (sent to ``device``) up to block ``first`` and record
    its inputs; ``clean`` rewrites the keyword arguments (e.g. drops KV caches), ``keep`` stores
    each hidden state (on the CPU, say). Identical extras of consecutive batches are stored once."""
    captured = BlockInputs([], [], [])

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        else:
            raise AdapterError(f"cannot find the hidden states among block 0's inputs ({', '.join(kwargs)})")
        kwargs = clean(dict(kwargs))
        if captured.kwargs and same(kwargs, captured.kwargs[-1]) and same(rest, captured.args[-1]):
            kwargs, rest = captured.kwargs[-1], captured.args[-1]
        captured.hidden.append(keep(hidden.detach()))
        captured.args.append(rest)
        captured.kwargs.append(kwargs)
        raise StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            before = len(captured)
            try:
                forward(batch.to(device))
            except StopForward:
                pass
            if len(captured) == before:
                raise AdapterError(f"the {name} model's forward never reached its first block")
    finally:
        handle.remove()
    return captured


def outside(model: nn.Module, inside: set[int]) -> list[nn.Module | torch.Tensor]:
    """Maximal submodules of ``model`` that hold none of the modules whose ids are in ``inside``,
    plus the loose parameters and buffers of their ancestors."""
    out: list[nn.Module | torch.Tensor] = []

    def visit(module: nn.Module) -> None:
        out.extend(t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
        for child in module.children():
            if id(child) in inside:
                continue
            if any(id(m) in inside for m in child.modules()):
                visit(child)
            else:
                out.append(child)

    visit(model)
    return out


def module_ids(*modules: nn.Module) -> set[int]:
    """ids of ``modules`` and of everything inside them (the ``inside`` set of :func:`outside`)."""
    return {id(m) for module in modules for m in module.modules()}


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5's mixture-of-experts layout: one module holding every expert's weights as
    3-D parameters ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), called with the
    tokens, their top-k expert indices and routing weights (Mixtral, Qwen2/3-MoE, OLMoE...)."""
    return hasattr(module, "act_fn") and all(
        isinstance(getattr(module, name, None), torch.Tensor) and getattr(module, name).dim() == 3
        for name in FUSED_PROJECTIONS
    )


def quantizable_names(block: nn.Module) -> list[str]:
    """What cdq can quantize in ``block``, in registration order: Linear and Conv2d layers by module
    name, fused experts by parameter name (``mlp.experts.gate_up_proj``: one matrix per expert)."""
    names: list[str] = []
    for name, module in block.named_modules():
        if isinstance(module, QUANTIZABLE):
            names.append(name)
        elif is_fused_experts(module):
            names.extend(join_name(name, projection) for projection in FUSED_PROJECTIONS)
    return names


def layer_weight(block: nn.Module, name: str) -> torch.Tensor:
    """The weight of quantizable ``name`` (a Linear/Conv2d's ``weight``, or a fused 3-D parameter)."""
    owner, _, leaf = name.rpartition(".")
    if leaf in FUSED_PROJECTIONS and is_fused_experts(block.get_submodule(owner)):
        return getattr(block.get_submodule(owner), leaf)
    return block.get_submodule(name).weight


def quantizable_layers(adapter: Adapter, model: nn.Module) -> dict[str, nn.Module | torch.Tensor]:
    """Every layer the pipeline will quantize, by its full name in the model (a module, or the 3-D
    parameter of fused experts)."""
    found: dict[str, nn.Module | torch.Tensor] = {}
    for index, block in enumerate(adapter.blocks(model)):
        for group in adapter.layer_groups(block):
            for name in group:
                owner, _, leaf = name.rpartition(".")
                fused = leaf in FUSED_PROJECTIONS and is_fused_experts(block.get_submodule(owner))
                found[join_name(adapter.block_name(index), name)] = (
                    layer_weight(block, name) if fused else block.get_submodule(name)
                )
    return found


def unquantized_weights(block: nn.Module, names: list[str]) -> list[str]:
    """Matrices in ``block`` that none of the quantized ``names`` covers (routers, custom layers):
    the report names them rather than skip them in silence."""
    covered = {id(layer_weight(block, name)) for name in names}
    return [
        name
        for name, param in block.named_parameters()
        if param.dim() >= 2 and id(param) not in covered and not name.endswith(("embed_tokens.weight",))
    ]


def join_name(prefix: str, name: str) -> str:
    """Full module name of ``name`` inside a block called ``prefix`` (an empty prefix is the root)."""
    return f"{prefix}.{name}" if prefix else name


def resolve(root: nn.Module, path: str, *, missing_ok: bool = False) -> Any:
    """The attribute at dotted ``path`` under ``root`` (None when missing and ``missing_ok``)."""
    node: Any = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            if missing_ok:
                return None
            raise AdapterError(f"{type(root).__name__} has no attribute path {path!r}")
    return node


def same(a: Any, b: Any) -> bool:
    """Structural equality for captured block arguments (tensors compared by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, Sequence) and isinstance(b, Sequence) and not isinstance(a, str):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==: never share
        return False
