"""Block-by-block driver on tiny OPT/BLOOM/Llama: plumbing, layer coverage, every method, errors."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_lm import FAMILIES, expected_layers, tiny_model
from torch import nn

from cdq_cli import pipeline
from cdq_cli.capture import layer_pair_sigma, linear_sigmas
from cdq_cli.models import BlockAdapter, Family, adapter_for, generic_adapter
from cdq_cli.pipeline import quantize_model, validate
from cdq_cli.run.plan import make_settings
from cdq_cli.solvers import METHODS
from cdq_cli.solvers.sigma import PairedSigmaAccumulator

# Quick settings per method: the tiny layers need only a few sweeps to show the behaviour.
FAST = {
    "rtn": {},
    "gptq": {},
    "quantease": {"sweeps": 3},
    "quantease-outlier": {"iterations": 2, "final_sweeps": 1, "outlier_fraction": 0.02},
    "comq": {"iterations": 1},
}


def batches(vocab: int = 100, seed: int = 1) -> list[torch.Tensor]:
    """Two batches of different sizes: per-batch masks/rotary tables must follow each batch."""
    ids = torch.randint(0, vocab, (5, 16), generator=torch.Generator().manual_seed(seed))
    return [ids[:3], ids[3:]]


def logits(model: nn.Module, data: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b).logits for b in data])


def chain_logits(model: nn.Module, outcome) -> torch.Tensor:
    adapter = adapter_for(model)
    return torch.cat([adapter.head(model, h) for h in outcome.outputs])


@pytest.mark.parametrize("family", FAMILIES)
def test_bits16_block_plumbing_leaves_logits_unchanged(family: str) -> None:
    """Blocks run one by one on captured inputs reproduce the model: masks, ALiBi, rotary are right."""
    model = tiny_model(family)
    data = batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(model, data)
    outcome = quantize_model(model, adapter_for(model), data, make_settings(bits=16, device="cpu"))
    assert outcome.rows == [] and outcome.layers == {}
    assert torch.equal(chain_logits(model, outcome), reference)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, data), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_blocks_chain_equals_model_and_cover_every_linear(family: str) -> None:
    """After quantization the block chain equals the quantized model's forward (so every Σ saw the
    inputs the real model feeds that layer), and every Linear in the blocks, only those, is quantized."""
    model = tiny_model(family)
    data = batches()
    reference = logits(model, data)
    outcome = quantize_model(
        model, adapter_for(model), data, make_settings(method="rtn", bits=3, device="cpu")
    )
    names = [row.name for row in outcome.rows]
    assert names == expected_layers(family)
    assert list(outcome.layers) == names
    quantized = logits(model, data)
    assert torch.allclose(chain_logits(model, outcome), quantized, atol=1e-6, rtol=0)
    assert not torch.allclose(quantized, reference, atol=1e-3)
    for row in outcome.rows:
        layer = model.get_submodule(row.name)
        stored = outcome.layers[row.name]
        assert torch.equal(layer.weight.data, stored.dequantize().to(layer.weight.dtype))
        assert len(stored.codes().unique()) <= 2**3
        assert row.tokens == 5 * 16
        assert row.rtn_error == pytest.approx(row.error)
        assert 0 < row.relative_error < 1
    assert not any("lm_head" in n or "embed" in n or "word_embeddings" in n for n in names)


def test_solved_layers_hold_no_weights_while_later_groups_are_solved(monkeypatch) -> None:
    """While a true-sequential group is solved, the block's layers solved before it are parked
    (no weights: a wide block's solved layers are much of what is resident) and put back after,
    bit for bit as their records dequantize, before the block runs again: the chain still equals
    the model, and every weight is its record's."""
    model = tiny_model("llama")
    data = batches()
    empty: dict[str, list[str]] = {}
    original = pipeline._Run._solve

    def spy(self, block, index, names, sigmas):
        empty[",".join(names)] = [n for n, p in block.named_parameters() if p.numel() == 0]
        return original(self, block, index, names, sigmas)

    monkeypatch.setattr(pipeline._Run, "_solve", spy)
    settings = make_settings(method="gptq", bits=3, device="cpu")
    outcome = quantize_model(model, adapter_for(model), data, settings)
    attention = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert empty == {
        ",".join(attention): [],
        "self_attn.o_proj": [f"{n}.weight" for n in attention],
        "mlp.gate_proj,mlp.up_proj": [f"{n}.weight" for n in [*attention, "self_attn.o_proj"]],
        "mlp.down_proj": [
            f"{n}.weight" for n in [*attention, "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]
        ],
    }
    assert torch.allclose(chain_logits(model, outcome), logits(model, data), atol=1e-6, rtol=0)
    for row in outcome.rows:
        layer = model.get_submodule(row.name)
        assert torch.equal(layer.weight.data, outcome.layers[row.name].dequantize().to(layer.weight.dtype))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_and_reports(method: str) -> None:
    model = tiny_model("llama")
    settings = make_settings(method=method, bits=4, group_size=16, options=FAST.get(method, {}), device="cpu")
    outcome = quantize_model(model, adapter_for(model), batches(), settings)
    assert len(outcome.rows) == 14
    for row in outcome.rows:
        assert math.isfinite(row.error) and row.error >= 0
        assert row.method == method and row.bits == 4 and row.group_size == 16
        assert row.rtn_error is not None and row.rtn_error > 0
        if method != "gptq":  # CD methods never end worse than where they started, on their own objective
            own = row.error if row.solver_error is None else row.solver_error  # (cdq: -o target=fp's W*)
            assert own <= row.objective_start * (1 + 1e-6) + 1e-9
    if method == "quantease-outlier":
        assert sum(row.outliers for row in outcome.rows) > 0
    if method != "rtn":  # better than RTN on average over the layers
        ratios = [row.error / row.rtn_error for row in outcome.rows]
        assert math.exp(sum(map(math.log, ratios)) / len(ratios)) < 1


def test_fp_inputs_takes_every_sigma_from_the_full_precision_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """COMQ's setting: Σ of each layer equals the one the unmodified model produces, and the chain
    carries full-precision activations (so its head reproduces the original logits)."""
    model = tiny_model("opt")
    data = batches()
    reference = logits(model, data)
    fp_sigmas = {
        name: acc.sigma.clone()
        for name, (_layer, acc) in linear_sigmas(
            model, data, include=lambda n, _m: "layers" in n, dtype=torch.float64
        ).items()
    }
    seen = {}
    original = pipeline.solve_layer

    def spy(name, layer, acc, settings):
        seen[name] = acc.sigma.clone()
        return original(name, layer, acc, settings)

    monkeypatch.setattr(pipeline, "solve_layer", spy)
    settings = make_settings(method="rtn", bits=4, fp_inputs=True, device="cpu", sigma_dtype=torch.float64)
    outcome = quantize_model(model, adapter_for(model), data, settings)
    assert set(seen) == set(fp_sigmas)
    for name, sigma in seen.items():
        assert torch.allclose(sigma, fp_sigmas[name], rtol=1e-6, atol=1e-6), name
    assert torch.allclose(chain_logits(model, outcome), reference, atol=1e-5, rtol=0)


def test_true_sequential_changes_only_later_groups() -> None:
    """The first group sees the same inputs either way; later groups see quantized earlier groups
    only in true-sequential mode."""
    rows = {}
    for flag in (True, False):
        model = tiny_model("llama")
        settings = make_settings(method="rtn", bits=2, true_sequential=flag, device="cpu")
        rows[flag] = {
            r.name: r.error for r in quantize_model(model, adapter_for(model), batches(), settings).rows
        }
    first = "model.layers.0.self_attn.q_proj"
    assert rows[True][first] == pytest.approx(rows[False][first], rel=1e-6)
    assert rows[True]["model.layers.0.self_attn.o_proj"] != pytest.approx(
        rows[False]["model.layers.0.self_attn.o_proj"], rel=1e-6
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"bits": 5}, "--bits 5 is not supported"),
        ({"bits": 4, "group_size": 24}, "model.layers.0.self_attn.q_proj: group size 24 does not divide"),
        ({"method": "rtn", "options": {"sweeps": 2}}, "unknown option(s) sweeps"),
        (
            {"method": "cdq", "options": {"sweeps": -3}},
            "sweeps (option sweeps of cdq) must be an integer >= 0",
        ),
        ({"method": "nope"}, "unknown method 'nope'"),
    ],
)
def test_bad_settings_fail_before_any_work(flags: dict, message: str) -> None:
    """Bad settings are refused when they are made, or by the model's layers (``validate``, which
    the run calls once before calibrating) before any data."""
    model = tiny_model("llama")

    def never():
        raise AssertionError("calibration data must not be touched")
        yield

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings = make_settings(**flags)
        validate(model, adapter_for(model), settings)
        quantize_model(model, adapter_for(model), never(), settings)


def test_non_finite_weight_fails_naming_the_layer() -> None:
    model = tiny_model("bloom")
    with torch.no_grad():
        model.transformer.h[1].mlp.dense_h_to_4h.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"transformer\.h\.1"):
        quantize_model(
            model, adapter_for(model), batches(), make_settings(method="rtn", bits=4, device="cpu")
        )


def test_generic_adapter_for_unknown_family() -> None:
    """An unregistered causal LM with a ``*.layers`` list: every Linear of a block in one group."""
    model = tiny_model("llama")
    adapter = generic_adapter(model)
    assert adapter.name == "generic"
    block = adapter.blocks(model)[0]
    groups = adapter.layer_groups(block)
    assert len(groups) == 1 and len(groups[0]) == 7
    data = batches()
    reference = logits(model, data)
    outcome = quantize_model(model, adapter, data, make_settings(method="rtn", bits=8, device="cpu"))
    assert [r.name for r in outcome.rows] == expected_layers("llama")
    assert torch.allclose(logits(model, data), reference, atol=0.05)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _ConvNet(nn.Module):
    """A toy vision-style model: a stem, a list of conv blocks, a head (no ``config``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.ModuleList(_Residual() for _ in range(2))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))


def test_a_vision_family_plugs_in_as_data() -> None:
    """Conv2d layers and a family matched by class name go through the same pipeline."""
    torch.manual_seed(0)
    model = _ConvNet().eval()
    family = Family(
        name="toy-convnet", blocks="stages", groups=(("body.0",), ("body.2",)), classes=("_ConvNet",), call={}
    )
    adapter = BlockAdapter(family)
    images = [torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8)]
    outcome = quantize_model(
        model, adapter, images, make_settings(method="quantease", bits=4, options={"sweeps": 2})
    )
    assert [r.name for r in outcome.rows] == [
        "stages.0.body.0",
        "stages.0.body.2",
        "stages.1.body.0",
        "stages.1.body.2",
    ]
    assert outcome.rows[0].shape == [8, 8, 3, 3] and outcome.rows[0].tokens == 3 * 64
    assert all(r.error <= r.rtn_error * (1 + 1e-6) for r in outcome.rows)
    with torch.no_grad():
        final = torch.cat([model.head(h.mean(dim=(2, 3))) for h in outcome.outputs])
        assert torch.allclose(final, torch.cat([model(x) for x in images]), atol=1e-5)


@pytest.mark.parametrize("method", ["cdq", "gptq"])
def test_a_wide_layer_is_solved_in_bands_that_share_the_sigma_work(method, monkeypatch) -> None:
    """A 600-row layer is solved in three 256-row-at-most bands (solvers.bands) and factors its Σ
    once per GPTQ start, not once per band; its report row lists the bands' seconds."""
    from cdq_cli.solvers import gptq
    from cdq_cli.solvers.sigma import SigmaAccumulator

    factored = []
    original = gptq._cholesky

    def spy(sigma, damping, order=None):
        factored.append(sigma.shape[0])
        return original(sigma, damping, order)

    monkeypatch.setattr(gptq, "_cholesky", spy)
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(48, 600, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(600, 48, generator=gen))
    acc = SigmaAccumulator(48, device="cpu", dtype=torch.float64)
    acc.add_linear(torch.randn(256, 48, generator=gen, dtype=torch.float64))
    settings = make_settings(
        method=method, bits=3, device="cpu", sigma_dtype=torch.float64, options={"target": "quantized"}
    )  # (a plain Σ: -o target=fp, cdq's default, needs the paired statistics)
    row, record = pipeline.solve_layer("wide", layer, acc, settings)
    assert len(row.band_seconds) == 3
    assert len(factored) == (2 if method == "cdq" else 1)  # cdq's two GPTQ starts; GPTQ's one


def test_target_fp_copies_only_the_solved_layers_and_none_for_the_last_group(monkeypatch) -> None:
    """-o target=fp (cdq's default) keeps a full-precision copy of a layer only once it is about
    to be solved and a later pass still runs the block at full precision: each block's last
    group is solved with no copy held (the pass that collected it advanced the full-precision
    stream); without true-sequential (one pass collects every group) none is ever kept."""
    kept: list[list[str]] = []
    original = pipeline.FullPrecision.keep
    monkeypatch.setattr(
        pipeline.FullPrecision, "keep", lambda self, names: (kept.append(names), original(self, names))
    )
    model = tiny_model("llama")
    outcome = quantize_model(
        model, adapter_for(model), batches(), make_settings(method="cdq", bits=3, device="cpu")
    )
    assert {row.name.split(".")[-1] for row in outcome.rows} >= {"down_proj"}
    attention = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    per_block = [attention, ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"]]
    blocks = len(adapter_for(model).blocks(model))
    assert kept == per_block * blocks
    kept.clear()
    model = tiny_model("llama")
    settings = make_settings(method="cdq", bits=3, device="cpu", true_sequential=False)
    quantize_model(model, adapter_for(model), batches(), settings)
    assert kept == []


@pytest.mark.parametrize("target", ["fp", "quantized"])
def test_collection_passes_stop_at_their_last_layer_and_change_no_bit(target, monkeypatch) -> None:
    """A pass that only collects statistics (its stream is not advanced) stops where the last of
    its group's layers is called, in both streams with -o target=fp: a block's last layer runs
    only in the passes that advance a stream, after the block's first batch, which runs whole (it
    counts the calls). Every weight, objective and output is the same, bit for bit, as with every
    pass run whole."""
    data = batches()

    def run(stop_early: bool) -> tuple[list[int], dict, list[float], list[torch.Tensor]]:
        monkeypatch.setattr(pipeline, "STOP_EARLY", stop_early)
        model = tiny_model("llama")
        adapter = adapter_for(model)
        calls = [0] * len(adapter.blocks(model))
        for index, block in enumerate(adapter.blocks(model)):
            block.mlp.down_proj.register_forward_hook(
                lambda *_, index=index: calls.__setitem__(index, calls[index] + 1)
            )
        settings = make_settings(method="cdq", bits=3, device="cpu", options={"target": target})
        outcome = quantize_model(model, adapter, data, settings)
        return calls, model.state_dict(), [row.error for row in outcome.rows], outcome.outputs

    calls, state, errors, outputs = run(True)
    whole_calls, whole_state, whole_errors, whole_outputs = run(False)
    # per batch: four passes over the block (two streams each with target=fp), then the forward
    # that advances the quantized stream; stopping early, down_proj runs in the first pass's first
    # batch (it counts the calls of every layer), the last pass's full-precision stream (advanced),
    # with target=fp its quantized stream too (a bias-free Linear's batch is taken from its output:
    # the pass stops after it ran) and that forward
    streams = 2 if target == "fp" else 1
    assert whole_calls == [len(data) * (4 * streams + 1)] * len(calls)
    assert calls == [streams + len(data) * (streams + (target == "fp"))] * len(calls)
    assert errors == whole_errors
    assert state.keys() == whole_state.keys()
    assert all(torch.equal(state[key], whole_state[key]) for key in state)
    assert all(torch.equal(a, b) for a, b in zip(outputs, whole_outputs, strict=True))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_fp_target_from_layer_outputs_is_the_products_bit_for_bit(family, monkeypatch) -> None:
    """-o target=fp takes a bias-free float32 Linear's W X̃ and W X from the layer's own outputs in
    the two passes instead of computing both products again: every weight, objective and output is
    the same, bit for bit, as with the products (every Linear forced onto them). A Linear with a
    bias (OPT's) keeps the products."""
    data = batches()
    taken = {"add_outputs": 0, "add_pair": 0}
    for method in taken:
        original = getattr(PairedSigmaAccumulator, method)

        def counted(self, *args, method=method, original=original):
            taken[method] += 1
            return original(self, *args)

        monkeypatch.setattr(PairedSigmaAccumulator, method, counted)

    def products(layer, dtype, wrap):
        acc, add, _ = layer_pair_sigma(layer, dtype, wrap)
        return acc, lambda module, args, fp_input, _output=None: acc.add_pair(fp_input, args[0]), False

    def run(force_products: bool) -> tuple[dict, list[float], list[torch.Tensor], dict[str, int]]:
        taken.update(add_outputs=0, add_pair=0)
        if force_products:
            monkeypatch.setattr(pipeline, "layer_pair_sigma", products)
        model = tiny_model(family)
        adapter = adapter_for(model)
        settings = make_settings(method="cdq", bits=3, device="cpu", options={"target": "fp"})
        outcome = quantize_model(model, adapter, data, settings)
        return model.state_dict(), [row.error for row in outcome.rows], outcome.outputs, dict(taken)

    state, errors, outputs, used = run(False)
    forced_state, forced_errors, forced_outputs, forced_used = run(True)
    # 7 Linears per block, one addition per batch each (OPT: 6, every one with a bias)
    layers = len(errors)
    want = {"add_outputs": layers * len(data), "add_pair": 0} if family == "llama" else forced_used
    assert used == want and forced_used == {"add_outputs": 0, "add_pair": layers * len(data)}
    assert errors == forced_errors
    assert all(torch.equal(state[key], forced_state[key]) for key in state)
    assert all(torch.equal(a, b) for a, b in zip(outputs, forced_outputs, strict=True))


class _Twice(nn.Module):
    """A block whose first conv runs twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, act, out = self.body
        return x + out(act(conv(act(conv(x)))))


@pytest.mark.parametrize("target", ["fp", "quantized"])
def test_a_layer_called_twice_keeps_its_passes_whole(target, monkeypatch) -> None:
    """A pass cannot stop at a layer that runs twice per forward pass (its second inputs would be
    lost): the first batch counts the calls, and the statistics are those of whole passes."""

    def run(stop_early: bool) -> tuple[list[float], dict]:
        monkeypatch.setattr(pipeline, "STOP_EARLY", stop_early)
        torch.manual_seed(0)
        model = _ConvNet().eval()
        model.stages = nn.ModuleList(_Twice() for _ in range(2))
        family = Family(
            name="toy-twice",
            blocks="stages",
            groups=(("body.0",), ("body.2",)),
            classes=("_ConvNet",),
            call={},
        )
        images = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        settings = make_settings(method="cdq", bits=3, options={"target": target})
        outcome = quantize_model(model, BlockAdapter(family), images, settings)
        assert [row.tokens for row in outcome.rows[:1]] == [2 * 6 * 64]  # both calls, every batch
        return [row.error for row in outcome.rows], model.state_dict()

    errors, state = run(True)
    whole_errors, whole_state = run(False)
    assert errors == whole_errors
    assert all(torch.equal(state[key], whole_state[key]) for key in state)
