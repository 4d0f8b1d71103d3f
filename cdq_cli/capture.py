"""Σ capture: forward hooks that fold what a layer's weight multiplies into its Σ.

The driver (:mod:`cdq_cli.pipeline`) puts these hooks on a block's layers; nothing here knows
about model families. What a weight multiplies: Linear inputs, or conv patches exactly as
F.conv2d sees them.

Σ must be built from the true layer inputs. For a Conv2d those are the im2col patches of the input
*after* the padding the layer applies, and layers pad in different places: ``nn.Conv2d`` through
its ``padding`` (or ``padding_mode``, or ``padding="same"``), timm's ``Conv2dSame`` (TF "SAME",
used by the ``tf_*`` EfficientNets) by padding asymmetrically inside ``forward``. Reading only
``layer.padding`` would shift every stride-2 patch of a ``Conv2dSame`` by a pixel.

Grouped and depthwise convs (``groups > 1``) get one Σ per group
(:class:`~cdq_cli.solvers.grouped.GroupedSigmaAccumulator`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .solvers.grouped import GroupedSigmaAccumulator
from .solvers.sigma import PairedSigmaAccumulator, SigmaAccumulator

# Patch elements unfolded at once (float32: 256 MiB), so wide depthwise inputs stay bounded.
_CHUNK_ELEMENTS = 64 * 2**20

Accumulator = SigmaAccumulator | GroupedSigmaAccumulator


def conv_groups(layer: nn.Module) -> int:
    """Independent problems in ``layer``: its conv groups, 1 for anything else."""
    return int(layer.groups) if isinstance(layer, nn.Conv2d) else 1


def padded_input(layer: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(input, padding) such that ``F.conv2d(input, w, stride, padding, dilation)`` is the layer."""
    if _is_conv2d_same(layer):
        from timm.layers.padding import pad_same

        return pad_same(x, layer.kernel_size, layer.stride, layer.dilation), (0, 0)
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        # nn.Conv2d precomputes these pads (asymmetric for even kernels with padding="same").
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), (0, 0)
    return x, tuple(layer.padding)


def conv_columns(
    layer: nn.Conv2d, x: torch.Tensor, *, chunk: int = _CHUNK_ELEMENTS
) -> Iterator[torch.Tensor]:
    """The layer's im2col inputs, one (C_in·kh·kw, positions) matrix per image, rows in
    ``weight.flatten(1)`` order.

    Column-major per image is what Σ needs without copies: ``U Uᵀ`` for a dense conv, and for
    groups a free view (G, c, positions) for one batched product. A 1x1 stride-1 conv needs no
    unfold at all; others are unfolded a chunk of images at a time (bounded memory).
    """
    if x.dim() == 3:  # unbatched input
        x = x.unsqueeze(0)
    x, padding = padded_input(layer, x)
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and tuple(padding) == (0, 0):
        for image in x:
            yield image.reshape(image.shape[0], -1)
        return
    features = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    per_image = max(1, features * _positions(layer, x.shape[-2:], padding))
    step = max(1, chunk // per_image)
    for start in range(0, x.shape[0], step):
        patches = F.unfold(
            x[start : start + step],
            layer.kernel_size,
            dilation=layer.dilation,
            padding=padding,
            stride=layer.stride,
        )
        yield from patches


def layer_sigma(
    layer: nn.Module, dtype: torch.dtype = torch.float32, wrap: Callable[[Any], Any] = lambda acc: acc
) -> tuple[Accumulator, Callable[..., None]]:
    """A Σ accumulator for ``layer`` and the forward pre-hook that fills it; ``wrap`` may stand
    in front of the accumulator (a distributed run records the additions and makes them later)."""
    device = layer.weight.device
    if isinstance(layer, nn.Conv2d):
        groups = layer.groups
        columns = layer.weight[0].numel()
        if groups == 1:
            acc: Accumulator = wrap(SigmaAccumulator(columns, device=device, dtype=dtype))

            def dense(_module: nn.Module, args: tuple) -> None:
                for cols in conv_columns(layer, args[0]):
                    acc.add_linear(cols.T)  # a transposed view: Σ += U Uᵀ without a copy

            return acc, dense
        grouped = wrap(GroupedSigmaAccumulator(groups, columns, device=device, dtype=dtype))

        def per_group(_module: nn.Module, args: tuple) -> None:
            for cols in conv_columns(layer, args[0]):
                grouped.add_columns(cols.reshape(groups, columns, -1))

        return grouped, per_group
    if isinstance(layer, nn.Linear):
        linear = wrap(SigmaAccumulator(layer.in_features, device=device, dtype=dtype))
        return linear, lambda _module, args: linear.add_linear(args[0])
    raise TypeError(f"cannot collect Σ for a {type(layer).__name__}")


def layer_pair_sigma(
    layer: nn.Module, dtype: torch.dtype = torch.float32, wrap: Callable[[Any], Any] = lambda acc: acc
) -> tuple[Any, Callable[[nn.Module, tuple, torch.Tensor, torch.Tensor | None], None], bool]:
    """The full-precision target's accumulator (:class:`~cdq_cli.solvers.sigma.PairedSigmaAccumulator`)
    for ``layer``, the function that folds in one batch, and whether it takes the layer's outputs.

    ``add(module, args, fp_seen, output)``: ``args`` are the layer's own inputs (the model being
    quantized); ``fp_seen`` is what the full-precision pass kept of the layer on the same tokens.
    A bias-free Linear whose weight is in Σ's dtype takes outputs (True): the full-precision pass
    keeps its output W X̃, and the batch is added after the layer ran, from its output W X (the
    products the accumulator would otherwise compute again, bit for bit the same). Any other layer
    (a bias, another dtype, a conv) takes inputs (False): ``fp_seen`` is its full-precision input
    X̃, ``output`` is not used, and the products are computed; conv inputs become patches exactly as
    for Σ. The accumulator reads the layer's weight at each addition (W: the layer is not solved yet)."""
    device = layer.weight.device
    if isinstance(layer, nn.Conv2d):
        groups = layer.groups
        columns = layer.weight[0].numel()
        acc = wrap(
            PairedSigmaAccumulator(
                layer.weight, columns, groups=None if groups == 1 else groups, device=device, dtype=dtype
            )
        )

        def conv(_module: nn.Module, args: tuple, fp_input: torch.Tensor, _output: Any = None) -> None:
            pairs = zip(conv_columns(layer, fp_input), conv_columns(layer, args[0]), strict=True)
            for fp_cols, cols in pairs:
                if groups == 1:
                    acc.add_pair(fp_cols.T, cols.T)
                else:
                    acc.add_pair_columns(
                        fp_cols.reshape(groups, columns, -1), cols.reshape(groups, columns, -1)
                    )

        return acc, conv, False
    if isinstance(layer, nn.Linear):
        linear = wrap(PairedSigmaAccumulator(layer.weight, layer.in_features, device=device, dtype=dtype))
        if layer.bias is None and layer.weight.dtype == dtype:

            def from_outputs(_module: nn.Module, args: tuple, fp_output: torch.Tensor, output: Any) -> None:
                linear.add_outputs(fp_output, output, args[0])

            return linear, from_outputs, True
        return linear, lambda _module, args, fp_input, _output=None: linear.add_pair(fp_input, args[0]), False
    raise TypeError(f"cannot collect Σ for a {type(layer).__name__}")


class ExpertsCapture:
    """Σ of every expert's own inputs: the tokens routed to expert e for its ``gate_up_proj[e]``
    (an (H, H) Σ), and ``act(gate) * up`` of those tokens for its ``down_proj[e]`` ((I, I)).

    While active, the module runs cdq's copy of the experts computation (the loop transformers'
    eager implementation runs: for each expert hit, in order, its tokens' gate/up product, the
    activation, the down product, weighted and added back), which feeds the accumulators. The copy
    is checked against the module's own forward on the first call: a transformers release that
    computes experts differently fails loudly instead of collecting a wrong Σ.
    """

    def __init__(
        self,
        module: nn.Module,
        wanted: set[str],
        dtype: torch.dtype = torch.float32,
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        self.module = module
        self.wanted = wanted
        self.dtype = dtype
        self.wrap = wrap  # a distributed run: every expert gets its (recording) accumulator up front
        experts, rows, hidden = module.gate_up_proj.shape
        inner = module.down_proj.shape[2]
        self.experts = experts
        self.sigmas: dict[str, list[Any]] = {name: [None] * experts for name in wanted}
        self._features = {"gate_up_proj": hidden, "down_proj": inner}
        self._checked = False
        self._own = module.forward

    def want(self, name: str) -> None:
        """Collect Σ's for projection ``name`` too."""
        self.wanted.add(name)
        if name not in self.sigmas:
            device = getattr(self.module, name).device
            self.sigmas[name] = [
                self.wrap(SigmaAccumulator(self._features[name], device=device, dtype=self.dtype))
                if self.wrap is not None
                else None
                for _ in range(self.experts)
            ]

    def __enter__(self) -> ExpertsCapture:
        self.module.forward = self._forward  # an instance attribute: the class's forward is untouched
        return self

    def __exit__(self, *exc: object) -> None:
        del self.module.forward

    def tokens(self, name: str, expert: int) -> int:
        acc = self.sigmas[name][expert]
        return 0 if acc is None else acc.tokens

    def _add(self, name: str, expert: int, x: torch.Tensor) -> None:
        if name not in self.wanted:
            return
        acc = self.sigmas[name][expert]
        if acc is None:
            acc = SigmaAccumulator(self._features[name], device=x.device, dtype=self.dtype)
            self.sigmas[name][expert] = acc
        acc.add_linear(x)

    def _forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        module = self.module
        out = torch.zeros_like(hidden)
        mask = F.one_hot(top_k_index, num_classes=self.experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():
            if expert == self.experts:
                continue
            position, token = torch.where(mask[expert])
            state = hidden[token]
            self._add("gate_up_proj", expert, state)
            gate, up = F.linear(state, module.gate_up_proj[expert]).chunk(2, dim=-1)
            inner = module.act_fn(gate) * up
            self._add("down_proj", expert, inner)
            result = F.linear(inner, module.down_proj[expert]) * top_k_weights[token, position, None]
            out.index_add_(0, token, result.to(out.dtype))
        if not self._checked:
            reference = self._own(hidden, top_k_index, top_k_weights)
            scale = float(reference.abs().max()) or 1.0
            if not torch.allclose(out, reference, rtol=1e-4, atol=1e-5 * scale):
                raise ValueError(
                    f"cannot collect Σ per expert for {type(module).__name__}: its experts compute "
                    "differently from the layout cdq knows"
                )
            self._checked = True
        return out


class Scratch:
    """One buffer reused for same-dtype temporaries taken one at a time (the error E = W − Ŵ of
    each layer of a block, in turn): a fresh full-size tensor per call is mapped and faulted in
    anew, which cost 3-4x the subtraction itself here (2048 x 8192, one thread: 42 ms against 9)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count = math.prod(shape)
        buffer = self._buffer
        if buffer is None or buffer.numel() < count or buffer.dtype != dtype or buffer.device != device:
            self._buffer = buffer = None  # the old one goes first
            self._buffer = buffer = torch.empty(count, dtype=dtype, device=device)
        return buffer[:count].view(shape)


class OutputErrors:
    """What Σ would give a quantized ``layer``'s report, measured from its inputs X instead: the
    objective ``‖(W − Ŵ) X‖²`` = tr((W − Ŵ) Σ (W − Ŵ)ᵀ) and the energy ``‖W X‖²`` = tr(W Σ Wᵀ),
    summed in float64 over every call of the layer while this forward hook is registered, and
    ``tokens``, the columns of X (Linear input rows, conv output positions: Σ's count).

    ``layer`` is an ``nn.Linear`` or ``nn.Conv2d`` with Ŵ in place; ``original`` is W as it was
    before, ``approx`` Ŵ in ``dtype`` (Σ's dtype, the one the report is computed in), both shaped
    like the layer's weight. Per call, with E = W − Ŵ in ``dtype`` (the Σ path's very difference):
    E x is the layer's own functional forward with weight E and no bias
    (``torch.func.functional_call``: padding, stride, dilation, groups and timm's ``Conv2dSame``
    exactly as the layer applies them), Ŵ x is the layer's output less its bias when the layer
    computes in ``dtype`` (else its functional forward with ``approx``), and W x = Ŵ x + E x. That is
    rows·columns per token, one more product of the layer's own size, where Σ costs columns² per
    token and the two traces 2·rows·columns² per layer.
    """

    def __init__(
        self,
        layer: nn.Module,
        original: torch.Tensor,
        approx: torch.Tensor,
        dtype: torch.dtype,
        seen: Callable[[torch.Tensor], None] = lambda x: None,
        scratch: Scratch | None = None,
    ) -> None:
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"cannot measure the output error of a {type(layer).__name__}")
        self.layer = layer
        self.original = original
        self.approx = approx
        self.dtype = dtype
        self.seen = seen  # called with every input the layer is fed (the driver's group check)
        self.scratch = scratch  # where E is computed (shared by a block's meters), else a new tensor
        self.objective = 0.0
        self.energy = 0.0
        self.tokens = 0
        self._inside = False

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._inside:  # the functional forwards below run the layer itself
            return
        self.seen(args[0])
        self._inside = True
        try:
            self._add(module, args[0], output)
        finally:
            self._inside = False

    def _add(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> None:
        from torch.func import functional_call

        conv = isinstance(module, nn.Conv2d)
        x = x.to(self.dtype)
        if self.scratch is not None and self.original.dtype == self.approx.dtype == self.dtype:
            out = self.scratch.take(self.approx.shape, self.dtype, self.approx.device)
            error = torch.sub(self.original, self.approx, out=out)
        else:
            error = self.original.to(self.dtype) - self.approx
        ex = functional_call(module, {"weight": error, "bias": None}, (x,))
        del error
        if module.weight.dtype == self.dtype and output.dtype == self.dtype:
            bias = module.bias
            wx = output if bias is None else output - (bias.view(-1, 1, 1) if conv else bias)
        else:
            wx = functional_call(module, {"weight": self.approx, "bias": None}, (x,))
        self.objective += float(ex.square().sum(dtype=torch.float64))
        self.energy += float((wx + ex).square_().sum(dtype=torch.float64))
        self.tokens += output.numel() // output.shape[-3 if conv else -1]


def _positions(layer: nn.Conv2d, size: torch.Size, padding: tuple[int, int]) -> int:
    count = 1
    for dim in range(2):
        span = layer.dilation[dim] * (layer.kernel_size[dim] - 1) + 1
        count *= max(0, (size[dim] + 2 * padding[dim] - span) // layer.stride[dim] + 1)
    return count


def _is_conv2d_same(layer: nn.Module) -> bool:
    """timm's dynamic-"SAME" conv (found by class name, so timm is imported only when it is used)."""
    return any(
        cls.__name__ in ("Conv2dSame", "Conv2dSameExport") and cls.__module__.startswith("timm.")
        for cls in type(layer).__mro__
    )


@torch.no_grad()
def linear_sigmas(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    include: Callable[[str, nn.Linear], bool] = lambda name, module: True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[nn.Linear, SigmaAccumulator]]:
    """Σ of every Linear of an unmodified model from one pass over ``batches`` (input ids):
    {name: (layer, Σ accumulator)}. This is the "layer inputs from the FP model" setting of the
    per-layer benchmarks; the block-by-block driver uses :func:`layer_sigma` instead."""
    found: dict[str, tuple[nn.Linear, SigmaAccumulator]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and include(name, module):
            acc = SigmaAccumulator(module.in_features, device=module.weight.device, dtype=dtype)
            found[name] = (module, acc)
            handles.append(
                module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add_linear(args[0]))
            )
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return found
