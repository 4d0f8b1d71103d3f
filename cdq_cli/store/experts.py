"""Fused mixture-of-experts weights under the names checkpoints give them: one matrix per expert.

transformers 5 holds a MoE block's experts as two 3-D parameters, ``PREFIX.experts.gate_up_proj``
(E, 2I, H) and ``PREFIX.experts.down_proj`` (E, H, I); cdq solves and stores each of them as one
layer, its experts' rows stacked (:func:`~cdq_cli.store.layer.matrix_shape`). Checkpoints (what a
model's authors publish, what transformers' own ``save_pretrained`` writes back, what vLLM reads)
hold one Linear weight per expert and projection, and transformers fuses them while loading with
its conversion mapping (``transformers/conversion_mapping.py``, 5.x)::

    gate_up_proj[e] = cat(gate[e], up[e])     rows 0…I−1 the gate, I…2I−1 the up projection
    down_proj[e]    = down[e]                 (MergeModulelist(dim=0), then Concatenate(dim=1))

and ``MixtralExperts.forward`` (and its Qwen/OLMoE twins) reads them in that order:
``gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)``.

The names, per ``model_type`` (:data:`LAYOUTS`)::

    mixtral                        PREFIX = model.layers.N.block_sparse_moe
                                   experts.E.w1 (gate), experts.E.w3 (up), experts.E.w2 (down);
                                   every other ``.mlp.`` of the model is ``.block_sparse_moe.`` too
                                   (the router: block_sparse_moe.gate), which transformers renames
                                   ``.block_sparse_moe.`` -> ``.mlp.`` while loading
    qwen2_moe, qwen3_moe, olmoe    PREFIX = model.layers.N.mlp
                                   experts.E.gate_proj, experts.E.up_proj, experts.E.down_proj

This is what transformers 5's conversion mapping reads for those families (``mixtral``: sources
``.experts.*.w1.weight`` and ``.experts.*.w3.weight`` into ``.experts.gate_up_proj``,
``.experts.*.w2.weight`` into ``.experts.down_proj``; ``qwen2_moe``, to which ``qwen3_moe`` and
``olmoe`` map: ``mlp.experts.*.gate_proj.weight`` / ``up_proj`` / ``down_proj``), what its
``save_pretrained`` writes (tests/test_moe_export.py compares the names), and what vLLM's model
files load (``mixtral.py``: ``block_sparse_moe``, ``ckpt_gate_proj_name="w1"``, up ``"w3"``,
down ``"w2"``; ``qwen3_moe.py``: ``gate_proj``/``up_proj``/``down_proj`` under ``mlp``).
Fused experts of any other model type are refused by the exports (one line): their checkpoint
names are not known here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .exporting import ExportError
from .layer import QuantizedLayer

FUSED = ("gate_up_proj", "down_proj")  # transformers 5's 3-D parameters of fused experts


@dataclass(frozen=True)
class ExpertSlice:
    """One expert's projection inside a fused parameter: its checkpoint module name and its rows
    ``start:stop`` in the (E·out, in) matrix cdq stores (experts stacked, expert-major)."""

    module: str
    start: int
    stop: int


@dataclass(frozen=True)
class ExpertLayout:
    """How one family's checkpoints name its experts (see the module doc)."""

    block: str  # the MoE block's name in checkpoints ("block_sparse_moe"; "mlp")
    gate: str
    up: str
    down: str

    def describe(self) -> str:
        """The per-expert names, for messages: ``block_sparse_moe.experts.E.w1/w3/w2``."""
        return f"{self.block}.experts.E.{self.gate}/{self.up}/{self.down}"

    def checkpoint_name(self, name: str) -> str:
        """A tensor's checkpoint name from its name in the transformers 5 model (fused experts
        excepted: :meth:`split`)."""
        return name.replace(".mlp.", f".{self.block}.") if self.block != "mlp" else name

    def model_name(self, key: str) -> str:
        """The inverse of :meth:`checkpoint_name`."""
        return key.replace(f".{self.block}.", ".mlp.") if self.block != "mlp" else key

    def split(self, param: str, shape: tuple[int, ...]) -> list[ExpertSlice]:
        """The per-expert matrices of fused parameter ``param`` ((E, out, in)), in checkpoint order
        (expert by expert; gate before up)."""
        owner, _, leaf = param.rpartition(".")
        experts, rows = shape[0], shape[1]
        prefix = self.checkpoint_name(f"{owner}.")
        slices = []
        for e in range(experts):
            base = e * rows
            if leaf == "gate_up_proj":
                half = rows // 2
                slices.append(ExpertSlice(f"{prefix}{e}.{self.gate}", base, base + half))
                slices.append(ExpertSlice(f"{prefix}{e}.{self.up}", base + half, base + rows))
            else:
                slices.append(ExpertSlice(f"{prefix}{e}.{self.down}", base, base + rows))
        return slices

    def expert_pattern(self) -> re.Pattern[str]:
        """Checkpoint keys of per-expert tensors: groups ``owner`` (the model's ``….experts``),
        ``expert``, ``projection`` (a checkpoint leaf name) and ``leaf`` (``weight``,
        ``weight_packed``, ``qweight``...)."""
        leaves = "|".join(re.escape(p) for p in (self.gate, self.up, self.down))
        return re.compile(
            rf"^(?P<owner>.*\.{re.escape(self.block)}\.experts)\.(?P<expert>\d+)\.(?P<projection>{leaves})"
            r"\.(?P<leaf>[^.]+)$"
        )

    def fused_param(self, owner: str, projection: str) -> str:
        """The transformers 5 parameter a checkpoint projection goes into."""
        leaf = "down_proj" if projection == self.down else "gate_up_proj"
        return f"{self.model_name(owner + '.')[:-1]}.{leaf}"


_QWEN = ExpertLayout("mlp", "gate_proj", "up_proj", "down_proj")
LAYOUTS: dict[str, ExpertLayout] = {
    "mixtral": ExpertLayout("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": _QWEN,
    "qwen3_moe": _QWEN,
    "olmoe": _QWEN,
}


def is_fused_name(name: str) -> bool:
    """``name`` is a fused-experts parameter, ``….experts.gate_up_proj`` or ``….experts.down_proj``
    (a Linear's weight would end in ``.weight``)."""
    owner, _, leaf = name.rpartition(".")
    return leaf in FUSED and owner.rpartition(".")[2] == "experts"


def is_fused_param(name: str, shape: tuple[int, ...] | list[int]) -> bool:
    """``name`` is a fused-experts parameter of shape (E, out, in)."""
    return len(shape) == 3 and is_fused_name(name)


def layout_for(model_type: str | None, example: str) -> ExpertLayout:
    """The checkpoint layout of ``model_type``'s experts; one line naming the known ones otherwise
    (``example``: a fused layer, for the message)."""
    layout = LAYOUTS.get(str(model_type))
    if layout is None:
        raise ExportError(
            f"{example}: fused experts of model type {model_type!r} are not exported (cdq knows how "
            f"{', '.join(LAYOUTS)} checkpoints name their experts)"
        )
    return layout


def gate_up_halves(name: str, shape: tuple[int, ...]) -> None:
    """A fused gate/up parameter must split into two equal halves (gate, then up)."""
    if name.endswith(".gate_up_proj") and shape[1] % 2:
        raise ExportError(f"{name}: {shape[1]} rows do not split into a gate and an up projection")


def expert_layer(layer: QuantizedLayer, piece: ExpertSlice) -> QuantizedLayer:
    """One expert's projection of a stored fused layer, as a layer of its own (its rows of the
    packed codes, scales and zero-points: every row has its own grid, so nothing changes)."""
    if layer.outliers_idx is not None:
        raise ExportError(f"{layer.name}: full-precision outliers cannot be split per expert")
    rows = slice(piece.start, piece.stop)
    return QuantizedLayer(
        name=piece.module,
        spec=layer.spec,
        shape=(piece.stop - piece.start, layer.columns),
        qweight=layer.qweight[rows],
        scales=layer.scales[rows],
        zeros=layer.zeros[rows],
    )
