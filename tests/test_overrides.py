"""Per-layer overrides: ``--skip PATTERN`` keeps layers in full precision, ``--layer PATTERN=SPEC``
gives them their own grid. Resolved once (``Settings.grid_for``), checked against the model before
any work, visible in the stored bits of exactly the matching layers, recorded in report.json,
accepted by presets, and honoured or refused (one line) by every export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from safetensors import safe_open
from tiny_lm import expected_layers, save_tiny
from tiny_vision import images, tiny_model

from cdq_cli.models import load_causal_lm
from cdq_cli.models.vision import vision_adapter_for
from cdq_cli.pipeline import quantize_model
from cdq_cli.run.plan import make_settings
from cdq_cli.solvers import GridSpec
from cdq_cli.solvers.packing import packed_length
from cdq_cli.store.folder import read_layers, read_table

FAST = ["--method", "rtn", "--nsamples", "4", "--seqlen", "32", "--quiet"]


@pytest.fixture(scope="module")
def llama(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _model, tokenizer = load_causal_lm(str(data_dir / "models" / "stories260K"))
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-overrides") / "llama", tokenizer)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- the rules, resolved once --------------------------------------------------------------------


def test_specs_inherit_what_they_leave_out_and_the_last_rule_wins() -> None:
    settings = make_settings(
        bits=4,
        group_size=32,
        sym=False,
        skip=[r"\.o_proj$"],
        layer=["mlp=8", r"down_proj=3g16sym", "q_proj=8ch", "up_proj=2asym", r"layers\.1\.mlp\.gate=4ch"],
    )
    grid = settings.grid_for
    assert grid("model.layers.0.self_attn.k_proj") == GridSpec(4, 32, False)  # no rule: the run's grid
    assert grid("model.layers.0.mlp.gate_proj") == GridSpec(8, 32, False)  # "8": group and sym inherited
    assert grid("model.layers.0.mlp.down_proj") == GridSpec(3, 16, True)  # later rule wins over "mlp"
    assert grid("model.layers.0.self_attn.q_proj") == GridSpec(8, None, False)  # ch: per output row
    assert grid("model.layers.0.mlp.up_proj") == GridSpec(2, 32, False)
    assert grid("model.layers.1.mlp.gate_proj") == GridSpec(4, None, False)
    assert grid("model.layers.0.self_attn.o_proj") is None  # --skip wins: full precision
    assert grid("model.layers.0.mlp.experts.down_proj[3]") == GridSpec(3, 16, True)  # an expert: its layer's
    per_layer = make_settings(bits=4, per_layer=True, layer=["a=8", "b=4g8"])
    assert per_layer.grid_for("a") == GridSpec(8, None, False, per_layer=True)
    assert per_layer.grid_for("b") == GridSpec(4, 8, False)
    described = settings.describe()["overrides"]
    assert described[0] == {"flag": "--skip", "pattern": r"\.o_proj$", "spec": None, "grid": None}
    assert described[2]["grid"] == {"bits": 3, "group_size": 16, "sym": True, "per_layer": False}
    assert "overrides" not in make_settings(bits=4).describe()  # old resume fingerprints stay valid


@pytest.mark.parametrize(
    ("skip", "layer", "message"),
    [
        ([], ["mlp"], "--layer expects PATTERN=SPEC, got 'mlp'"),
        ([], ["=8"], "--layer expects PATTERN=SPEC"),
        ([], ["mlp=16"], "16 bits is not one of 2, 3, 4, 8 (--skip keeps a layer in full precision)"),
        ([], ["mlp=4g"], "--layer SPEC '4g' is not BITS[gGROUP|ch][sym|asym]"),
        ([], ["mlp=4g0"], "the group size must be positive"),
        ([], ["mlp(=8"], "--layer 'mlp(=8': not a valid regular expression"),
        (["["], [], "--skip '[': not a valid regular expression"),
    ],
)
def test_bad_rules_are_one_line_errors(skip, layer, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_settings(bits=4, skip=skip, layer=layer)


def test_bits16_takes_no_rules() -> None:
    with pytest.raises(ValueError, match="--bits 16 quantizes none"):
        make_settings(bits=16, skip=["mlp"])


# -- through the command line ---------------------------------------------------------------------


def test_overrides_are_in_the_stored_bits_of_exactly_the_matching_layers(llama, calib, tmp_path, capsys):
    out = tmp_path / "q"
    code, stdout, err = cli(
        capsys, "quantize", llama, *FAST, "--calib", calib, "--bits", "4", "--group-size", "16",
        "--layer", r"mlp\.down_proj=8ch", "--layer", r"layers\.1\.self_attn\.[qk]_proj=2g32sym",
        "--skip", r"layers\.0\.self_attn\.o_proj", "--output", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["layers"] == 13  # 14 layers, one kept in full precision
    table, layers = read_table(out), read_layers(out)
    source = load_causal_lm(str(llama))[0]
    expected = {}
    for name in expected_layers("llama"):
        if name == "model.layers.0.self_attn.o_proj":
            continue
        if name.endswith("mlp.down_proj"):
            expected[name] = GridSpec(8, None, False)
        elif re.search(r"layers\.1\.self_attn\.[qk]_proj", name):
            expected[name] = GridSpec(2, 32, True)
        else:
            expected[name] = GridSpec(4, 16, False)
    assert set(layers) == set(expected)
    for name, spec in expected.items():
        layer = layers[name]
        assert layer.spec == spec, name
        out_features, columns = layer.shape
        assert tuple(layer.qweight.shape) == (out_features, packed_length(columns, spec.bits)), name
        assert int(layer.codes().max()) <= spec.maxq
        if spec.sym:
            assert bool((layer.zeros == 2 ** (spec.bits - 1)).all())
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:  # the skipped layer: as it was
        kept = fh.get_tensor("model.layers.0.self_attn.o_proj.weight")
        assert "model.layers.0.self_attn.o_proj.qweight" not in set(fh.keys())
    assert torch.equal(kept, source.get_submodule("model.layers.0.self_attn.o_proj").weight.detach())
    assert table["skipped"] == ["model.layers.0.self_attn.o_proj"]
    report = json.loads((out / "report.json").read_text())
    assert [(r["flag"], r["pattern"], r["spec"]) for r in report["run"]["overrides"]] == [
        ("--skip", r"layers\.0\.self_attn\.o_proj", None),
        ("--layer", r"mlp\.down_proj", "8ch"),
        ("--layer", r"layers\.1\.self_attn\.[qk]_proj", "2g32sym"),
    ]
    assert report["skipped"]["layers"] == ["model.layers.0.self_attn.o_proj"]
    rows = {row["name"]: row for row in report["layers"]}
    assert set(rows) == set(expected)
    for name, spec in expected.items():
        assert (rows[name]["bits"], rows[name]["group_size"], rows[name]["sym"]) == (
            spec.bits,
            spec.group_size,
            spec.sym,
        )
    code, stdout, err = cli(
        capsys, "eval", out, "--data", calib, "--seqlen", "32", "--max-windows", "2", "--json"
    )
    assert code == 0 and json.loads(stdout)["ppl"] > 0, err  # the mixed folder loads back


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--skip", "attention"],
            "--skip 'attention' matches no layer of the model (its layers are named like",
        ),
        (["--layer", "fc1=8"], "--layer 'fc1=8' matches no layer of the model"),
        (["--layer", "mlp=4sym", "--bits", "16"], "--bits 16 quantizes none"),
        (["--layer", "mlp=3x"], "--layer SPEC '3x' is not BITS[gGROUP|ch][sym|asym]"),
        (["--group-size", "16", "--layer", "down_proj=4g48"], "mlp.down_proj: group size 48 does not divide"),
    ],
)
def test_rules_are_checked_before_any_work(llama, calib, tmp_path, capsys, args, message) -> None:
    code, _, err = cli(capsys, "quantize", llama, *FAST, "--calib", calib, "--output", tmp_path / "q", *args)
    assert code == 2 and message in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_presets_take_skip_and_layer(llama, calib, tmp_path, capsys) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        "method: rtn\nbits: 4\nnsamples: 4\nseqlen: 32\nquiet: true\n"
        "skip: ['layers\\.1\\.mlp\\.up_proj']\nlayer:\n  'self_attn\\.v_proj': 8\n  'mlp\\.gate': 3ch\n"
    )
    out = tmp_path / "q"
    code, _, err = cli(capsys, "quantize", llama, "--config", preset, "--calib", calib, "--output", out)
    assert code == 0, err
    bits = {name: layer.spec.bits for name, layer in read_layers(out).items()}
    assert "model.layers.1.mlp.up_proj" not in bits and bits["model.layers.0.mlp.up_proj"] == 4
    assert bits["model.layers.1.self_attn.v_proj"] == 8 and bits["model.layers.0.mlp.gate_proj"] == 3
    assert {"skip", "layer"} <= set(
        json.loads((out / "report.json").read_text())["run"]["config"]["from_file"]
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("layer: 8\n")
    code, _, err = cli(capsys, "quantize", llama, "--config", bad, "--calib", calib, "--output", out)
    assert code == 2 and "key 'layer' expects a list" in one_error_line(err)


def test_gptq_export_refuses_mixed_grids_and_skipped_layers(llama, calib, tmp_path, capsys) -> None:
    for rule in (["--layer", "down_proj=8"], ["--skip", "down_proj"]):
        code, _, err = cli(
            capsys,
            "quantize",
            llama,
            *FAST,
            "--calib",
            calib,
            "--output",
            tmp_path / "q",
            "--format",
            "gptq",
            *rule,
        )
        assert code == 2 and "use --format compressed-tensors" in one_error_line(err)
        assert list(tmp_path.iterdir()) == []
    out = tmp_path / "skipped"
    assert (
        cli(capsys, "quantize", llama, *FAST, "--calib", calib, "--output", out, "--skip", "down_proj")[0]
        == 0
    )
    code, _, err = cli(capsys, "export", out, "--format", "gptq")
    line = one_error_line(err)
    assert code == 2 and "model.layers.0.mlp.down_proj was kept in full precision (--skip)" in line


def test_depthwise_convs_at_8_bits_on_a_vision_model() -> None:
    """EfficientNet-Lite's depthwise convs (conv_dw) at 8 bits, the rest at 4: stored grids follow."""
    model = tiny_model("lite0-small")
    settings = make_settings(method="rtn", bits=4, layer=["conv_dw=8"], device="cpu")
    outcome = quantize_model(model, vision_adapter_for(model), [images()], settings)
    depthwise = {name for name in outcome.layers if name.endswith("conv_dw")}
    assert depthwise and all(model.get_submodule(name).groups > 1 for name in depthwise)
    for name, layer in outcome.layers.items():
        assert layer.spec.bits == (8 if name in depthwise else 4), name
    assert {row.name: row.bits for row in outcome.rows} == {n: q.spec.bits for n, q in outcome.layers.items()}
