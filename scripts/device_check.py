"""The GPU check: everything cdq claims about CUDA, measured in one run (under 8 minutes on an H200).

1. Solvers on CUDA against the CPU (float32 both): for every method, on fresh random layers and
   on the real stories260K layers, the objective agrees to 1e-3 relative and at least 99% of the
   codes are identical (float32 rounding may tip a few ties).
2. Speed on the GPU (scripts/bench_speed.py): one CD sweep and GPTQ against a GEMM of the same
   size at 4096², and QuantEase's 30 sweeps against one GPTQ call.
3. End to end on CUDA: ``cdq quantize`` with gptq and cdq, then ``--eval`` perplexity, of
   SmolLM2-135M (real weights when ``--smollm2-gguf`` is given, else a synthetic model of its
   exact architecture) and of a 1.5B-parameter synthetic Llama in bf16 shards (lazy loading,
   sharded output): wall time, peak GPU memory, perplexity, the dtype the blocks were computed in
   (``--dtype auto``: the checkpoint's bf16 on a GPU that computes it natively). The big model's
   runs go through scripts/probe_memory.py ``--cuda``: the GPU memory peak of every block (and of
   the embeddings and the head) and the process's peak resident memory, per phase.

Every figure goes to stdout as a table and to ``$OUT/device_check.json`` (or ``--json PATH``).
Run through scripts/device_check.sh, which sets up the carried data (see that file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from synthetic_lm import write_synthetic_llama  # noqa: E402

from cdq_cli.solvers import METHODS, solve  # noqa: E402

SMOLLM2 = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152)
BIG = dict(hidden=2048, intermediate=8192, layers=24, heads=16, kv_heads=8, vocab=32000)
FAST_OPTIONS = {"quantease": {"preset": "fast"}, "quantease-outlier": {"iterations": 2}}


def solver_agreement(data: Path, device: torch.device) -> list[dict]:
    """CPU vs ``device`` (CUDA) on random and real layers, every method."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    problems = []
    for p, q in ((512, 512), (1024, 768)):
        x = torch.randn(p, 4 * p, generator=gen)
        problems.append((f"random {q}x{p}", torch.randn(q, p, generator=gen), x @ x.T))
    stories = data / "models" / "stories260K"
    if stories.is_dir():
        from cdq_cli.capture import linear_sigmas
        from cdq_cli.models import load_causal_lm

        model, tokenizer = load_causal_lm(str(stories))
        text = (data / "text" / "wikitext2-raw-test.txt").read_text()[:20000]
        ids = tokenizer(text, return_tensors="pt").input_ids[:, : 16 * 64].reshape(16, 64)
        for name, (layer, acc) in list(linear_sigmas(model, ids.split(4)).items())[:7]:
            problems.append((name, layer.weight.detach().float(), acc.sigma))
    for label, weight, sigma in problems:
        for method in METHODS:
            for config in ({"bits": 3}, {"bits": 4, "group_size": 64}):
                if weight.shape[1] % config.get("group_size", 1):
                    continue
                options = FAST_OPTIONS.get(method, {})
                cpu = solve(method, weight, sigma, **config, **options)
                began = time.perf_counter()
                gpu = solve(method, weight.to(device), sigma.to(device), **config, **options)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - began
                same = float((cpu.codes == gpu.codes.cpu()).double().mean())
                rel = abs(gpu.objective - cpu.objective) / max(cpu.objective, 1e-30)
                rows.append(
                    {
                        "layer": label,
                        "method": method,
                        "grid": f"w{config['bits']}"
                        + (f"g{config['group_size']}" if "group_size" in config else ""),
                        "objective_rel_diff": rel,
                        "same_codes": same,
                        "cuda_seconds": seconds,
                        "ok": rel <= 1e-3 and same >= 0.99,
                    }
                )
    return rows


def cdq(*args: str, timeout: int, probe: Path | None = None) -> tuple[dict, float]:
    """Run ``cdq ARGS --json --quiet`` (under scripts/probe_memory.py --cuda, writing its samples to
    ``probe``, when given); its JSON and wall seconds."""
    began = time.perf_counter()
    runner = ["-m", "cdq_cli"]
    if probe is not None:
        runner = [
            str(REPO / "scripts" / "probe_memory.py"),
            "--cuda",
            "--interval",
            "0.05",  # each sample's GPU figure is the peak since the last one: none is missed
            "--json",
            str(probe),
            "--",
        ]
    try:
        done = subprocess.run(
            [sys.executable, *runner, *args, "--json", "--quiet"],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout}s"}, time.perf_counter() - began
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}, time.perf_counter() - began
    return json.loads(done.stdout), time.perf_counter() - began


def end_to_end(data: Path, work: Path, gguf: str | None, budget: int, device: str, small: bool) -> list[dict]:
    from cdq_cli.models import load_causal_lm

    _, tokenizer = load_causal_lm(str(data / "models" / "stories260K"))
    calib, wikitext = str(data / "text" / "c4-sample.jsonl"), str(data / "text" / "wikitext2-raw-test.txt")
    models = []
    if gguf:
        models.append(("SmolLM2-135M (real, GGUF)", gguf))
    else:
        folder = work / "smollm2-architecture"
        shape = {**SMOLLM2, "layers": 2} if small else SMOLLM2
        write_synthetic_llama(folder, **shape, tokenizer=tokenizer, context=2048)
        models.append(("SmolLM2-135M architecture (synthetic)", str(folder)))
    big = work / "llama-1.5b"
    shape = {**BIG, "layers": 1, "hidden": 256, "intermediate": 512} if small else BIG
    params = write_synthetic_llama(big, **shape, tokenizer=tokenizer, max_shard_bytes=2**30)
    models.append((f"Llama {params / 1e9:.2f}B (synthetic, bf16 shards)", str(big)))
    samples, windows = ("8", "2") if small else ("128", "40")
    rows = []
    deadline = time.perf_counter() + budget
    for label, source in models:
        for method in ("gptq", "cdq"):
            left = int(deadline - time.perf_counter())
            if left < 30:
                rows.append({"model": label, "method": method, "error": "skipped: out of time"})
                continue
            out = work / f"{Path(source).name}-{method}"
            probe = work / f"probe-{method}.json" if source == str(big) else None
            result, seconds = cdq(
                "quantize", source, "--method", method, "--bits", "3", "--device", device,
                "--calib", calib, "--nsamples", samples, "--seqlen", "512", "--eval", wikitext,
                "--eval-seqlen", "512", "--eval-max-windows", windows, "--output", str(out), "--overwrite",
                timeout=left, probe=probe,
            )  # fmt: skip
            evaluation = result.get("evaluation", {})
            report = out / "report.json"
            run = json.loads(report.read_text())["run"] if report.is_file() else {}
            phases = (
                json.loads(probe.read_text())["phases"] if probe is not None and probe.is_file() else None
            )
            rows.append(
                {
                    "model": label,
                    "method": method,
                    "wall_seconds": round(seconds, 1),
                    "peak_gpu_bytes": result.get("peak_memory_bytes"),
                    "peak_kind": result.get("peak_memory_kind"),
                    "fp_ppl": evaluation.get("fp_ppl"),
                    "ppl": evaluation.get("ppl"),
                    "layers": result.get("layers"),
                    "dtype": run.get("dtype"),
                    "compute_dtype": run.get("compute_dtype"),
                    "phases": phases,  # per block: largest GPU allocated bytes and VmRSS (probe_memory)
                    "error": result.get("error"),
                }
            )
    return rows


def speed(timeout: int, device: str, small: bool) -> str:
    script = REPO / "scripts" / "bench_speed.py"
    size = "256" if small else "4096"
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--device", device, "--sizes", size, "--square", "--quantease"],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        return f"bench_speed did not finish within {timeout}s"
    return done.stdout + (done.stderr[-2000:] if done.returncode else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("CDQ_DATA_DIR", REPO / ".device" / "data"))
    )
    parser.add_argument("--smollm2-gguf", default=None)
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "device_check.json")
    parser.add_argument("--budget", type=int, default=420, help="Seconds for the whole check.")
    parser.add_argument(
        "--dry-run", action="store_true", help="On the CPU, tiny sizes: checks the script itself."
    )
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--dry-run runs the script on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    began = time.perf_counter()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)"
    report: dict = {"device": name, "torch": torch.__version__}
    report["solvers"] = solver_agreement(args.data, device)
    bad = [r for r in report["solvers"] if not r["ok"]]
    print(
        f"solvers, CPU vs CUDA: {len(report['solvers']) - len(bad)}/{len(report['solvers'])} agree",
        flush=True,
    )
    for row in bad:
        print(f"  DIFFERS {row}", flush=True)
    report["speed"] = speed(timeout=120, device=device.type, small=args.dry_run)
    print(report["speed"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        left = args.budget - int(time.perf_counter() - began)
        report["end_to_end"] = end_to_end(
            args.data, Path(tmp), args.smollm2_gguf, left, device.type, small=args.dry_run
        )
    for row in report["end_to_end"]:
        peak = row.get("peak_gpu_bytes")
        print(
            f"{row['model']:45} {row['method']:5} "
            + (f"error {row['error']}" if row.get("error") else
               f"{row['wall_seconds']:7.1f}s peak GPU {peak / 2**30 if peak else float('nan'):6.2f} GiB "
               f"ppl {row['fp_ppl']:.3f} -> {row['ppl']:.3f} "
               f"({row['dtype']} computed in {row['compute_dtype']})"),
            flush=True,
        )  # fmt: skip
        for phase, entry in (row.get("phases") or {}).items():
            gpu = entry.get("cuda")
            print(
                f"    {phase:28} GPU peak {gpu / 2**30 if gpu else float('nan'):6.2f} GiB, "
                f"VmRSS {entry['rss'] / 2**30:6.2f} GiB, {entry['s']:6.1f}s",
                flush=True,
            )
    report["seconds"] = round(time.perf_counter() - began, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"total {report['seconds']}s; wrote {args.json}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
