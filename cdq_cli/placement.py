"""Where a model's tensors are: the one place that loads, moves and releases them.

A model is either *resident* (its weights are real tensors on its home device, the CPU) or *lazy*
(a skeleton on the meta device whose tensors come, on demand, from a :class:`~cdq_cli.records.Weights`
source: a checkpoint's safetensors shards or a cdq output folder). Either way the parts that are about
to run visit the compute device through :meth:`Placement.using`: the preamble while block-0 inputs
are captured, one block while it is solved, the head while logits are computed. A lazy part is read
from its source on entry and dropped back to the meta device on exit, so peak memory is about one
block, whatever the depth. Adapters, the driver and evaluators never move modules themselves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .records import Weights

Placeable = nn.Module | torch.Tensor
META = torch.device("meta")


def home_of(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (the CPU for a model without parameters)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def move(item: Placeable, device: torch.device) -> None:
    """Move a module, or a parameter/buffer in place (so every reference to it follows)."""
    if isinstance(item, nn.Module):
        item.to(device)
    else:
        item.data = item.data.to(device)


@contextmanager
def visiting(items: Sequence[Placeable], device: torch.device, home: torch.device) -> Iterator[None]:
    """Move ``items`` to ``device`` for the body of the ``with``, then back to ``home``."""
    for item in items:
        move(item, device)
    try:
        yield
    finally:
        for item in items:
            move(item, home)


def _move_real(items: Sequence[Placeable], device: torch.device) -> None:
    """Move every tensor of ``items`` that is not on the meta device (a lazy skeleton's computed
    buffers, such as rotary tables), leaving meta tensors alone."""
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.device != META:
                item.data = item.data.to(device)
            continue
        for module in item.modules():
            for table in (module._parameters, module._buffers):
                for tensor in table.values():
                    if tensor is not None and tensor.device not in (META, device):
                        tensor.data = tensor.data.to(device)


class Placement:
    """The tensors of one model: resident (``weights`` None) or lazy (a meta skeleton + a source).

    For a lazy model every parameter and persistent buffer on the meta device is a slot named as in
    the model's state dict; tied tensors (an LM head sharing the embedding matrix) are one slot
    with several owners, filled and dropped together.
    """

    def __init__(self, model: nn.Module, device: torch.device, weights: Weights | None = None) -> None:
        self.model = model
        self.device = device
        self.weights = weights
        self.home = torch.device("cpu") if weights is not None else home_of(model)
        # id(meta tensor) -> (the state-dict name it is read by, [(module, leaf, is_param)])
        self._slots: dict[int, tuple[str, list[tuple[nn.Module, str, bool]]]] = {}
        if weights is None:
            return
        stored = set(weights.names())
        names: dict[int, list[str]] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            for leaf, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None or tensor.device != META:
                    continue
                name = f"{prefix}.{leaf}" if prefix else leaf
                names.setdefault(id(tensor), []).append(name)
                slot = self._slots.setdefault(id(tensor), (name, []))
                owners = slot[1]
                if not any(m is module and leaf_ == leaf for m, leaf_, _ in owners):
                    owners.append((module, leaf, leaf in module._parameters))
        for key, (first, owners) in self._slots.items():  # tied: read by whichever name the source has
            self._slots[key] = (next((n for n in names[key] if n in stored), first), owners)

    @property
    def lazy(self) -> bool:
        return self.weights is not None

    @contextmanager
    def using(self, items: Sequence[Placeable], device: torch.device | None = None) -> Iterator[None]:
        """``items`` on ``device`` (default: the compute device) for the body of the ``with``.

        Lazy slots are read from the source (once per slot, however many owners) and dropped back
        to meta afterwards; resident tensors move there and back home.
        """
        device = device or self.device
        if not self.lazy:
            with visiting(items, device, self.home):
                yield
            return
        filled = self._fill(items, device)
        _move_real(items, device)
        try:
            yield
        finally:
            for key in filled:
                self._drop(key)
            _move_real(items, self.home)

    def meta_tensors(self, items: Sequence[Placeable]) -> list[int]:
        """Keys of the lazy slots owned by ``items`` that are still on the meta device."""
        keys: list[int] = []
        for item in items:
            modules = item.modules() if isinstance(item, nn.Module) else []
            tensors = [item] if isinstance(item, torch.Tensor) else []
            for module in modules:
                tensors.extend(
                    t for t in [*module._parameters.values(), *module._buffers.values()] if t is not None
                )
            keys.extend(id(t) for t in tensors if id(t) in self._slots and t.device == META)
        return list(dict.fromkeys(keys))

    def _fill(self, items: Sequence[Placeable], device: torch.device) -> list[int]:
        keys = self.meta_tensors(items)
        for key in keys:
            name, owners = self._slots[key]
            value = self.weights.tensor(name).to(device)  # type: ignore[union-attr]
            param = nn.Parameter(value, requires_grad=False)  # one object for all owners: ties hold
            for module, leaf, is_param in owners:
                if is_param:
                    module._parameters[leaf] = param
                else:
                    module._buffers[leaf] = value
        return keys

    def _drop(self, key: int) -> None:
        name, owners = self._slots[key]
        for module, leaf, is_param in owners:
            current = module._parameters[leaf] if is_param else module._buffers[leaf]
            if current is None or current.device == META:
                continue
            meta = torch.empty_like(current, device=META)
            if is_param:
                meta = nn.Parameter(meta, requires_grad=False)
                module._parameters[leaf] = meta
            else:
                module._buffers[leaf] = meta
        # the slot now points at the new meta tensor (its id changes): re-key it
        module, leaf, is_param = owners[0]
        new = module._parameters[leaf] if is_param else module._buffers[leaf]
        self._slots.pop(key)
        self._slots[id(new)] = (name, owners)
        for module, leaf, is_param in owners[1:]:  # ties share the one meta tensor again
            if is_param:
                module._parameters[leaf] = new  # type: ignore[assignment]
            else:
                module._buffers[leaf] = new
