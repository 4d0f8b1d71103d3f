"""``cdq report`` and ``cdq compare``: tables (plain when not a TTY), JSON, the PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import cli

from cdq_cli.records import LayerRow, RunRecord
from cdq_cli.run.plan import make_settings
from cdq_cli.store import report as reports

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def row(name: str, error: float, relative: float, rtn: float, outliers: int = 0) -> LayerRow:
    return LayerRow(name, [32, 64], 3, None, False, "quantease", error, relative, rtn, error * 2, 3, 0.25,
                    outliers, 128)  # fmt: skip


def write_run(folder: Path, rows: list[LayerRow], method: str, evaluation: dict | None = None) -> Path:
    """A real report.json (rendered by cdq_cli.store.report from a run record) for ``rows``."""
    record = RunRecord(
        model="models/tiny", family="llama", dtype="float32", settings=make_settings(method=method, bits=3),
        seed=0, batch_size=8, command="cdq quantize models/tiny", config=None,
        calibration={"source": "c4-sample.jsonl", "nsamples": 4, "seqlen": 32, "seed": 0},
        rows=rows, unquantized=[], parallel={}, sections={}, started="s", ended="e", wall_seconds=1.5,
        peak_memory=reports.peak_memory(torch.device("cpu")), evaluation=evaluation,
    )  # fmt: skip
    folder.mkdir(parents=True)
    reports.write(folder, reports.render(record))
    return folder


NAMES = [f"model.layers.{b}.{n}" for b in range(3) for n in ("self_attn.q_proj", "mlp.down_proj")]


@pytest.fixture
def run_a(tmp_path: Path) -> Path:
    rows = [row(name, 1.0 + i, 0.01 * (i % 4 + 1), 2.0 + i) for i, name in enumerate(NAMES)]
    return write_run(tmp_path / "a", rows, "rtn", {"data": "wiki", "ppl": 20.0, "fp_ppl": 18.0, "windows": 2})


@pytest.fixture
def run_b(tmp_path: Path) -> Path:
    rows = [
        row(name, (1.0 + i) * (0.5 if i % 2 else 2.0), 0.005 * (i + 1), 2.0 + i, 3)
        for i, name in enumerate(NAMES)
    ]
    return write_run(
        tmp_path / "b", rows[1:], "cdq", {"data": "wiki", "ppl": 19.0, "fp_ppl": 18.0, "windows": 2}
    )


def test_report_plain_table_worst_first_and_png(run_a: Path, capsys) -> None:
    code, out, err = cli(capsys, "report", run_a, "--top", "3")
    assert code == 0 and err == "", err
    lines = out.splitlines()
    assert lines[0] == "model: models/tiny (llama, float32)"
    assert lines[1].startswith("method: rtn w3 asym")
    assert "layers: 6, mean relative error" in lines[2] and "error vs RTN (geomean)" in lines[2]
    assert "evaluation: wiki, ppl 20.0000, fp_ppl 18.0000" in out
    assert "worst 3 of 6 layers by relative error" in out
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    assert lines[header].split() == [
        "layer",
        "shape",
        "error",
        "rel.",
        "err",
        "err/RTN",
        "time",
        "s",
        "outliers",
    ]
    body = [line.split() for line in lines[header + 2 : header + 5]]
    assert [cells[0] for cells in body] == [NAMES[3], NAMES[2], NAMES[1]]  # relative error 0.04, 0.03, 0.02
    assert body[0][1:] == ["32x64", "4", "0.04", "0.800", "0.25", "0"]
    assert "\x1b[" not in out  # no colour codes when not a terminal
    png = run_a / "report.png"
    assert lines[-1] == f"plot: {png}"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000


def test_report_json_and_custom_plot_path(run_a: Path, tmp_path: Path, capsys) -> None:
    code, out, err = cli(
        capsys, "report", run_a / "report.json", "--json", "--top", "0", "--plot", tmp_path / "p.png"
    )
    assert code == 0, err
    payload = json.loads(out)
    relative = [r["relative_error"] for r in payload["worst_layers"]]
    assert len(relative) == 6 and relative == sorted(relative, reverse=True)
    assert payload["worst_layers"][0]["error_vs_rtn"] == pytest.approx(4.0 / 5.0)
    assert [b["block"] for b in payload["blocks"]] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert payload["blocks"][0]["mean_relative_error"] == pytest.approx((0.01 + 0.02) / 2)
    assert (
        payload["plot"] == str(tmp_path / "p.png") and (tmp_path / "p.png").read_bytes()[:8] == PNG_SIGNATURE
    )
    assert not (run_a / "report.png").exists()


def test_report_no_plot_and_errors(run_a: Path, tmp_path: Path, capsys) -> None:
    code, _, _ = cli(capsys, "report", run_a, "--no-plot")
    assert code == 0 and not (run_a / "report.png").exists()
    code, out, err = cli(capsys, "report", tmp_path / "missing")
    assert (
        code == 2
        and out == ""
        and err.strip() == f"error: no report found: {tmp_path / 'missing'} does not exist"
    )
    (tmp_path / "junk.json").write_text("{}")
    code, _, err = cli(capsys, "report", tmp_path / "junk.json")
    assert code == 2 and "is not a cdq report" in err
    code, _, err = cli(capsys, "report", run_a, "--top", "-1")
    assert code == 2 and "--top must be 0 (all) or positive" in err


def test_compare_matches_layers_by_name(run_a: Path, run_b: Path, capsys) -> None:
    code, out, err = cli(capsys, "compare", run_a, run_b, "--json", "--top", "0")
    assert code == 0, err
    payload = json.loads(out)
    assert (
        payload["matched_layers"] == 5 and payload["only_in_a"] == [NAMES[0]] and payload["only_in_b"] == []
    )
    ratios = {m["name"]: m["ratio_b_over_a"] for m in payload["layers"]}
    assert ratios[NAMES[1]] == pytest.approx(0.5) and ratios[NAMES[2]] == pytest.approx(2.0)
    assert [m["ratio_b_over_a"] for m in payload["layers"]] == sorted(ratios.values(), reverse=True)
    assert payload["b_better_layers"] == 3
    assert payload["geomean_ratio_b_over_a"] == pytest.approx((0.5**3 * 2.0**2) ** (1 / 5))
    assert payload["evaluation"]["ppl"] == {"a": 20.0, "b": 19.0, "ratio": pytest.approx(0.95)}
    code, out, err = cli(capsys, "compare", run_a, run_b, "--top", "2")
    assert code == 0, err
    assert "A: rtn w3 on tiny" in out and "B: cdq w3 on tiny" in out
    assert "1 layers only in A" in out and "ppl: A 20.0000  B 19.0000  (B/A 0.9500)" in out
    table = out.splitlines()[-2:]
    assert [line.split()[-1] for line in table] == ["2.000", "2.000"]


def test_compare_without_evaluation_in_both(run_a: Path, tmp_path: Path, capsys) -> None:
    plain = write_run(tmp_path / "c", [row(NAMES[0], 1.0, 0.01, 2.0)], "gptq")
    code, out, err = cli(capsys, "compare", plain, run_a, "--json")
    assert code == 0, err
    assert json.loads(out)["evaluation"] is None
