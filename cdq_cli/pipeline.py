"""The block-by-block driver: capture block-0 inputs once, then quantize one block at a time.

For each block: hooks on its layers fold their inputs into Σ (streamed, no activation store;
:mod:`cdq_cli.capture`), each layer is solved on its Σ, the dequantized Ŵ replaces the weight, and
the block is run again to produce the next block's inputs. The model stays where it is (its home,
the CPU); one block at a time visits the device (:mod:`cdq_cli.placement`), so peak device memory
is one block, its Σ's and the calibration activations.

Only :mod:`cdq_cli.solvers` (math), an :class:`~cdq_cli.models.Adapter` (layout) and the records
of :mod:`cdq_cli.records` are used, so any family with an adapter runs through this same code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .capture import conv_groups, layer_sigma
from .models.base import Adapter, BlockInputs, join_name, quantizable_layers
from .placement import home_of, visiting
from .records import Event, Journal, LayerRow, Progress, ResumeState, Settings, silent
from .solvers import SigmaAccumulator, run_solver
from .solvers.grouped import energy, group_spec, solve_grouped
from .store.layer import QuantizedLayer


@dataclass
class Outcome:
    """What a run produced: report rows, the storage form of each layer, the last block's outputs."""

    rows: list[LayerRow]
    layers: dict[str, QuantizedLayer]
    outputs: list[torch.Tensor]
    device: torch.device
    tokens: int


def validate(model: nn.Module, adapter: Adapter, settings: Settings) -> dict[str, nn.Module]:
    """Check the grid against every layer before any work (one-line ``ValueError``s naming the
    layer); return the layers that will be quantized, by full name."""
    layers = quantizable_layers(adapter, model)
    if settings.grid is None:
        return layers
    for name, layer in layers.items():
        try:  # grouped/depthwise convs: one problem per group (solvers.grouped)
            group_spec(settings.grid, layer.weight[0].numel(), conv_groups(layer))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return layers


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    batches: Iterable[torch.Tensor],
    settings: Settings,
    progress: Progress = silent,
    journal: Journal | None = None,
) -> Outcome:
    """Quantize ``model`` in place, block by block, on calibration ``batches`` (model inputs).

    With a ``journal``, every finished block is handed to it, and the blocks of a saved state are
    not solved again: their stored layers are put back and the block is re-run for its outputs.
    """
    model.eval()
    validate(model, adapter, settings)
    device = settings.device
    home = home_of(model)
    blocks = adapter.blocks(model)
    run = _Run(adapter, settings, progress, len(blocks))
    if settings.quantizing:
        run.layers = sum(len(group) for block in blocks for group in adapter.layer_groups(block))
    run.emit("start", 0)

    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches")
    adapter.verify(model, batches[0])
    with visiting(adapter.preamble(model), device, home):
        inputs = adapter.capture_block_inputs(model, batches, device)
    tokens = sum(int(h.shape[:-1].numel()) for h in inputs.hidden)
    saved = journal.resume_state() if journal is not None and settings.quantizing else None
    for index, block in enumerate(blocks):
        run.emit("block", index)
        restored = saved is not None and index < saved.blocks_done
        done = len(run.stored)
        with visiting([block], device, home):
            if restored:
                outputs = run.restore(block, index, inputs, saved)
            elif settings.quantizing:
                outputs = run.block(block, index, inputs)
            else:
                outputs = _run(adapter, block, inputs)
        if not all(bool(torch.isfinite(t).all()) for t in outputs):
            raise ValueError(
                f"{adapter.block_name(index)} produced NaN/Inf activations (try --dtype float32)"
            )
        if journal is not None and settings.quantizing and not restored:
            journal.on_block_done(index, run.rows, dict(list(run.stored.items())[done:]))
        inputs = BlockInputs(outputs, inputs.args, inputs.kwargs)
    run.emit("done", len(blocks))
    return Outcome(run.rows, run.stored, inputs.hidden, device, tokens)


@dataclass
class _Run:
    """State of one quantization run: settings, report rows so far, stored layers, progress."""

    adapter: Adapter
    settings: Settings
    progress: Progress
    blocks: int
    layers: int = 0
    rows: list[LayerRow] = field(default_factory=list)
    stored: dict[str, QuantizedLayer] = field(default_factory=dict)

    def emit(self, kind: str, block: int, row: LayerRow | None = None) -> None:
        self.progress(Event(kind, block, self.blocks, len(self.rows), self.layers, row))

    def restore(
        self, block: nn.Module, index: int, inputs: BlockInputs, saved: ResumeState
    ) -> list[torch.Tensor]:
        """Put a saved block's layers back (no solving); return the next block's inputs exactly as
        :meth:`block` produced them (from the full-precision block with ``fp_inputs``)."""
        prefix = f"{self.adapter.block_name(index)}."
        outputs = _run(self.adapter, block, inputs) if self.settings.fp_inputs else None
        for row in saved.rows:
            if row.name.startswith(prefix):
                record = saved.layers[row.name]
                layer = block.get_submodule(row.name[len(prefix) :])
                layer.weight.data.copy_(record.dequantize(layer.weight.device).to(layer.weight.dtype))
                self.rows.append(row)
                self.stored[row.name] = record
                self.emit("layer", index, row)
        return outputs if outputs is not None else _run(self.adapter, block, inputs)

    def block(self, block: nn.Module, index: int, inputs: BlockInputs) -> list[torch.Tensor]:
        """Solve every layer of one block; return the next block's inputs."""
        groups = self.adapter.layer_groups(block)
        everything = [name for group in groups for name in group]
        if self.settings.fp_inputs:
            # COMQ's setting: every Σ and the next block's inputs come from the full-precision block.
            sigmas, outputs = _collect(self.adapter, block, inputs, everything, self.settings, keep=True)
            self.solve(block, index, everything, sigmas)
            return outputs
        if self.settings.true_sequential:
            # Each group's Σ is collected after the earlier groups of this block were quantized.
            for group in groups:
                sigmas, _ = _collect(self.adapter, block, inputs, group, self.settings)
                self.solve(block, index, group, sigmas)
        else:
            sigmas, _ = _collect(self.adapter, block, inputs, everything, self.settings)
            self.solve(block, index, everything, sigmas)
        return _run(self.adapter, block, inputs)

    def solve(
        self, block: nn.Module, index: int, names: list[str], sigmas: dict[str, SigmaAccumulator]
    ) -> None:
        for name in names:
            full = join_name(self.adapter.block_name(index), name)
            row, record = solve_layer(full, block.get_submodule(name), sigmas.pop(name), self.settings)
            self.rows.append(row)
            self.stored[full] = record
            self.emit("layer", index, row)


def solve_layer(
    name: str, layer: nn.Module, acc: SigmaAccumulator, settings: Settings
) -> tuple[LayerRow, QuantizedLayer]:
    """Solve one layer on its Σ, write Ŵ into it, and describe the result."""
    if acc.tokens == 0:
        raise ValueError(f"{name}: the layer saw no calibration inputs")
    spec = settings.grid
    assert spec is not None, "solve_layer needs a grid (bits 16 quantizes nothing)"
    sigma = acc.sigma
    if not torch.isfinite(sigma).all():
        raise ValueError(f"{name}: Σ of the calibration inputs has NaN/Inf entries (activations overflowed?)")
    shape = tuple(layer.weight.shape)
    weight = layer.weight.detach().reshape(shape[0], -1).to(sigma.dtype)
    try:
        if sigma.dim() == 3:  # (G, c, c): one Σ per conv group
            result = solve_grouped(settings.method, weight, sigma, spec, settings.options)
            rtn = solve_grouped("rtn", weight, sigma, spec, {}) if settings.compare_rtn else None
        else:
            result = run_solver(settings.method, weight, sigma, spec, settings.options)
            rtn = run_solver("rtn", weight, sigma, spec, {}) if settings.compare_rtn else None
    except (ValueError, FloatingPointError) as exc:
        raise ValueError(f"{name}: {exc}") from None
    if not torch.isfinite(result.weight).all() or not math.isfinite(result.objective):
        raise ValueError(f"{name}: {settings.method} produced non-finite weights")
    record = QuantizedLayer.from_result(name, result, shape)
    chosen = record.dequantize(result.weight.device)
    if not torch.equal(chosen.reshape(result.weight.shape), result.weight):
        raise RuntimeError(f"{name}: stored codes do not reproduce the solver's weights (a cdq bug)")
    layer.weight.data.copy_(chosen.to(layer.weight.dtype))
    reference = energy(weight, sigma)
    row = LayerRow(
        name=name,
        shape=list(shape),
        bits=spec.bits,
        group_size=spec.group_size,
        sym=spec.sym,
        method=settings.method,
        error=result.objective,
        relative_error=result.objective / reference if reference > 0 else 0.0,
        rtn_error=rtn.objective if rtn is not None else None,
        objective_start=result.objective_start,
        sweeps=result.sweeps,
        seconds=result.seconds,
        outliers=result.outlier_count,
        tokens=acc.tokens,
    )
    return row, record


def _collect(
    adapter: Adapter,
    block: nn.Module,
    inputs: BlockInputs,
    names: list[str],
    settings: Settings,
    *,
    keep: bool = False,
) -> tuple[dict[str, SigmaAccumulator], list[torch.Tensor]]:
    """Run the block on every batch with Σ hooks on ``names``; optionally keep its outputs."""
    sigmas: dict[str, SigmaAccumulator] = {}
    handles = []
    for name in names:
        layer = block.get_submodule(name)
        acc, hook = layer_sigma(layer, settings.sigma_dtype)  # conv patches as F.conv2d sees them
        sigmas[name] = acc
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        outputs = _run(adapter, block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sigmas, outputs if keep else []


def _run(adapter: Adapter, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    return [
        adapter.run_block(block, hidden, args, kwargs)
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True)
    ]
