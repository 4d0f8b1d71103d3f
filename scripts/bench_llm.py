"""End-to-end language-model benchmark: quantize with every method, then WikiText-2 perplexity.

Each quantization and each evaluation runs as its own ``cdq`` process (the product's real path,
loading included), so wall time and peak resident memory (``wait4`` rusage of that process) are
per run. Prints a markdown table and optionally writes JSON.

    python scripts/bench_llm.py --model ~/.cache/cdq/smollm2-135m-instruct \
        --nsamples 128 --seqlen 512 --eval-windows 40 --configs w4 w3 w3g64
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
# The `cdq` next to this Python, or $CDQ_BIN (e.g. a checkout's CLI when the venv's is another's).
CDQ = os.environ.get("CDQ_BIN") or str(Path(sys.executable).with_name("cdq"))

# name -> extra `cdq quantize` arguments
METHODS: dict[str, list[str]] = {
    "rtn": ["--method", "rtn"],
    "gptq": ["--method", "gptq"],
    "quantease": ["--method", "quantease"],
    "quantease-fast": ["--method", "quantease", "-o", "preset=fast"],
    "quantease-outlier1%": ["--method", "quantease-outlier", "-o", "outlier_fraction=0.01"],
    "comq": ["--method", "comq"],
    "comq-layer": ["--method", "comq", "--per-layer"],
    "cdq": ["--method", "cdq"],
}


def parse_config(name: str) -> tuple[int, int | None]:
    """``w3`` → (3, None); ``w3g64`` → (3, 64)."""
    bits, _, group = name[1:].partition("g")
    return int(bits), int(group) if group else None


def run(cmd: list[str], threads: int) -> tuple[dict, float, float, float]:
    """Run a cdq command printing one JSON object; return (object, wall s, peak RSS MiB, CPU s)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out, err = proc.communicate()
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err.strip()[-2000:]}")
    return json.loads(out), seconds, _reported(err, "peak_rss_mib"), _reported(err, "cpu_seconds")


def _reported(stderr: str, key: str) -> float:
    """A value that ``_peak_rss.py`` printed for the wrapped process (``key=value``)."""
    for line in stderr.splitlines():
        if line.startswith(f"{key}="):
            return float(line.split("=", 1)[1])
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/cdq/smollm2-135m-instruct"))
    parser.add_argument("--calib", default=str(DATA / "text/c4-sample.jsonl"))
    parser.add_argument("--data", default=str(DATA / "text/wikitext2-raw-test.txt"))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--configs", nargs="+", default=["w4", "w3", "w3g64"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", nargs="*", default=[], help="More `cdq quantize` arguments.")
    parser.add_argument("--work", default="/tmp/cdq-bench-llm")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    print(f"# bench_llm: {platform.machine()}, {args.threads} threads; argv: {' '.join(sys.argv[1:])}")
    wrapper = [sys.executable, str(REPO / "scripts" / "_peak_rss.py")]
    evaluate = ["eval", "--data", args.data, "--seqlen", str(args.seqlen)]
    evaluate += ["--max-windows", str(args.eval_windows), "--json"]
    fp, fp_seconds, _, _ = run([*wrapper, CDQ, *evaluate[:1], args.model, *evaluate[1:]], args.threads)
    print(
        f"# FP perplexity {fp['ppl']:.3f} on {fp['windows']} windows x {fp['seqlen']} tokens"
        f" ({fp_seconds:.0f} s)"
    )
    rows = []
    for config in args.configs:
        bits, group = parse_config(config)
        for method in args.methods:
            out = Path(args.work) / f"{config}-{method}"
            cmd = [*wrapper, CDQ, "quantize", args.model, *METHODS[method], "--bits", str(bits)]
            cmd += ["--group-size", str(group)] if group else []
            cmd += ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
            cmd += ["--output", str(out), "--overwrite", "--json", "--quiet", *args.extra]
            summary, q_seconds, q_peak, q_cpu = run(cmd, args.threads)
            result, _, _, _ = run([*wrapper, CDQ, "eval", str(out), *evaluate[1:]], args.threads)
            row = {
                "config": config,
                "method": method,
                "ppl": result["ppl"],
                "fp_ppl": fp["ppl"],
                "quantize_seconds": q_seconds,
                "quantize_cpu_seconds": q_cpu,
                "peak_rss_mib": q_peak,
                "mean_relative_error": summary.get("summary", summary).get("mean_relative_error"),
            }
            rows.append(row)
            if args.json_out:  # after every row, so an interrupted run keeps what it measured
                record = {"fp": fp, "rows": rows, "argv": sys.argv[1:]}
                Path(args.json_out).write_text(json.dumps(record, indent=2))
            print(
                f"{config:7s} {method:20s} ppl {row['ppl']:9.3f}  quantize {q_seconds:7.1f} s"
                f" ({q_cpu:.0f} CPU s)  peak {q_peak:7.0f} MiB",
                flush=True,
            )
    print()
    print(
        "| config | method | WikiText-2 ppl | Δ vs FP | quantize wall s | CPU s | × GPTQ CPU time "
        "| peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        gptq = next((r for r in rows if r["config"] == row["config"] and r["method"] == "gptq"), None)
        ratio = f"{row['quantize_cpu_seconds'] / gptq['quantize_cpu_seconds']:.2f}" if gptq else "-"
        print(
            f"| {row['config']} | {row['method']} | {row['ppl']:.3f} | {row['ppl'] - fp['ppl']:+.3f} "
            f"| {row['quantize_seconds']:.0f} | {row['quantize_cpu_seconds']:.0f} | {ratio} "
            f"| {row['peak_rss_mib']:.0f} |"
        )
    print(f"\nFP: {fp['ppl']:.3f} ({fp['windows']} windows x {fp['seqlen']} tokens)")


if __name__ == "__main__":
    main()
