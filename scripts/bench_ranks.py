"""Many ranks on one machine: the same ``cdq quantize`` with 1 process and with ``--nproc N``.

Each run is its own ``cdq`` process tree (torchrun's workers for ``--nproc``), every process with
``--threads`` threads (default one: on a 2-core machine, two ranks of one thread each against one
process of one thread). Printed per world size:

* end-to-end wall seconds of the command (loading, calibration forwards, Σ, solves, writing);
* the solve phase: per group of layers, the slowest rank's solve seconds, summed over the run
  (report.json's ``run.parallel.solve_phase_seconds``: what the block loop waits for; one
  process: every layer's solve seconds);
* each rank's own solve seconds (``run.parallel.solve_seconds``);
* the imbalance the assignments predicted (``run.parallel.predicted_imbalance``: the slowest
  rank's estimated load over the mean load, minus one, summed over groups);
* whether the safetensors files have the same bytes as the single-process run's.

    CDQ_DATA_DIR=../shared/data .venv/bin/python scripts/bench_ranks.py --nproc 2,4

``--predict 4`` (or ``2,4,8``) also replays the one-process run's measured layer times through the
driver's assignment for that many ranks (:func:`cdq_cli.parallel.replay`): the imbalance such a
run would predict, and its solve phase had every layer taken the time it took in one process (a
layer solved in bands of rows is one unit per band, each band's seconds as the report lists them;
one process does a layer's Σ-only work in its first band, which a rank given a later band alone
would repeat, so the replayed solve phase is a lower bound there). It
needs ``--no-true-sequential`` (each block's layers are then one group, as the report's rows can
say); ``--report FOLDER/report.json`` does only that, on a finished one-process run.

The model is SmolLM2-135M (scripts/_bench_common.py ``load_smollm2``: expanded once from its GGUF
into ``~/.cache/cdq``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from _bench_common import CACHE, data_dir, load_smollm2  # noqa: E402


def sha256(folder: Path) -> str:
    """One digest over the bytes of every safetensors file of an output folder, in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def run(args, world: int) -> dict:
    out = Path(args.work) / f"ranks-{world}"
    cmd = [sys.executable, "-m", "cdq_cli", "quantize", args.model, "--method", args.method]
    cmd += ["--bits", str(args.bits), "--calib", args.calib, "--nsamples", str(args.nsamples)]
    cmd += ["--seqlen", str(args.seqlen), "--output", str(out), "--overwrite", "--quiet", "--json"]
    cmd += [*shlex.split(args.extra), *(["--nproc", str(world)] if world > 1 else [])]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads}
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"world {world} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    report = json.loads((out / "report.json").read_text())
    parallel = report["run"]["parallel"]
    return {
        "world": world,
        "wall": seconds,
        "per_rank": parallel["solve_seconds"],
        "solve": parallel["solve_phase_seconds"],
        "imbalance": parallel["predicted_imbalance"],
        "digest": sha256(out),
    }


def replayed(report: dict, worlds: list[int]) -> list[dict]:
    """:func:`cdq_cli.parallel.replay` of a one-process report for each world size."""
    sys.path.insert(0, str(REPO))  # this checkout's cdq_cli
    from cdq_cli.parallel import replay
    from cdq_cli.solvers import find_method
    from cdq_cli.solvers.bands import even_bands
    from cdq_cli.store.layer import matrix_shape

    run = report["run"]
    if run.get("true_sequential", True):
        raise SystemExit("--predict needs a run made with --no-true-sequential (one group per block)")
    method = find_method(run["method"])
    options = run.get("options") or {}
    groups: dict[str, dict] = {}
    for row in report["layers"]:
        block = row["name"].rsplit(".", 2)[0]  # model.layers.N.self_attn.q_proj -> model.layers.N
        rows, columns = matrix_shape(row["shape"])
        if row.get("band_seconds"):  # solved in bands of rows: each band is a unit of the ranks' work
            bands = even_bands(rows, len(row["band_seconds"]))  # the run's bands (solvers.bands)
            for (lo, hi), seconds in zip(bands, row["band_seconds"], strict=True):
                groups.setdefault(block, {})[f"{row['name']}[rows {lo}:{hi}]"] = ((hi - lo, columns), seconds)
        else:
            groups.setdefault(block, {})[row["name"]] = ((rows, columns), row["seconds"])
    total = sum(seconds for group in groups.values() for _, seconds in group.values())
    rows = []
    for world in worlds:
        balance = replay(list(groups.values()), lambda r, c: method.cost(r, c, options), world)
        rows.append(
            {
                "world": world,
                "imbalance": balance.predicted_imbalance,
                "critical": balance.critical,
                "speedup": total / balance.critical,
            }
        )
    return rows


def print_replayed(rows: list[dict]) -> None:
    print("| ranks (replayed) | predicted imbalance | solve phase s (one-process layer times) | speed-up |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['world']} | {100 * row['imbalance']:.1f}% | {row['critical']:.1f} "
            f"| {row['speedup']:.2f}× |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(CACHE / "smollm2-135m-instruct"))
    parser.add_argument("--calib", default=None, help="Calibration text (default: the C4 sample).")
    parser.add_argument("--method", default="cdq")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--nproc", default="2", help="World sizes to compare with one process: 2 or 2,4.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--extra", default="--no-true-sequential", help="More `cdq quantize` arguments, one string."
    )
    parser.add_argument("--work", default="/tmp/cdq-bench-ranks")
    parser.add_argument(
        "--predict", default="", help="World sizes to replay the one-process run for: 4 or 2,4,8."
    )
    parser.add_argument(
        "--report", type=Path, help="Only replay this one-process report.json (with --predict)."
    )
    args = parser.parse_args()
    worlds = [int(world) for world in args.predict.split(",") if world]
    if args.report is not None:
        print(f"# replay of {args.report}")
        print_replayed(replayed(json.loads(args.report.read_text()), worlds or [2, 4]))
        return
    args.calib = args.calib or str(data_dir() / "text" / "c4-sample.jsonl")
    if not (Path(args.model) / "config.json").is_file() and args.model == str(
        CACHE / "smollm2-135m-instruct"
    ):
        load_smollm2()  # expands the GGUF into the cache once
    print(
        f"# bench_ranks: {platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s) per process, "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )
    print(f"# argv: {' '.join(sys.argv[1:])}")
    rows = [run(args, 1)] + [run(args, int(world)) for world in args.nproc.split(",")]
    base = rows[0]
    print(
        "| processes | end-to-end s | solve phase s | solve s per rank | predicted imbalance "
        "| speed-up end-to-end | speed-up solve phase | same bytes as 1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        # one process has no ranks to compare (its report's per-rank figure is not a time)
        ranks = " / ".join(f"{value:.1f}" for value in row["per_rank"]) if row["world"] > 1 else "—"
        same = "yes" if row["digest"] == base["digest"] else "NO"
        print(
            f"| {row['world']} | {row['wall']:.1f} | {row['solve']:.1f} | {ranks} "
            f"| {100 * row['imbalance']:.1f}% "
            f"| {base['wall'] / row['wall']:.2f}× | {base['solve'] / row['solve']:.2f}× | {same} |"
        )
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")
    if worlds:
        print_replayed(
            replayed(json.loads((Path(args.work) / "ranks-1" / "report.json").read_text()), worlds)
        )


if __name__ == "__main__":
    main()
