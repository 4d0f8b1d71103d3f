"""Hostile and careless input (issue "Nothing a user types loses a file, hangs, or reads what it was
not given"): every numbered case of the second hostile-input probe, as the user would meet it.

Each test is the situation itself: a sentinel file that must survive, two real processes racing
for one output, a stale torchrun environment in a real shell, a signal sent to a real process, a
checkpoint index that points outside its folder. docs/cli.md ("What cdq promises") points here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_runner import cli
from safetensors.torch import load_file, save_file
from tiny_lm import save_tiny

from cdq_cli.cli import main
from cdq_cli.models import load_causal_lm
from cdq_cli.store.names import journal_folder, lock_file

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CDQ_SHUTDOWN_S": "5"}


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path):
    return load_causal_lm(str(data_dir / "models" / "stories260K"))[1]


@pytest.fixture(scope="module")
def stories(data_dir: Path) -> Path:
    return data_dir / "models" / "stories260K"


@pytest.fixture()
def llama(tokenizer, tmp_path: Path) -> Path:
    """A fresh tiny Llama folder per test (tests edit it)."""
    return save_tiny("llama", tmp_path / "llama", tokenizer)


@pytest.fixture(scope="module")
def quantized(tokenizer, calib: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished cdq output folder (rtn, 4 bits) to copy."""
    root = tmp_path_factory.mktemp("hostile-out")
    model = save_tiny("llama", root / "llama", tokenizer)
    out = root / "q"
    assert (
        main(["quantize", str(model), "--method", "rtn", "--calib", calib, *FAST, "--output", str(out)]) == 0
    )
    return out


def cdq(
    *args: object, env: dict | None = None, timeout: float = 240, **kwargs
) -> subprocess.CompletedProcess:
    """A real ``cdq`` process."""
    return subprocess.run(
        [sys.executable, "-m", "cdq_cli", *map(str, args)],
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


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


def unwritable(tmp_path: Path) -> Path:
    """A folder no process may create entries in (root ignores permission bits: /sys then)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked
    target = Path("/sys/cdq-probe")
    try:
        target.mkdir()
    except OSError:
        return Path("/sys")
    target.rmdir()
    pytest.skip("no unwritable location on this machine")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------------------------
# 1. `cdq report --plot PATH` never replaces a file it did not write


def test_report_plot_never_replaces_a_file_cdq_did_not_write(quantized, tmp_path, capsys) -> None:
    run = tmp_path / "q"
    shutil.copytree(quantized, run)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    before = digest(run)
    for target, message in (
        (run / "model.safetensors", "it is a file of the cdq folder"),
        (run / "report.json", "it is a file of the cdq folder"),
        (notes, "which is not a plot cdq wrote"),
        (tmp_path, "is a folder"),
    ):
        code, _, err = cli(capsys, "report", run, "--plot", target)
        assert code == 2 and message in one_error_line(err), target
    assert digest(run) == before and notes.read_text() == "my notes"
    picture = tmp_path / "plots" / "errors.png"
    assert cli(capsys, "report", run, "--plot", picture)[0] == 0  # a new file: written
    assert cli(capsys, "report", run, "--plot", picture)[0] == 0  # a plot cdq wrote: replaced
    inside = run / "extra.png"
    assert cli(capsys, "report", run, "--plot", inside)[0] == 0  # into a cdq folder: listed as cdq's
    manifest = json.loads((run / ".cdq-manifest.json").read_text())
    assert "extra.png" in manifest["files"] and manifest["kind"] == "quantize"


def test_report_plot_to_an_unwritable_or_full_place_is_one_line(quantized, tmp_path, capsys, monkeypatch):
    code, _, err = cli(capsys, "report", quantized, "--plot", unwritable(tmp_path) / "p.png")
    assert code == 2 and "not writable" in one_error_line(err)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full)
    code, _, err = cli(capsys, "report", quantized, "--plot", tmp_path / "p.png")
    assert code == 2 and "no space left on device" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "locked") == []  # no temporary file


# --------------------------------------------------------------------------------------------
# 2. --overwrite replaces only a folder of its own kind; never inside the source


def test_export_never_replaces_a_quantize_output(quantized, tmp_path, capsys) -> None:
    source, victim = tmp_path / "a", tmp_path / "b"
    shutil.copytree(quantized, source)
    shutil.copytree(quantized, victim)  # another finished run
    before = digest(victim)
    code, _, err = cli(capsys, "export", source, "--output", victim, "--overwrite")
    assert code == 2 and "it is a cdq quantize output folder, not an export" in one_error_line(err)
    code, _, err = cli(capsys, "export", source, "--output", source / "sub", "--overwrite")
    assert code == 2 and "inside" in one_error_line(err) and not (source / "sub").exists()
    assert digest(victim) == before
    export = tmp_path / "e"
    assert cli(capsys, "export", source, "--output", export)[0] == 0
    assert json.loads((export / ".cdq-manifest.json").read_text())["kind"] == "export"
    assert cli(capsys, "export", source, "--output", export, "--overwrite")[0] == 0  # an export: replaced


def test_quantize_never_replaces_an_export_and_checks_its_export_folder(
    quantized, llama, calib, tmp_path, capsys, monkeypatch
) -> None:
    export = tmp_path / "e"
    assert cli(capsys, "export", quantized, "--output", export)[0] == 0
    before = digest(export)

    def never(*args, **kwargs):
        raise AssertionError("refused before the model loads")

    monkeypatch.setattr("cdq_cli.models.lazy.open_causal_lm", never)
    code, _, err = cli(capsys, "quantize", llama, "--calib", calib, *FAST, "--output", export, "--overwrite")
    assert code == 2 and "it is a cdq export folder, not a cdq quantize output" in one_error_line(err)
    out = tmp_path / "q"
    shutil.copytree(quantized, tmp_path / "q-gptq")  # where --format gptq would export: a quantize output
    code, _, err = cli(
        capsys, "quantize", llama, "--calib", calib, *FAST, "--output", out, "--format", "gptq", "--overwrite"
    )
    assert code == 2 and "q-gptq: it is a cdq quantize output folder" in one_error_line(err)
    assert digest(export) == before and not out.exists()


# --------------------------------------------------------------------------------------------
# 3. One run per output (real processes)


def test_a_second_run_on_the_same_output_exits_at_once(stories, calib, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    args = [
        "quantize",
        stories,
        "--method",
        "rtn",
        "--calib",
        calib,
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "-q",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "cdq_cli", *map(str, args), "--output", str(out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not lock_file(out).exists():  # the first run has started and holds the output
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # held mid-run, lock and all
        began = time.monotonic()
        second = cdq(*args, "--output", out, "--overwrite", "--json")
        line = one_error_line(second.stderr)
        assert second.returncode == 2 and f"another cdq run (pid {first.pid}) is writing {out}" in line
        assert json.loads(second.stdout) == {"error": line[7:], "exit_code": 2}
        assert time.monotonic() - began < 60  # at once: before loading anything
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert not lock_file(out).exists() and not journal_folder(out).exists()
    reference = tmp_path / "reference"  # the same command, alone: the first run was not disturbed
    assert cli(capsys, *args, "--output", reference)[0] == 0
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def _holder(dest: Path) -> subprocess.Popen:
    """A real process holding the lock of ``dest`` (as a run writing it would)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cdq_cli.store.files import output_lock\n"
         f"with output_lock({str(dest)!r}):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_two_exports_to_one_folder_exclude_each_other(quantized, tmp_path, capsys) -> None:
    from cdq_cli.store.files import output_lock

    dest = tmp_path / "e"
    holder = _holder(dest)
    try:
        code, _, err = cli(capsys, "export", quantized, "--output", dest)
        assert code == 2 and f"another cdq run (pid {holder.pid}) is writing {dest}" in one_error_line(err)
    finally:
        holder.kill()
        holder.wait()
    assert lock_file(dest).exists()  # a killed holder's file stays, but the kernel dropped its lock:
    assert cli(capsys, "export", quantized, "--output", dest)[0] == 0  # it never blocks the next run
    assert not lock_file(dest).exists()
    with output_lock(dest):  # re-entrant within one process (quantize --format holds the export's lock)
        assert cli(capsys, "export", quantized, "--output", dest, "--overwrite")[0] == 0


# --------------------------------------------------------------------------------------------
# 4. A source index names only files inside the model folder, and the tensors they hold


def _sharded(llama: Path) -> Path:
    """``llama`` re-saved as two safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama)
    (llama / "model.safetensors").unlink()
    model.save_pretrained(llama, max_shard_size="60KB")
    assert (llama / "model.safetensors.index.json").is_file()
    return llama / "model.safetensors.index.json"


@pytest.mark.parametrize(
    "edit, message",
    [
        ("absolute", "outside the model folder"),
        ("parent", "outside the model folder"),
        ("passwd", "outside the model folder"),
        ("missing", "which the folder lacks"),
        ("wrong-shard", "which lacks that tensor"),
        ("not-json", "cannot read"),
    ],
)
def test_a_source_index_is_checked_before_loading(edit, message, llama, calib, tmp_path, capsys) -> None:
    index = _sharded(llama)
    data = json.loads(index.read_text())
    weight_map = data["weight_map"]
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = weight_map[name]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(llama / shard, outside / shard)
    other = next(f for f in sorted(set(weight_map.values())) if f != shard)
    weight_map[name] = {
        "absolute": str(outside / shard),
        "parent": f"../elsewhere/{shard}",
        "passwd": "/etc/passwd",
        "missing": "model-00009-of-00009.safetensors",
        "wrong-shard": other,
        "not-json": shard,
    }[edit]
    index.write_text("{not json" if edit == "not-json" else json.dumps(data))
    out = tmp_path / "q"
    code, _, err = cli(capsys, "quantize", llama, "--method", "rtn", "--calib", calib, *FAST, "--output", out)
    line = one_error_line(err)
    assert code == 2 and message in line, line
    if edit != "not-json":
        assert repr(name) in line  # the entry is named
        assert line.count(str(index)) == 1  # the path once
    assert not out.exists() and not journal_folder(out).exists()


# --------------------------------------------------------------------------------------------
# 5. A tensor of the wrong shape or kind, and an already-quantized source, before block 0


@pytest.mark.parametrize("what", ["shape", "kind"])
def test_a_wrong_tensor_is_refused_before_block_0(what, llama, calib, tmp_path, capsys, monkeypatch) -> None:
    import torch

    weights = load_file(str(llama / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = weights[name][:, :-1].contiguous() if what == "shape" else weights[name].to(torch.int32)
    save_file(weights, str(llama / "model.safetensors"), metadata={"format": "pt"})

    def never(*args, **kwargs):
        raise AssertionError("no block may be quantized")

    monkeypatch.setattr("cdq_cli.pipeline.quantize_model", never)
    out = tmp_path / "q"
    code, _, err = cli(capsys, "quantize", llama, "--method", "rtn", "--calib", calib, *FAST, "--output", out)
    line = one_error_line(err)
    assert code == 2 and f"tensor {name} in model.safetensors" in line
    assert (
        "has shape [32, 63], but the model's config makes it [32, 64]" if what == "shape" else "integer"
    ) in line
    assert not out.exists() and not journal_folder(out).exists()


def test_an_already_quantized_source_is_refused_by_name(quantized, tmp_path, calib, capsys) -> None:
    gptq = tmp_path / "gptq"
    assert cli(capsys, "export", quantized, "--output", gptq)[0] == 0
    out = tmp_path / "again"
    for source, message in (
        (quantized, "is already quantized by cdq"),
        (gptq, "is already quantized (gptq, named by quantization_config in config.json)"),
    ):
        code, _, err = cli(capsys, "quantize", source, "--calib", calib, *FAST, "--output", out)
        line = one_error_line(err)
        assert code == 2 and message in line and "quantize the original model" in line, line
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 6. A stale torchrun environment: a short wait with one line; signals end any wait


def _stale_env(port: int, rank: int = 0, **extra: str) -> dict[str, str]:
    return {**ENV, "WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), **extra}  # fmt: skip


def test_a_stale_torchrun_environment_fails_in_one_line(
    stories, calib, tmp_path, capsys, monkeypatch
) -> None:
    args = ["quantize", stories, "--method", "rtn", "--calib", calib, *FAST, "--batch-size", "2"]
    done = cdq(*args, "--output", tmp_path / "q", env=_stale_env(free_port(), 0, CDQ_RENDEZVOUS_S="2"))
    line = one_error_line(done.stderr)  # a real shell's leftovers, and no C++ log lines either
    assert (
        done.returncode == 2
        and "waited 2 s at 127.0.0.1:" in line
        and "for 1 more process of WORLD_SIZE=2" in line
    )
    assert "unset WORLD_SIZE and RANK to run alone" in line
    for key, value in _stale_env(free_port(), 1, CDQ_RENDEZVOUS_S="2").items():
        monkeypatch.setenv(key, value)
    code, _, err = cli(capsys, *args, "--output", tmp_path / "q")
    line = one_error_line(err)
    assert code == 2 and "could not reach process 0 of WORLD_SIZE=2" in line and "unset WORLD_SIZE" in line
    assert not (tmp_path / "q").exists()


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.communicate()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, "the process never started waiting"
        time.sleep(0.1)


def _as_from_a_terminal() -> None:
    """A child's Ctrl-C as a terminal's foreground command has it: default disposition, unblocked.
    An ignored SIGINT is inherited through exec; twice in the full suite (never in a run of this
    file alone) the SIGINT case hung and, in the same run, ``_thread.interrupt_main`` did nothing in
    the test process, i.e. its SIGINT was no longer Python's handler (what changed it was not
    found)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_end_the_rendezvous_wait(sig, code, stories, calib, tmp_path) -> None:
    port = free_port()
    args = ["quantize", stories, "--calib", calib, *FAST, "--batch-size", "2", "--output", tmp_path / "q"]
    waiting = subprocess.Popen(
        [sys.executable, "-m", "cdq_cli", *map(str, args)],
        env=_stale_env(port, CDQ_RENDEZVOUS_S="600"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        _wait_for_port(port, waiting)  # rank 0 serves the rendezvous: it is waiting now
        time.sleep(0.5)
        began = time.monotonic()
        waiting.send_signal(sig)
        _, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == code and time.monotonic() - began < 30
    assert one_error_line(err) == ("error: terminated" if code == 143 else "error: interrupted")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_ends_a_process_stuck_in_a_collective(stories, calib, tmp_path) -> None:
    """Two ranks started by hand (as torchrun would); rank 0 is frozen, so rank 1 blocks in a
    collective that Python cannot interrupt; SIGTERM still ends it, 143, one line, in seconds."""
    port = free_port()
    args = ["quantize", stories, "--method", "gptq", "--calib", calib, "--nsamples", "8", "--seqlen", "32",
            "--batch-size", "2", "-q", "--output", tmp_path / "q"]  # fmt: skip
    env = {"CDQ_STOP_GRACE_S": "2", "CDQ_RENDEZVOUS_S": "120"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "cdq_cli", *map(str, args)],
            env=_stale_env(port, rank, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        _wait_for_port(port, ranks[0])
        ranks[0].send_signal(signal.SIGSTOP)
        deadline, last, still = time.monotonic() + 120, -1.0, 0
        while still < 10:  # rank 1 idle for a second: blocked, waiting for rank 0
            assert ranks[1].poll() is None and time.monotonic() < deadline, ranks[1].communicate()
            now = _cpu_seconds(ranks[1].pid)
            still = still + 1 if now == last else 0
            last = now
            time.sleep(0.1)
        began = time.monotonic()
        ranks[1].send_signal(signal.SIGTERM)
        _, err = ranks[1].communicate(timeout=60)
        assert ranks[1].returncode == 143 and time.monotonic() - began < 30
        assert one_error_line(err).startswith("error: rank 1: terminated")
    finally:
        for process in ranks:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------------------------
# 7. --nproc is checked before any process starts


def test_nproc_is_checked_before_any_process_starts(llama, calib, tmp_path, capsys, monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("no process may start")

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", never)
    out = tmp_path / "q"
    code, _, err = cli(capsys, "quantize", llama, "--calib", calib, *FAST, "--output", out, "--nproc", "99")
    line = one_error_line(err)
    assert (
        code == 2 and "99 processes need at least 99 calibration batches" in line and "--batch-size" in line
    )
    cpus = len(os.sched_getaffinity(0))
    code, _, err = cli(
        capsys, "quantize", llama, "--calib", calib, "--nsamples", str(cpus + 1), "--seqlen", "32", "-q",
        "--batch-size", "1", "--output", out, "--nproc", cpus + 1, "--device", "cpu",
    )  # fmt: skip
    assert code == 2 and f"need {cpus + 1} cores, and this machine gives {cpus}" in one_error_line(err)
    code, _, err = cli(
        capsys, "quantize", "timm/resnet18", "--calib", calib, *FAST, "--output", out, "--nproc", "2"
    )
    line = one_error_line(err)
    assert code == 2 and "not vision models" in line and "--resume" not in line
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 8. A catastrophic --skip/--layer pattern ends in one line, naming it


@pytest.mark.parametrize(
    "flag, pattern, message",
    [
        ("--skip", "^([a-z._0-9]+)+!", "matches no layer of the model"),  # the probe's: never hangs
        ("--layer", r"^([\w.]|[\w.])+(?<![a-z])$=8", "takes over 1 s to match the layer name"),
    ],
)
def test_a_catastrophic_pattern_fails_in_one_line(flag, pattern, message, llama, calib, tmp_path) -> None:
    """A real process: a pattern that backtracks without end would hold it (and its GIL) forever."""
    done = cdq(
        "quantize", llama, "--calib", calib, *FAST, flag, pattern, "--output", tmp_path / "q", timeout=120
    )
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and message in line and repr(pattern) in line
    assert not (tmp_path / "q").exists()


# --------------------------------------------------------------------------------------------
# 9. Temporary folders never leak


def test_offload_folders_are_removed_and_stale_ones_swept(
    llama, calib, tmp_path, capsys, monkeypatch
) -> None:
    import re
    import tempfile

    from cdq_cli.store.journal import TERM_ENV

    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = scratch / f"cdq-offload-{host}-{int(dead.stdout)}-abcd1234"  # a killed run's: PREFIX-HOST-PID-*
    stale.mkdir()
    (stale / "expert.safetensors").write_bytes(b"converted experts of a killed run")
    alive = scratch / f"cdq-offload-{host}-{os.getppid()}-efgh5678"  # a live process's: kept
    alive.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv(TERM_ENV, "0")  # SIGTERM after block 0, as a scheduler would send it
    code, _, err = cli(
        capsys, "quantize", llama, "--method", "rtn", "--calib", calib, *FAST, "--output", tmp_path / "q"
    )
    assert code == 143 and "--resume" in one_error_line(err)
    assert sorted(p.name for p in scratch.iterdir()) == [alive.name]  # its own gone, the stale one too


# --------------------------------------------------------------------------------------------
# 10. Several processes fail in one line, with the right advice and exit code


def test_multi_process_stops_and_failures_are_one_line(stories, calib, tmp_path) -> None:
    """--nproc 2: Ctrl-C (SIGINT to the whole foreground group, as a terminal sends it) is 130 with
    the resume hint; a refused --resume is rank 0's own line, exit 2, with no advice to resume."""
    out = tmp_path / "q"
    args = ["quantize", stories, "--method", "cdq", "--calib", calib, "--nsamples", "16", "--seqlen", "64",
            "--batch-size", "2", "-q", "--output", out, "--nproc", "2"]  # fmt: skip
    launcher = subprocess.Popen(
        [sys.executable, "-m", "cdq_cli", *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 180
        while not (journal_folder(out) / "state.json").is_file():
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.05)
        os.killpg(launcher.pid, signal.SIGINT)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    line = one_error_line(err)
    assert launcher.returncode == 130 and line.startswith("error: interrupted") and "--resume" in line
    refused = cdq(*args[:-2], "--seed", "1", *args[-2:], "--resume", "--json")  # other windows
    line = one_error_line(refused.stderr)
    assert refused.returncode == 2 and "cannot resume: calibration data changed" in line
    assert "--resume to continue" not in line  # bad input: resuming would fail the same way
    assert json.loads(refused.stdout) == {"error": line[7:], "exit_code": 2}


def test_a_launcher_stopped_outside_torch_says_the_saved_journals_hint(
    llama, calib, tmp_path, capsys, monkeypatch
) -> None:
    """--nproc 2 stopped where torch's launcher does not turn Ctrl-C into its own exception (or
    ended by the watchdog, which reads the same registered hint): the line still says --resume
    when the workers saved a block, read from the journal on disk, and nothing once the launcher ends."""
    from cdq_cli.cleanup import resume_hint

    out = tmp_path / "q"
    seen = []

    def stopped_after_two_blocks(config, entrypoint):
        def run(*args):
            journal_folder(out).mkdir(parents=True, exist_ok=True)
            (journal_folder(out) / "state.json").write_text(json.dumps({"blocks_done": 2}))
            seen.append(resume_hint())
            raise KeyboardInterrupt

        return run

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", stopped_after_two_blocks)
    code, _, err = cli(
        capsys, "quantize", llama, "--calib", calib, "--nsamples", "4", "--seqlen", "32", "--batch-size", "1",
        "-q", "--output", out, "--nproc", "2", "--device", "cpu",
    )  # fmt: skip
    line = one_error_line(err)
    assert code == 130 and line.startswith("error: interrupted; 2 finished block(s) are saved")
    assert "--resume" in line and seen == [line.split("; ", 1)[1]] and resume_hint() is None


# --------------------------------------------------------------------------------------------
# 11. Values that used to end in raw errno or exception text


def test_raw_errors_become_one_line_before_any_work(llama, quantized, calib, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("refused before the model loads")

    monkeypatch.setattr("cdq_cli.models.lazy.open_causal_lm", never)
    base = ["quantize", llama, "--calib", calib, *FAST]
    code, _, err = cli(capsys, *base, "--output", tmp_path / "q", "--max-shard-size", "1" + "0" * 400)
    assert code == 2 and "--max-shard-size: the size" in one_error_line(err) and "too large" in err
    long_name = tmp_path / ("a" * 250)
    code, _, err = cli(capsys, *base, "--output", long_name)
    assert code == 2 and "is too long for the file system" in one_error_line(err)
    code, _, err = cli(capsys, "export", quantized, "--output", unwritable(tmp_path) / "e")
    assert code == 2 and "not writable" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "locked") == ["llama"]


# --------------------------------------------------------------------------------------------
# 12. --json failures: one object on stdout


@pytest.mark.parametrize(
    "args",
    [
        ["quantize", "{llama}", "--bits", "5", "--json"],
        ["eval", "{llama}", "--data", "{missing}", "--json"],
        ["export", "{missing}", "--json"],
        ["report", "{missing}", "--json"],
        ["compare", "{missing}", "{missing}", "--json"],
        ["quantize", "{llama}", "--no-such-flag", "--json"],
    ],
)
def test_json_failures_print_one_object(args, llama, tmp_path, capsys) -> None:
    values = {"llama": llama, "missing": tmp_path / "missing"}
    code, out, err = cli(capsys, *[a.format(**values) for a in args])
    line = one_error_line(err)
    assert code == 2 and out.count("\n") == 1 and json.loads(out) == {"error": line[7:], "exit_code": 2}


# --------------------------------------------------------------------------------------------
# 13. Messages that used to mislead


def test_messages_say_what_is_wrong(stories, calib, tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "eval", stories, "--data", calib, "--limit", "3")
    assert code == 2 and "--limit counts the items of each --tasks task" in one_error_line(err)
    code, _, err = cli(capsys, "eval", "no-such-model", "--data", "imagenet-sample")
    line = one_error_line(err)
    assert code == 2 and "no-such-model is not an image classifier cdq knows" in line
    code, _, err = cli(
        capsys, "quantize", tmp_path / "nope", "--calib", "imagenet-sample", "--output", tmp_path / "q"
    )
    assert code == 2 and "no such file or folder" in one_error_line(err)


def test_a_pickled_checkpoint_refusal_gives_no_unsafe_advice(stories, calib, tmp_path, capsys) -> None:
    import torch

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        if (stories / name).exists():
            shutil.copy(stories / name, folder / name)
    state = load_file(str(stories / "model.safetensors"))
    state["extra"] = _Reducer()  # a pickle that would run code when loaded
    torch.save(state, folder / "pytorch_model.bin")
    code, _, err = cli(capsys, "quantize", folder, "--calib", calib, *FAST, "--output", tmp_path / "q")
    line = one_error_line(err)
    assert code == 2 and "could run code" in line and "weights_only=False" not in line and "\x1b" not in line


class _Reducer:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_task_data_glob_with_no_match_and_no_git_noise(stories, tmp_path, capfd, monkeypatch) -> None:
    pytest.importorskip("lm_eval")
    tasks = Path(__file__).resolve().parent / "tasks"
    task = tmp_path / "t.yaml"
    shutil.copy(tasks / "stories_mc.jsonl", tmp_path / "stories_mc.jsonl")
    task.write_text((tasks / "stories_mc.yaml").read_text().replace("stories_mc.jsonl", "nothing-*.jsonl"))
    monkeypatch.chdir(tmp_path)  # not a git checkout
    code = main(["eval", str(stories), "--tasks", str(task)])
    line = one_error_line(capfd.readouterr().err)
    assert code == 2 and "data files nothing-*.jsonl match no file" in line
    good = tmp_path / "good.yaml"
    good.write_text((tasks / "stories_mc.yaml").read_text())
    assert main(["eval", str(stories), "--tasks", str(good), "--limit", "2", "--json"]) == 0
    assert "fatal" not in capfd.readouterr().err


def test_a_corrupt_output_index_names_its_path_once(quantized, tmp_path, wikitext, capsys) -> None:
    folder = tmp_path / "q"
    shutil.copytree(quantized, folder)
    (folder / "model.safetensors").unlink()
    index = folder / "model.safetensors.index.json"
    index.write_text("{broken")
    code, _, err = cli(capsys, "eval", folder, "--data", wikitext, "--max-windows", "1")
    line = one_error_line(err)
    assert code == 2 and line.count(str(index)) == 1, line


# --------------------------------------------------------------------------------------------
# 14. Requests that would do less than they say: a warning each, or exit 2


def test_skipping_every_layer_is_refused(llama, calib, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    code, _, err = cli(capsys, "quantize", llama, "--calib", calib, *FAST, "--skip", ".", "--output", out)
    assert code == 2 and "keeps every layer of the model in full precision" in one_error_line(err)
    assert not out.exists()


def test_shadowed_rules_and_short_calibration_text_warn(llama, tmp_path, capsys) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Once upon a time there was a tiny model. " * 12)
    out = tmp_path / "q"
    code, stdout, err = cli(
        capsys, "quantize", llama, "--method", "rtn", "--calib", text, "--nsamples", "16", "--seqlen", "64",
        "--layer", "mlp=8", "--layer", r"mlp\.=3", "--output", out, "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and err.strip().splitlines() == warnings, err  # -q: nothing else
    assert "--layer 'mlp=8' changes no layer" in warnings[0] and r"--layer 'mlp\\.=3'" in warnings[0]
    assert "far fewer than --nsamples 16 x --seqlen 64 = 1024" in warnings[1]
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] == [w.removeprefix("warning: ") for w in warnings]
    assert json.loads(stdout)["warnings"] == report["warnings"]
    bits = {row["name"]: row["bits"] for row in report["layers"]}
    assert {b for n, b in bits.items() if ".mlp." in n} == {3}  # what the warning said


def test_a_long_enough_text_gives_no_warning(llama, calib, tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "quantize", llama, "--method", "rtn", "--calib", calib, *FAST,
                       "--output", tmp_path / "q")  # fmt: skip
    assert code == 0 and err == ""


# --------------------------------------------------------------------------------------------
# The promises in docs/cli.md point at tests that exist


def test_every_promise_points_at_tests_that_exist() -> None:
    import re

    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "cli.md").read_text(encoding="utf-8")
    section = doc[doc.index("## What cdq promises") : doc.index("## `cdq quantize MODEL`")]
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", section))
    defined = {
        name
        for path in (repo / "tests").glob("test_*.py")
        for name in re.findall(r"^def (test_[a-z0-9_]+)\(", path.read_text(encoding="utf-8"), re.M)
    }
    assert len(named) >= 20 and named <= defined, sorted(named - defined)


def test_a_rendezvous_wait_ended_by_a_signal_leaves_its_helper_alive_while_it_is_blocked(monkeypatch) -> None:
    """Ctrl-C during the rendezvous leaves its helper thread blocked in torch's store, and the
    thread is still seen alive (waiting with ``Thread.join`` instead, CPython 3.11 marks it
    stopped), until the helper returns."""
    import _thread

    import torch.distributed as dist

    from cdq_cli import parallel

    release = threading.Event()

    def blocked(*_args, **_kwargs):
        release.wait(30)
        raise RuntimeError("released")

    def helper() -> threading.Thread:
        return next(t for t in threading.enumerate() if t.name == "cdq-rendezvous")

    monkeypatch.setattr(dist, "rendezvous", blocked)
    # Python's own Ctrl-C handler, whatever an earlier in-process launch left (torch elastic
    # installs its own and keeps it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.3, _thread.interrupt_main).start()
        with pytest.raises(KeyboardInterrupt):
            parallel._rendezvous(0, 2)
    finally:
        signal.signal(signal.SIGINT, previous)
    thread = helper()
    assert thread.is_alive()
    release.set()
    thread.join(10)
    assert not thread.is_alive()
