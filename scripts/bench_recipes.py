"""Recipes side by side on SmolLM2-135M: quantize with each recipe, then perplexity on two texts.

The protocol of issue 19 (the peers' table uses the same windows): calibration 32 x 512 tokens from
the C4 sample (seed 0), symmetric per-channel grids at the given bits, evaluation on the first 40
windows of 512 tokens of WikiText-2 test and of PTB test (GPTQ protocol). Each quantization and
each evaluation is its own process of THIS checkout's cdq (``python -m cdq_cli``), at ``--threads``
threads, run one after the other; CPU seconds and peak RSS are that process's (``wait4``).

    python scripts/bench_recipes.py --bits 3 4 --recipes cdq cdq-fp cdq-hadamard-fp \\
        --json-out /tmp/recipes.json

Rows already in ``--json-out`` (same bits and recipe) are not run again: an interrupted
benchmark continues where it stopped. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CDQ_DATA_DIR", REPO.parent / "shared" / "data"))
CDQ = [sys.executable, "-m", "cdq_cli"]

# name -> `cdq quantize` arguments (besides the protocol's)
RECIPES: dict[str, list[str]] = {
    "rtn": ["--method", "rtn"],
    "gptq": ["--method", "gptq"],
    "gptq-no-act-order": ["--method", "gptq", "-o", "act_order=false"],
    "gptq-fp": ["--method", "gptq", "-o", "target=fp"],
    "gptq-hadamard": ["--method", "gptq", "--transform", "hadamard"],
    "gptq-hadamard-fp": ["--method", "gptq", "--transform", "hadamard", "-o", "target=fp"],
    "cdq": ["--method", "cdq", "-o", "target=quantized"],
    "cdq-fp": ["--method", "cdq", "-o", "target=fp"],
    "cdq-hadamard": ["--method", "cdq", "--transform", "hadamard", "-o", "target=quantized"],
    "cdq-hadamard-fp": ["--method", "cdq", "--transform", "hadamard", "-o", "target=fp"],
    "cdq-awq": ["--method", "cdq", "--transform", "awq", "-o", "target=quantized"],
    "cdq-awq-fp": ["--method", "cdq", "--transform", "awq", "-o", "target=fp"],
    "quantease-fp": ["--method", "quantease", "-o", "target=fp"],
}


def run(cmd: list[str], threads: int) -> tuple[dict, float, float, float]:
    """Run a cdq command printing one JSON object; (object, wall s, peak RSS MiB, CPU s)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "NUMBA_NUM_THREADS": str(threads),
    }
    wrapped = [sys.executable, str(REPO / "scripts" / "_peak_rss.py"), *cmd]
    began = time.perf_counter()
    proc = subprocess.run(wrapped, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}"
        )
    reported = dict(
        line.split("=", 1)
        for line in proc.stderr.splitlines()
        if line.startswith(("peak_rss_mib=", "cpu_seconds="))
    )
    return json.loads(proc.stdout), seconds, float(reported["peak_rss_mib"]), float(reported["cpu_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/cdq/smollm2-135m-instruct"))
    parser.add_argument("--calib", default=str(DATA / "text/c4-sample.jsonl"))
    parser.add_argument(
        "--texts",
        nargs="+",
        default=[str(DATA / "text/wikitext2-raw-test.txt"), str(DATA / "text/ptb-test.txt")],
    )
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--recipes", nargs="+", default=["gptq", "cdq"], choices=list(RECIPES))
    parser.add_argument(
        "--extra", nargs="*", default=[], help="More `cdq quantize` arguments, for every row."
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/cdq-bench-recipes")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    record = {"rows": [], "fp": {}}
    if args.json_out and Path(args.json_out).is_file():
        record = json.loads(Path(args.json_out).read_text())
    print(f"# bench_recipes: {platform.machine()}, {args.threads} thread(s); argv: {' '.join(sys.argv[1:])}")

    def evaluate(target: str, text: str) -> dict:
        cmd = [*CDQ, "eval", target, "--data", text, "--seqlen", str(args.seqlen)]
        return run([*cmd, "--max-windows", str(args.eval_windows), "--json"], args.threads)[0]

    for text in args.texts:
        if text not in record["fp"]:
            record["fp"][text] = evaluate(args.model, text)["ppl"]
        print(f"# FP perplexity on {Path(text).name}: {record['fp'][text]:.3f}")
    for bits in args.bits:
        for recipe in args.recipes:
            done = [r for r in record["rows"] if r["bits"] == bits and r["recipe"] == recipe]
            if done:
                continue
            out = Path(args.work) / f"w{bits}-{recipe}"
            cmd = [*CDQ, "quantize", args.model, *RECIPES[recipe], "--bits", str(bits), "--sym"]
            cmd += ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
            cmd += ["--seed", str(args.seed), "--output", str(out), "--overwrite", "--json", "--quiet"]
            cmd += args.extra
            summary, wall, peak, cpu = run(cmd, args.threads)
            row = {
                "bits": bits,
                "recipe": recipe,
                "command": " ".join(["cdq", *cmd[len(CDQ) :]]),
                "ppl": {text: evaluate(str(out), text)["ppl"] for text in args.texts},
                "quantize_seconds": round(wall, 1),
                "quantize_cpu_seconds": cpu,
                "peak_rss_mib": peak,
                "mean_relative_error": summary.get("mean_relative_error"),
            }
            record["rows"].append(row)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(record, indent=2))
            shown = "  ".join(f"{Path(t).stem} {p:8.3f}" for t, p in row["ppl"].items())
            print(
                f"w{bits} {recipe:18s} {shown}  quantize {wall:6.0f} s ({cpu:.0f} CPU s)  {peak:.0f} MiB",
                flush=True,
            )
    texts = [Path(t).stem for t in args.texts]
    print()
    print(f"| bits | recipe | {' | '.join(texts)} | quantize CPU s | peak RSS MiB |")
    print("|---|---|" + "---|" * len(texts) + "---|---|")
    for row in sorted(record["rows"], key=lambda r: (r["bits"], r["recipe"])):
        ppls = " | ".join(f"{row['ppl'][t]:.3f}" for t in args.texts if t in row["ppl"])
        cost = f"{row['quantize_cpu_seconds']:.0f} | {row['peak_rss_mib']:.0f}"
        print(f"| W{row['bits']} | {row['recipe']} | {ppls} | {cost} |")
    fp = " | ".join(f"{record['fp'][t]:.3f}" for t in args.texts)
    print(f"| FP | - | {fp} | - | - |")


if __name__ == "__main__":
    main()
