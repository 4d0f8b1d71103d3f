"""The peer comparison's shared protocol (scripts/peers/, issue 19): the calibration file every tool
reads holds exactly the windows ``cdq quantize`` draws, a tampered file is refused, the grid check
passes a fake-quant model and refuses full-precision weights, and cdq's rows in the driver use the
protocol's calibration. (The peers themselves run in their own venvs, outside the suite.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cdq_cli.cli import main

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    path = REPO / "scripts" / "peers" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"peers_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.fixture(scope="module")
def protocol():
    return _load("protocol")


def test_calibration_file_holds_the_windows_cdq_quantize_draws(
    protocol, data_dir: Path, calib: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import LlamaTokenizer

    stories = data_dir / "models" / "stories260K"
    out = tmp_path / "q"
    args = ["quantize", stories, "--method", "rtn", "--bits", "4", "--calib", calib, "--nsamples", "4"]
    args += ["--seqlen", "64", "--seed", "3", "--output", out, "--quiet", "--json"]
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    used = json.loads((out / "report.json").read_text())["run"]["calibration"]["windows_sha256"]

    windows = protocol.cdq_windows(LlamaTokenizer.from_pretrained(stories), Path(calib), 4, 64, 3)
    file = tmp_path / "calib.safetensors"
    written = protocol.write_calib(file, windows, Path(calib), 3)
    assert written["state"] == "written" and written["windows_sha256"] == used
    ids, digest = protocol.read_calib(file)
    assert torch.equal(ids, windows) and digest == used
    assert protocol.write_calib(file, windows, Path(calib), 3)["state"] == "checked"
    with pytest.raises(SystemExit, match="differs from cdq's calibration windows"):
        protocol.write_calib(file, windows.flip(0), Path(calib), 3)

    tampered = tmp_path / "tampered.safetensors"
    save_file({"input_ids": windows.flip(0).contiguous()}, str(tampered), metadata={"sha256": digest})
    with pytest.raises(SystemExit, match="do not match their recorded sha256"):
        protocol.read_calib(tampered)


def _folder(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path


def _on_grid(gen: torch.Generator, rows: int, columns: int, bits: int) -> torch.Tensor:
    half = 2 ** (bits - 1)
    codes = torch.randint(-half, half, (rows, columns), generator=gen).float()
    return codes * torch.rand(rows, 1, generator=gen).add(0.01)


def test_grid_check_passes_fake_quant_weights_and_refuses_full_precision(protocol, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{b}.self_attn.{p}.weight" for b in range(2) for p in ("q_proj", "o_proj")]
    quantized = {name: _on_grid(gen, 16, 64, 3) for name in names}
    fp_norm = {"model.layers.0.input_layernorm.weight": torch.randn(64, generator=gen)}  # not checked
    report = protocol.grid_report(_folder(tmp_path / "q3", {**quantized, **fp_norm}), 3, len(names))
    assert report["ok"] and report["layers"] == 4 and report["max_distinct_per_row"] <= 8
    # the same weights are not a 2-bit grid; one full-precision layer is refused (what AutoRound's
    # fake export wrote for a float32 model); a missing layer is refused
    assert not protocol.grid_report(tmp_path / "q3", 2, len(names))["ok"]
    leaked = {**quantized, names[1]: torch.randn(16, 64, generator=gen)}
    report = protocol.grid_report(_folder(tmp_path / "fp", leaked), 3, len(names))
    assert not report["ok"] and [o["layer"] for o in report["off_grid"]] == [names[1]]
    assert not protocol.grid_report(tmp_path / "q3", 3, len(names) + 1)["ok"]


def test_grid_check_finds_the_scale_of_a_row_that_uses_few_codes(protocol, tmp_path: Path) -> None:
    """A row on a symmetric grid that uses no two adjacent codes (llm-compressor's AWQ W4 wrote one:
    {0, 5s, 7s}, smallest gap 2s) is on its grid at scale s; a row that is not stays refused, and so
    does a code beyond a B-bit grid's range."""
    s = 4.2552
    w = torch.tensor(
        [[0.0, 5 * s, 7 * s, 5 * s, 0.0, 7 * s], [-8.0, -1.0, 0.0, 3.0, 7.0, 2.0]], dtype=torch.float64
    )
    scale, off = protocol.row_scales(w, 4)
    assert scale[0, 0].item() == pytest.approx(s) and scale[1, 0].item() == 1.0 and float(off.max()) < 1e-9
    names = [f"model.layers.0.mlp.{p}.weight" for p in ("down_proj", "up_proj")]
    ok = protocol.grid_report(_folder(tmp_path / "few", {names[0]: w, names[1]: w}), 4, 2)
    assert ok["ok"] and ok["max_code"] == 8.0
    off_grid = torch.tensor([[0.0, 1.0, 1.37, 2.0]], dtype=torch.float64)
    assert float(protocol.row_scales(off_grid, 4)[1].max()) > 0.02
    wide = {names[0]: w, names[1]: torch.tensor([[0.0, 9.0, -3.0, 1.0]])}  # code 9 on a 4-bit grid
    report = protocol.grid_report(_folder(tmp_path / "wide", wide), 4, 2)
    assert not report["ok"] and report["off_grid"][0]["layer"] == names[1]


def test_driver_rows_share_the_protocol(protocol) -> None:
    run_all = _load("run_all")
    rows = run_all.rows(["-o", "target=fp"], "fp-target")
    cdq = [row for row in rows.values() if row.kind == "cdq"]
    peers = [row for row in rows.values() if row.kind == "peer"]
    assert len(cdq) == 8 and len(peers) == 10  # cdq (its default), cdq-own, the preset, gptq; W3 and W4
    for row in cdq:
        flags = dict(zip(row.argv[::1], row.argv[1::1], strict=False))
        assert flags["--nsamples"] == str(protocol.NSAMPLES) and flags["--seqlen"] == str(protocol.SEQLEN)
        assert flags["--seed"] == str(protocol.SEED) and flags["--calib"] == str(protocol.c4_path())
        assert (
            "--sym" in row.argv and row.argv[-2:] == ["-o", "target=fp"] and row.name.endswith("+fp-target")
        )
        assert row.rerun_flags == ["--cdq-extra", "-o target=fp", "--label", "fp-target"]
    preset = rows["cdq-cdq-hadamard-w3+fp-target"].argv
    assert preset[preset.index("--config") + 1] == str(REPO / "configs" / "cdq-hadamard.yaml")
    for row in peers:
        assert row.argv[row.argv.index("--calib") + 1] == str(protocol.CALIB_FILE)
        assert row.argv[row.argv.index("--bits") + 1] == str(row.bits)


def test_targets_are_judged_from_the_rows() -> None:
    run_all = _load("run_all")

    def row(tool: str, recipe: str, bits: int | None, wiki: float, ptb: float, cpu: float | None) -> dict:
        scores = {"wikitext2": {"ppl": wiki}, "ptb": {"ppl": ptb}}
        return {"tool": tool, "recipe": recipe, "bits": bits, "scores": scores, "cpu_seconds": cpu}

    records = [
        row("full precision", "-", None, 30.0, 60.0, None),
        row("cdq", "cdq", 3, 55.0, 120.0, 300.0),
        row("cdq", "gptq", 3, 90.0, 100.0, 200.0),
        row("AutoRound", "light", 3, 70.0, 110.0, 1000.0),
        row("llm-compressor", "awq", 3, 80.0, 115.0, 150.0),
        {**row("llm-compressor", "gptq", 3, 1.0, 1.0, 1.0), "failed": {"error": "x"}},  # never counts
        row("cdq", "cdq", 4, 35.0, 70.0, 300.0),
    ]
    lines = "\n".join(run_all.targets(records))
    assert "W3 WikiText-2: cdq's best is cdq at 55.00; below every peer (2 rows): **met**" in lines
    # the best recipe is one row (lowest WikiText-2), judged on PTB too: not the PTB-best gptq row
    assert "W3 PTB: cdq's best is cdq at 120.00; below every peer (2 rows): **missed**" in lines
    assert "(at or below it: AutoRound light 110.00; llm-compressor awq 115.00)" in lines
    assert "W3 WikiText-2 <= 2.0x FP = 60.00: 55.00, **met**" in lines
    assert "W3 CPU time of cdq's best (cdq) 300 s vs AutoRound light 1000 s: **met**" in lines
    assert "W4 WikiText-2 <= 1.15x FP = 34.50: 35.00, **missed**" in lines
    assert (
        "W4 WikiText-2: cdq's best is cdq at 35.00; below every peer (0 rows): **no peer row yet**" in lines
    )
    records[3]["scores"]["wikitext2"]["ppl"] = 55.0  # a peer level with cdq's best is not beaten
    assert "**missed** (at or below it: AutoRound light 55.00)" in "\n".join(run_all.targets(records))


def test_peer_venvs_can_live_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_all = _load("run_all")
    monkeypatch.delenv("PEER_VENV_ROOT", raising=False)
    assert run_all.venv_python("autoround") == str(REPO / ".venv-peer-autoround" / "bin" / "python")
    monkeypatch.setenv("PEER_VENV_ROOT", str(tmp_path))
    rows = run_all.rows([], None)
    assert rows["autoround-light-w3"].argv[0] == str(tmp_path / ".venv-peer-autoround" / "bin" / "python")
    assert rows["llmc-awq-w4"].argv[0] == str(tmp_path / ".venv-peer-llmcompressor" / "bin" / "python")


def test_table_prints_each_row_with_its_rerun_command(capsys: pytest.CaptureFixture) -> None:
    run_all = _load("run_all")
    scores = {"wikitext2": {"ppl": 29.187}, "ptb": {"ppl": 57.5}}
    records = [
        {
            "row": "llmc-awq-w3",
            "tool": "llm-compressor",
            "recipe": "awq",
            "bits": 3,
            "rerun": "B",
            "failed": {"error": "RuntimeError: no driver"},
        },
        {"row": "fp", "tool": "full precision", "recipe": "-", "bits": None, "rerun": "A", "scores": scores},
    ]
    run_all.table(records)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| full precision | - | FP32 | 29.19 | 57.50 | - | - | `A` |"  # sorted: FP first
    assert lines[3].startswith("| llm-compressor | awq | W3 | failed: RuntimeError: no driver |")
    assert lines[3].endswith("| - | - | `B` |")
