"""Several processes through torch.distributed (gloo on the CPU): the single-process bytes, always.

Every run here is a real multi-process run: ``cdq quantize --nproc 2`` (torch.distributed's own
launcher), two ``torchrun`` invocations as two nodes on localhost, and a run whose rank 1 is
killed mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cdq_cli.parallel import KILL_RANK_ENV, Balance, Costs, Ranks, assign, layer_of, replay
from cdq_cli.solvers import METHODS
from cdq_cli.store.names import journal_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CDQ_SHUTDOWN_S": "5"}


@pytest.fixture(scope="module")
def quantize(data_dir: Path) -> list[str]:
    stories = str(data_dir / "models" / "stories260K")
    calib = str(data_dir / "text" / "c4-sample.jsonl")
    return [
        "quantize",
        stories,
        "--calib",
        calib,
        "--nsamples",
        "8",
        "--seqlen",
        "48",
        "--batch-size",
        "2",
        "-q",
    ]


@pytest.fixture(scope="module")
def single(quantize, tmp_path_factory) -> dict[str, Path]:
    """The single-process outputs every multi-process run must equal, per method."""
    outputs = {}
    for method, args in RECIPES.items():
        out = tmp_path_factory.mktemp("single") / method
        done = cdq(*quantize, *args, "--bits", "3", "--output", str(out))
        assert done.returncode == 0, done.stderr
        outputs[method] = out
    return outputs


# The runs compared: the two GPTQ-started solvers, the full-precision target (two activation
# streams, three accumulators per layer relayed in batch order), and rtn (one process solves it
# without Σ, measuring its report in the block's pass; several ranks relay Σ as for any method).
RECIPES = {
    "cdq": ["--method", "cdq"],
    "gptq": ["--method", "gptq"],
    "gptq-fp": ["--method", "gptq", "-o", "target=fp"],
    "rtn": ["--method", "rtn"],
}


def cdq(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cdq_cli", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", list(RECIPES))
def test_two_processes_write_the_single_process_bytes(method, quantize, single, tmp_path) -> None:
    two = tmp_path / "two"
    done = cdq(*quantize, *RECIPES[method], "--bits", "3", "--output", str(two), "--nproc", "2")
    assert done.returncode == 0, done.stderr
    assert weights(single[method]) == weights(two)
    parallel = json.loads((two / "report.json").read_text())["run"]["parallel"]
    assert parallel["world_size"] == 2 and parallel["backend"] == "gloo"
    assert len(parallel["solve_seconds"]) == 2 and sum(parallel["layers_per_rank"]) == 35
    assert min(parallel["layers_per_rank"]) > 0  # both ranks solved layers
    rows = [json.loads((folder / "report.json").read_text())["layers"] for folder in (single[method], two)]
    for one, other in zip(*rows, strict=True):
        assert one["name"] == other["name"] and one["tokens"] == other["tokens"]
        assert one["error"] == pytest.approx(other["error"], rel=1e-5)
        assert one["relative_error"] == pytest.approx(other["relative_error"], rel=1e-5)


def test_a_layer_split_by_rows_between_ranks_writes_the_single_process_bytes(data_dir, tmp_path) -> None:
    """A Llama whose MLP is 600 wide: gate_proj and up_proj are solved in three bands of rows
    (solvers.bands), in one process and as units of work shared between two ranks; the bytes and
    the report's figures are the same."""
    from tiny_lm import config

    from cdq_cli.models import load_causal_lm

    stories = data_dir / "models" / "stories260K"
    if not stories.is_dir():
        pytest.skip(f"missing shared model {stories}")
    _model, tokenizer = load_causal_lm(str(stories))
    settings = config("llama", vocab=512)
    settings.intermediate_size = 600
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(settings).eval()
    folder = tmp_path / "wide"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    calib = str(data_dir / "text" / "c4-sample.jsonl")
    base = ["quantize", str(folder), "--calib", calib, "--nsamples", "8", "--seqlen", "32"]
    base += ["--batch-size", "2", "-q", "--bits", "3"]
    outputs = {}
    for nproc in ("1", "2"):
        out = tmp_path / f"nproc{nproc}"
        done = cdq(*base, "--no-true-sequential", "--output", str(out), "--nproc", nproc)
        assert done.returncode == 0, done.stderr
        outputs[nproc] = out
    assert weights(outputs["1"]) == weights(outputs["2"])
    one, two = (json.loads((outputs[n] / "report.json").read_text()) for n in ("1", "2"))
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert (a["name"], a["error"], a["relative_error"]) == (b["name"], b["error"], b["relative_error"])
    gate = next(row for row in one["layers"] if row["name"].endswith("0.mlp.gate_proj"))
    assert len(gate["band_seconds"]) == 3
    owners = two["run"]["parallel"]["band_owners"]  # every band was a unit of work of its own
    assert sorted(owners) == sorted(
        f"model.layers.{block}.mlp.{layer}[rows {lo}:{hi}]"
        for block in (0, 1)
        for layer in ("gate_proj", "up_proj")
        for lo, hi in ((0, 200), (200, 400), (400, 600))
    )


def test_two_nodes_on_localhost_write_the_same_bytes(quantize, single, tmp_path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "nodes"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    command = ["-m", "cdq_cli", *quantize, "--method", "gptq", "--bits", "3", "--output", str(out)]
    nodes = [
        subprocess.Popen(
            [*launcher, "--node-rank", str(node), *rendezvous, *command],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=240)
        assert node.returncode == 0, err[-2000:]
    assert weights(out) == weights(single["gptq"])


def test_a_killed_rank_ends_every_rank_then_resume_finishes_the_same(quantize, single, tmp_path) -> None:
    out = tmp_path / "q"
    args = [*quantize, "--method", "gptq", "--bits", "3", "--output", str(out), "--nproc", "2"]
    began = time.monotonic()
    killed = subprocess.run(
        [sys.executable, "-m", "cdq_cli", *args],
        env={**ENV, KILL_RANK_ENV: "1:1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert time.monotonic() - began < 120  # bounded: the launcher stops the other rank
    assert killed.returncode != 0
    lines = killed.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines) and len(lines) <= 2, killed.stderr
    assert any(f"ended with signal {signal.Signals.SIGKILL.name}" in line for line in lines)
    assert any("--resume" in line for line in lines)
    assert not out.exists() and (journal_folder(out) / "state.json").is_file()
    resumed = cdq(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert weights(out) == weights(single["gptq"])
    assert json.loads((out / "report.json").read_text())["run"]["resumed_blocks"] >= 1


@pytest.mark.parametrize("world", [2, 3])
def test_sigma_split_by_bands_across_ranks_is_the_single_process_sigma(world, tmp_path) -> None:
    """Σ's of 64, 256 and 600 features (one band, one full band, three bands of which the last is
    partial), reduced across 2 or 3 ranks (band i on rank i mod world, batches of uneven sizes), and
    a paired accumulator relayed alongside: bitwise the single-process totals."""
    worker = str(Path(__file__).parent / "sigma_bands_worker.py")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), ENV.get("PYTHONPATH", "")])}
    alone = subprocess.run([sys.executable, worker, str(tmp_path / "one.pt")], env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    done = subprocess.run([*launch, worker, str(tmp_path / "many.pt")], env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one, many = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "many.pt")
    assert one.keys() == many.keys()
    for key in one:
        assert torch.equal(one[key], many[key]), key
    assert int(one["tokens600"]) == 2 * sum(17 + 5 * i for i in range(7))


def test_layers_go_largest_first_to_the_least_loaded_rank() -> None:
    costs = {"a": 9.0, "b": 7.0, "c": 5.0, "d": 4.0, "e": 1.0}
    assert assign(costs, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}  # loads 9, 7, 12, 13, 13
    assert assign(costs, 1) == dict.fromkeys(costs, 0)
    assert METHODS["gptq"].cost(4096, 11008, {}) > METHODS["gptq"].cost(4096, 4096, {})
    assert METHODS["quantease"].cost(4096, 4096, {}) > METHODS["gptq"].cost(4096, 4096, {})


def test_a_layer_goes_whole_unless_that_unbalances_the_ranks_then_band_by_band() -> None:
    """Bands of one layer stay on one rank (its Σ-only work done once) while that rank stays within
    SPLIT_SLACK of the mean load; a layer too large for that is spread band by band."""
    bands = {f"down[rows {lo}:{lo + 2}]": 3.0 for lo in (0, 2, 4, 6)}  # 12 in four bands
    small = {"q[rows 0:2]": 2.0, "q[rows 2:4]": 2.0, "k": 2.0, "v": 2.0}
    owners = assign({**bands, **small}, 2)  # total 20: mean 10, down (12) is split
    assert {owners[unit] for unit in bands} == {0, 1}
    assert owners["q[rows 0:2]"] == owners["q[rows 2:4]"]  # q fits whole
    loads = [sum(cost for unit, cost in {**bands, **small}.items() if owners[unit] == r) for r in (0, 1)]
    assert loads == [10.0, 10.0]
    whole = assign({**bands, **small}, 1)
    assert set(whole.values()) == {0}
    assert layer_of("model.layers.0.mlp.up_proj[rows 0:512]") == "model.layers.0.mlp.up_proj"


def test_costs_are_the_measured_seconds_of_a_shape_once_one_was_timed() -> None:
    costs = Costs(lambda rows, columns: rows * columns**2)
    assert costs.cost((2, 4)) == 32  # nothing timed: the estimate
    costs.record((2, 4), 3.0)  # 32 units took 3 s
    assert costs.cost((2, 4)) == 3.0
    assert costs.cost((1, 4)) == 16 * 3.0 / 32  # not timed yet: the estimate, in seconds
    costs.record((2, 4), 5.0)
    assert costs.cost((2, 4)) == 4.0  # the mean of its timings
    # cdq's GPTQ starts factor Σ: a wide layer costs more than rows x columns² says
    cdq = METHODS["cdq"]
    assert cdq.cost(576, 1536, {}) / cdq.cost(1536, 576, {}) > 1536 / 576
    assert cdq.cost(576, 1536, {"starts": ["rtn"]}) < cdq.cost(576, 1536, {"starts": ["gptq", "rtn"]})


def test_balance_adds_up_the_slowest_rank_of_every_group() -> None:
    balance = Balance()
    owners = {"a": 0, "b": 1, "c": 1}
    balance.planned({"a": 4.0, "b": 2.0, "c": 1.0}, owners, 2)  # loads 4 and 3: max 4, mean 3.5
    balance.solved({"a": 5.0, "b": 1.0, "c": 1.0}, owners, 2)  # the group took 5 s
    balance.planned({"a": 1.0, "b": 1.0, "c": 0.0}, owners, 2)
    balance.solved({"a": 1.0, "b": 2.0, "c": 0.5}, owners, 2)
    assert balance.critical == 5.0 + 2.5 and balance.total == 7.0 + 3.5
    assert balance.predicted_imbalance == (4.0 + 1.0) / (3.5 + 1.0) - 1


def test_replay_assigns_each_group_as_the_driver_would() -> None:
    """replay (bench_ranks --predict): each group assigned on Costs fed the earlier groups' times,
    largest first onto the least-loaded rank; figures worked out by hand."""
    groups = [
        {"q": ((4, 4), 1.0), "up": ((8, 4), 2.0), "down": ((4, 8), 6.0)},
        {"q": ((4, 4), 1.5), "up": ((8, 4), 2.5), "down": ((4, 8), 5.0)},
    ]

    def estimate(rows: int, columns: int) -> float:
        return rows * columns**2  # q 64, up 128, down 256 units before any time is known

    one = replay(groups, estimate, 1)
    assert one.predicted_imbalance == 0 and one.critical == one.total == 18.0
    # 2 ranks. Group 1 on estimates: down -> 0 (256), up -> 1 (128), q -> 1 (192): max 256, mean 224.
    # Group 2 on group 1's seconds (q 1, up 2, down 6): down -> 0 (6), up, q -> 1 (3): max 6, mean 4.5.
    two = replay(groups, estimate, 2)
    assert two.predicted_imbalance == pytest.approx((256 + 6) / (224 + 4.5) - 1)
    assert two.critical == 6.0 + 5.0 and two.total == 18.0  # measured: rank 0's down, both times
    # 3 ranks: one layer each: max 256 then 6, means 448/3 and 3; solve phase still down's
    three = replay(groups, estimate, 3)
    assert three.predicted_imbalance == pytest.approx((256 + 6) / (448 / 3 + 3) - 1)
    assert three.critical == 11.0


def test_batches_are_split_into_contiguous_ranges() -> None:
    ranges = [list(Ranks(rank=r, world=3).batches(8)) for r in range(3)]
    assert ranges == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert sum(ranges, []) == list(range(8))
