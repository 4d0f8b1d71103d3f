"""Resume and reproducibility: a run killed by a real SIGKILL resumes to byte-identical output, changed
inputs are refused, and two identical runs write identical bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_lm import save_tiny

from cdq_cli.cli import main
from cdq_cli.models import load_causal_lm
from cdq_cli.store import journal as resume
from cdq_cli.store.journal import KILL_ENV
from cdq_cli.store.names import journal_folder as work_folder

# Report keys that are times or say how this invocation went (a resumed run solved fewer layers
# itself), not results.
TIMING = {
    "started",
    "ended",
    "wall_seconds",
    "peak_memory_bytes",
    "seconds",
    "solve_seconds",
    "layers_per_rank",
    "solve_phase_seconds",
    "command",
    "resumed_blocks",
}


@pytest.fixture(scope="module")
def llama(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _model, tokenizer = load_causal_lm(str(data_dir / "models" / "stories260K"))
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-resume") / "llama", tokenizer)


@pytest.fixture(scope="module")
def argv(llama: Path, data_dir: Path) -> list[str]:
    calib = str(data_dir / "text" / "c4-sample.jsonl")
    return ["quantize", str(llama), "--method", "quantease", "--bits", "3", "--calib", calib,
            "--nsamples", "4", "--seqlen", "32", "--option", "sweeps=3", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(argv: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "q"
    assert main([*argv, "--output", str(out)]) == 0
    return out


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def same_output(a: Path, b: Path) -> None:
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "quantization.json").read_bytes() == (b / "quantization.json").read_bytes()
    report_a, report_b = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert without_timing(report_a) == without_timing(report_b)


def test_sigkill_then_resume_gives_byte_identical_output(argv, reference, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    env = {**os.environ, KILL_ENV: "0", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-m", "cdq_cli", *argv, "--output", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()  # no half-written output
    state = json.loads((work_folder(out) / "state.json").read_text())
    assert state["blocks_done"] == 1 and len(state["rows"]) == 7
    assert main([*argv, "--output", str(out), "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["resumed_blocks"] == 1
    assert not work_folder(out).exists()  # removed on success
    same_output(reference, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_two_identical_runs_write_identical_bytes(argv, reference, tmp_path) -> None:
    out = tmp_path / "again"
    assert main([*argv, "--output", str(out)]) == 0
    same_output(reference, out)
    assert json.loads((out / "report.json").read_text())["run"]["resumed_blocks"] == 0


def interrupt_after_first_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C right after block 0's state is saved (in-process; the SIGKILL test covers a real kill)."""
    real = resume.Journal.on_block_done

    def stop(self, index, rows, layers):
        real(self, index, rows, layers)
        raise KeyboardInterrupt

    monkeypatch.setattr(resume.Journal, "on_block_done", stop)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--bits", "4"], "settings (bits 3 -> 4) changed"),
        (["--option", "sweeps=2"], "settings (options {'sweeps': 3} -> {'sweeps': 2}) changed"),
        (["--nsamples", "3"], "calibration data changed"),
    ],
)
def test_resume_with_changed_inputs_is_refused(change, message, argv, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "q"
    with monkeypatch.context() as patch:
        interrupt_after_first_block(patch)
        assert main([*argv, "--output", str(out)]) == 130
    assert (work_folder(out) / "state.json").is_file() and not out.exists()
    capsys.readouterr()
    changed = [*argv, *change]  # the later flag wins (a later --option overrides the same key)
    code = main([*changed, "--output", str(out), "--resume"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert (
        code == 2
        and len(lines) == 1
        and lines[0].startswith("error: cannot resume: ")
        and message in lines[0]
    )
    assert "run without --resume" in lines[0] and not out.exists()
    assert main([*changed, "--output", str(out)]) == 0  # without --resume: starts over
    assert not work_folder(out).exists()


@pytest.mark.parametrize("saved", [None, "quantease revision 1"])
def test_a_state_from_another_solver_revision_is_refused(saved, argv, tmp_path, capsys, monkeypatch) -> None:
    """A method's results can change between releases for the same options (a new default): a
    state saved by the other revision (or by a cdq that did not record one: None) is not finished
    by this one."""
    out = tmp_path / "q"
    with monkeypatch.context() as patch:
        interrupt_after_first_block(patch)
        assert main([*argv, "--output", str(out)]) == 130
    path = work_folder(out) / "state.json"
    state = json.loads(path.read_text())
    from cdq_cli.solvers.registry import find_method

    current = find_method("quantease").revision
    assert state["fingerprint"]["versions"]["solver"] == f"quantease revision {current}"
    if saved is None:
        del state["fingerprint"]["versions"]["solver"]
    else:
        state["fingerprint"]["versions"]["solver"] = saved
    path.write_text(json.dumps(state))
    capsys.readouterr()
    assert main([*argv, "--output", str(out), "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cdq/torch/solver version changed" in lines[0], lines
    assert not out.exists()


def test_fp_inputs_run_resumes_identically(argv, tmp_path, monkeypatch) -> None:
    """COMQ's setting (next block fed full-precision outputs) restores the FP activations too."""
    args = [*argv, "--fp-inputs"]
    assert main([*args, "--output", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as patch:
        interrupt_after_first_block(patch)
        assert main([*args, "--output", str(tmp_path / "q")]) == 130
    assert main([*args, "--output", str(tmp_path / "q"), "--resume"]) == 0
    same_output(tmp_path / "whole", tmp_path / "q")


def test_resume_without_state_starts_fresh(argv, reference, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    code = main([a for a in argv if a != "--quiet"] + ["--output", str(out), "--resume"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "no saved state for q (nothing to resume): starting fresh" in captured.err
    same_output(reference, out)


CPU_FAILURE = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4096 bytes. Error code 12"


@pytest.mark.parametrize("where", ["sigma", "solve", "read"])
def test_out_of_memory_names_the_block_and_tensor_then_resume_continues(
    where, argv, reference, tmp_path, capsys, monkeypatch
) -> None:
    """A simulated allocation failure in block 1 (its Σ, a solve on a GPU, reading a weight): one
    line naming the block and what did not fit, the finished block kept, and --resume ends with
    the uninterrupted run's bytes."""
    from cdq_cli import capture, pipeline
    from cdq_cli.store import checkpoint

    out = tmp_path / "q"
    with monkeypatch.context() as patch:
        if where == "sigma":  # block 1's first Σ (7 accumulators per block: q, k, v, o, gate, up, down)
            made = []
            real_sigma = capture.SigmaAccumulator

            def sigma(*args, **kwargs):
                made.append(1)
                if len(made) == 8:
                    raise RuntimeError(CPU_FAILURE)
                return real_sigma(*args, **kwargs)

            patch.setattr(capture, "SigmaAccumulator", sigma)
            expected = (
                "out of memory in model.layers.1: Σ of self_attn.q_proj (32x32 float32, 0.0 MiB) did not fit"
            )
        elif where == "solve":
            real_solve = pipeline.solve_layer

            def solve(name, *args, **kwargs):
                if name == "model.layers.1.mlp.down_proj":
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
                return real_solve(name, *args, **kwargs)

            patch.setattr(pipeline, "solve_layer", solve)
            expected = (
                "out of memory in model.layers.1: solving model.layers.1.mlp.down_proj (32x64) did not fit "
                "(CUDA out of memory. Tried to allocate 20.00 MiB)"
            )
        else:
            real_read = checkpoint.CheckpointWeights.tensor

            def read(self, name, dtype=None):
                if name == "model.layers.1.mlp.up_proj.weight":
                    raise MemoryError
                return real_read(self, name, dtype)

            patch.setattr(checkpoint.CheckpointWeights, "tensor", read)
            expected = (
                "out of memory in model.layers.1: model.layers.1.mlp.up_proj.weight (64x32 float32, 0.0 MiB) "
                "did not fit (MemoryError)"
            )
        code = main([*argv, "--output", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {expected}"), lines[0]
    assert lines[0].endswith(
        f"1 finished block(s) are saved in {work_folder(out)}: run the same command with --resume to continue"
    )
    assert not out.exists()
    assert main([*argv, "--output", str(out), "--resume"]) == 0
    assert json.loads((out / "report.json").read_text())["run"]["resumed_blocks"] == 1
    same_output(reference, out)
