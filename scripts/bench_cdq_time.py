"""Where cdq's solver time goes, per part, on real layers; and the objectives it reaches.

Runs ``solve("cdq", W, Σ, ...)`` on every Linear of the chosen SmolLM2 (or stories260K) blocks and
times, by wrapping the solver modules' functions: the objective evaluations (float64
``objective`` and working-dtype ``working_objective``, whichever the code has), the GPTQ starts,
the CD sweeps, the grid refits and range clipping. Prints the shares and writes the per-layer
objectives (recomputed in float64) to JSON, so two versions of the code can be compared on the
same Σ:

    python scripts/bench_cdq_time.py --sigmas /tmp/smol.pt --json-out /tmp/new.json
    PYTHONPATH=/path/to/old/checkout python scripts/bench_cdq_time.py --sigmas /tmp/smol.pt \\
        --json-out /tmp/old.json
    python scripts/bench_cdq_time.py --compare /tmp/old.json /tmp/new.json

``--sigmas`` caches the captured (W, Σ) pairs (float32), so every run sees the same problems.
``--float64-decisions`` runs the current code with every objective it reports or decides with
recomputed in float64 (GPTQ's, the starts', the sweeps' and the refits'), which isolates what
taking objectives from the working dtype and the sweep log changes: compare its JSON with a plain
run's.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

import torch

PARTS = {
    # (module, function): label
    ("cdq", "objective"): "objective (float64)",
    ("cdq", "working_objective"): "objective (working dtype)",
    ("gptq", "objective"): "GPTQ's objective (float64)",
    ("gptq", "working_objective"): "GPTQ's objective (working dtype)",
    ("starts", "solve_gptq"): "GPTQ starts (incl. their objective)",
    ("starts", "fit_clipped"): "range clipping of the clipped start",
    ("cdq", "cd_sweeps"): "CD sweeps",
    ("cdq", "refit_scales_and_zeros"): "grid refits",
}


class _SigmaArgs:
    seed = 0
    batch_size = 8
    sigma_dtype = "float32"
    solve_dtype = "float32"


def problems(args) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if args.sigmas and Path(args.sigmas).is_file():
        return torch.load(args.sigmas)
    from _bench_common import MODELS
    from bench_quality import layer_sigmas

    model, tokenizer = MODELS[args.model]()
    found = layer_sigmas(model, tokenizer, args.blocks, _SigmaArgs, args.nsamples, args.seqlen)
    if args.sigmas:
        torch.save(found, args.sigmas)
    return found


def instrument(acc: collections.Counter) -> None:
    import importlib

    for (module_name, function), label in PARTS.items():
        module = importlib.import_module(f"cdq_cli.solvers.{module_name}")
        inner = getattr(module, function, None)
        if inner is None:
            continue

        def timed(*a, _inner=inner, _label=label, **k):
            began = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                acc[_label] += time.perf_counter() - began

        setattr(module, function, timed)


def float64_decisions() -> None:
    """Patch the current solvers so that every objective they use is the float64 one."""
    from cdq_cli.solvers import cdq, result, starts

    exact = result.objective
    cdq.working_objective = starts.working_objective = exact
    plain_gptq, plain_sweeps = starts.solve_gptq, cdq.cd_sweeps

    def solve_gptq(weight, sigma, spec, **options):
        solved = plain_gptq(weight, sigma, spec, **options)
        solved.objective = solved.objective_start = exact(weight, solved.weight, sigma)
        return solved

    def cd_sweeps(weight, sigma, grid, start, **options):
        approx, log = plain_sweeps(weight, sigma, grid, start, **options)
        log.start = exact(weight, approx, sigma) - sum(log.gains)  # objectives[-1] is exact
        return approx, log

    def lower(new, old, _exact, *, margin=0.0, or_equal=False):
        bound = old * (1 - margin)
        return (new <= bound if or_equal else new < bound), new, old

    starts.solve_gptq, cdq.cd_sweeps, cdq.lower = solve_gptq, cd_sweeps, lower


def run(args) -> None:
    import hashlib

    import cdq_cli
    from cdq_cli.solvers import solve
    from cdq_cli.solvers.result import objective

    if args.threads:
        torch.set_num_threads(args.threads)
    found = problems(args)
    if args.float64_decisions:
        float64_decisions()
    acc: collections.Counter = collections.Counter()
    instrument(acc)
    total, values, codes = 0.0, {}, {}
    for name, (weight, sigma) in found.items():
        began = time.perf_counter()
        result = solve("cdq", weight, sigma, bits=args.bits, group_size=args.group_size)
        total += time.perf_counter() - began
        values[name] = objective(weight, result.weight, sigma)
        codes[name] = hashlib.sha256(result.codes.numpy().tobytes()).hexdigest()
    print(
        f"# cdq from {Path(cdq_cli.__file__).parent}, {torch.get_num_threads()} threads, {len(found)} layers"
    )
    print(f"# bits {args.bits}, group size {args.group_size}: solver time {total:.2f} s")
    print("| part | seconds | share of solver time |")
    print("|---|---|---|")
    for label, seconds in sorted(acc.items(), key=lambda item: -item[1]):
        print(f"| {label} | {seconds:.2f} | {seconds / total:.0%} |")
    if args.json_out:
        record = {"seconds": total, "parts": dict(acc), "objectives": values, "codes": codes}
        record["source"] = cdq_cli.__file__
        Path(args.json_out).write_text(json.dumps(record, indent=1))


def compare(before: str, after: str) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (before, after))
    ratios = [b["objectives"][k] / a["objectives"][k] for k in a["objectives"]]
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    worse = sum(r > 1 for r in ratios)
    same = sum(a.get("codes", {}).get(k) == b.get("codes", {}).get(k, "") for k in a["objectives"])
    print(f"solver time {a['seconds']:.2f} s -> {b['seconds']:.2f} s ({b['seconds'] / a['seconds']:.2f}x)")
    print(f"layers with identical codes: {same} of {len(ratios)}")
    print(
        f"objective after/before over {len(ratios)} layers: geometric mean {geo:.7f}, "
        f"min {min(ratios):.7f}, max {max(ratios):.9f}, layers higher: {worse}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "stories260K"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[3, 15])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sigmas", help="cache file for the captured (W, Σ) pairs")
    parser.add_argument("--float64-decisions", action="store_true", help="see the module docstring")
    parser.add_argument("--json-out")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        run(args)


if __name__ == "__main__":
    main()
