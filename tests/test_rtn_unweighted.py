"""``--method rtn`` without Σ: every layer of a block rounded first, the report measured from the
layer inputs in the one forward pass that advances the block (pipeline._Run.unweighted). The
report and the stored layers must equal the Σ path's (forced here by switching the new path off),
no Σ may be collected and the block must run once per batch."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from tiny_lm import save_tiny, tiny_model
from tiny_vision import images
from tiny_vision import tiny_model as tiny_vision
from torch import nn

from cdq_cli import capture, pipeline
from cdq_cli.capture import OutputErrors, layer_sigma
from cdq_cli.models import adapter_for, generic_adapter, load_causal_lm
from cdq_cli.models.vision import vision_adapter_for
from cdq_cli.pipeline import quantize_model
from cdq_cli.run.plan import make_settings
from cdq_cli.solvers import find_method
from cdq_cli.solvers.grouped import energy

MEASURED = ("error", "relative_error", "rtn_error", "objective_start")


def force_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Σ path for every block, as before the Σ-free path existed."""
    monkeypatch.setattr(pipeline._Run, "_unweighted", lambda self, block, index, names: False)


def count_blocks(monkeypatch: pytest.MonkeyPatch, adapter) -> list[int]:
    calls: list[int] = []
    original = adapter.run_block

    def counted(block, hidden, args, kwargs):
        calls.append(id(block))
        return original(block, hidden, args, kwargs)

    monkeypatch.setattr(adapter, "run_block", counted)
    return calls


def no_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the Σ-free path collected Σ")

    monkeypatch.setattr(pipeline, "_collect", refuse)
    for module in (capture, pipeline):
        monkeypatch.setattr(module, "SigmaAccumulator", refuse)
    monkeypatch.setattr(capture, "GroupedSigmaAccumulator", refuse)


def assert_same(fast, slow) -> None:
    """Rows equal field by field (the measured ones to float rounding), records bit for bit."""
    assert [row.name for row in fast.rows] == [row.name for row in slow.rows]
    for a, b in zip(fast.rows, slow.rows, strict=True):
        da, db = asdict(a), asdict(b)
        for key in da:
            if key == "seconds":
                continue
            if key in MEASURED and da[key] is not None:
                assert da[key] == pytest.approx(db[key], rel=1e-5), (a.name, key)
            else:
                assert da[key] == db[key], (a.name, key)
    assert list(fast.layers) == list(slow.layers)
    for name, record in fast.layers.items():
        other = slow.layers[name]
        assert record.spec == other.spec and record.shape == other.shape
        for key in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(record, key), getattr(other, key)), (name, key)
    for a, b in zip(fast.outputs, slow.outputs, strict=True):
        assert torch.equal(a, b)


def test_rtn_declares_it_needs_no_sigma() -> None:
    assert not find_method("rtn").needs_sigma
    assert find_method("gptq").needs_sigma and find_method("cdq").needs_sigma


@pytest.mark.parametrize(
    "flags",
    [
        {"bits": 3},
        {"bits": 4, "group_size": 16, "layer": ["down_proj=8", "q_proj=2g16sym"]},
        {"bits": 4, "sigma_dtype": torch.float64, "compare_rtn": False},
    ],
)
def test_llama_report_and_layers_equal_the_sigma_path(flags: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    data = [torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    settings = make_settings(method="rtn", device="cpu", **flags)
    with monkeypatch.context() as patch:
        force_sigma(patch)
        model = tiny_model("llama")
        slow = quantize_model(model, adapter_for(model), data, settings)
    model = tiny_model("llama")
    adapter = adapter_for(model)
    calls = count_blocks(monkeypatch, adapter)
    no_sigma(monkeypatch)
    fast = quantize_model(model, adapter, data, settings)
    assert_same(fast, slow)
    blocks = adapter.blocks(model)
    assert calls == [id(block) for block in blocks for _ in data]  # one forward per block per batch
    assert all(row.tokens == 3 * 16 * 2 for row in fast.rows)
    assert (fast.rows[0].rtn_error is None) == (not settings.compare_rtn)


def test_stored_codes_that_differ_from_the_solvers_stop_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Σ-free path checks the record by its codes: a packing that does not give the solver's
    codes back is a cdq bug, raised before the weight is touched."""
    from cdq_cli.store.layer import QuantizedLayer

    data = [torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(1))]
    model = tiny_model("llama")
    original = QuantizedLayer.codes
    monkeypatch.setattr(QuantizedLayer, "codes", lambda self: original(self) ^ 1)
    with pytest.raises(RuntimeError, match="stored codes do not reproduce"):
        quantize_model(model, adapter_for(model), data, make_settings(method="rtn", bits=4, device="cpu"))


def test_depthwise_vision_model_equals_the_sigma_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """EfficientNet-Lite (timm "SAME" convs, depthwise groups, 1x1 convs, a Linear head unit)."""
    x = images()
    data = [x[:4], x[4:]]
    settings = make_settings(method="rtn", bits=4, device="cpu")
    with monkeypatch.context() as patch:
        force_sigma(patch)
        model = tiny_vision("lite0-small")
        slow = quantize_model(model, vision_adapter_for(model, quantize_head=True), data, settings)
    model = tiny_vision("lite0-small")
    adapter = vision_adapter_for(model, quantize_head=True)
    calls = count_blocks(monkeypatch, adapter)
    no_sigma(monkeypatch)
    fast = quantize_model(model, adapter, data, settings)
    assert_same(fast, slow)
    assert any(model.get_submodule(row.name).groups > 1 for row in fast.rows)
    assert len(calls) == len(adapter.blocks(model)) * len(data)


def test_per_layer_grouped_convs_equal_the_sigma_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """per_layer on grouped convs: one scale per group (solved group by group) in both paths."""
    x = images()
    settings = make_settings(method="rtn", bits=3, per_layer=True, device="cpu")
    with monkeypatch.context() as patch:
        force_sigma(patch)
        model = tiny_vision("lite0-small")
        slow = quantize_model(model, vision_adapter_for(model), [x], settings)
    model = tiny_vision("lite0-small")
    no_sigma(monkeypatch)
    fast = quantize_model(model, vision_adapter_for(model), [x], settings)
    assert_same(fast, slow)


def test_chained_group_falls_back_to_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generic adapter puts a block's seven Linears in one group, where o_proj's input comes
    from v_proj: the one pass would see it quantized while Σ sees it in full precision, so the
    block goes back to the Σ path (and the result is the Σ path's)."""
    data = [torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(2))]
    settings = make_settings(method="rtn", bits=3, device="cpu")
    with monkeypatch.context() as patch:
        force_sigma(patch)
        model = tiny_model("llama")
        slow = quantize_model(model, generic_adapter(model), data, settings)
    model = tiny_model("llama")
    collected = []
    original = pipeline._collect
    monkeypatch.setattr(pipeline, "_collect", lambda *a, **k: collected.append(1) or original(*a, **k))
    fast = quantize_model(model, generic_adapter(model), data, settings)
    assert_same(fast, slow)
    assert len(collected) == 2  # each block's one group, after the first batch found it chained


@pytest.mark.parametrize("method", ["gptq", "cdq"])
def test_methods_that_need_sigma_still_collect_it(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    used = []
    original = pipeline._collect
    monkeypatch.setattr(pipeline, "_collect", lambda *a, **k: used.append(1) or original(*a, **k))
    options = {"sweeps": 1} if method == "cdq" else {}
    quantize_model(
        model, adapter_for(model), [torch.randint(0, 100, (2, 8))], make_settings(method, options=options)
    )
    assert used


def _layers() -> list[nn.Module]:
    from timm.layers.conv2d_same import Conv2dSame

    return [
        nn.Linear(12, 5),
        nn.Linear(12, 5, bias=False),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        Conv2dSame(4, 8, 5, stride=2, groups=4),
        nn.Conv2d(4, 4, 3, padding="same", groups=4),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=2, bias=False),
        nn.Conv2d(4, 6, 1),
    ]


@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize("compute", [torch.float32, torch.float64, torch.bfloat16])
def test_output_errors_equal_the_traces_on_sigma(index: int, compute: torch.dtype) -> None:
    """‖(W − Ŵ)X‖² and ‖WX‖² from the layer's inputs equal tr(EΣEᵀ) and tr(WΣWᵀ) on Σ (float64),
    whatever the layer computes in (float32: Ŵx is its own output less the bias; float64 and
    bf16 differ from Σ's dtype: Ŵx is computed again in Σ's)."""
    torch.manual_seed(index)
    layer = _layers()[index]
    dtype = torch.float32
    with torch.no_grad():
        original = layer.weight.detach().to(dtype).clone()
        approx = (original * 4).round() / 4
        layer.to(compute).weight.copy_(approx)
    x = torch.randn((3, 7, 12) if isinstance(layer, nn.Linear) else (3, 4, 11, 9)).to(compute)
    meter = OutputErrors(layer, original, approx, dtype)
    handle = layer.register_forward_hook(meter)
    with torch.no_grad():
        layer(x)
        layer(x[:1])
    handle.remove()
    reference = layer.to(torch.float64)
    acc, add = layer_sigma(reference, torch.float64)
    for batch in (x, x[:1]):
        add(reference, (batch.to(torch.float64),))
    rows = original.shape[0]
    sigma = acc.sigma
    w, e = original.double().reshape(rows, -1), (original - approx).double().reshape(rows, -1)
    assert meter.tokens == acc.tokens
    assert meter.objective == pytest.approx(energy(e, sigma), rel=1e-5)
    assert meter.energy == pytest.approx(energy(w, sigma), rel=1e-5)


def test_cli_output_files_equal_the_sigma_path(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cdq quantize --method rtn`: every file of the output folder but the report (timings) is
    byte-identical to the Σ path's; the report's rows equal it to float rounding."""
    import json

    stories = data_dir / "models" / "stories260K"
    calib = data_dir / "text" / "c4-sample.jsonl"
    _model, tokenizer = load_causal_lm(str(stories))
    source = save_tiny("llama", tmp_path / "llama", tokenizer)
    args = ["quantize", source, "--method", "rtn", "--bits", "4", "--group-size", "16", "--calib", calib]
    args += ["--nsamples", "4", "--seqlen", "32", "--quiet"]
    with monkeypatch.context() as patch:
        force_sigma(patch)
        code, _, err = cli(capsys, *args, "--output", tmp_path / "slow")
        assert code == 0, err
    no_sigma(monkeypatch)
    code, _, err = cli(capsys, *args, "--output", tmp_path / "fast")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "slow").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "fast").iterdir())
    assert any(name.endswith(".safetensors") for name in files)
    for name in files:
        if name != "report.json":
            assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name
    fast, slow = (json.loads((tmp_path / d / "report.json").read_text())["layers"] for d in ("fast", "slow"))
    assert [row["name"] for row in fast] == [row["name"] for row in slow]
    for a, b in zip(fast, slow, strict=True):
        assert set(a) == set(b)
        for key in a:
            if key in MEASURED:
                assert a[key] == pytest.approx(b[key], rel=1e-5)
            elif key != "seconds":
                assert a[key] == b[key], key


def test_killed_rtn_run_resumes_to_the_same_bytes(data_dir: Path, tmp_path: Path) -> None:
    """The Σ-free block hands the journal its rows and records like the Σ path: a run killed after
    block 0 resumes (block 0 restored, block 1 rounded) to the uninterrupted run's bytes and rows."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from cdq_cli.cli import main
    from cdq_cli.store.journal import KILL_ENV

    _model, tokenizer = load_causal_lm(str(data_dir / "models" / "stories260K"))
    source = save_tiny("llama", tmp_path / "llama", tokenizer)
    calib = data_dir / "text" / "c4-sample.jsonl"
    argv = ["quantize", str(source), "--method", "rtn", "--bits", "3", "--calib", str(calib)]
    argv += ["--nsamples", "4", "--seqlen", "32", "--quiet"]
    reference, out = tmp_path / "reference", tmp_path / "q"
    assert main([*argv, "--output", str(reference)]) == 0
    env = {**os.environ, KILL_ENV: "0", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-m", "cdq_cli", *argv, "--output", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert main([*argv, "--output", str(out), "--resume"]) == 0
    for name in ("model.safetensors", "quantization.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    reports = [json.loads((folder / "report.json").read_text()) for folder in (out, reference)]
    assert reports[0]["run"]["resumed_blocks"] == 1
    rows = [[{k: v for k, v in row.items() if k != "seconds"} for row in r["layers"]] for r in reports]
    assert rows[0] == rows[1]
