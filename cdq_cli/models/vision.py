"""Vision adapters: a timm image classifier as a chain of units the pipeline quantizes one by one.

A family is declared as DATA (:class:`VisionFamily`): glob patterns for its blocks (``*`` = every
child, in order; matches are put in the model's registration order, which is forward order for
timm models, so Swin's ``layers.*.downsample`` and ``layers.*.blocks.*`` interleave stage by
stage), the modules ``forward_features`` runs after the last block (``tail``), and which layers of
a block see the same input (one Σ pass for them). One :class:`VisionAdapter` runs every family.

The chain is ``[stem] + blocks + [tail] + [head]``:

* stem (only with ``quantize_embed``): everything before block 0, run by the model's own
  ``forward_features`` up to block 0, so the patch embedding / stem conv gets a Σ of real images;
* blocks: the family's units, run as ``unit(hidden)``;
* tail: e.g. ``norm`` (ViT, Swin) or ``conv_head`` + ``bn2`` (EfficientNet, via the generic
  fallback), a unit when present;
* head (only with ``quantize_head``): the model's ``forward_head`` (pooling + classifier).

Without the stem/head units their layers stay in full precision (COMQ's setting). Before any
work the chain is run once on the first calibration batch and compared with ``model(batch)``: a
layout that does not reproduce the model fails with one line instead of quantizing wrongly.

BatchNorm layers are kept as they are (not folded into the convs before them).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..placement import move
from .base import (
    QUANTIZABLE,
    AdapterError,
    BlockInputs,
    StopForward,
    capture_first_inputs,
    join_name,
    module_ids,
    outside,
)


@dataclass(frozen=True)
class VisionFamily:
    """Layout of a timm classifier family, as names only.

    ``classes``: model class names (exact match wins over a base class). ``archs``: timm
    architecture-name prefixes (``deit``), checked first. ``blocks``: glob paths of the units.
    ``tail``: modules run after the last block inside ``forward_features``. ``groups``: layers of
    a unit that see the same input, in order; other quantizable layers of a unit form their own
    one-layer groups in registration order. Names absent from a unit are skipped (ResNet blocks
    without a ``downsample``).
    """

    name: str
    blocks: tuple[str, ...]
    tail: tuple[str, ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    classes: tuple[str, ...] = ()
    archs: tuple[str, ...] = ()


_TRANSFORMER_GROUPS = (("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",))

VIT = VisionFamily(
    name="vit",
    classes=("VisionTransformer",),
    blocks=("blocks.*",),
    tail=("norm",),
    groups=_TRANSFORMER_GROUPS,
)
DEIT = VisionFamily(
    name="deit",
    classes=("VisionTransformerDistilled",),
    archs=("deit",),
    blocks=("blocks.*",),
    tail=("norm",),
    groups=_TRANSFORMER_GROUPS,
)
SWIN = VisionFamily(
    name="swin",
    classes=("SwinTransformer",),
    blocks=("layers.*.downsample", "layers.*.blocks.*"),  # PatchMerging (its ``reduction``) + blocks
    tail=("norm",),
    groups=_TRANSFORMER_GROUPS,
)
RESNET = VisionFamily(
    name="resnet",
    classes=("ResNet",),
    blocks=("layer1.*", "layer2.*", "layer3.*", "layer4.*"),
    groups=(("conv1", "downsample.0"), ("conv2",), ("conv3",)),
)

VISION_FAMILIES: dict[str, VisionFamily] = {}

# Children that belong to ``forward_head`` (never to the generic fallback's tail).
_HEAD_NAMES = ("global_pool", "head", "fc", "classifier", "fc_norm", "head_drop", "head_dist", "pre_logits")
_BODY_NAMES = ("blocks", "stages", "layers", "features")


def register_vision(family: VisionFamily) -> VisionFamily:
    """Make ``family`` detectable by :func:`vision_adapter_for` (later registrations win)."""
    VISION_FAMILIES[family.name] = family
    return family


for _family in (VIT, DEIT, SWIN, RESNET):
    register_vision(_family)


def vision_family(model: nn.Module) -> VisionFamily:
    """The declared family of ``model`` (architecture prefix, then class), else the generic fallback."""
    arch = str(getattr(model, "pretrained_cfg", {}).get("architecture", "") or "")
    families = list(reversed(VISION_FAMILIES.values()))
    for family in families:
        if any(arch.startswith(prefix) for prefix in family.archs):
            return family
    mro = [cls.__name__ for cls in type(model).__mro__]
    for name in mro:
        for family in families:
            if name in family.classes:
                return family
    return generic_family(model)


def generic_family(model: nn.Module) -> VisionFamily:
    """Fallback: the first of ``blocks``/``stages``/``layers``/``features`` (nested Sequentials
    flattened), and as tail the children between it and the head (e.g. EfficientNet's conv_head)."""
    children = list(model.named_children())
    for body in _BODY_NAMES:
        container = getattr(model, body, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container) > 0:
            break
    else:
        raise AdapterError(
            f"unsupported vision model {type(model).__name__}: no blocks/stages/layers/features list found"
        )
    pattern = body + ".*"
    while (found := _glob(model, pattern)) and all(
        isinstance(m, (nn.Sequential, nn.ModuleList)) for m in found
    ):
        pattern += ".*"
    names = [name for name, _ in children]
    tail = []
    for name in names[names.index(body) + 1 :]:
        if name in _HEAD_NAMES or name.startswith("head"):
            break
        tail.append(name)
    return VisionFamily(name="generic", blocks=(pattern,), tail=tuple(tail))


@dataclass
class Unit:
    """One link of the chain: its name prefix, the callable module, and its layer groups."""

    name: str
    module: nn.Module
    groups: list[list[str]]


class _View(nn.Module):
    """A unit made of parts of the model it does not own: layer names resolve against the model.

    ``to`` moves only ``owned`` (modules or tensors), so a stem/head unit visits the device
    without dragging the blocks along.
    """

    def __init__(self, model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], owned: list) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: the model is not this unit's
        object.__setattr__(self, "_run", run)
        object.__setattr__(self, "_owned", owned)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._run(hidden)

    def get_submodule(self, target: str) -> nn.Module:
        return self._model.get_submodule(target)

    def to(self, device: torch.device | str) -> _View:  # type: ignore[override]
        for item in self._owned:
            move(item, torch.device(device))
        return self


class VisionAdapter:
    """The pipeline's Adapter for a timm classifier (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        family: VisionFamily,
        *,
        quantize_embed: bool = False,
        quantize_head: bool = False,
    ) -> None:
        self.family = family
        self.name = family.name
        self.quantize_embed = quantize_embed
        self.quantize_head = quantize_head
        self._model = model
        self.units = self._build(model)

    # -- layout ---------------------------------------------------------------------------------

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        self._check(model)
        return [unit.module for unit in self.units]

    def block_name(self, index: int) -> str:
        return self.units[index].name

    def layer_groups(self, block: nn.Module) -> list[list[str]]:
        for unit in self.units:
            if unit.module is block:
                return [list(group) for group in unit.groups]
        raise AdapterError("block is not part of this vision adapter's chain")

    def layers(self, part: str) -> list[str]:
        """Full names of the quantizable layers of ``part``: ``embed``, ``body`` or ``head``."""
        return list(self._parts[part])

    # -- running --------------------------------------------------------------------------------

    def preamble(self, model: nn.Module) -> list[nn.Module | torch.Tensor]:
        """Everything outside the chain (stem, head); empty when the stem is a unit of the chain."""
        self._check(model)
        return [] if self.quantize_embed else list(self._outside)

    @torch.no_grad()
    def capture_block_inputs(
        self,
        model: nn.Module,
        batches: Iterable[torch.Tensor],
        device: torch.device,
        keep: Callable[[torch.Tensor], torch.Tensor] = lambda hidden: hidden,
    ) -> BlockInputs:
        """Images themselves (with a stem unit) or what the model feeds block 0, per batch."""
        self._check(model)
        batches = list(batches)
        if self.quantize_embed:
            return BlockInputs(
                [keep(b.to(device)) for b in batches], [()] * len(batches), [{}] * len(batches)
            )
        return capture_first_inputs(
            self.units[0].module, batches, model.forward_features, device=device, name=self.name, keep=keep
        )

    def run_block(self, block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        return block(hidden, *args, **kwargs)

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        return [item for item in self._outside if isinstance(item, nn.Module)]  # forward_head lives there

    @torch.no_grad()
    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last unit's output."""
        return hidden if self.quantize_head else model.forward_head(hidden)

    @torch.no_grad()
    def verify(self, model: nn.Module, batch: torch.Tensor) -> None:
        """Check that the chain reproduces ``model(batch)``: a wrong layout fails here, loudly."""
        home = next(model.parameters()).device
        batch = batch.to(home)
        reference = model(batch)
        hidden = batch if self.quantize_embed else _stem(model, self.units[0].module, [])(batch)
        for unit in self.units:
            hidden = unit.module(hidden)
        out = self.head(model, hidden)
        scale = float(reference.abs().max()) or 1.0
        if out.shape != reference.shape or not torch.allclose(out, reference, rtol=1e-4, atol=1e-4 * scale):
            raise AdapterError(
                f"cannot run {type(model).__name__} block by block with the {self.name!r} layout "
                f"(the chained blocks do not reproduce the model's output); supported families: "
                f"{', '.join(VISION_FAMILIES)}"
            )

    # -- building the chain ---------------------------------------------------------------------

    def _build(self, model: nn.Module) -> list[Unit]:
        body = _match(model, self.family.blocks)
        if not body:
            raise AdapterError(f"{type(model).__name__} has no blocks at {', '.join(self.family.blocks)}")
        tail = [name for name in self.family.tail if _get(model, name) is not None]
        chain_ids = module_ids(*(module for _, module in body), *(_get(model, name) for name in tail))
        self._outside = outside(model, chain_ids)
        order = {name: index for index, (name, _) in enumerate(model.named_modules())}
        first = min(order[name] for name, _ in body)
        embed, head = [], []
        for name, module in model.named_modules():
            if isinstance(module, QUANTIZABLE) and id(module) not in chain_ids:
                (embed if order[name] < first else head).append(name)
        units = [Unit(name, module, self._groups(module)) for name, module in body]
        if tail:
            layers = [
                join_name(part, sub) if sub else part
                for part in tail
                for sub, module in _get(model, part).named_modules()
                if isinstance(module, QUANTIZABLE)
            ]
            run = _sequence([_get(model, name) for name in tail])
            units.append(
                Unit("", _View(model, run, [_get(model, name) for name in tail]), [[n] for n in layers])
            )
        body_layers = [join_name(u.name, n) for u in units for g in u.groups for n in g]
        self._parts = {"embed": embed, "body": body_layers, "head": head}
        if self.quantize_embed:
            units.insert(0, Unit("", _stem(model, units[0].module, self._outside), [[n] for n in embed]))
        if self.quantize_head:
            units.append(Unit("", _View(model, model.forward_head, self._outside), [[n] for n in head]))
        return units

    def _groups(self, unit: nn.Module) -> list[list[str]]:
        present = [name for name, module in unit.named_modules() if isinstance(module, QUANTIZABLE)]
        groups = [[n for n in group if n in present] for group in self.family.groups]
        groups = [group for group in groups if group]
        declared = {n for group in groups for n in group}
        return groups + [[n] for n in present if n not in declared]

    def _check(self, model: nn.Module) -> None:
        if model is not self._model:
            raise AdapterError("this vision adapter was built for another model")


def _stem(model: nn.Module, first: nn.Module, owned: list) -> _View:
    """A unit running the model's own ``forward_features`` up to (not into) block ``first``."""

    def run(images: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def hook(_module: nn.Module, args: tuple) -> None:
            seen.append(args[0])
            raise StopForward

        handle = first.register_forward_pre_hook(hook)
        try:
            model.forward_features(images)
        except StopForward:
            pass
        finally:
            handle.remove()
        if not seen:
            raise AdapterError(f"the {type(model).__name__} forward never reached its first block")
        return seen[0]

    return _View(model, run, owned)


def vision_adapter_for(
    model: nn.Module, *, quantize_embed: bool = False, quantize_head: bool = False
) -> VisionAdapter:
    """The adapter of a timm classifier: its declared family, else the generic fallback."""
    return VisionAdapter(
        model, vision_family(model), quantize_embed=quantize_embed, quantize_head=quantize_head
    )


def _sequence(modules: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(hidden: torch.Tensor) -> torch.Tensor:
        for module in modules:
            hidden = module(hidden)
        return hidden

    return run


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _glob(model: nn.Module, pattern: str) -> list[nn.Module]:
    return [module for _, module in _match(model, (pattern,))]


def _match(model: nn.Module, patterns: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """Modules whose names match any pattern (``*`` = one name segment), in registration order;
    identity modules (Swin stage 0 has no downsampling) are skipped."""
    found = []
    for name, module in model.named_modules():
        if not name or isinstance(module, nn.Identity):
            continue
        parts = name.split(".")
        for pattern in patterns:
            want = pattern.split(".")
            if len(want) == len(parts) and all(
                fnmatch.fnmatchcase(p, w) for p, w in zip(parts, want, strict=True)
            ):
                found.append((name, module))
                break
    return found
