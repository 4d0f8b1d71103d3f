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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
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


# What a lean visit keeps stored: plain embeddings and linears only. A subclass may compute with
# its weight in its own forward (Gemma's scaled embedding multiplies in the weight's dtype), where a
# stored weight would change the computed values.
LEAN = (nn.Embedding, nn.Linear)
SLICE_BYTES = 64 << 20  # how much of a stored head a sliced_linear converts at a time


def sliced_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, budget: int = SLICE_BYTES
) -> torch.Tensor:
    """``F.linear(x, weight.to(x.dtype), bias)`` converting ``weight`` a slice of output rows at a
    time (at most ``budget`` bytes converted at once): each output is the same dot product."""
    rows = weight.shape[0]
    out = x.new_empty(*x.shape[:-1], rows)
    step = max(1, budget // max(1, weight.shape[1] * x.element_size()))
    for start in range(0, rows, step):
        part = slice(start, min(start + step, rows))
        out[..., part] = F.linear(
            x, weight[part].to(x.dtype), None if bias is None else bias[part].to(x.dtype)
        )
    return out


def _compute_in(module: nn.Module, dtype: torch.dtype) -> Callable[[], None]:
    """Make ``module`` (an Embedding or Linear whose weight stays stored) compute in ``dtype``; the
    function returned undoes it."""
    if isinstance(module, nn.Embedding):
        handle = module.register_forward_hook(lambda _m, _args, out: out.to(dtype))
        return handle.remove

    def forward(x: torch.Tensor) -> torch.Tensor:
        return sliced_linear(x, module.weight, module.bias)

    module.forward = forward  # an instance attribute: nn.Module.__call__ runs it

    def undo() -> None:
        del module.forward

    return undo


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
        self,
        items: Sequence[Placeable],
        device: torch.device | None = None,
        *,
        stored: bool = False,
        lean: bool = False,
    ) -> Iterator[None]:
        """``items`` on ``device`` (default: the compute device) for the body of the ``with``, in
        the compute dtype (``stored``: in the dtype they are stored in, e.g. to write them out).

        ``lean`` (the embeddings, the head): their vocabulary-sized matrices stay in the stored
        dtype and are computed in the compute dtype where they are used: an embedding's rows are
        looked up, then converted (the same values as a converted table gives), a Linear's
        weight is converted a slice of outputs at a time (:func:`sliced_linear`), so a float32
        computation of a bf16 head holds one slice in float32, not the whole matrix.

        Lazy slots are read from the source (once per slot, however many owners) and dropped back
        to meta afterwards; resident tensors move there and back home.
        """
        device = device or self.device
        if not self.lazy:
            with visiting(items, device, self.home):
                yield
            return
        kept = self._lean_modules(items) if lean and not stored else []
        keep = {id(module.weight) for module in kept}
        filled = self._fill(items, device, stored, keep)
        _move_real(items, device)
        undo = [_compute_in(module, self.dtype) for module in kept]  # type: ignore[arg-type]
        try:
            yield
        finally:
            for restore in undo:
                restore()
            for key in filled:
                self._drop(key)
            _move_real(items, self.home)

    def _lean_modules(self, items: Sequence[Placeable]) -> list[nn.Module]:
        """The Embedding and Linear modules of ``items`` whose weight is a lazy slot stored in
        another dtype than the compute dtype (those a lean visit keeps as stored)."""
        if self.dtype is None:
            return []
        found = []
        for item in items:
            for module in item.modules() if isinstance(item, nn.Module) else []:
                weight = module._parameters.get("weight") if type(module) in LEAN else None
                if weight is not None and id(weight) in self._slots and weight.device == META:
                    if weight.dtype.is_floating_point and weight.dtype != self.dtype:
                        found.append(module)
        return found

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

    def _fill(
        self,
        items: Sequence[Placeable],
        device: torch.device,
        stored: bool = False,
        keep: set[int] = frozenset(),
    ) -> list[int]:
        """Read the meta slots of ``items`` (in the compute dtype; as stored when ``stored``, and
        the slots whose keys are in ``keep``)."""
        keys = self.meta_tensors(items)
        for key in keys:
            name, owners = self._slots[key]
            module, leaf, is_param = owners[0]
            meta = module._parameters[leaf] if is_param else module._buffers[leaf]
            assert meta is not None
            self._parked[key] = meta  # put back on drop: the slot keeps its key, its stored dtype
            dtype = meta.dtype
            if not stored and key not in keep and self.dtype is not None and dtype.is_floating_point:
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
