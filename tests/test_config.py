"""``cdq quantize --config``: presets load, command-line flags win, bad files are refused by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import cli as run
from tiny_lm import save_tiny

from cdq_cli.models import load_causal_lm

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def llama(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _model, tokenizer = load_causal_lm(str(data_dir / "models" / "stories260K"))
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-config") / "llama", tokenizer)


def test_the_shipped_presets_exist_and_are_valid(capsys) -> None:
    names = {p.name for p in PRESETS}
    assert {
        "opt-3bit-quantease.yaml",
        "llama-4bit-g128-comq.yaml",
        "vit-4bit-comq.yaml",
        "smollm2-3bit-cdq.yaml",
        "stories260k-4bit-demo.yaml",
        "cdq-hadamard.yaml",
        "cdq-hadamard-fp.yaml",
        "cdq-gguf.yaml",
    } <= names
    for preset in PRESETS:  # --help runs after the eager --config: every key and type is checked
        code, out, err = run(capsys, "quantize", "--config", preset, "--help")
        assert code == 0 and err == "" and "--config" in out, (preset.name, err)


@pytest.mark.parametrize(
    ("preset", "flags", "share"),
    [
        ("cdq-hadamard.yaml", ["--method", "cdq", "--transform", "hadamard", "-o", "target=fp"], 0.25),
        ("cdq-hadamard.yaml", ["--method", "cdq", "--transform", "hadamard"], 0.25),
        (
            "cdq-hadamard-fp.yaml",
            ["--method", "cdq", "--transform", "hadamard", "-o", "target=fp", "-o", "fp_share=1"],
            1.0,
        ),
    ],
)
def test_the_recipe_presets_are_their_flags(preset, flags, share, llama, calib, tmp_path, capsys) -> None:
    """The recipe presets of issue 19 (BENCHMARKS.md measured them by their flags) run exactly those."""
    common = [llama, "--bits", "3", "--sym", "--calib", calib, "--nsamples", "4", "--seqlen", "32"]
    common += ["--quiet", "--json"]
    code, _, err = run(
        capsys, "quantize", "--config", REPO / "configs" / preset, *common, "--output", tmp_path / "preset"
    )
    assert code == 0, err
    code, _, err = run(capsys, "quantize", *common, *flags, "--output", tmp_path / "flags")
    assert code == 0, err
    report = json.loads((tmp_path / "preset" / "report.json").read_text())["run"]
    assert (report["method"], report["target"], report["transform"]["name"]) == ("cdq", "fp", "hadamard")
    assert report["fp_share"] == share
    written = [(tmp_path / run_ / "model.safetensors").read_bytes() for run_ in ("preset", "flags")]
    assert written[0] == written[1]


def test_the_gguf_preset_is_its_flags(llama, calib, tmp_path, capsys) -> None:
    """configs/cdq-gguf.yaml (issue 20's recipe) writes the bytes of ``--method cdq --format gguf -o
    shrink=0.3``; that is also what cdq does on a GGUF grid by default (the same tensors), and
    ``-o shrink=0`` gives other tensors (the option reaches the solver)."""
    gguf = pytest.importorskip("gguf")
    common = [llama, "--type", "Q4_0", "--calib", calib, "--nsamples", "4", "--seqlen", "32", "--quiet"]
    runs = {
        "preset": ["--config", REPO / "configs" / "cdq-gguf.yaml"],
        "flags": ["--method", "cdq", "--format", "gguf", "-o", "shrink=0.3"],
        "default": ["--method", "cdq", "--format", "gguf"],
        "off": ["--method", "cdq", "--format", "gguf", "-o", "shrink=0"],
    }
    for name, flags in runs.items():
        code, _, err = run(capsys, "quantize", *flags, *common, "--output", tmp_path / name / "q")
        assert code == 0, err  # the same folder name: the file's general.name is the folder's
    files = {name: tmp_path / name / "q-gguf" / "model-Q4_0.gguf" for name in runs}
    assert files["preset"].read_bytes() == files["flags"].read_bytes()

    def tensors(path):
        return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}

    assert tensors(files["default"]) == tensors(files["flags"]) != tensors(files["off"])


def test_file_fills_defaults_and_the_command_line_wins(llama, calib, tmp_path, capsys) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        f"model: {llama}\nmethod: quantease\nbits: 3\ngroup-size: 16\nsym: true\ncalib: {calib}\n"
        "nsamples: 4\nseqlen: 32\nquiet: true\njson: true\noptions:\n  sweeps: 3\n  order: cyclic\n"
    )
    out = tmp_path / "q"
    code, stdout, stderr = run(
        capsys, "quantize", "--config", preset, "--bits", "4", "--asym", "-o", "sweeps=2", "--output", out
    )
    assert code == 0, stderr
    assert json.loads(stdout)["layers"] == 14  # json: true came from the file
    report = json.loads((out / "report.json").read_text())["run"]
    assert (report["method"], report["bits"], report["group_size"], report["sym"]) == (
        "quantease",
        4,
        16,
        False,
    )
    assert report["options"] == {"sweeps": 2, "order": "cyclic"}  # merged key by key, the flag wins
    assert report["calibration"]["nsamples"] == 4 and report["model"] == str(llama)
    config = report["config"]
    assert config["path"] == str(preset) and len(config["sha256"]) == 64
    assert "bits" not in config["from_file"] and "sym" not in config["from_file"]
    assert {"method", "group_size", "model", "calib"} <= set(config["from_file"])


def test_a_positional_model_overrides_the_preset(llama, calib, tmp_path, capsys) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        f"model: {tmp_path / 'missing'}\nmethod: rtn\ncalib: {calib}\nnsamples: 2\nseqlen: 16\n"
    )
    code, _, stderr = run(
        capsys, "quantize", "--config", preset, llama, "--output", tmp_path / "q", "--quiet"
    )
    assert code == 0, stderr
    assert json.loads((tmp_path / "q" / "report.json").read_text())["run"]["model"] == str(llama)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bitz: 3\n", "unknown key 'bitz'"),
        ("option: [sweeps=2]\n", "unknown key 'option' (use an 'options:' mapping for solver options)"),
        ("bits: three\n", "key 'bits' expects an integer, got str 'three'"),
        ("bits: 3.5\n", "key 'bits' expects an integer, got float 3.5"),
        ("sym: 'yes'\n", "key 'sym' expects true or false, got str 'yes'"),
        ("group_size: true\n", "key 'group_size' expects an integer, got bool True"),
        ("method: magic\n", "key 'method' must be one of rtn, gptq"),
        ("calib: 5\n", "key 'calib' expects a string, got int 5"),
        ("options: [1, 2]\n", "key 'options' expects a mapping of solver options"),
        ("options:\n  sweeps: [1]\n", "solver option 'sweeps' expects a single value"),
        ("- bits\n", "expected a mapping of option names to values, got list"),
        ("bits: [3\n", "not valid YAML"),
    ],
)
def test_bad_presets_are_refused_naming_the_key(text, message, llama, tmp_path, capsys) -> None:
    preset = tmp_path / "bad.yaml"
    preset.write_text(text)
    code, stdout, stderr = run(capsys, "quantize", "--config", preset, llama, "--output", tmp_path / "q")
    lines = stderr.strip().splitlines()
    assert code == 2 and stdout == "" and len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {preset}: ") and message in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_missing_config_file(llama, tmp_path, capsys) -> None:
    code, _, stderr = run(capsys, "quantize", "--config", tmp_path / "nope.yaml", llama)
    assert code == 2 and stderr.strip() == f"error: no such config file: {tmp_path / 'nope.yaml'}"


def test_solver_options_from_the_file_are_checked_against_the_method(llama, calib, tmp_path, capsys) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text("method: rtn\noptions:\n  sweeps: 3\n")
    code, _, stderr = run(capsys, "quantize", "--config", preset, llama, "--calib", calib, "--quiet")
    assert code == 2 and "unknown option(s) sweeps for method 'rtn'" in stderr
