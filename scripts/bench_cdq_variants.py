"""cdq's settings against each other on real layers: objective / GPTQ and solver time per variant.

Why the defaults are what they are (starts, sweeps, tolerance, rounds): each variant is one set of
``solve("cdq", ...)`` options, run on the same Σ as GPTQ; the table gives the geometric mean over
layers of the ratio to GPTQ's objective and the summed solver seconds (GPTQ's own time first).

    python scripts/bench_cdq_variants.py --model smollm2 --blocks 3 --threads 1
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _bench_common import MODELS
from bench_quality import layer_sigmas

from cdq_cli.solvers import solve

VARIANTS: dict[str, dict] = {
    "3 starts, 16 sweeps, tol 0 (~ previous default)": {
        "starts": "gptq,gptq-actorder,gptq-clip",
        "sweeps": 16,
        "tolerance": 0.0,
    },
    "2 starts, 16 sweeps, tol 0": {"sweeps": 16, "tolerance": 0.0},
    "default (2 starts, 4 sweeps, tol 1e-3)": {},
    "8 sweeps": {"sweeps": 8},
    "16 sweeps": {"sweeps": 16},
    "rounds 3": {"rounds": 3},
    "rounds 3, 2 sweeps": {"rounds": 3, "sweeps": 2},
}
CONFIGS = {"smollm2": [(3, None), (4, None), (3, 64)], "stories260K": [(3, None), (4, None), (4, 32)]}


class _SigmaArgs:
    seed = 0
    batch_size = 8
    sigma_dtype = "float32"
    solve_dtype = "float32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--blocks", type=int, nargs="+", default=[3])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = MODELS[args.model]()
    problems = layer_sigmas(model, tokenizer, args.blocks, _SigmaArgs, args.nsamples, args.seqlen)
    size = f"{args.nsamples} x {args.seqlen}"
    print(f"# {args.model} blocks {args.blocks}: {len(problems)} layers, Σ from {size} C4-sample tokens")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| bits | group | variant | geo-mean obj / GPTQ | solver s | × GPTQ time |")
    print("|---|---|---|---|---|---|")
    for bits, group in CONFIGS[args.model]:
        ratios: dict[str, list[float]] = {name: [] for name in args.variants}
        seconds = dict.fromkeys(["gptq", *args.variants], 0.0)
        for weight, sigma in problems.values():
            if group and weight.shape[1] % group:
                continue
            began = time.perf_counter()
            reference = solve("gptq", weight, sigma, bits=bits, group_size=group).objective
            seconds["gptq"] += time.perf_counter() - began
            for name in args.variants:
                began = time.perf_counter()
                result = solve("cdq", weight, sigma, bits=bits, group_size=group, **VARIANTS[name])
                seconds[name] += time.perf_counter() - began
                ratios[name].append(result.objective / reference)
        label = f"g{group}" if group else "channel"
        print(f"| {bits} | {label} | GPTQ | 1.000 | {seconds['gptq']:.1f} | 1.0 |")
        for name in args.variants:
            geo = math.exp(sum(math.log(r) for r in ratios[name]) / len(ratios[name]))
            factor = seconds[name] / seconds["gptq"]
            row = f"| {bits} | {label} | {name} | {geo:.4f} | {seconds[name]:.1f} | {factor:.1f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
