"""``--transform awq``: activation-aware per-channel scales, searched block by block on the
calibration data and folded into the preceding norm or linear (AWQ, Lin et al. 2023; the search of
AutoAWQ and llm-compressor's ``AWQModifier``).

For a group of layers that read the same input ``x`` (q/k/v after the attention norm; gate/up,
a router and experts after the MLP norm; o_proj after v_proj; down_proj after up_proj), and a
positive vector ``s`` over the input channels, ``prev`` (the norm's weight and bias, or the
preceding linear's output rows and bias) is divided by ``s`` and every reader's input columns are
multiplied by it. The block computes the same function (to rounding): ``(x / s) (W diag(s))ᵀ = x
Wᵀ``, and between two linears the map in between is elementwise linear in the scaled output
(``down(act(gate) · up)``) or positively homogeneous (``fc2(relu(fc1))``). What changes is what
the quantizer sees: channels with large activations get larger weights and so finer steps.

The search (AutoAWQ's ``_search_best_scale``, ``duo_scaling``): with ``x̄`` the mean of ``|x|`` per
channel over the calibration tokens and ``w̄`` the mean over the group's rows of ``|W|`` normalised
by each row's (group's) largest, for ``α`` in ``0, 1/n, ..., (n−1)/n``::

    s = clamp(x̄^α / (w̄^(1−α) + 1e-4), 1e-4);   s = s / sqrt(max(s) · min(s))

each reader is replaced by ``round(W diag(s)) diag(s)⁻¹`` (round: round-to-nearest on the run's
grid for that layer, min–max), the inspected module (the attention, the MLP, or the consumer
linear) is run on its captured inputs, and the ``s`` whose output is closest (squared error) to
the full-precision output is kept. ``s = 1`` (no scaling) is also a candidate, so a group is only
scaled when scaling lowers the searched error. The search runs on the first calibration batches,
up to :data:`SEARCH_TOKENS` tokens. Between two linears the scale is searched only when the
producer's outputs and the consumer's inputs are the same channels (AutoAWQ's rule: no v→o under
grouped-query attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.base import is_fused_experts, quantizable_names
from ..models.families import Stream
from ..solvers.grid import GridSpec, fit_minmax

SEARCH_TOKENS = 4096  # calibration tokens the search runs on (the first batches)
N_GRID = 20


@dataclass
class Group:
    """One scaling: ``prev`` (a norm module, or a linear whose output rows are scaled down),
    ``readers`` (names of the tensors whose input columns are scaled up: Linear modules or fused
    3-D parameters), ``inspect`` (the module whose output the search compares)."""

    prev: str
    prev_is_norm: bool
    readers: list[str]
    inspect: str


def groups_of(block: nn.Module, stream: Stream) -> list[Group]:
    """The scalings a block of this layout takes, in execution order."""
    found = []
    for readers in stream.readers:
        present = [name for name in readers.layers if _has(block, name)]
        if present:
            found.append(Group(readers.norm, True, present, readers.inspect))
        if readers is stream.readers[0]:
            value, output = stream.values
            if _has(block, value) and _has(block, output):
                if _rows(block, value) == _columns(block, output):
                    found.append(Group(value, False, [output], output))
    for producer, consumer in stream.inner:
        if _has(block, producer) and _has(block, consumer):
            found.append(Group(producer, False, [consumer], consumer))
    return found


@torch.no_grad()
def search_block(
    block: nn.Module,
    stream: Stream,
    forward: Callable[[], None],
    grid_of: Callable[[str], GridSpec | None],
    n_grid: int = N_GRID,
) -> list[dict[str, Any]]:
    """Search and fold the scales of one block (in place); return what was chosen, per group.

    ``forward`` runs the full-precision block on the search batches (the block's own forward, so
    the inspected modules are called exactly as the block calls them; their inputs and outputs
    are captured here). ``grid_of(name)`` is the grid of the block's layer ``name`` (None: kept in
    full precision, so not rounded in the search)."""
    groups = groups_of(block, stream)
    quantizable = set(quantizable_names(block))
    captured: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {g.inspect: [] for g in groups}
    handles = []
    for name in captured:

        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any, name: str = name) -> None:
            out = output[0] if isinstance(output, tuple) else output
            captured[name].append((args, kwargs, out.detach()))

        handles.append(block.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    chosen = []
    for group in groups:
        calls = captured[group.inspect]
        x_mean = _input_mean(calls)
        rounded = [name for name in group.readers if name in quantizable and grid_of(name) is not None]
        if not rounded:  # nothing of this group is quantized: scaling it cannot help
            continue
        tensors = {name: _tensor(block, name) for name in group.readers}
        originals = {name: tensors[name].data.clone() for name in rounded}
        w_mean = _weight_mean([originals[name] for name in rounded], [grid_of(n) for n in rounded])

        specs = {name: grid_of(name) for name in rounded}
        search = (block, group, calls, tensors, originals, specs)
        best_value, best_ratio, best_scales = _search_error(*search, None), None, None
        identity = best_value
        for step in range(n_grid):
            ratio = step / n_grid
            scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            value = _search_error(*search, scales.to(originals[rounded[0]].dtype))
            if value < best_value:
                best_value, best_ratio, best_scales = value, ratio, scales
        for name in rounded:
            tensors[name].data = originals[name]
        if best_scales is not None:
            fold(block, group, best_scales)
        chosen.append(
            {
                "prev": group.prev,
                "layers": group.readers,
                "alpha": best_ratio,
                "error": best_value,
                "error_unscaled": identity,
            }
        )
    return chosen


def _search_error(
    block: nn.Module,
    group: Group,
    calls: list[tuple[tuple, dict, torch.Tensor]],
    tensors: dict[str, torch.Tensor],
    originals: dict[str, torch.Tensor],
    specs: dict[str, GridSpec | None],
    scales: torch.Tensor | None,
) -> float:
    """Squared error of the inspected module's output with the rounded readers (``originals``
    scaled by ``scales``, rounded on ``specs``, unscaled) against the full-precision outputs."""
    for name, original in originals.items():
        tensors[name].data = _rounded(original, scales, specs[name])
    module = block.get_submodule(group.inspect)
    total = torch.zeros((), dtype=torch.float64)
    for args, kwargs, reference in calls:
        out = module(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        total += (out.to(torch.float64) - reference.to(torch.float64)).pow(2).sum().cpu()
    return float(total)


def fold(block: nn.Module, group: Group, scales: torch.Tensor) -> None:
    """Divide ``prev`` by ``scales`` (a norm's weight and bias, or a linear's output rows and bias)
    and multiply every reader's input columns by them."""
    prev = block.get_submodule(group.prev)
    for leaf in ("weight", "bias"):
        param = getattr(prev, leaf, None)
        if param is None:
            continue
        s = scales.to(param.device, param.dtype)
        if group.prev_is_norm or leaf == "bias":
            param.data = param.data / s
        else:
            param.data = param.data / s.unsqueeze(1)
    for name in group.readers:
        tensor = _tensor(block, name)
        tensor.data = tensor.data * scales.to(tensor.device, tensor.dtype)


def _input_mean(calls: list[tuple[tuple, dict, torch.Tensor]]) -> torch.Tensor:
    """Mean of ``|x|`` per channel of the inspected module's input, over every captured token."""
    total, count = None, 0
    for args, kwargs, _ in calls:
        x = args[0] if args else kwargs["hidden_states"]
        flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
        part = flat.abs().sum(dim=0)
        total = part if total is None else total + part
        count += flat.shape[0]
    assert total is not None
    return (total / max(count, 1)).to(torch.float32)


def _weight_mean(weights: list[torch.Tensor], specs: list[GridSpec | None]) -> torch.Tensor:
    """Mean over every row of ``|W|`` divided by its group's (row's) largest ``|W|``."""
    rows = []
    for weight, spec in zip(weights, specs, strict=True):
        matrix = weight.reshape(-1, weight.shape[-1]).to(torch.float32).abs()
        group = spec.group_size if spec is not None and spec.group_size else matrix.shape[1]
        grouped = matrix.reshape(matrix.shape[0], -1, group)
        normalised = grouped / grouped.amax(dim=2, keepdim=True).clamp_min(1e-12)
        rows.append(normalised.reshape(matrix.shape))
    return torch.cat(rows).mean(dim=0)


def _rounded(weight: torch.Tensor, scales: torch.Tensor | None, spec: GridSpec | None) -> torch.Tensor:
    """``round(W diag(s)) diag(s)⁻¹`` (each expert of a 3-D stack on its own grid)."""
    assert spec is not None
    scaled = weight if scales is None else weight * scales
    if scaled.dim() == 3:
        out = torch.stack([fit_minmax(m, spec).round(m) for m in scaled])
    else:
        out = fit_minmax(scaled, spec).round(scaled)
    return out if scales is None else out / scales


def _has(block: nn.Module, name: str) -> bool:
    try:
        _tensor(block, name)
    except AttributeError:
        return False
    return True


def _tensor(block: nn.Module, name: str) -> torch.Tensor:
    """A Linear's weight by module name, or a fused 3-D parameter by its own name."""
    owner, _, leaf = name.rpartition(".")
    parent = block.get_submodule(owner) if owner else block
    if is_fused_experts(parent) and isinstance(getattr(parent, leaf, None), torch.Tensor):
        return getattr(parent, leaf)
    module = block.get_submodule(name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise AttributeError(name)
    return weight


def _rows(block: nn.Module, name: str) -> int:
    return int(_tensor(block, name).shape[-2])


def _columns(block: nn.Module, name: str) -> int:
    return int(_tensor(block, name).shape[-1])
