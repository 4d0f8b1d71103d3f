"""GGUF block types as solver grids: exact dequantization against gguf-py's reader, llama.cpp's own
choice of scales (against gguf-py's bit-exact reference quantizers), the packed block bytes, and
every solver on every type's exact grid.

The reference reader is gguf-py's ``gguf.quants.dequantize`` (what transformers uses to load a GGUF
file, and written from ggml's ``dequantize_row_*``): cdq's grid of a type must give the same float32
values, bit for bit, for any codes. llama.cpp's own quantizer (ggml via ctypes) is compared in
tests/test_gguf_llama_cpp.py (``make test-gguf``).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from cdq_cli.solvers import GridSpec, objective, solve
from cdq_cli.solvers import gguf as G
from cdq_cli.solvers.cd import cd_sweeps
from cdq_cli.solvers.gguf_types import BLOCK_TYPES, fitting_type
from cdq_cli.solvers.llama_fit import fit_parts
from cdq_cli.store.gguf_blocks import pack, unpack

TYPES = list(BLOCK_TYPES)
METHODS = ("rtn", "gptq", "quantease", "comq", "cdq")


def awkward_weights(rows: int = 12, columns: int = 512, seed: int = 0) -> torch.Tensor:
    """Random weights with the blocks that break naive code: all zero, constant, one spike, all
    negative, all positive, tiny (fp16 subnormal scales)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=gen) * 0.05
    w[0, :256] = 0.0
    w[1, :64] = 0.013
    w[2, 5] = 3.0
    w[3, 32:96] = -w[3, 32:96].abs()
    w[4, 256:] = w[4, 256:].abs()
    w[5, :128] *= 1e-6
    return w


def reference_values(name: str, raw: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("importance", [False, True])
def test_dequantize_equals_gguf_reader_bit_for_bit(name: str, importance: bool) -> None:
    """For fitted scales and for ANY codes (random over the whole range), cdq's grid of the type
    gives exactly gguf-py's values for the packed bytes."""
    w = awkward_weights()
    imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.01 if importance else None
    spec = GridSpec.of_type(name)
    for grid in (G.grid_of(spec, fit_parts(w, name, imp)), G.fit(w, spec, imp)):
        kind = BLOCK_TYPES[name]
        random_codes = torch.randint(0, kind.maxq + 1, w.shape, generator=torch.Generator().manual_seed(2))
        for codes in (G.codes_of(w, grid), random_codes.to(torch.uint8)):
            raw = pack(name, codes, grid.parts)
            assert raw.shape == (w.shape[0], w.shape[1] // kind.block * kind.type_size)
            assert torch.equal(grid.dequantize(codes), reference_values(name, raw, tuple(w.shape)))
            back_codes, back_parts = unpack(name, raw, *w.shape)
            assert torch.equal(back_codes, codes.to(torch.uint8))
            assert all(torch.equal(back_parts[k].to(v.dtype), v) for k, v in grid.parts.items())


@pytest.mark.parametrize("name", TYPES)
def test_real_weights_round_trip_exactly(name: str, stories_layers) -> None:
    """Real stories260K weights (tiled to 256-wide rows for the 256-blocks): llama.cpp's scales,
    nearest codes, and the reader's values equal cdq's."""
    flat = torch.cat([layer.weight.reshape(-1) for layer in stories_layers]).float()
    w = flat[: flat.numel() // 256 * 256].reshape(-1, 256)[:256]
    grid = G.fit(w, GridSpec.of_type(name), w.abs().mean(dim=0))
    codes = grid.quantize(w)
    assert torch.equal(
        grid.dequantize(codes), reference_values(name, pack(name, codes, grid.parts), tuple(w.shape))
    )


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_reference_scales_equal_gguf_py_quantizer(name: str, stories_layers) -> None:
    """gguf-py's quantizers of the 32-block types are bit-exact ports of ggml's reference path:
    cdq's llama.cpp fit stores the same d (and m) bytes, on random and real weights."""
    kind = BLOCK_TYPES[name]
    real = (
        torch.cat([layer.weight.reshape(-1) for layer in stories_layers]).float()[: 64 * 256].reshape(64, 256)
    )
    for w in (awkward_weights(columns=256), real):
        raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[name])
        _, theirs = unpack(name, raw, *w.shape)
        ours = fit_parts(w, name)
        assert set(ours) == set(theirs)
        for key in ours:
            assert torch.equal(ours[key], theirs[key].to(ours[key].dtype)), (name, key)
        assert kind.bytes_for(*w.shape) == raw.size


@pytest.mark.parametrize("name", TYPES)
def test_usable_start_grid_rounds_no_worse_than_llama(name: str) -> None:
    """The solver's start grid (zero scales made the smallest non-zero) has no zero scale, and
    nearest rounding on it is never worse, in every entry, than on llama.cpp's own grid."""
    w = awkward_weights()
    spec = GridSpec.of_type(name)
    raw = G.grid_of(spec, fit_parts(w, name))
    start = G.fit(w, spec)
    assert bool((start.scale != 0).all())
    theirs = raw.dequantize(G.codes_of(w, raw))
    ours = start.dequantize(start.quantize(w))
    assert bool(((ours - w).abs() <= (theirs - w).abs()).all())


def test_grid_spec_checks_widths_and_names() -> None:
    spec = GridSpec.of_type("q4_k")
    assert (spec.bits, spec.group_size, spec.sym, spec.block_type) == (4, 32, False, "Q4_K")
    assert spec.n_groups(512) == 16
    with pytest.raises(
        ValueError, match="Q4_K needs an input width that is a multiple of 256; this layer's is 576"
    ):
        spec.n_groups(576)
    with pytest.raises(ValueError, match="unknown GGUF type 'Q7_K'"):
        GridSpec.of_type("Q7_K")
    with pytest.raises(ValueError, match="a Q6_K grid is 6-bit in groups of 16"):
        GridSpec(6, 32, True, False, "Q6_K")
    assert GridSpec.of_type("Q6_K").maxq == 63 and GridSpec.of_type("Q3_K").sym
    assert fitting_type("Q4_K", 576) == "Q5_0" and fitting_type("Q6_K", 64) == "Q8_0"
    assert fitting_type("Q2_K", 172) is None and fitting_type("Q4_0", 512) == "Q4_0"


def _problem(problem, name: str):
    columns = 512 if BLOCK_TYPES[name].k_quant else 128
    p = problem(7, 24, columns, dtype=torch.float32)
    return p.weight * 0.05, p.sigma


@pytest.mark.parametrize("name", TYPES)
def test_every_solver_works_on_the_exact_grid(name: str, problem) -> None:
    """Each method's result is on the type's grid exactly (the file's values ARE its weights),
    its stored scales fit their widths, its objective is the one reported, CD methods do not end
    above the GPTQ start cdq takes, and every method beats round-to-nearest on its own grid."""
    w, sigma = _problem(problem, name)
    kind = BLOCK_TYPES[name]
    results = {}
    for method in METHODS:
        options = {"preset": "fast"} if method == "quantease" else {}
        result = solve(method, w, sigma, GridSpec.of_type(name), **options)
        raw = pack(name, result.codes, result.grid.parts)
        assert torch.equal(result.weight, reference_values(name, raw, tuple(w.shape))), method
        assert result.objective == pytest.approx(objective(w, result.weight, sigma), rel=1e-4)
        if kind.k_quant:
            low = -(2 ** (kind.scale_bits - 1)) if kind.signed_scales else 0
            high = 2 ** (kind.scale_bits - 1) - 1 if kind.signed_scales else 2**kind.scale_bits - 1
            for key in ("scales", "mins"):
                if key in result.grid.parts:
                    part = result.grid.parts[key]
                    assert int(part.min()) >= low and int(part.max()) <= high, (method, key)
        assert result.grid.parts["d"].dtype == torch.float16
        results[method] = result.objective
    assert results["cdq"] <= results["gptq"] * (1 + 1e-6)
    for method in ("gptq", "quantease", "comq", "cdq"):
        assert results[method] < results["rtn"], method


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_offset_grids_sweep_as_shifted_problems(backend: str, problem) -> None:
    """A grid with an offset M is swept as W − M on the offset-free grid: the same codes and, on
    the grid, the same values as running the kernel on the shifted problem by hand."""
    pytest.importorskip(backend)
    w, sigma = _problem(problem, "Q4_K")
    grid = G.fit(w, GridSpec.of_type("Q4_K"), sigma.diagonal())
    start = grid.round(w)
    swept, log = cd_sweeps(w, sigma, grid, start, sweeps=3, backend=backend)
    shift = grid.expand_offset(w.shape[1])
    by_hand, log2 = cd_sweeps(
        w - shift, sigma, grid.without_offset(), start - shift, sweeps=3, backend=backend
    )
    assert torch.equal(grid.quantize(swept), grid.without_offset().quantize(by_hand))
    assert log.changed == log2.changed and sum(log.changed) > 0
    assert objective(w, grid.round(swept), sigma) < objective(w, start, sigma)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q6_K"])
def test_refit_stores_its_widths_and_cdq_keeps_only_improvements(name: str, problem) -> None:
    """A refit of the stored scales for fixed codes returns a grid the type can store (fp16 d,
    sub-block scales within their widths); cdq's result with refits is never above its result
    without (a refit is taken only when it lowers the objective)."""
    w, sigma = _problem(problem, name)
    spec = GridSpec.of_type(name)
    grid = G.fit(w, spec, sigma.diagonal())
    codes = grid.quantize(w)
    refitted = G.refit(w, sigma, grid, codes)
    assert refitted.parts["d"].dtype == torch.float16 and refitted.spec == spec
    raw = pack(name, codes, refitted.parts)
    assert torch.equal(refitted.dequantize(codes), reference_values(name, raw, tuple(w.shape)))
    with_refit = solve("cdq", w, sigma, spec)
    without = solve("cdq", w, sigma, spec, refit="none")
    assert with_refit.objective <= without.objective * (1 + 1e-9)


def test_outlier_method_is_refused_on_a_gguf_grid(problem) -> None:
    w, sigma = _problem(problem, "Q4_0")
    with pytest.raises(ValueError, match="outliers, which a GGUF file cannot hold"):
        solve("quantease-outlier", w, sigma, GridSpec.of_type("Q4_0"))
