"""Streaming accumulation of the layer Gram matrix Σ = Σ_batches X Xᵀ.

Σ is all a solver needs from the calibration data: the objective ``‖(W − Ŵ) X‖²`` equals
``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)``. Batches are folded in as they arrive, so no activations are stored.
Σ is a sum (not a mean); ``tokens`` counts the columns of X seen.

RTN needs not even Σ (its method declares ``needs_sigma`` False): its Ŵ is fixed by W alone, and
the driver measures its reported objective from X directly, in the block pass it runs anyway: one
more product of each layer's size per token, where Σ costs columns² per token, its traces
2·rows·columns² per layer, and true-sequential Σ one block forward per layer group
(:mod:`cdq_cli.pipeline`, :class:`cdq_cli.capture.OutputErrors`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Σ is accumulated a band of rows at a time, ``Σ[I] += X[:, I]ᵀ X`` for I = rows 0..255, 256..511, ...
# (one product per band; on the BLAS here the bands give the very bits of the whole product). The
# bands are the same whichever process computes them, so ranks split them (parallel.Ranks) and
# still give the single-process Σ to the bit.
BAND = 256


def bands(features: int) -> list[slice]:
    """The row bands of a ``features`` × ``features`` Σ, in order."""
    return [slice(start, min(start + BAND, features)) for start in range(0, features, BAND)]


class SigmaAccumulator:
    """Accumulates Σ for a layer with ``features`` inputs (``in_features`` or ``C·kh·kw``)."""

    def __init__(
        self,
        features: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.sigma = torch.zeros(features, features, device=device, dtype=dtype)
        self.tokens = 0

    def add_linear(self, inputs: torch.Tensor) -> None:
        """Fold in the inputs of a Linear layer: any shape ending in ``in_features``."""
        rows = inputs.reshape(-1, inputs.shape[-1])
        self._add_rows(rows)

    def add_conv2d(
        self,
        inputs: torch.Tensor,
        kernel_size: tuple[int, int],
        *,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
    ) -> None:
        """Fold in the inputs (N, C, H, W) of a groups=1 Conv2d via im2col (unfold).

        Each output pixel is one column of X with ``C·kh·kw`` features, matching the
        ``weight.flatten(1)`` layout of the convolution.
        """
        if isinstance(padding, str):
            raise ValueError("string padding is not supported for Σ accumulation; use explicit padding")
        patches = F.unfold(inputs, kernel_size, dilation=dilation, padding=padding, stride=stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        self._add_rows(rows)

    def _add_rows(self, rows: torch.Tensor) -> None:
        rows = self.rows_of(rows)
        self.add_bands(rows, range(len(self.bands())))
        self.tokens += rows.shape[0]

    def bands(self) -> list[slice]:
        """Σ's row bands, in order (:func:`bands`)."""
        return bands(self.sigma.shape[0])

    def rows_of(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (tokens × features) checked and in Σ's device and dtype."""
        if rows.dim() != 2 or rows.shape[1] != self.sigma.shape[0]:
            raise ValueError(f"inputs have {rows.shape[-1]} features, Σ expects {self.sigma.shape[0]}")
        return rows.to(self.sigma.device, self.sigma.dtype)

    def add_bands(self, rows: torch.Tensor, which: range | list[int]) -> None:
        """``Σ[I] += rows[:, I]ᵀ rows`` for the bands ``which`` (indices into :func:`bands`) of
        checked rows (:meth:`rows_of`); the token count is the caller's."""
        every = self.bands()
        for index in which:
            band = every[index]
            self.sigma[band].addmm_(rows[:, band].T, rows)


class PairedSigmaAccumulator:
    """The statistics of the full-precision target (:mod:`.target`) for a layer ``W`` (q × p) that
    sees ``X`` in the model being quantized and ``X̃`` in the full-precision model on the same
    tokens:

    - ``sigma`` = X Xᵀ (p × p), shared with the other layers fed the very same input
      (:meth:`share_sigma`: q/k/v, gate/up);
    - ``residual`` = W (X̃ − X) Xᵀ (q × p): all the target needs of the cross term X̃ Xᵀ;
    - ``energy`` = ‖W X̃‖² and ``upstream`` = ‖W (X̃ − X)‖², per output row (float64): the report's
      reference and the part of the objective no Ŵ changes.

    No p × p statistic but Σ: ``W X̃`` and ``W X`` are computed per batch (one product of the
    layer's size each), so X̃ Xᵀ and X̃ X̃ᵀ are never formed, and the difference ``W (X̃ − X)`` is
    taken before anything is summed (exactly zero where the two streams agree, so W* = W there).
    ``weight`` is the layer's weight parameter, read at each addition: it holds W (full precision)
    while the layer's statistics are collected. A grouped convolution (``groups`` given) has Σ
    (G, c, c), ``residual`` (G, q/G, c)."""

    def __init__(
        self,
        weight: torch.Tensor,
        features: int,
        *,
        groups: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        rows = weight.shape[0]
        self.weight = weight
        self.groups = groups
        shape = (features, features) if groups is None else (groups, features, features)
        self._sigma: torch.Tensor | None = torch.zeros(shape, device=device, dtype=dtype)
        self._owner: PairedSigmaAccumulator | None = None
        per = (rows, features) if groups is None else (groups, rows // groups, features)
        self.residual = torch.zeros(per, device=device, dtype=dtype)
        self.energy = torch.zeros(rows, device=device, dtype=torch.float64)
        self.upstream = torch.zeros_like(self.energy)
        self.tokens = 0

    @property
    def sigma(self) -> torch.Tensor:
        return self._sigma if self._owner is None else self._owner.sigma

    def share_sigma(self, owner: Any) -> None:
        """Σ is ``owner``'s (a layer fed the very same inputs, which accumulates it): this one stops
        accumulating its own (before its first addition) and reads the owner's."""
        if self.tokens:
            raise RuntimeError("Σ can only be shared before the first batch is added (a cdq bug)")
        self._owner, self._sigma = owner, None

    def state_tensors(self) -> list[torch.Tensor]:
        """Every accumulated tensor (what a distributed run relays; a shared Σ is its owner's)."""
        own = [] if self._sigma is None else [self._sigma]
        return [*own, self.residual, self.energy, self.upstream]

    def _matrix(self) -> torch.Tensor:
        weight = self.weight.detach()
        return weight.reshape(weight.shape[0], -1).to(self.residual.device, self.residual.dtype)

    def add_pair(self, fp_inputs: torch.Tensor, inputs: torch.Tensor) -> None:
        """Fold in one batch of a Linear's inputs from both models (any shape ending in features)."""
        dtype, device = self.residual.dtype, self.residual.device
        rows = inputs.reshape(-1, inputs.shape[-1]).to(device, dtype)
        fp_rows = fp_inputs.reshape(-1, fp_inputs.shape[-1]).to(device, dtype)
        if rows.shape != fp_rows.shape or rows.shape[1] != self.residual.shape[-1]:
            raise ValueError(
                f"paired inputs must both have {self.residual.shape[-1]} features and the same tokens, "
                f"got {tuple(fp_rows.shape)} and {tuple(rows.shape)}"
            )
        weight = self._matrix()
        fp_out = fp_rows @ weight.T  # (tokens, q): W X̃
        self._fold(rows, fp_out, fp_out - rows @ weight.T)

    def add_outputs(self, fp_outputs: torch.Tensor, outputs: torch.Tensor, inputs: torch.Tensor) -> None:
        """:meth:`add_pair` from the products the layer itself computed: its outputs ``W X̃`` in the
        full-precision model and ``W X`` here, with its inputs X (any shapes ending in features).
        For a bias-free Linear whose weight is in Σ's dtype they are the very products
        :meth:`add_pair` would compute (``F.linear`` is the same matrix product), so the result is
        the same bit for bit, at a third of the cost (the block's forward made two of the three)."""
        dtype, device = self.residual.dtype, self.residual.device
        rows = inputs.reshape(-1, inputs.shape[-1]).to(device, dtype)
        fp_out = fp_outputs.reshape(-1, fp_outputs.shape[-1]).to(device, dtype)
        out = outputs.reshape(-1, outputs.shape[-1]).to(device, dtype)
        q, p = self.residual.shape[-2:]
        if fp_out.shape != out.shape or out.shape != (rows.shape[0], q) or rows.shape[1] != p:
            raise ValueError(
                f"paired outputs must both be (tokens, {q}) for inputs (tokens, {p}), "
                f"got {tuple(fp_out.shape)}, {tuple(out.shape)} and {tuple(rows.shape)}"
            )
        self._fold(rows, fp_out, fp_out - out)

    def _fold(self, rows: torch.Tensor, fp_out: torch.Tensor, gap: torch.Tensor) -> None:
        """Add one batch: its inputs X (tokens, p), ``W X̃`` and ``W (X̃ − X)`` (tokens, q)."""
        if self._sigma is not None:
            self._sigma.addmm_(rows.T, rows)
        self.residual.addmm_(gap.T, rows)
        self.energy += fp_out.square().sum(0, dtype=torch.float64)
        self.upstream += gap.square().sum(0, dtype=torch.float64)
        self.tokens += rows.shape[0]

    def add_pair_columns(self, fp_columns: torch.Tensor, columns: torch.Tensor) -> None:
        """Fold in grouped inputs, (groups, features, M) from each model."""
        grouped = tuple(self.residual.shape[::2])  # (G, c)
        if self.groups is None or columns.shape != fp_columns.shape or tuple(columns.shape[:2]) != grouped:
            raise ValueError(
                f"grouped paired inputs must both be {grouped} + (M,), "
                f"got {tuple(fp_columns.shape)} and {tuple(columns.shape)}"
            )
        dtype, device = self.residual.dtype, self.residual.device
        cols = columns.to(device, dtype)
        fp_cols = fp_columns.to(device, dtype)
        weight = self._matrix().reshape(self.residual.shape)  # (G, q/G, c)
        fp_out = torch.bmm(weight, fp_cols)  # (G, q/G, M)
        gap = fp_out - torch.bmm(weight, cols)
        if self._sigma is not None:
            self._sigma.baddbmm_(cols, cols.transpose(1, 2))
        self.residual.baddbmm_(gap, cols.transpose(1, 2))
        self.energy += fp_out.square().sum(-1, dtype=torch.float64).reshape(-1)
        self.upstream += gap.square().sum(-1, dtype=torch.float64).reshape(-1)
        self.tokens += cols.shape[2]
