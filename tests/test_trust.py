"""Trust: no input loses data, runs code, or passes silently wrong (issue "Trust", parts 2 to 5).

Every case is the exact situation a user could create: a sentinel file survives ``--overwrite``,
the source model's bytes are unchanged, a remote-code folder's code never runs even with ``y`` on
stdin, an edited table is refused, ``--json`` output parses as strict JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import cli
from safetensors.torch import load_file, save_file
from tiny_lm import save_tiny

from cdq_cli import pipeline
from cdq_cli.cli import main
from cdq_cli.models import load_causal_lm
from cdq_cli.store.journal import TERM_ENV
from cdq_cli.store.names import journal_folder

REPO = Path(__file__).resolve().parents[1]
FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path):
    return load_causal_lm(str(data_dir / "models" / "stories260K"))[1]


@pytest.fixture()
def llama(tokenizer, tmp_path: Path) -> Path:
    """A fresh tiny Llama folder per test (tests edit it)."""
    return save_tiny("llama", tmp_path / "llama", tokenizer)


@pytest.fixture(scope="module")
def quantized(tokenizer, calib: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cdq output folder (rtn, 4 bits) to copy and tamper with."""
    root = tmp_path_factory.mktemp("trust-out")
    model = save_tiny("llama", root / "llama", tokenizer)
    out = root / "q"
    assert (
        main(["quantize", str(model), "--method", "rtn", "--calib", calib, *FAST, "--output", str(out)]) == 0
    )
    return out


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name} in {text!r}")

    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------------------------
# 2. Nothing lost


def test_overwrite_never_replaces_a_folder_cdq_did_not_write(llama, calib, tmp_path, capsys) -> None:
    out = tmp_path / "photos"
    (out / "2024" / "june").mkdir(parents=True)
    (out / "2024" / "june" / "beach.jpg").write_bytes(b"sentinel")
    code, _, stderr = cli(capsys, "quantize", llama, "--calib", calib, *FAST, "--output", out, "--overwrite")
    assert code == 2 and "cdq did not write it" in one_error_line(stderr)
    assert (out / "2024" / "june" / "beach.jpg").read_bytes() == b"sentinel"


def test_overwrite_refuses_the_current_folder_and_its_parents(llama, calib, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "sentinel.txt").write_text("keep")
    monkeypatch.chdir(work)
    for target in (".", "..", str(tmp_path)):
        code, _, stderr = cli(
            capsys, "quantize", llama, "--calib", calib, *FAST, "--output", target, "--overwrite"
        )
        assert code == 2 and "current folder" in one_error_line(stderr), target
    assert (work / "sentinel.txt").read_text() == "keep"


def test_overwrite_refuses_the_source_model_and_folders_holding_it(llama, calib, tmp_path, capsys):
    before = digest(llama)
    for target in (llama, llama.parent):
        code, _, stderr = cli(
            capsys, "quantize", llama, "--calib", calib, *FAST, "--output", target, "--overwrite"
        )
        assert code == 2 and "which cdq reads" in one_error_line(stderr), target
    assert digest(llama) == before


def test_preset_output_with_overwrite_obeys_the_same_rules(llama, calib, tmp_path, capsys) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"output: {victim}\noverwrite: true\nmethod: rtn\n")
    code, _, stderr = cli(capsys, "quantize", llama, "--config", preset, "--calib", calib, *FAST)
    assert code == 2 and "cdq did not write it" in one_error_line(stderr)
    assert (victim / "thesis.tex").read_text() == "years of work"


def test_an_export_never_replaces_its_own_source(quantized, tmp_path, capsys) -> None:
    source = tmp_path / "q"
    shutil.copytree(quantized, source)
    before = digest(source)
    code, _, stderr = cli(capsys, "export", source, "--output", source, "--overwrite")
    assert code == 2 and "needs its own folder" in one_error_line(stderr)
    code, _, stderr = cli(capsys, "export", source, "--output", tmp_path, "--overwrite")
    assert code == 2 and "which cdq reads" in one_error_line(stderr)
    assert digest(source) == before


def test_report_plot_never_overwrites_a_file_cdq_did_not_write(quantized, tmp_path, capsys) -> None:
    folder = tmp_path / "q"
    shutil.copytree(quantized, folder)
    (folder / "report.png").write_bytes(b"my own picture")
    code, _, stderr = cli(capsys, "report", folder)
    assert code == 2 and "cdq did not write" in one_error_line(stderr)
    assert (folder / "report.png").read_bytes() == b"my own picture"
    (folder / "report.png").unlink()
    assert cli(capsys, "report", folder)[0] == 0  # cdq's own plot, recorded in the manifest...
    assert cli(capsys, "report", folder)[0] == 0  # ...so it may be replaced next time


@pytest.mark.parametrize(
    ("where", "value"),
    [("model.norm.weight", "nan"), ("model.layers.1.self_attn.v_proj.weight", "nan"),
     ("model.layers.0.mlp.down_proj.weight", "-inf")],
)  # fmt: skip
def test_nan_anywhere_in_the_model_is_refused_before_any_work(
    where, value, llama, calib, tmp_path, capsys, monkeypatch
):
    weights = load_file(str(llama / "model.safetensors"))
    weights[where][0] = float(value)
    save_file(weights, str(llama / "model.safetensors"), metadata={"format": "pt"})

    def never(*args, **kwargs):
        raise AssertionError("no block may be quantized")

    monkeypatch.setattr("cdq_cli.pipeline.quantize_model", never)
    out = tmp_path / "q"
    code, _, stderr = cli(capsys, "quantize", llama, "--calib", calib, *FAST, "--output", out)
    assert code == 2 and f"tensor {where} holds NaN/Inf" in one_error_line(stderr)
    assert not out.exists() and not journal_folder(out).exists()


def test_unwritable_output_is_refused_before_any_work(llama, calib, tmp_path, capsys, monkeypatch) -> None:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "q"
    else:  # root ignores permission bits: use a location no process may create folders in
        target = Path("/sys/cdq-output")
        try:
            target.mkdir()
        except OSError:
            pass
        else:
            target.rmdir()
            pytest.skip("no unwritable location on this machine")

    def never(*args, **kwargs):
        raise AssertionError("the model must not even be loaded")

    monkeypatch.setattr("cdq_cli.models.load_causal_lm", never)
    code, _, stderr = cli(capsys, "quantize", llama, "--calib", calib, *FAST, "--output", target)
    assert code == 2 and "is not writable" in one_error_line(stderr)
    file = tmp_path / "a-file"
    file.write_text("x")
    code, _, stderr = cli(capsys, "quantize", llama, "--calib", calib, *FAST, "--output", file / "q")
    assert code == 2 and "not writable" in one_error_line(stderr)


def test_bad_input_found_mid_run_leaves_no_journal(llama, calib, tmp_path, capsys, monkeypatch) -> None:
    real = pipeline.round_layer  # rtn's layers are solved without Σ (pipeline._Run.unweighted)

    def second_block_is_bad(name, *args, **kwargs):
        if ".layers.1." in name:
            raise ValueError(f"{name}: activations overflowed")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(pipeline, "round_layer", second_block_is_bad)
    out = tmp_path / "q"
    code, _, stderr = cli(
        capsys, "quantize", llama, "--method", "rtn", "--calib", calib, *FAST, "--output", out
    )
    line = one_error_line(stderr)
    assert code == 2 and "overflowed" in line and "--resume" not in line
    assert not out.exists() and not journal_folder(out).exists()


def test_interrupt_keeps_the_journal_and_says_resume(llama, calib, tmp_path, capsys, monkeypatch) -> None:
    real = pipeline.round_layer  # rtn's layers are solved without Σ (pipeline._Run.unweighted)

    def interrupted(name, *args, **kwargs):
        if ".layers.1." in name:
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(pipeline, "round_layer", interrupted)
    out = tmp_path / "q"
    code, _, stderr = cli(
        capsys, "quantize", llama, "--method", "rtn", "--calib", calib, *FAST, "--output", out
    )
    line = one_error_line(stderr)
    assert code == 130 and line.startswith("error: interrupted") and "--resume" in line
    assert (journal_folder(out) / "state.json").is_file() and not out.exists()


def test_an_interrupt_just_after_a_state_is_published_keeps_it(llama, calib, tmp_path, capsys, monkeypatch):
    """Ctrl-C landing right after block 0's state replaced the old one on disk (before the journal
    could note it in memory): the saved block counts, its journal stays and the line says --resume."""
    from cdq_cli.store import journal as journal_module

    real = journal_module._atomic

    def published_then_interrupted(path, write):
        real(path, write)
        if path.name == "state.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(journal_module, "_atomic", published_then_interrupted)
    out = tmp_path / "q"
    code, _, stderr = cli(
        capsys, "quantize", llama, "--method", "rtn", "--calib", calib, *FAST, "--output", out
    )
    line = one_error_line(stderr)
    assert code == 130 and line.startswith("error: interrupted; 1 finished block(s) are saved")
    assert json.loads((journal_folder(out) / "state.json").read_text())["blocks_done"] == 1


def test_disk_full_keeps_the_journal_and_says_resume(llama, calib, tmp_path, capsys, monkeypatch) -> None:
    from cdq_cli.store.shards import ShardWriter

    real = ShardWriter.write

    def full_at_the_second_block(self, tensors, metadata=None):
        if any(".layers.1." in name for name in tensors):
            raise OSError(28, "No space left on device")
        return real(self, tensors, metadata)

    monkeypatch.setattr(ShardWriter, "write", full_at_the_second_block)
    out = tmp_path / "q"
    code, _, stderr = cli(
        capsys, "quantize", llama, "--method", "rtn", "--calib", calib, *FAST, "--output", out
    )
    line = one_error_line(stderr)
    assert code == 1 and f"no space left on device while writing {out}" in line
    assert "2 finished block(s) are saved" in line and "--resume" in line  # block 1 was solved and saved
    assert journal_folder(out).is_dir() and not out.exists()
    monkeypatch.setattr(ShardWriter, "write", real)
    code, _, stderr = cli(
        capsys, "quantize", llama, "--method", "rtn", "--calib", calib, *FAST, "--output", out, "--resume"
    )
    assert code == 0, stderr
    assert out.is_dir() and not journal_folder(out).exists()


def test_sigterm_is_handled_like_ctrl_c_then_resume_finishes(llama, calib, tmp_path) -> None:
    args = [sys.executable, "-m", "cdq_cli", "quantize", str(llama), "--method", "gptq", "--calib", calib,
            *FAST]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run([*args, "--output", str(reference)], env=env, check=True, capture_output=True)
    out = tmp_path / "q"
    stopped = subprocess.run(
        [*args, "--output", str(out)], env={**env, TERM_ENV: "0"}, capture_output=True, text=True
    )
    assert stopped.returncode == 143, stopped.stderr
    line = one_error_line(stopped.stderr)
    assert (
        line.startswith("error: terminated")
        and "1 finished block(s) are saved" in line
        and "--resume" in line
    )
    assert (journal_folder(out) / "state.json").is_file() and not out.exists()
    resumed = subprocess.run(
        [*args, "--output", str(out), "--resume"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert not journal_folder(out).exists()


def test_a_folder_that_is_not_a_journal_is_never_deleted(llama, calib, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    impostor = journal_folder(out)
    impostor.mkdir()
    (impostor / "notes.txt").write_text("not cdq's")
    code, _, stderr = cli(
        capsys, "quantize", llama, "--method", "rtn", "--calib", calib, *FAST, "--output", out
    )
    assert code == 2 and "not a cdq resume journal" in one_error_line(stderr)
    assert (impostor / "notes.txt").read_text() == "not cdq's"


# --------------------------------------------------------------------------------------------
# 3. Nothing run

_EVIL = """
import pathlib
pathlib.Path({sentinel!r}).write_text("code from the model folder ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evil"
"""


def test_remote_code_is_refused_and_never_runs(llama, calib, tmp_path) -> None:
    sentinel = tmp_path / "pwned"
    (llama / "configuration_evil.py").write_text(_EVIL.format(sentinel=str(sentinel)))
    config = json.loads((llama / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (llama / "config.json").write_text(json.dumps(config))
    for command in (
        ["quantize", str(llama), "--calib", calib, *FAST, "--output", str(tmp_path / "q"), "--json"],
        ["eval", str(llama), "--data", calib, "--json"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "cdq_cli", *command], input="y\ny\n", capture_output=True, text=True
        )
        line = one_error_line(done.stderr)
        assert done.returncode == 2 and strict_json(done.stdout) == {"error": line[7:], "exit_code": 2}
        assert "configuration_evil.py" in line and "never runs code" in line
        assert not sentinel.exists()


def test_table_values_are_checked_against_allow_lists(quantized, tmp_path, wikitext, capsys) -> None:
    for key, value, message in (
        ("dtype", "Tensor", "dtype 'Tensor' is not one of"),
        ("kind", "__import__", "unknown model kind"),
    ):
        folder = tmp_path / key
        shutil.copytree(quantized, folder)
        table = json.loads((folder / "quantization.json").read_text())
        table[key] = value
        (folder / "quantization.json").write_text(json.dumps(table))
        code, _, stderr = cli(capsys, "eval", folder, "--data", wikitext, "--max-windows", "1")
        assert code == 2 and message in one_error_line(stderr)


# --------------------------------------------------------------------------------------------
# 4. Nothing silently wrong


def test_deleted_table_is_refused(quantized, tmp_path, wikitext, capsys) -> None:
    folder = tmp_path / "q"
    shutil.copytree(quantized, folder)
    (folder / "quantization.json").unlink()
    code, out, stderr = cli(capsys, "eval", folder, "--data", wikitext, "--max-windows", "1", "--json")
    assert code == 2 and "without its quantization.json" in one_error_line(stderr)
    assert strict_json(out) == {"error": one_error_line(stderr)[7:], "exit_code": 2}  # --json: the error


def test_edited_bits_are_refused(quantized, tmp_path, wikitext, capsys) -> None:
    """4 -> 2 in quantization.json alone: the two copies disagree; in both: the sizes do not match."""
    folder = tmp_path / "q"
    shutil.copytree(quantized, folder)
    table = json.loads((folder / "quantization.json").read_text())
    layer = next(iter(table["layers"]))
    table["layers"][layer]["bits"] = 2
    (folder / "quantization.json").write_text(json.dumps(table, indent=2))
    code, _, stderr = cli(capsys, "eval", folder, "--data", wikitext, "--max-windows", "1")
    assert code == 2 and "disagree" in one_error_line(stderr)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file(
        tensors,
        str(folder / "model.safetensors"),
        metadata={"format": "pt", "cdq_quantization": json.dumps(table)},
    )
    code, _, stderr = cli(capsys, "eval", folder, "--data", wikitext, "--max-windows", "1")
    line = one_error_line(stderr)
    assert code == 2 and f"layer {layer}: qweight" in line and "2-bit codes" in line


def test_nan_metric_is_an_error_and_json_is_strict(llama, quantized, wikitext, capsys) -> None:
    code, out, stderr = cli(capsys, "eval", quantized, "--data", wikitext, "--max-windows", "2", "--json")
    assert code == 0 and math.isfinite(strict_json(out)["ppl"])
    weights = load_file(str(llama / "model.safetensors"))
    weights["model.embed_tokens.weight"][:] = float("inf")
    save_file(weights, str(llama / "model.safetensors"), metadata={"format": "pt"})
    code, out, stderr = cli(capsys, "eval", llama, "--data", wikitext, "--max-windows", "2", "--json")
    assert code == 2 and "non-finite" in one_error_line(stderr)
    assert strict_json(out) == {"error": one_error_line(stderr)[7:], "exit_code": 2}  # never a NaN result


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_source_files_name_the_file(name, llama, calib, tmp_path, capsys) -> None:
    path = llama / "model.safetensors"
    if name == "pytorch_model.bin":
        path.unlink()
        path = llama / name
        path.write_bytes(b"\x80\x02not a pickle at all")
    else:
        path.write_bytes(path.read_bytes()[:300])  # truncated
    code, _, stderr = cli(capsys, "quantize", llama, "--calib", calib, *FAST, "--output", tmp_path / "q")
    assert code == 2 and f"cannot load {llama}" in one_error_line(stderr)


def test_truncated_output_and_journal_files_name_the_file(
    llama, quantized, calib, wikitext, tmp_path, capsys
):
    folder = tmp_path / "q"
    shutil.copytree(quantized, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, stderr = cli(capsys, "eval", folder, "--data", wikitext, "--max-windows", "1")
    assert code == 2 and f"cannot read {weights}" in one_error_line(stderr)
    # a journal whose block file was truncated
    out = tmp_path / "resumed"
    env = {**os.environ, TERM_ENV: "0", "OMP_NUM_THREADS": "1"}
    run = ["quantize", str(llama), "--method", "rtn", "--calib", calib, *FAST, "--output", str(out)]
    assert (
        subprocess.run([sys.executable, "-m", "cdq_cli", *run], env=env, capture_output=True).returncode
        == 143
    )
    block = journal_folder(out) / "block-00000.safetensors"
    block.write_bytes(block.read_bytes()[:64])
    code, _, stderr = cli(capsys, *run, "--resume")
    assert code == 2 and f"cannot read saved block {block}" in one_error_line(stderr)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-o", "sweeps=abc"], "sweeps (option sweeps of cdq) must be an integer >= 0, got 'abc'"),
        (["-o", "sweeps=-3"], "must be an integer >= 0, got '-3'"),
        (["-o", "tolerance=2"], "tolerance (option tolerance of cdq) must be a number in [0, 1)"),
        (["-o", "order=random"], "must be one of cyclic, diag, greedy"),
        (["--method", "gptq", "-o", "act_order=maybe"], "must be true or false"),
        (["--seed", "-1"], "--seed must be at least 0"),
    ],
)
def test_options_are_typed_and_ranged(flags, message, llama, calib, tmp_path, capsys) -> None:
    code, _, stderr = cli(
        capsys, "quantize", llama, *flags, "--calib", calib, *FAST, "--output", tmp_path / "q"
    )
    assert code == 2 and message in one_error_line(stderr)


# --------------------------------------------------------------------------------------------
# 5. Help that reads


def _help(command: str, columns: int = 80) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb"}
    done = subprocess.run(
        [sys.executable, "-m", "cdq_cli", command, "--help"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


COMMANDS = ("quantize", "eval", "export", "report", "compare", "methods")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_uncut(command) -> None:
    text = _help(command)
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines()), text


def test_quantize_help_mentions_vision_images_and_where_option_keys_are() -> None:
    text = " ".join(_help("quantize").split())
    assert "timm" in text and "image" in text and "cdq methods" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_documented(command) -> None:
    documented = (REPO / "README.md").read_text() + "".join(
        p.read_text() for p in (REPO / "docs").glob("*.md")
    )
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", _help(command, columns=200))) - {"--help"}
    missing = sorted(o for o in options if f"`{o}" not in documented and f"{o} " not in documented)
    assert not missing, f"cdq {command}: {missing} not in README.md or docs/"


def test_export_takes_output_and_keeps_dest_as_alias(quantized, tmp_path, capsys) -> None:
    for flag in ("--output", "--dest"):
        dest = tmp_path / flag.strip("-")
        code, out, stderr = cli(capsys, "export", quantized, flag, dest, "--json")
        assert code == 0, stderr
        assert strict_json(out)["output"] == str(dest) and (dest / "quantize_config.json").is_file()


def test_no_library_noise_on_stderr_when_it_is_not_a_terminal(llama, calib, tmp_path) -> None:
    """Piped stderr (CI logs) gets cdq's own lines only: no weight-loading bars, no warnings."""
    done = subprocess.run(
        [sys.executable, "-m", "cdq_cli", "quantize", str(llama), "--method", "rtn", "--calib", calib,
         "--nsamples", "4", "--seqlen", "32", "--output", str(tmp_path / "q")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    own = re.compile(r"^(loading |calibration: |quantizing |block \d|  \[\d+/\d+\] |writing |done in )")
    noise = [line for line in done.stderr.splitlines() if not own.match(line)]
    assert not noise, noise
    quiet = subprocess.run(
        [sys.executable, "-m", "cdq_cli", "quantize", str(llama), "--method", "rtn", "--calib", calib, *FAST,
         "--output", str(tmp_path / "q2")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_sigterm_handler_does_not_leak_out_of_main(capsys) -> None:
    before = signal.getsignal(signal.SIGTERM)
    cli(capsys, "methods")
    assert signal.getsignal(signal.SIGTERM) is before


def test_methods_lists_every_option_as_strict_json(capsys) -> None:
    from cdq_cli.solvers import METHODS

    code, out, _ = cli(capsys, "methods", "--json")
    listing = strict_json(out)
    assert code == 0 and {m: set(v["options"]) for m, v in listing.items()} == {
        m: set(method.options) for m, method in METHODS.items()
    }


def test_every_solver_keyword_is_a_declared_option() -> None:
    """No keyword option of a solver escapes the registry's typing (the one internal keyword is the
    fixed grid a GGUF type's solve goes through, Method.fixed_grid); an option the driver consumes
    (``solver=False``, e.g. ``target``) is not a solve keyword. A method solved in phases takes its
    keywords in its ``phases`` (its ``solve`` passes them on)."""
    import inspect

    from cdq_cli.solvers import METHODS

    for name, method in METHODS.items():
        internal = {method.fixed_grid} if method.fixed_grid is not None else set()
        keywords = {
            option
            for option, p in inspect.signature(method.phases or method.solve).parameters.items()
            if p.kind is p.KEYWORD_ONLY
        }
        declared = {option for option, typed in method.options.items() if typed.solver}
        assert keywords - internal == declared, name
        assert not keywords & (set(method.options) - declared), name
