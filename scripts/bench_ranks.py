"""Many ranks on one machine: the same ``cdq quantize`` with 1 process and with ``--nproc N``.

Each run is its own ``cdq`` process tree (torchrun's workers for ``--nproc``), every process with
``--threads`` threads (default one: on a 2-core machine, two ranks of one thread each against one
process of one thread). Printed per world size:

* end-to-end wall seconds of the command (loading, calibration forwards, solves, writing);
* solve seconds: the sum of the per-layer solver times in report.json for one process; for N ranks
  each rank's own solve time (``run.parallel.solve_seconds``) and the largest of them, which is
  what the block loop waits for;
* whether the safetensors files have the same bytes as the single-process run's.

    CDQ_DATA_DIR=../shared/data .venv/bin/python scripts/bench_ranks.py --nproc 2
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
DATA = Path(os.environ.get("CDQ_DATA_DIR", REPO.parent / "shared" / "data"))


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
    parallel = report["run"].get("parallel")
    per_rank = parallel["solve_seconds"] if parallel else [sum(row["seconds"] for row in report["layers"])]
    return {
        "world": world,
        "wall": seconds,
        "per_rank": per_rank,
        "solve": max(per_rank),
        "digest": sha256(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/cdq/smollm2-135m-instruct"))
    parser.add_argument("--calib", default=str(DATA / "text/c4-sample.jsonl"))
    parser.add_argument("--method", default="cdq")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--extra", default="--no-true-sequential", help="More `cdq quantize` arguments, one string."
    )
    parser.add_argument("--work", default="/tmp/cdq-bench-ranks")
    args = parser.parse_args()
    print(
        f"# bench_ranks: {platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s) per process"
    )
    print(f"# argv: {' '.join(sys.argv[1:])}")
    rows = [run(args, 1), run(args, args.nproc)]
    base = rows[0]
    print(
        "| processes | end-to-end s | solve s (slowest rank) | solve s per rank | speed-up end-to-end "
        "| speed-up solve | same bytes as 1 |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ranks = " / ".join(f"{value:.1f}" for value in row["per_rank"])
        same = "yes" if row["digest"] == base["digest"] else "NO"
        print(
            f"| {row['world']} | {row['wall']:.1f} | {row['solve']:.1f} | {ranks} "
            f"| {base['wall'] / row['wall']:.2f}× | {base['solve'] / row['solve']:.2f}× | {same} |"
        )


if __name__ == "__main__":
    main()
