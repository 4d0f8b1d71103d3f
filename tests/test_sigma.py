"""Σ accumulation: streaming equals X Xᵀ at once, and tr(E Σ Eᵀ) is the true output error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdq_cli.capture import linear_sigmas
from cdq_cli.solvers import SigmaAccumulator
from cdq_cli.solvers.result import objective


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_linear_streaming_equals_one_shot():
    """Batches of different shapes folded in one by one give exactly X Xᵀ and count every token."""
    gen = _gen(0)
    batches = [
        torch.randn(3, 7, 10, generator=gen, dtype=torch.float64),
        torch.randn(5, 10, generator=gen, dtype=torch.float64),
        torch.randn(2, 1, 4, 10, generator=gen, dtype=torch.float64),
    ]
    acc = SigmaAccumulator(10, dtype=torch.float64)
    for batch in batches:
        acc.add_linear(batch)
    x = torch.cat([b.reshape(-1, 10) for b in batches]).T  # (features, tokens)
    torch.testing.assert_close(acc.sigma, x @ x.T, rtol=1e-13, atol=1e-12)
    assert acc.tokens == 21 + 5 + 8
    assert torch.equal(acc.sigma, acc.sigma.T)


def test_linear_objective_is_output_error():
    """tr((W−Ŵ) Σ (W−Ŵ)ᵀ) equals ‖(W−Ŵ) X‖² summed over all streamed batches."""
    gen = _gen(1)
    w = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(6, 10, generator=gen, dtype=torch.float64)
    acc = SigmaAccumulator(10, dtype=torch.float64)
    direct = 0.0
    for _ in range(3):
        batch = torch.randn(4, 9, 10, generator=gen, dtype=torch.float64)
        acc.add_linear(batch)
        direct += float((F.linear(batch, w) - F.linear(batch, w_hat)).pow(2).sum())
    assert objective(w, w_hat, acc.sigma) == pytest.approx(direct, rel=1e-12)


def test_float32_accumulation_close_to_float64():
    """The default float32 Σ is the float64 Σ to single-precision accuracy."""
    gen = _gen(2)
    batches = [torch.randn(64, 16, generator=gen) for _ in range(8)]
    lo, hi = SigmaAccumulator(16), SigmaAccumulator(16, dtype=torch.float64)
    for b in batches:
        lo.add_linear(b)
        hi.add_linear(b)
    assert lo.sigma.dtype == torch.float32
    torch.testing.assert_close(lo.sigma.double(), hi.sigma, rtol=1e-5, atol=1e-3)


CONV_CASES = [
    # kernel, stride, padding, dilation
    ((3, 3), (1, 1), (0, 0), (1, 1)),
    ((3, 2), (2, 1), (1, 2), (1, 1)),
    ((3, 3), (2, 3), (2, 1), (2, 1)),
    ((1, 1), (2, 2), (0, 0), (1, 1)),
    ((2, 3), (1, 2), (0, 1), (2, 2)),
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), CONV_CASES)
def test_conv2d_objective_is_output_error(kernel, stride, padding, dilation):
    """With W flattened to (out, C·kh·kw), tr(E Σ Eᵀ) equals ‖conv(x, W) − conv(x, Ŵ)‖² exactly."""
    gen = _gen(sum(kernel + stride + padding + dilation))
    c_in, c_out = 3, 5
    w = torch.randn(c_out, c_in, *kernel, generator=gen, dtype=torch.float64)
    w_hat = w + 0.2 * torch.randn(w.shape, generator=gen, dtype=torch.float64)
    acc = SigmaAccumulator(c_in * kernel[0] * kernel[1], dtype=torch.float64)
    direct = 0.0
    pixels = 0
    for size in ((2, 11, 9), (1, 8, 13)):
        n, h, width = size
        x = torch.randn(n, c_in, h, width, generator=gen, dtype=torch.float64)
        acc.add_conv2d(x, kernel, stride=stride, padding=padding, dilation=dilation)
        conv = dict(stride=stride, padding=padding, dilation=dilation)
        diff = F.conv2d(x, w, **conv) - F.conv2d(x, w_hat, **conv)
        direct += float(diff.pow(2).sum())
        pixels += diff.shape[0] * diff.shape[2] * diff.shape[3]
    assert acc.tokens == pixels
    value = objective(w.flatten(1), w_hat.flatten(1), acc.sigma)
    assert value == pytest.approx(direct, rel=1e-11)


def test_feature_mismatch_and_string_padding_rejected():
    acc = SigmaAccumulator(8)
    with pytest.raises(ValueError, match="features"):
        acc.add_linear(torch.randn(4, 7))
    with pytest.raises(ValueError, match="padding"):
        acc.add_conv2d(torch.randn(1, 2, 5, 5), (2, 2), padding="same")
    with pytest.raises(ValueError, match="features"):
        acc.add_conv2d(torch.randn(1, 3, 5, 5), (2, 2))  # 3·2·2 = 12 ≠ 8


def test_linear_sigmas_captures_each_layer_inputs():
    """The capture hooks give each Linear the Σ of exactly the inputs it saw, and remove themselves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    gen = _gen(3)
    batches = [torch.randn(7, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    found = linear_sigmas(model, batches, include=lambda name, _m: True, dtype=torch.float64)
    assert set(found) == {"0", "2"}
    first = torch.cat(batches)
    second = torch.relu(model[0](first)).detach()
    for name, x in (("0", first), ("2", second)):
        layer, acc = found[name]
        assert layer is model[int(name)]
        torch.testing.assert_close(acc.sigma, x.T @ x, rtol=1e-12, atol=1e-12)
        assert acc.tokens == 21
    model(first)  # hooks removed: running again changes nothing
    assert found["0"][1].tokens == 21
    only = linear_sigmas(model, batches[:1], include=lambda name, _m: name == "2", dtype=torch.float64)
    assert set(only) == {"2"}
