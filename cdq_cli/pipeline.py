"""The block-by-block driver: capture block-0 inputs once, then quantize one block at a time.

For each block: hooks on its layers fold their inputs into Σ (streamed, no activation store;
:mod:`cdq_cli.capture`; layers fed the same tensor, such as q/k/v, share one Σ), each layer is
solved on its Σ, the dequantized Ŵ replaces the weight, the finished block is handed to a sink
(the output folder being written) and run again to produce the next block's inputs. The model stays
at home (in memory, or on the meta device when loaded lazily); one block at a time is placed on the
device (:mod:`cdq_cli.placement`), so peak memory is one block, its Σ's and the activations, which
live on the device or, when they do not fit, on the CPU (:class:`Activations`).

A method whose Ŵ does not depend on Σ (``Method.needs_sigma`` False: RTN) collects none when one
process runs it on Linear/Conv2d layers: every layer of the block is rounded first, and the block's
one forward pass that produces the next block's inputs also measures each layer's report, its
objective ‖(W − Ŵ)X‖² and energy ‖WX‖², from the inputs X as they pass (:meth:`_Run.unweighted`):
one block forward per batch instead of one per layer group plus one, and no Σ or trace (columns²
per token and 2·rows·columns² per layer). The values are the Σ path's to float rounding and the
stored layers its bytes. Several ranks keep the Σ path (it is what they relay).

Only :mod:`cdq_cli.solvers` (math), an :class:`~cdq_cli.models.Adapter` (layout) and the records
of :mod:`cdq_cli.records` are used, so any family with an adapter runs through this same code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

from .capture import ExpertsCapture, OutputErrors, Scratch, conv_groups, layer_pair_sigma, layer_sigma
from .memory import OutOfMemory, naming, release
from .models.base import (
    FUSED_PROJECTIONS,
    Adapter,
    BlockInputs,
    is_fused_experts,
    join_name,
    layer_weight,
    quantizable_layers,
    unquantized_weights,
)
from .parallel import Costs, Deferred, Ranks, assign, test_hook, timed
from .placement import Placement
from .records import Event, LayerRow, Progress, Settings, silent
from .solvers import (
    QuantResult,
    SigmaAccumulator,
    find_method,
    run_solver_phases,
    run_unweighted,
)
from .solvers.bands import finish, lockstep, row_bands, shared
from .solvers.grid import GridSpec, all_finite
from .solvers.grouped import energy, group_spec, solve_grouped, solve_grouped_unweighted, stack_results
from .solvers.result import working_energy
from .solvers.target import fp_correction, fp_objective
from .store.journal import Journal, ResumeState
from .store.layer import QuantizedLayer, matrix_shape


class Offload(str, Enum):
    """``--offload-activations``: where calibration activations live between blocks."""

    auto = "auto"  # on the device while they take at most _DEVICE_SHARE of its free memory
    always = "always"  # on the CPU (pinned), streamed through the device batch by batch
    never = "never"  # on the device


_DEVICE_SHARE = 0.5


class BlockWriter(Protocol):
    """Where finished blocks go as the run proceeds (the output folder being written,
    :class:`cdq_cli.store.folder.OutputBuilder`): state-dict entries, a quantized layer's stored
    record in place of the weight it replaces."""

    def add_state(
        self, tensors: Iterable[tuple[str, torch.Tensor]], layers: dict[str, QuantizedLayer]
    ) -> None: ...


class Activations:
    """The current block's inputs for every calibration batch (replaced in place by its outputs, so
    there is never more than one full copy), plus block 0's extras (masks, rotary tables).

    Hidden states live on the compute device, or on the CPU (pinned, when a GPU is used) and
    stream through the device one batch at a time: ``policy`` "never" keeps them on the device,
    "always" on the CPU, "auto" on the device while they take at most half its free memory.
    """

    def __init__(self, device: torch.device, policy: str = "auto", batches: int = 1) -> None:
        choices = [member.value for member in Offload]
        if policy not in choices:
            raise ValueError(f"--offload-activations must be one of {', '.join(choices)}, got {policy!r}")
        self.device = device
        self.policy = policy
        self.batches = batches
        self.where: torch.device | None = None
        self.inputs = BlockInputs([], [], [])

    def keep(self, hidden: torch.Tensor) -> torch.Tensor:
        """Where a captured or produced hidden state is stored (decided at the first one)."""
        if self.where is None:
            self.where = self._decide(hidden)
        if hidden.device == self.where:
            return hidden
        moved = hidden.to(self.where)
        return moved.pin_memory() if self.where.type == "cpu" and self.device.type == "cuda" else moved

    def batch(self, i: int) -> tuple[torch.Tensor, tuple, dict]:
        hidden = self.inputs.hidden[i].to(self.device, non_blocking=True)
        return hidden, self.inputs.args[i], self.inputs.kwargs[i]

    def __len__(self) -> int:
        return len(self.inputs)

    def twin(self) -> Activations:
        """A second stream starting from the same inputs (the full-precision model's, for
        ``-o target=fp``): its own hidden states from here on, the same extras."""
        other = Activations(self.device, self.policy, self.batches)
        other.where = self.where
        other.inputs = BlockInputs(list(self.inputs.hidden), self.inputs.args, self.inputs.kwargs)
        return other

    def _decide(self, first: torch.Tensor) -> torch.device:
        if self.device.type != "cuda" or self.policy == Offload.never:
            return self.device
        if self.policy == Offload.always:
            return torch.device("cpu")
        total = first.numel() * first.element_size() * self.batches
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if total <= _DEVICE_SHARE * free else torch.device("cpu")


@dataclass
class Outcome:
    """What a run produced: report rows, the storage form of each layer, the last block's outputs."""

    rows: list[LayerRow]
    layers: dict[str, QuantizedLayer]  # the stored layers no sink wrote during the run
    outputs: list[torch.Tensor]
    device: torch.device
    tokens: int
    unquantized: list[str] = field(default_factory=list)  # matrices in blocks no layer type covers
    transform_log: list[dict[str, Any]] = field(default_factory=list)  # --transform awq: per block


def validate(
    model: nn.Module, adapter: Adapter, settings: Settings
) -> tuple[dict[str, nn.Module | torch.Tensor], Settings]:
    """Check the grid against every layer before any work (one-line ``ValueError``s naming the
    layer; a ``--skip``/``--layer`` pattern that matches no layer); return the layers that will be
    quantized (those ``--skip`` keeps in full precision left out), by full name, and the settings
    for this model: whether fused experts are among those layers decides cdq's default target
    (:attr:`Settings.target`), and refuses ``-o target=fp`` given for them."""
    layers = quantizable_layers(adapter, model)
    if settings.grid is None:
        return layers, settings
    settings.check_overrides(layers)
    kept = {name: layer for name, layer in layers.items() if settings.grid_for(name) is not None}
    if layers and not kept:
        skips = " ".join(repr(rule.pattern) for rule in settings.overrides if rule.spec is None)
        raise ValueError(
            f"--skip {skips} keeps every layer of the model in full precision: nothing would be quantized "
            "(--bits 16 runs the model block by block without quantizing)"
        )
    layers = kept
    fused = [name for name, layer in layers.items() if isinstance(layer, torch.Tensor)]
    settings = settings.for_model(bool(fused))
    if settings.target == "fp" and fused:
        raise ValueError(
            f"-o target=fp does not support fused experts ({fused[0]}): the full-precision and the "
            "quantized model route tokens to different experts, so their inputs do not pair up "
            "(-o target=quantized solves them)"
        )
    for name, layer in layers.items():
        spec = settings.grid_for(name)
        try:  # grouped/depthwise convs: one problem per group (solvers.grouped)
            if isinstance(layer, torch.Tensor):  # fused experts: (E, out, in), one matrix per expert
                group_spec(spec, layer.shape[-1], 1)
            else:
                group_spec(spec, layer.weight[0].numel(), conv_groups(layer))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return layers, settings


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    batches: Iterable[torch.Tensor],
    settings: Settings,
    progress: Progress = silent,
    journal: Journal | None = None,
    placement: Placement | None = None,
    writer: BlockWriter | None = None,
    ranks: Ranks | None = None,
) -> Outcome:
    """Quantize ``model`` block by block on calibration ``batches`` (model inputs), with
    ``settings`` made and checked by the run (:func:`cdq_cli.run.plan.settle` and :func:`validate`:
    the driver trusts them).

    ``placement`` says where the model's tensors are (default: resident in memory, quantized in
    place); a lazily loaded model's blocks are read one at a time and dropped after ``writer``
    (the output folder being written) has taken each finished block that the model stores under
    the block's own name (a vision stem or head unit is a view: its tensors are written with the
    rest of the model). With a ``journal``, every
    finished block is handed to it, and the blocks of a saved state are not solved again: their
    stored layers are put back and the block is re-run for its outputs. With ``ranks`` of several
    processes, each runs its own range of the batches and solves its share of the layers
    (:mod:`cdq_cli.parallel`); the result is every rank's, and the single-process one.
    """
    model.eval()
    placement = placement or Placement(model, settings.device)
    ranks = ranks or Ranks()
    blocks = adapter.blocks(model)
    run = _Run(adapter, settings, progress, len(blocks), ranks)
    if settings.quantizing:
        run.layers = sum(
            _rows_of(block, name)
            for index, block in enumerate(blocks)
            for group in _groups(adapter, block, index, settings)
            for name in group
        )
    run.emit("start", 0)

    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches")
    if len(batches) < ranks.world:
        raise ValueError(
            f"{ranks.world} processes need at least {ranks.world} calibration batches, got {len(batches)}"
        )
    local = [batches[b] for b in ranks.batches(len(batches))]
    acts = capture(model, adapter, placement, local, settings.offload_activations, verify=ranks.leader)
    if settings.quantizing and settings.target == "fp":
        run.fp_acts = acts.twin()  # the full-precision model's stream: the same block-0 inputs
    tokens = int(ranks.sum_value(sum(int(h.shape[:-1].numel()) for h in acts.inputs.hidden)))
    saved = journal.resume_state() if journal is not None and settings.quantizing else None
    if ranks.active and settings.quantizing:  # the leader's journal: its finished blocks' rows, to all
        stub = ranks.broadcast(None if saved is None else ResumeState(saved.blocks_done, saved.rows, {}))
        saved = saved if ranks.leader else stub
    for index, block in enumerate(blocks):
        run.emit("block", index)
        restored = saved is not None and index < saved.blocks_done
        done = set(run.stored)
        with in_block(adapter.block_name(index)), placement.using([block]):
            if restored:
                run.restore(block, index, acts, saved)
            elif settings.quantizing:
                run.block(block, index, acts)
            else:
                _forward(adapter, block, acts)
            if (
                not ranks.sum_value(float(all(bool(torch.isfinite(t).all()) for t in acts.inputs.hidden)))
                == ranks.world
            ):
                raise ValueError(
                    f"{adapter.block_name(index)} produced NaN/Inf activations (try --dtype float32)"
                )
            new = {name: record for name, record in run.stored.items() if name not in done}
            if settings.quantizing:
                names = [name for group in adapter.layer_groups(block) for name in group]
                run.unquantized.extend(
                    join_name(adapter.block_name(index), n) for n in unquantized_weights(block, names)
                )
                if journal is not None and not restored:
                    journal.on_block_done(index, run.rows, new)
            prefix = _stored_name(model, adapter, index, block)
            if writer is not None and prefix is not None:
                writer.add_state(block.state_dict(prefix=f"{prefix}.", keep_vars=True).items(), new)
                for name in new:  # written out: packed layers are not held for the whole model
                    run.stored.pop(name)
        release()  # what the block's transients freed goes back to the system
        test_hook(ranks, index)
    run.emit("done", len(blocks))
    return Outcome(
        run.rows, run.stored, acts.inputs.hidden, settings.device, tokens, run.unquantized, run.transform_log
    )


def capture(
    model: nn.Module,
    adapter: Adapter,
    placement: Placement,
    batches: list[torch.Tensor],
    policy: str = "auto",
    *,
    verify: bool = False,
) -> Activations:
    """Block 0's inputs for every batch, the preamble placed on the device for the capture."""
    acts = Activations(placement.device, policy, len(batches))
    if verify and not placement.lazy:
        adapter.verify(model, batches[0])
    preamble = adapter.preamble(model)
    with in_block("the embeddings (capturing block 0's inputs)"), placement.using(preamble, lean=True):
        acts.inputs = adapter.capture_block_inputs(model, batches, placement.device, keep=acts.keep)
    return acts


@contextmanager
def in_block(where: str) -> Iterator[None]:
    """An allocation that fails inside the ``with`` is reported as out of memory in ``where`` (a
    block's name), saying what did not fit (:func:`cdq_cli.memory.naming`)."""
    try:
        with naming("its work"):
            yield
    except OutOfMemory as exc:
        raise OutOfMemory(f"out of memory in {where}: {exc}") from exc.__cause__


@torch.no_grad()
def forward_blocks(
    model: nn.Module,
    adapter: Adapter,
    placement: Placement,
    batches: list[torch.Tensor],
    policy: str = "auto",
) -> Iterator[torch.Tensor]:
    """The model's outputs (its head applied to the last block's output) for every batch, computed
    block by block: peak memory is one block plus the activations, whatever the model's size."""
    acts = capture(model, adapter, placement, batches, policy)
    for index, block in enumerate(adapter.blocks(model)):
        with in_block(adapter.block_name(index)), placement.using([block]):
            _forward(adapter, block, acts)
        release()
    with in_block("the head"), placement.using(adapter.head_modules(model), lean=True):
        for i in range(len(acts)):
            hidden, _, _ = acts.batch(i)
            yield adapter.head(model, hidden)


@dataclass(frozen=True)
class Unit:
    """A unit of a group's work for the ranks: a whole layer, or a band ``rows`` of its rows."""

    name: str  # the layer, in its block
    key: str  # the unit, in its block (``NAME[rows LO:HI]`` for a band)
    shape: tuple[int, int]  # what it solves (the cost model's key)
    label: str  # for messages
    rows: tuple[int, int] | None  # None: the whole layer

    @property
    def whole(self) -> bool:
        return self.rows is None


@dataclass
class _Run:
    """State of one quantization run: settings, report rows so far, stored layers, progress."""

    adapter: Adapter
    settings: Settings
    progress: Progress
    blocks: int
    ranks: Ranks = field(default_factory=lambda: Ranks())
    layers: int = 0
    rows: list[LayerRow] = field(default_factory=list)
    stored: dict[str, QuantizedLayer] = field(default_factory=dict)
    unquantized: list[str] = field(default_factory=list)
    costs: Costs = field(init=False)
    fp_acts: Activations | None = None  # -o target=fp: the full-precision model's stream
    transform_log: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        method, options = find_method(self.settings.method), self.settings.options
        self.costs = Costs(lambda rows, columns: method.cost(rows, columns, options))

    def emit(self, kind: str, block: int, row: LayerRow | None = None) -> None:
        if self.ranks.leader:
            self.progress(Event(kind, block, self.blocks, len(self.rows), self.layers, row))

    def restore(self, block: nn.Module, index: int, acts: Activations, saved: ResumeState) -> None:
        """Put a saved block's layers back (no solving) and advance ``acts`` exactly as
        :meth:`block` did (through the full-precision block with ``fp_inputs``)."""
        prefix = f"{self.adapter.block_name(index)}."
        if self.settings.transform == "awq":  # the same search on the same inputs: the same scales
            self.awq(block, index, acts)
        if self.fp_acts is not None:  # the block is still full precision here
            _forward(self.adapter, block, self.fp_acts)
        if self.settings.fp_inputs:
            _forward(self.adapter, block, acts)
        records = {
            row.layer: saved.layers.get(row.layer) for row in saved.rows if row.name.startswith(prefix)
        }
        if self.ranks.active:  # only the leader read the journal: its records of this block, to all
            records = self.ranks.broadcast(records)
        for row in saved.rows:
            if row.name.startswith(prefix):
                if row.layer not in self.stored:
                    record = records[row.layer]
                    weight = layer_weight(block, row.layer[len(prefix) :])
                    weight.data.copy_(record.dequantize(weight.device).to(weight.dtype))
                    self.stored[row.layer] = record
                self.rows.append(row)
                self.emit("layer", index, row)
        if not self.settings.fp_inputs:
            _forward(self.adapter, block, acts)

    def block(self, block: nn.Module, index: int, acts: Activations) -> None:
        """Solve every layer of one block; advance ``acts`` to the next block's inputs."""
        if self.settings.transform == "awq":
            self.awq(block, index, acts)
        groups = _groups(self.adapter, block, index, self.settings)
        everything = [name for group in groups for name in group]
        if self._unweighted(block, index, everything) and self.unweighted(block, index, groups, acts):
            return
        if self.settings.fp_inputs:
            # COMQ's setting: every Σ and the next block's inputs come from the full-precision block.
            sigmas = _collect(
                self.adapter, block, acts, everything, self.settings, advance=True, ranks=self.ranks
            )
            self.solve(block, index, everything, sigmas)
            return
        # Each group's Σ is collected after the earlier groups of this block were quantized (true
        # sequential), or every Σ at once.
        passes = groups if self.settings.true_sequential else [everything]
        # -o target=fp: the block's full-precision weights run the other stream, and its last pass
        # over the block advances that stream, so they are dropped before the last solve
        fp = None if self.fp_acts is None else FullPrecision(block)
        calls: dict[str, int] = {}  # each layer's calls per forward pass: the first pass counts
        for k, names in enumerate(passes):
            last = k == len(passes) - 1
            sigmas = _collect(
                self.adapter,
                block,
                acts,
                names,
                self.settings,
                ranks=self.ranks,
                fp=None if fp is None else (fp, self.fp_acts),
                advance_fp=last,
                calls=calls,
                watch=everything,
            )
            if fp is not None and not last:
                fp.keep(names)  # these are solved now; later passes run them at full precision
            if last:
                fp = None
            self.solve(block, index, names, sigmas)
        _forward(self.adapter, block, acts)

    def _unweighted(self, block: nn.Module, index: int, names: list[str]) -> bool:
        """Whether this block's layers may be solved without Σ (:meth:`unweighted`): the method
        declares ``needs_sigma`` False (RTN) and nothing else needs Σ. Σ stays for ``-o target=fp``
        (its paired statistics), ``--fp-inputs`` and runs that are not true-sequential (Σ from the
        full-precision block, not the inputs of the quantized one), an RTN comparison that is not
        the result itself, several ranks (each rank holds only its batches: Σ is what they relay,
        :mod:`cdq_cli.parallel`), a GGUF block type (its grid is fitted on diag Σ) and any layer
        that is not an ``nn.Linear`` or ``nn.Conv2d`` module (fused experts: per-expert Σ)."""
        settings = self.settings
        if find_method(settings.method).needs_sigma or self.ranks.active:
            return False
        if settings.target == "fp" or settings.fp_inputs or not settings.true_sequential:
            return False
        if settings.compare_rtn and not _rtn_is_result(settings):
            return False
        prefix = self.adapter.block_name(index)
        for name in names:
            try:
                layer = block.get_submodule(name)
            except AttributeError:  # a fused experts' parameter, not a module
                return False
            spec = settings.grid_for(join_name(prefix, name))
            if not isinstance(layer, (nn.Linear, nn.Conv2d)) or spec is None or spec.block_type is not None:
                return False
        return True

    def unweighted(self, block: nn.Module, index: int, groups: list[list[str]], acts: Activations) -> bool:
        """Solve the block's layers without Σ, then run the block once over every batch with Ŵ in
        place, the pass that advances ``acts`` to the next block's inputs, measuring each layer's
        objective ‖(W − Ŵ)X‖² and energy ‖WX‖² from its inputs X on the way
        (:class:`cdq_cli.capture.OutputErrors`): one block forward per batch, no Σ, no trace.

        X there comes from the block with all its layers quantized. True-sequential's Σ of a
        group sees the earlier groups quantized and its own in full precision: the same inputs
        whenever a group's layers do not feed one another. That holds when they are all fed the
        very same tensor (q/k/v, gate/up; a one-layer group), which is checked on the first batch:
        a group that fails it (layers chained inside a group, as in the generic adapter's single
        group, or a layer called twice) puts the block's weights back and returns False before
        anything is advanced, and the Σ path runs. Rows and records come in the Σ path's order.
        Single-process only (:meth:`_unweighted`)."""
        prefix = self.adapter.block_name(index)
        dtype = self.settings.sigma_dtype
        names = [name for group in groups for name in group]
        solved: dict[str, tuple[QuantResult, QuantizedLayer, float]] = {}
        meters: dict[str, OutputErrors] = {}
        group_of = {name: g for g, group in enumerate(groups) for name in group}
        fed: dict[int, torch.Tensor] = {}  # this batch's input of each group (held: identity is safe)
        scratch = Scratch()  # every layer's E = W − Ŵ, one at a time, in one buffer
        first = [True]

        def seen(name: str, x: torch.Tensor) -> None:
            if fed.setdefault(group_of[name], x) is not x:
                if first[0]:
                    raise _Chained(name)
                raise RuntimeError(f"{name}: its input changed identity between batches (a cdq bug)")

        for name in names:
            layer = block.get_submodule(name)
            full = join_name(prefix, name)
            with naming(lambda full=full, layer=layer: f"solving {_sized(full, layer.weight)}"):
                began = time.perf_counter()
                original = layer.weight.detach()  # W itself: Ŵ gets a tensor of its own below
                result, record = round_layer(full, layer, self.settings)
                solved[name] = (result, record, time.perf_counter() - began)
            weight = layer.weight.detach()
            if weight.dtype == dtype:  # Ŵ is the layer's own weight: no second copy is kept
                result.weight = weight.reshape(result.weight.shape)
            approx = result.weight.reshape(weight.shape)
            meters[name] = OutputErrors(
                layer, original, approx, dtype, lambda x, name=name: seen(name, x), scratch=scratch
            )
        handles = [block.get_submodule(name).register_forward_hook(meters[name]) for name in names]
        try:
            for i in range(len(acts)):
                fed.clear()
                out = _forward_batch(self.adapter, block, acts, i)
                acts.inputs.hidden[i] = acts.keep(out)
                first[0] = False
        except _Chained:
            for name in names:
                layer_weight(block, name).data.copy_(meters[name].original)
            return False
        finally:
            fed.clear()
            for handle in handles:
                handle.remove()
        for name in names:
            result, record, seconds = solved.pop(name)
            meter = meters.pop(name)
            full = join_name(prefix, name)
            if meter.tokens == 0:
                raise ValueError(f"{full}: the layer saw no calibration inputs")
            if not (math.isfinite(meter.objective) and math.isfinite(meter.energy)):
                raise ValueError(
                    f"{full}: its calibration inputs have NaN/Inf entries (activations overflowed?)"
                )
            result.objective = result.objective_start = meter.objective
            rtn = result if self.settings.compare_rtn else None
            shape = list(layer_weight(block, name).shape)
            row = _row(full, shape, self.settings, result, meter.energy, rtn, meter.tokens)
            self._take(index, name, [row], record)
            self.costs.record(matrix_shape(tuple(shape)), seconds)
            self.ranks.balance.solved({name: seconds}, {name: 0}, 1)
        return True

    def awq(self, block: nn.Module, index: int, acts: Activations) -> None:
        """``--transform awq``: search and fold this block's scales on its first calibration
        batches (up to ``SEARCH_TOKENS`` tokens), before any of its Σ is collected."""
        from .transforms.awq import SEARCH_TOKENS, search_block

        stream = getattr(getattr(self.adapter, "family", None), "stream", None)
        assert stream is not None, "--transform awq was checked against the family before any work"
        prefix = self.adapter.block_name(index)
        count, seen = 0, 0
        while count < len(acts) and (count == 0 or seen < SEARCH_TOKENS):
            seen += int(acts.inputs.hidden[count].shape[:-1].numel())
            count += 1

        def forward() -> None:
            for i in range(count):
                _forward_batch(self.adapter, block, acts, i)

        chosen = search_block(
            block, stream, forward, lambda name: self.settings.grid_for(join_name(prefix, name))
        )
        self.transform_log.append({"block": prefix, "tokens": seen, "groups": chosen})

    def solve(self, block: nn.Module, index: int, names: list[str], sigmas: dict[str, Any]) -> None:
        """Solve ``names`` and put every result into every rank's block, in ``names`` order.

        With several ranks the units of work are the layers' bands of rows (a layer solved whole
        is one unit; :func:`layer_bands`), each going to one rank by cost
        (:class:`cdq_cli.parallel.Costs`): every rank first solves all of its own units, then each
        is broadcast from its rank and every rank stacks a layer's bands as one process does (the
        layers of a group are independent: their Σ's were all collected before)."""
        with _parked(block, self.adapter.block_name(index), names, self.stored):
            self._solve(block, index, names, sigmas)

    def _solve(self, block: nn.Module, index: int, names: list[str], sigmas: dict[str, Any]) -> None:
        ranks = self.ranks
        prefix = self.adapter.block_name(index)
        if not ranks.active:
            for name in names:
                acc = sigmas.pop(name)
                full = join_name(prefix, name)
                began = time.perf_counter()
                with naming(
                    lambda name=name, full=full: f"solving {_sized(full, layer_weight(block, name))}"
                ):
                    rows, record = self._solve_one(block, name, full, acc)
                seconds = time.perf_counter() - began
                del acc  # this layer's Σ is not needed again (its memory goes now, not after the group)
                self._take(index, name, rows, record)
                self.costs.record(matrix_shape(tuple(layer_weight(block, name).shape)), seconds)
                ranks.balance.solved({name: seconds}, {name: 0}, 1)
            return
        units = {name: self._units(block, name, join_name(prefix, name), sigmas[name]) for name in names}
        costs = {unit.key: self.costs.cost(unit.shape) for pieces in units.values() for unit in pieces}
        owners = assign(costs, ranks.world)
        ranks.balance.planned(costs, owners, ranks.world)
        solved: dict[str, tuple[Any, float]] = {}
        for name in names:
            acc = sigmas.pop(name)
            full = join_name(prefix, name)
            with _sharing(acc):  # the Σ-only work once for this rank's bands of the layer
                for unit in units[name]:
                    if owners[unit.key] != ranks.rank:
                        continue
                    with naming(lambda unit=unit: f"solving {unit.label}"):
                        began = time.perf_counter()
                        done = timed(ranks, partial(self._solve_unit, block, unit, full, acc))
                        solved[unit.key] = (done, time.perf_counter() - began)
            del acc
        seconds = {}
        for name in names:
            full = join_name(prefix, name)
            parts = []
            for unit in units[name]:
                done, seconds[unit.key] = ranks.broadcast(solved.pop(unit.key, None), src=owners[unit.key])
                ranks.assignments[join_name(prefix, unit.key)] = owners[unit.key]
                parts.append(done)
            if units[name][0].whole:
                (rows, record), owner = parts[0], owners[units[name][0].key]
                if owner != ranks.rank:
                    weight = layer_weight(block, name)
                    weight.data.copy_(record.dequantize(weight.device).reshape(weight.shape).to(weight.dtype))
            else:
                row, record = finish_layer(full, block.get_submodule(name), parts, self.settings)
                rows = [row]
            self._take(index, name, rows, record)
            for unit in units[name]:
                self.costs.record(unit.shape, seconds[unit.key])
        ranks.balance.solved(seconds, owners, ranks.world)

    def _units(self, block: nn.Module, name: str, full: str, acc: Any) -> list[Unit]:
        """The units of work of one layer for the ranks: its bands of rows (:func:`layer_bands`;
        one band: the whole layer, fused experts and grouped convolutions included)."""
        weight = layer_weight(block, name)
        shape = matrix_shape(tuple(weight.shape))
        sized = _sized(full, weight)
        bands = layer_bands(full, weight.detach().reshape(weight.shape[0], -1), acc, self.settings)
        if len(bands) == 1:
            return [Unit(name, name, shape, sized, None)]
        return [
            Unit(name, f"{name}[rows {lo}:{hi}]", (hi - lo, shape[1]), f"rows {lo}:{hi} of {sized}", (lo, hi))
            for lo, hi in bands
        ]

    def _solve_unit(self, block: nn.Module, unit: Unit, full: str, acc: Any) -> Any:
        if unit.whole:
            return self._solve_one(block, unit.name, full, acc)
        weight = layer_weight(block, unit.name)
        matrix = weight.detach().reshape(weight.shape[0], -1)
        return _solve_band(full, matrix, acc, self.settings, *unit.rows)

    def _take(self, index: int, name: str, rows: list[LayerRow], record: QuantizedLayer) -> None:
        """Keep a solved layer's record and report rows."""
        self.stored[join_name(self.adapter.block_name(index), name)] = record
        for row in rows:
            self.rows.append(row)
            self.emit("layer", index, row)

    def _solve_one(
        self, block: nn.Module, name: str, full: str, acc: Any
    ) -> tuple[list[LayerRow], QuantizedLayer]:
        if isinstance(acc, ExpertSigmas):
            return solve_experts(full, layer_weight(block, name), acc, self.settings)
        row, record = solve_layer(full, block.get_submodule(name), acc, self.settings)
        return [row], record


@contextmanager
def _parked(
    block: nn.Module, prefix: str, names: list[str], stored: dict[str, QuantizedLayer]
) -> Iterator[None]:
    """Inside, the block's layers that are already solved (their records in ``stored``) and are not
    among ``names`` hold no weights: solving ``names`` does not read them, and on a wide block they
    are much of what is resident (the 1.6B Llama's q/k/v/o/gate/up: 192 MiB in float32 while its
    ``down_proj`` is solved). Each is put back after as :func:`_write_back` put it in, its record
    dequantized (the same values, bit for bit), before anything runs the block again."""
    parked = []
    for full, record in stored.items():
        name = full[len(prefix) + 1 :] if prefix and full.startswith(prefix + ".") else None
        if name is None or name in names:  # (a block without a name, the whole model: none parked)
            continue
        weight = layer_weight(block, name)
        parked.append((weight, record, tuple(weight.shape), weight.dtype, weight.device))
        weight.data = weight.data.new_empty((0,) * weight.dim())  # its dims kept: fused experts stay 3-D
    try:
        yield
    finally:
        for weight, record, shape, dtype, device in parked:
            weight.data = record.dequantize(device).reshape(shape).to(dtype)


def solve_layer(
    name: str, layer: nn.Module, acc: SigmaAccumulator, settings: Settings
) -> tuple[LayerRow, QuantizedLayer]:
    """Solve one layer on its Σ, write Ŵ into it, and describe the result."""
    matrix = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    return finish_layer(name, layer, _solve_bands(name, matrix, acc, settings), settings)


def finish_layer(
    name: str, layer: nn.Module, bands: list[Band], settings: Settings
) -> tuple[LayerRow, QuantizedLayer]:
    """A layer's solved bands, in row order, stacked into its record, its report row and Ŵ."""
    shape = tuple(layer.weight.shape)
    row, result = _assemble(bands, settings)
    row.shape = list(shape)
    record = QuantizedLayer.from_result(name, result, shape)
    _write_back(name, layer.weight, record, result)
    return row, record


def round_layer(name: str, layer: nn.Module, settings: Settings) -> tuple[QuantResult, QuantizedLayer]:
    """Solve one layer without Σ (a method that declares ``needs_sigma`` False), put Ŵ in and
    return the result, its objective NaN until the block's pass measures it
    (:meth:`_Run.unweighted`), and its stored record: the same as :func:`solve_layer` stores.

    Ŵ becomes the weight's own tensor and W's tensor is left as it was (the caller holds it: no
    copy of W is made). The stored form is checked by its codes: RTN's Ŵ is ``grid.dequantize(codes)``
    by construction (:func:`cdq_cli.solvers.rtn.solve_rtn`) and the record keeps that grid's scales
    and zeros as they are, so stored codes that unpack to the solver's reproduce Ŵ (the Σ path's
    :func:`_write_back` dequantizes the record instead; its solvers' Ŵ come out of longer
    computations). tests/test_rtn_unweighted.py checks the output bytes against the Σ path's."""
    spec = settings.grid_for(name)
    assert spec is not None, "solving needs a grid (bits 16 quantizes nothing, --skip keeps a layer)"
    shape = tuple(layer.weight.shape)
    weight = layer.weight.detach().reshape(shape[0], -1).to(settings.sigma_dtype)
    groups = conv_groups(layer)
    try:
        if groups > 1:
            result = solve_grouped_unweighted(settings.method, weight, groups, spec, settings.options)
        else:
            result = run_unweighted(settings.method, weight, spec, settings.options)
    except (ValueError, FloatingPointError) as exc:
        raise ValueError(f"{name}: {exc}") from None
    if not all_finite(result.weight):
        raise ValueError(f"{name}: {settings.method} produced non-finite weights")
    record = QuantizedLayer.from_result(name, result, shape)
    stored = record.codes().reshape(result.codes.shape)
    if (
        record.outliers_idx is not None
        or record.parts is not None
        or not torch.equal(stored, result.codes.cpu())
    ):
        raise RuntimeError(f"{name}: stored codes do not reproduce the solver's weights (a cdq bug)")
    layer.weight.data = result.weight.reshape(shape).to(layer.weight.dtype)
    return result, record


def solve_experts(
    name: str, weight: torch.Tensor, sigmas: ExpertSigmas, settings: Settings
) -> tuple[list[LayerRow], QuantizedLayer]:
    """Solve every expert of a fused 3-D weight (E, out, in) as its own matrix on the Σ of the
    tokens routed to it; an expert no calibration token reached is rounded to nearest (RTN) and
    flagged in its report row. The experts are stored as one layer (their rows stacked)."""
    from .solvers.grouped import stack_results
    from .solvers.rtn import solve_rtn

    spec = settings.grid_for(name)
    assert spec is not None
    rows, results = [], []
    for expert, acc in enumerate(sigmas.accumulators):
        label = f"{name}[{expert}]"
        matrix = weight[expert].detach()
        if acc is None or acc.tokens == 0:
            result = solve_rtn(matrix.to(settings.sigma_dtype), _no_sigma(matrix, settings), spec)
            row = _row(label, list(matrix.shape), settings, result, 0.0, None, 0)
            row.method, row.note = (
                "rtn",
                "no calibration tokens were routed to this expert: rounded to nearest",
            )
        else:
            row, result = _solve_matrix(label, matrix, acc, settings)
        rows.append(row)
        results.append(result)
    stacked = stack_results(results, spec)
    record = QuantizedLayer.from_result(name, stacked, tuple(weight.shape))
    _write_back(name, weight, record, stacked)
    return rows, record


@dataclass
class Band:
    """One band of a layer's rows, solved: its result and its shares of the report's sums (rows
    never interact in the objectives, so a layer's figures are its bands' added in row order)."""

    name: str
    result: QuantResult
    reference: float  # ‖W X‖² of these rows (-o target=fp: ‖W X̃‖²)
    rtn: float | None  # RTN's objective on these rows (the report's comparison), when asked
    error: float  # the objective of these rows (-o target=fp: the true ‖W X̃ − Ŵ X‖²)
    tokens: int


def layer_bands(name: str, matrix: torch.Tensor, acc: Any, settings: Settings) -> list[tuple[int, int]]:
    """The bands of rows a layer is solved in (:func:`cdq_cli.solvers.bands.row_bands`): several
    only for a method that declares ``row_bands``, on a per-row grid and a plain (2-D) Σ."""
    rows = matrix.shape[0]
    spec = settings.grid_for(name)
    if (
        not find_method(settings.method).row_bands
        or spec is None
        or spec.per_layer
        or isinstance(acc, ExpertSigmas)
        or acc.sigma.dim() != 2
    ):
        return [(0, rows)]
    return row_bands(rows, matrix.device)


def _solve_matrix(
    name: str, matrix: torch.Tensor, acc: SigmaAccumulator, settings: Settings
) -> tuple[LayerRow, QuantResult]:
    """A matrix (one expert's) solved in its bands, described as one report row."""
    return _assemble(_solve_bands(name, matrix, acc, settings), settings)


def _solve_bands(name: str, matrix: torch.Tensor, acc: SigmaAccumulator, settings: Settings) -> list[Band]:
    bands = layer_bands(name, matrix, acc, settings)
    with _sharing(acc):  # the Σ-only work once for all of the layer's bands, one phase at a time
        return lockstep([_band_phases(name, matrix, acc, settings, lo, hi) for lo, hi in bands])


def _sharing(acc: Any) -> Any:
    """:func:`cdq_cli.solvers.bands.shared` on a layer's plain Σ (else nothing)."""
    sigma = getattr(acc, "sigma", None) if not isinstance(acc, ExpertSigmas) else None
    return shared(sigma) if sigma is not None and sigma.dim() == 2 else nullcontext()


def _solve_band(
    name: str, matrix: torch.Tensor, acc: SigmaAccumulator, settings: Settings, lo: int, hi: int
) -> Band:
    """Rows ``lo:hi`` of a layer solved on its Σ (callers share the Σ-only work between a layer's
    bands: :func:`_sharing`)."""
    return finish(_band_phases(name, matrix, acc, settings, lo, hi))


def _band_phases(
    name: str, matrix: torch.Tensor, acc: SigmaAccumulator, settings: Settings, lo: int, hi: int
) -> Generator[None, None, Band]:
    """:func:`_solve_band` in the method's phases (:func:`run_solver_phases`), for
    :func:`lockstep`."""
    spec = settings.grid_for(name)  # the run's grid, or a --layer rule's
    assert spec is not None, "solving needs a grid (bits 16 quantizes nothing, --skip keeps a layer)"
    if acc.tokens == 0:
        raise ValueError(f"{name}: the layer saw no calibration inputs")
    sigma = acc.sigma
    if not all_finite(sigma):
        raise ValueError(f"{name}: Σ of the calibration inputs has NaN/Inf entries (activations overflowed?)")
    weight = matrix[lo:hi].to(sigma.dtype)
    if settings.target == "fp":
        return (yield from _fp_band_phases(name, weight, acc, settings, spec, lo, hi))
    same = _rtn_is_result(settings)
    compare = settings.compare_rtn and not same
    try:
        result = yield from _solver_phases(settings.method, weight, sigma, spec, settings.options)
        rtn = finish(_solver_phases("rtn", weight, sigma, spec, {})) if compare else None
    except (ValueError, FloatingPointError) as exc:
        raise ValueError(f"{name}: {exc}") from None
    if settings.compare_rtn and same:
        rtn = result
    _check_result(name, result, settings)
    reference = energy(weight, sigma) if sigma.dim() == 3 else working_energy(weight, sigma)
    rtn_error = None if rtn is None else rtn.objective
    return Band(name, result, reference, rtn_error, result.objective, acc.tokens)


def _fp_band_phases(
    name: str,
    weight: torch.Tensor,
    acc: Any,
    settings: Settings,
    spec: GridSpec,
    lo: int,
    hi: int,
) -> Generator[None, None, Band]:
    """:func:`_band_phases` for ``-o target=fp``: the solver runs on ``W*_α = W + α K`` (K = R H⁻¹,
    :mod:`cdq_cli.solvers.target`), whose objective on Σ is ‖W X_α − Ŵ X‖² up to a constant (X_α:
    the inputs a share α of the way toward X̃). The report's errors are the true ‖W X̃ − Ŵ X‖²
    (RTN's on the same terms, measured first, on W).

    No layer-sized matrix is added for it: K is written over these rows of the layer's residual R
    (not needed again) and W* over ``weight`` (these rows of the layer's own weight, which the
    result replaces when it is written back; W is ``W* − α K`` for the report). The correction's
    factor is made in a phase of its own, dropped before the solver factors Σ."""
    sigma, share = acc.sigma, settings.fp_share
    damping = settings.options.get("damping", 0.01)
    rows = _rows(acc.residual, lo, hi)
    upstream = float(acc.upstream[lo:hi].sum())
    try:
        rows.copy_(fp_correction(sigma, rows, damping))  # K, in R's memory
        rtn_error = None
        if settings.compare_rtn:
            rtn = finish(_solver_phases("rtn", weight, sigma, spec, {}))
            rtn_error = fp_objective(weight, rtn.weight, sigma, rows, damping, upstream)
            del rtn
        weight.add_(rows.reshape(weight.shape), alpha=share)  # W*, in W's memory
        yield
        result = yield from _solver_phases(settings.method, weight, sigma, spec, settings.options)
    except (ValueError, FloatingPointError) as exc:
        raise ValueError(f"{name}: {exc}") from None
    _check_result(name, result, settings)
    original = weight.sub(rows.reshape(weight.shape), alpha=share)
    error = fp_objective(original, result.weight, sigma, rows, damping, upstream)
    return Band(name, result, float(acc.energy[lo:hi].sum()), rtn_error, error, acc.tokens)


def _solver_phases(
    method: str, weight: torch.Tensor, sigma: torch.Tensor, spec: GridSpec, options: dict[str, Any]
) -> Generator[None, None, QuantResult]:
    """``method`` on a band: in its phases (:func:`run_solver_phases`) on a plain Σ, in one go on a
    (G, c, c) Σ, one problem per conv group (:func:`solve_grouped`)."""
    if sigma.dim() == 3:
        return solve_grouped(method, weight, sigma, spec, options)
    return (yield from run_solver_phases(method, weight, sigma, spec, options))


def _check_result(name: str, result: QuantResult, settings: Settings) -> None:
    if not all_finite(result.weight) or not math.isfinite(result.objective):
        raise ValueError(f"{name}: {settings.method} produced non-finite weights")


def _rows(residual: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo:hi`` of a layer's target=fp residual (a grouped one, (G, q/G, c), is whole: a
    grouped layer is one band)."""
    return residual[lo:hi] if residual.dim() == 2 else residual


def _assemble(bands: list[Band], settings: Settings) -> tuple[LayerRow, QuantResult]:
    """One layer's (or expert's) result and report row from its bands, in row order."""
    first = bands[0]
    results = [band.result for band in bands]
    result = results[0] if len(bands) == 1 else stack_results(results, results[0].grid.spec)
    row = _row(first.name, list(result.weight.shape), settings, result, 0.0, None, first.tokens)
    reference = sum(band.reference for band in bands)
    row.error = sum(band.error for band in bands)
    row.relative_error = row.error / reference if reference > 0 else 0.0
    if first.rtn is not None:
        row.rtn_error = sum(band.rtn for band in bands)
    if settings.target == "fp":
        row.solver_error = result.objective
    if len(bands) > 1:
        row.band_seconds = [band.result.seconds for band in bands]
    return row, result


def _rtn_is_result(settings: Settings) -> bool:
    """RTN is deterministic: with ``--method rtn`` (on W itself, not ``-o target=fp``'s W*) its
    own result is the RTN comparison."""
    return settings.method == "rtn" and settings.target != "fp"


def _row(
    name: str,
    shape: list[int],
    settings: Settings,
    result: QuantResult,
    reference: float,
    rtn: QuantResult | None,
    tokens: int,
) -> LayerRow:
    spec = result.grid.spec  # the grid this layer was solved on (per-layer rules included)
    return LayerRow(
        block_type=spec.block_type,
        name=name,
        shape=shape,
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
        tokens=tokens,
    )


def _write_back(name: str, weight: torch.Tensor, record: QuantizedLayer, result: QuantResult) -> None:
    """Put the stored form's Ŵ into the model, after checking it reproduces the solver's."""
    chosen = record.dequantize(result.weight.device)
    if not torch.equal(chosen.reshape(result.weight.shape), result.weight):
        raise RuntimeError(f"{name}: stored codes do not reproduce the solver's weights (a cdq bug)")
    weight.data.copy_(chosen.reshape(weight.shape).to(weight.dtype))


def _no_sigma(matrix: torch.Tensor, settings: Settings) -> torch.Tensor:
    columns = matrix.shape[1]
    return torch.zeros(columns, columns, dtype=settings.sigma_dtype, device=matrix.device)


def _groups(adapter: Adapter, block: nn.Module, index: int, settings: Settings) -> list[list[str]]:
    """The block's layer groups without the layers ``--skip`` keeps in full precision."""
    prefix = adapter.block_name(index)
    groups = [
        [name for name in group if settings.grid_for(join_name(prefix, name)) is not None]
        for group in adapter.layer_groups(block)
    ]
    return [group for group in groups if group]


def _rows_of(block: nn.Module, name: str) -> int:
    """Report rows a quantizable name makes: one, or one per expert of fused experts."""
    weight = layer_weight(block, name)
    return weight.shape[0] if weight.dim() == 3 else 1


class FullPrecision:
    """The full-precision weights of a block's solved layers, put in place for the passes of the
    full-precision stream (``-o target=fp``) and taken out again: the same modules run both
    streams, whatever the block is (a decoder layer, a view over a vision model's modules). A layer
    not solved yet holds its full-precision weight itself; :meth:`keep` copies a layer's before it
    is solved, so only the layers solved so far are held twice."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.weights: list[torch.Tensor] = []
        self.saved: list[torch.Tensor] = []

    def keep(self, names: list[str]) -> None:
        """Copy the full-precision weights of ``names`` (about to be solved)."""
        for name in names:
            weight = layer_weight(self.block, name)
            self.weights.append(weight)
            self.saved.append(weight.detach().clone())

    @contextmanager
    def active(self) -> Iterator[None]:
        current = [weight.data for weight in self.weights]
        for weight, saved in zip(self.weights, self.saved, strict=True):
            weight.data = saved
        try:
            yield
        finally:
            for weight, data in zip(self.weights, current, strict=True):
                weight.data = data


# Collection passes stop at the last layer they collect for (:func:`_collect`); False runs every
# pass whole (the tests compare the two: the same statistics, bit for bit).
STOP_EARLY = True


class _Enough(Exception):
    """A collection pass has seen every layer it collects for: the rest of the block's forward
    pass is skipped (raised from the last layer's hook, caught by :func:`_collect`)."""


class _Chained(Exception):
    """A group's layers were fed different tensors on the block's first batch: one may feed
    another, so the one pass of :meth:`_Run.unweighted` cannot see the inputs true-sequential Σ
    would (raised from a layer's hook, caught by the driver, which then collects Σ)."""


class ExpertSigmas:
    """The per-expert Σ's of one fused 3-D weight (None: no token reached that expert)."""

    def __init__(self, accumulators: list[SigmaAccumulator | None]) -> None:
        self.accumulators = accumulators


def _collect(
    adapter: Adapter,
    block: nn.Module,
    acts: Activations,
    names: list[str],
    settings: Settings,
    *,
    advance: bool = False,
    ranks: Ranks | None = None,
    fp: tuple[FullPrecision, Activations] | None = None,
    advance_fp: bool = False,
    calls: dict[str, int] | None = None,
    watch: list[str] | None = None,
) -> dict[str, SigmaAccumulator]:
    """Run the block on every batch with Σ hooks on ``names``; with ``advance`` its outputs
    replace ``acts`` (the inputs are not needed again).

    With ``fp`` (``-o target=fp``: the block's full-precision weights and the full-precision
    model's stream), each batch first runs through the block with those weights in place on the
    full-precision stream, recording the layers' inputs (a bias-free Linear's outputs, W X̃: its
    batch is then added after it ran, from its output W X; :func:`~cdq_cli.capture.layer_pair_sigma`),
    and the accumulators are the paired ones
    (:class:`~cdq_cli.solvers.sigma.PairedSigmaAccumulator`: Σ, shared as below, and each layer's
    own products of W with both streams); with ``advance_fp`` that pass's outputs replace the
    full-precision stream's inputs (the block's last pass over it: its weights are then needed no
    more).

    Layers fed the very same input tensor in a forward pass (q/k/v, gate/up) share one Σ: the
    first of them accumulates it, the others point at it (found on the first batch, checked on
    every other one). With several ranks, each records the inputs of its own batches and the Σ's
    are reduced in batch order (:meth:`cdq_cli.parallel.Ranks.reduce_in_order`).

    A pass whose outputs are not kept (a stream not advanced) stops where the last of ``names``
    is taken (called, or run when its output is taken): nothing after it can change a statistic
    (the earlier groups' passes skip the rest of the block, both streams). That needs each layer
    called once per forward pass: ``calls`` holds the block's counts, per layer of ``watch``
    (default ``names``); when it is empty, this pass's first batch runs whole and fills it (the
    block's first pass counts for its later ones, which then stop from their first batch). Fused
    experts (their own capture) run whole.
    """
    ranks = ranks or Ranks()
    deferred: list[Deferred] = []

    def wrap(acc: Any) -> Any:
        if not ranks.active:
            return acc
        stand_in = Deferred(acc, keep=acts.keep)
        deferred.append(stand_in)
        return stand_in

    sigmas: dict[str, SigmaAccumulator] = {}
    shares: dict[str, str] = {}  # layer -> the layer whose Σ it shares
    # This batch's Linear inputs and the first layer fed each; holding them keeps every tensor
    # alive until the batch ends, so object identity cannot be confused with a reused address.
    seen: list[tuple[torch.Tensor, str]] = []
    first = [True]
    handles = []

    experts: dict[str, tuple[ExpertsCapture, str]] = {}  # fused name -> (its module's capture, projection)
    captures: dict[int, ExpertsCapture] = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        if leaf in FUSED_PROJECTIONS and is_fused_experts(block.get_submodule(owner)):
            module = block.get_submodule(owner)
            capture = captures.setdefault(
                id(module),
                ExpertsCapture(module, set(), settings.sigma_dtype, wrap if ranks.active else None),
            )
            capture.want(leaf)
            experts[name] = (capture, leaf)
    fp_seen: dict[str, torch.Tensor] = {}  # what the FP pass kept of each layer: its input or output
    fp_pass = [False]
    calls = {} if calls is None else calls
    counting = not calls  # the first batch runs whole and counts the calls of every watched layer
    called: dict[str, int] = {}  # this pass's calls of each layer
    first_calls: list[dict[str, int]] = []  # the first batch's, per stream
    stop = [False]  # this pass may end at the last layer's call (_Enough)

    def record(module: nn.Module, args: tuple, name: str, add: Callable) -> None:
        """Fold one call's inputs into ``name``'s statistics (finding the layers that share Σ)."""
        owner = name
        if isinstance(module, nn.Linear):
            owner = next((first_name for x, first_name in seen if x is args[0]), name)
            if owner == name:
                seen.append((args[0], name))
        if first[0] and owner != name:
            shares[name] = owner
            if fp is not None:  # its own W-products, the owner's Σ
                sigmas[name].share_sigma(sigmas[owner])
        elif shares.get(name, name) != owner:
            raise RuntimeError(f"{name}: its input changed identity between batches (a cdq bug)")
        if owner == name or fp is not None:
            add(module, args)

    def count(module: nn.Module, args: tuple, name: str) -> None:
        called[name] = called.get(name, 0) + 1

    def take(module: nn.Module, args: tuple, name: str, add: Callable, output: Any) -> None:
        """A layer's call: its FP input or output kept (the FP pass) or its batch added; the pass
        ends here when this was the last of ``names``: nothing after it counts."""
        if fp_pass[0]:
            fp_seen[name] = args[0] if output is None else output.detach().clone()  # kept past later ops
        elif fp is None:
            record(module, args, name, add)
        else:
            record(module, args, name, lambda module, args: add(module, args, fp_seen.get(name), output))
        if stop[0] and called.keys() >= sigmas.keys():
            raise _Enough

    for name in names:
        if name in experts:
            continue
        layer = block.get_submodule(name)
        after = False  # the batch is taken after the layer ran, from its output (layer_pair_sigma)
        with naming(
            lambda name=name, layer=layer: f"Σ of {name} ({_sigma_size(layer, settings.sigma_dtype)})"
        ):
            if fp is not None:
                acc, add, after = layer_pair_sigma(layer, settings.sigma_dtype, wrap)
            else:
                acc, add = layer_sigma(layer, settings.sigma_dtype, wrap)  # conv patches as F.conv2d has them
        sigmas[name] = acc

        def before(module: nn.Module, args: tuple, name: str = name, add=add, after: bool = after) -> None:
            count(module, args, name)
            if not after:
                take(module, args, name, add, None)

        handles.append(layer.register_forward_pre_hook(before))
        if after:

            def ran(module: nn.Module, args: tuple, output: Any, name: str = name, add=add) -> None:
                take(module, args, name, add, output)

            handles.append(layer.register_forward_hook(ran))

    for name in (watch or []) if counting else []:
        if name in sigmas or name in experts:
            continue  # counted by its own hook; a fused experts' tensor (never stopped at)
        try:
            layer = block.get_submodule(name)
        except AttributeError:  # a fused experts' tensor of a later group
            continue
        handles.append(layer.register_forward_pre_hook(partial(count, name=name)))

    def stops() -> bool:
        """Whether this pass may stop early: every layer of ``names`` is called once per pass."""
        return STOP_EARLY and not experts and all(calls.get(name) == 1 for name in sigmas)

    def run(stream: Activations, i: int, kept: bool) -> torch.Tensor | None:
        """Block ``i`` on ``stream``: its output, or None when the pass stopped early."""
        called.clear()
        stop[0] = stoppable and not kept
        try:
            return _forward_batch(adapter, block, stream, i)
        except _Enough:
            return None
        finally:
            stop[0] = False
            if first[0] and counting:
                first_calls.append(dict(called))

    stoppable = not counting and stops()
    with ExitStack() as stack:
        for capture in captures.values():
            stack.enter_context(capture)
        try:
            for i in range(len(acts)):
                seen.clear()
                if fp is not None:
                    fp_seen.clear()
                    fp_pass[0] = True
                    try:
                        with fp[0].active():
                            fp_out = run(fp[1], i, advance_fp)
                    finally:
                        fp_pass[0] = False
                    if advance_fp:
                        fp[1].inputs.hidden[i] = fp[1].keep(fp_out)
                    del fp_out
                out = run(acts, i, advance)
                if advance:
                    acts.inputs.hidden[i] = acts.keep(out)
                if first[0]:
                    first[0] = False
                    if counting:  # a layer's count: the most calls in either stream
                        for name in {*sigmas, *(watch or [])}:
                            calls[name] = max(streamed.get(name, 0) for streamed in first_calls)
                        stoppable = stops()
        finally:
            for handle in handles:
                handle.remove()
    if ranks.active:  # in the order the accumulators were made: the same on every rank
        used = {id(sigmas[name]) for name in sigmas if name not in shares or fp is not None}
        used |= {id(acc) for capture, leaf in experts.values() for acc in capture.sigmas[leaf]}
        ranks.reduce_in_order([acc for acc in deferred if id(acc) in used])
    if fp is None:  # (paired accumulators share Σ, each has its own W-products)
        for name, owner in shares.items():
            sigmas[name] = sigmas[owner]
    for name, (capture, leaf) in experts.items():
        sigmas[name] = ExpertSigmas(capture.sigmas[leaf])  # type: ignore[assignment]
    return sigmas


def _stored_name(model: nn.Module, adapter: Adapter, index: int, block: nn.Module) -> str | None:
    """The name the model stores block ``index`` under, or None when the block is not the
    model's own submodule of that name (a view over modules stored elsewhere)."""
    prefix = adapter.block_name(index)
    if not prefix:
        return None
    try:
        return prefix if model.get_submodule(prefix) is block else None
    except AttributeError:
        return None


def _forward_batch(adapter: Adapter, block: nn.Module, acts: Activations, i: int) -> torch.Tensor:
    hidden, args, kwargs = acts.batch(i)
    with naming(lambda: f"its forward pass on calibration batch {i} (hidden states {_dims(hidden.shape)})"):
        return adapter.run_block(block, hidden, args, kwargs)


def _dims(shape: tuple[int, ...] | torch.Size) -> str:
    return "x".join(str(int(s)) for s in shape)


def _sized(name: str, weight: torch.Tensor) -> str:
    return f"{name} ({_dims(weight.shape)})"


def _sigma_size(layer: nn.Module, dtype: torch.dtype) -> str:
    """What a layer's Σ takes: ``8192x8192 float32, 256.0 MiB`` (per conv group: G of them)."""
    groups = conv_groups(layer)
    columns = layer.weight[0].numel()
    size = groups * columns * columns * torch.empty(0, dtype=dtype).element_size()
    shape = f"{groups}x{columns}x{columns}" if groups > 1 else f"{columns}x{columns}"
    return f"{shape} {str(dtype).removeprefix('torch.')}, {size / 2**20:.1f} MiB"


def _forward(adapter: Adapter, block: nn.Module, acts: Activations) -> None:
    """Run ``block`` on every batch; its outputs replace the inputs in ``acts``."""
    for i in range(len(acts)):
        acts.inputs.hidden[i] = acts.keep(_forward_batch(adapter, block, acts, i))
