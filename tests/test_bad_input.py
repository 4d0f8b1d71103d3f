"""Bad input fails loudly with a ValueError that names the problem, for every method."""

from __future__ import annotations

import pytest
import torch

from cdq_cli.solvers import METHODS, solve

METHODS = list(METHODS)


@pytest.fixture
def layer(problem):
    p = problem(0, 6, 16)
    return p.weight, p.sigma


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight(layer, method, bad):
    weight, sigma = layer
    weight = weight.clone()
    weight[2, 3] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        solve(method, weight, sigma, bits=4)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_sigma(layer, method):
    weight, sigma = layer
    sigma = sigma.clone()
    sigma[1, 1] = float("nan")
    with pytest.raises(ValueError, match="sigma has NaN/Inf"):
        solve(method, weight, sigma, bits=4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16, 32])
def test_unsupported_bits(layer, method, bits):
    with pytest.raises(ValueError, match=r"bit width .*\(2, 3, 4, 8\)"):
        solve(method, *layer, bits=bits)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group_size", [3, 5, 32])
def test_group_size_not_dividing_width(layer, method, group_size):
    with pytest.raises(ValueError, match=f"group size {group_size} does not divide .* 16"):
        solve(method, *layer, bits=4, group_size=group_size)


@pytest.mark.parametrize("method", METHODS)
def test_nonpositive_group_size_and_per_layer_groups(layer, method):
    with pytest.raises(ValueError, match="group size must be positive"):
        solve(method, *layer, bits=4, group_size=0)
    with pytest.raises(ValueError, match="per-layer"):
        solve(method, *layer, bits=4, group_size=8, per_layer=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(15, 15), (16, 15), (16,), (6, 6), (1, 16, 16)])
def test_sigma_of_wrong_shape(layer, method, shape):
    weight, _ = layer
    with pytest.raises(ValueError, match=r"sigma must be \(16, 16\)"):
        solve(method, weight, torch.ones(shape, dtype=weight.dtype), bits=4)


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_sigma(layer, method):
    weight, sigma = layer
    with pytest.raises(ValueError, match="all zero"):
        solve(method, weight, torch.zeros_like(sigma), bits=4)


@pytest.mark.parametrize("method", ["int4", "QuantEase", "", "awq"])
def test_unknown_method(layer, method):
    with pytest.raises(ValueError, match="unknown method"):
        solve(method, *layer, bits=4)


@pytest.mark.parametrize(
    ("method", "option"),
    [
        ("rtn", "damping"),
        ("gptq", "sweeps"),
        ("quantease", "outlier_fraction"),
        ("quantease", "preset_name"),
        ("comq", "relaxed"),
        ("quantease-outlier", "scalar"),
    ],
)
def test_unknown_option(layer, method, option):
    """A misspelt or foreign option is an error naming the option, not silently ignored."""
    with pytest.raises(ValueError, match=f"unknown option.*{option}"):
        solve(method, *layer, bits=4, **{option: 1})


@pytest.mark.parametrize(
    ("method", "options", "keyword"),
    [
        ("quantease", {"preset": "slow"}, "preset"),
        ("quantease", {"order": "random"}, "order"),
        ("quantease", {"start": "zeros"}, "start point"),
        ("quantease", {"sweeps": -1}, "sweeps"),
        ("comq", {"scalar": 0.0}, "scalar"),
        ("comq", {"iterations": 0}, "iteration"),
        ("comq", {"order": "backwards"}, "order"),
        ("quantease-outlier", {"outlier_fraction": 1.5}, "outlier fraction"),
        ("quantease-outlier", {"inner": "gptq"}, "inner"),
    ],
)
def test_bad_option_values(layer, method, options, keyword):
    with pytest.raises(ValueError, match=keyword):
        solve(method, *layer, bits=4, **options)


def test_weight_must_be_float_matrix(layer):
    weight, sigma = layer
    with pytest.raises(ValueError, match="floating-point"):
        solve("rtn", weight.to(torch.int32), sigma, bits=4)
    with pytest.raises(ValueError, match="2-D"):
        solve("rtn", weight[0], sigma, bits=4)


def test_gptq_singular_sigma_without_damping(problem):
    """A rank-deficient Σ with damping 0 cannot be factored: say so and suggest damping."""
    p = problem(1, 4, 16, samples=8)
    with pytest.raises(ValueError, match="damping"):
        solve("gptq", p.weight, p.sigma, bits=4, damping=0.0)


@pytest.mark.parametrize("method", ["rtn", "gptq", "quantease", "comq", "cdq", "quantease-outlier"])
def test_empty_weight_is_rejected(method):
    with pytest.raises(ValueError, match="empty"):
        solve(method, torch.zeros(0, 8), torch.eye(8), bits=4)
