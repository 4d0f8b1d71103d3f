"""Where a model's tensors are: the one place that loads, moves and releases them.

A model is either *resident* (its weights are real tensors on its home device, the CPU) or *lazy*
(a skeleton on the meta device whose tensors come, on demand, from a :class:`~cdq_cli.records.Weights`
source: a checkpoint's safetensors shards or a cdq output folder). Either way the parts that are about
to run visit the compute device through :meth:`Placement.using`: the preamble while block-0 inputs
are captured, one block while it is solved, the head while logits are computed. A lazy part is read
from its source on entry and dropped back to the meta device on exit, so peak memory is about one
block, whatever the depth. Adapters, the driver and evaluators never move modules themselves.

A lazy model keeps its checkpoint's dtype at rest (the meta skeleton says which, tensor by tensor);
its floating tensors are read in the compute dtype (``dtype``) as they visit, converted slice by
slice while they are read, so no second full-size copy is made, and the skeleton is given back its
stored dtype when they leave.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .memory import describe, naming
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

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        weights: Weights | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.weights = weights
        self.dtype = dtype  # the compute dtype of a lazy model's floating tensors (None: as stored)
        self.home = torch.device("cpu") if weights is not None else home_of(model)
        # id(meta tensor) -> (the state-dict name it is read by, [(module, leaf, is_param)])
        self._slots: dict[int, tuple[str, list[tuple[nn.Module, str, bool]]]] = {}
        self._parked: dict[int, torch.Tensor] = {}  # a filled slot's key -> its meta tensor
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
    def using(
        self, items: Sequence[Placeable], device: torch.device | None = None, *, stored: bool = False
    ) -> Iterator[None]:
        """``items`` on ``device`` (default: the compute device) for the body of the ``with``, in
        the compute dtype (``stored``: in the dtype they are stored in, e.g. to write them out).

        Lazy slots are read from the source (once per slot, however many owners) and dropped back
        to meta afterwards; resident tensors move there and back home.
        """
        device = device or self.device
        if not self.lazy:
            with visiting(items, device, self.home):
                yield
            return
        filled = self._fill(items, device, stored)
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

    def _fill(self, items: Sequence[Placeable], device: torch.device, stored: bool = False) -> list[int]:
        keys = self.meta_tensors(items)
        for key in keys:
            name, owners = self._slots[key]
            module, leaf, is_param = owners[0]
            meta = module._parameters[leaf] if is_param else module._buffers[leaf]
            assert meta is not None
            self._parked[key] = meta  # put back on drop: the slot keeps its key, its stored dtype
            dtype = meta.dtype
            if not stored and self.dtype is not None and dtype.is_floating_point:
                dtype = self.dtype
            with naming(lambda name=name, meta=meta, dtype=dtype: describe(name, meta.shape, dtype)):
                value = self.weights.tensor(name, dtype).to(device)  # type: ignore[union-attr]
            param = nn.Parameter(value, requires_grad=False)  # one object for all owners: ties hold
            for module, leaf, is_param in owners:
                if is_param:
                    module._parameters[leaf] = param
                else:
                    module._buffers[leaf] = value
        return keys

    def _drop(self, key: int) -> None:
        """Give every owner of slot ``key`` its meta tensor back (the very object it had: ties
        share it again, and its id stays the slot's key)."""
        _, owners = self._slots[key]
        meta = self._parked.pop(key)
        for module, leaf, is_param in owners:
            if is_param:
                module._parameters[leaf] = meta  # type: ignore[assignment]
            else:
                module._buffers[leaf] = meta
