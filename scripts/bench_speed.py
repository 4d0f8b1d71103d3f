"""Speed benchmark: one CD sweep vs one GEMM of the same size vs GPTQ, on random problems.

For every (p inputs, q outputs): W (q×p) ~ N(0, 1) and Σ = X Xᵀ with X (p×2p) ~ N(0, 1), float32.
Timed, each as the median of ``--repeat`` runs after one warm-up, all in the same process; the
timed functions take turns within each repeat, so load from other jobs on a shared machine falls
on all of them alike:

* ``sweep``: ``cd_sweeps(W, Σ, grid, RTN start, sweeps=1, stop_at_fixed_point=False)``, cyclic order,
  on the min–max grid (``--bits``, per channel), block size ``--block-size``: one whole call, its
  set-up (transposed copies) included;
* ``greedy``: the same sweep in COMQ's per-row greedy order (only for sizes in ``--greedy-sizes``);
* ``gemm``: ``W @ Σ``, (q×p)·(p×p), the 2·q·p² flops a sweep needs at the device's GEMM rate;
* ``gptq``: ``solve("gptq", W, Σ, bits=...)`` (includes its Cholesky factorisations);
* ``quantease`` (with ``--quantease``): ``solve("quantease", W, Σ, bits=...)``, the paper schedule
  (30 sweeps from W, diag order), compared with one GPTQ call.

The in-block kernel is the automatic choice (Triton on CUDA, numba on CPU) unless ``--backend``
(or ``$CDQ_KERNEL``) names one; ``--device cuda`` measures the GPU.

    .venv/bin/python scripts/bench_speed.py --sizes 576 1536 --repeat 3
    .venv/bin/python scripts/bench_speed.py --device cuda --sizes 4096 --square --quantease
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _bench_common import print_table

from cdq_cli import kernels
from cdq_cli.solvers import GridSpec, fit_minmax, solve
from cdq_cli.solvers.cd import cd_sweeps, order_permutation


def timed_together(
    fns: dict[str, Callable[[], object]], repeat: int, device: torch.device
) -> dict[str, float]:
    """Median wall time of each function over ``repeat`` rounds (after one untimed warm-up round);
    within a round the functions run one after another, so they share the machine's load."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            began = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def problem(p: int, q: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(p, 2 * p, generator=gen).to(device)
    weight = torch.randn(q, p, generator=gen).to(device)
    return weight, x @ x.T


def measure(p: int, q: int, spec: GridSpec, device: torch.device, args) -> list[object]:
    """One table row: timings of GEMM, cyclic sweep, greedy sweep, GPTQ and QuantEase for (p, q)."""
    weight, sigma = problem(p, q, device, args.seed)
    grid = fit_minmax(weight, spec)
    start = grid.round(weight)

    def sweep(order=None):
        cd_sweeps(
            weight,
            sigma,
            grid,
            start,
            sweeps=1,
            order=order,
            block_size=args.block_size,
            stop_at_fixed_point=False,
            backend=args.backend,
        )

    fns: dict[str, Callable[[], object]] = {"gemm": lambda: weight @ sigma, "sweep": sweep}
    if p in args.greedy_sizes and q in args.greedy_sizes:
        perm = order_permutation("greedy", weight, sigma)
        fns["greedy"] = lambda: sweep(perm)
    if not args.no_gptq or args.quantease:
        fns["gptq"] = lambda: solve("gptq", weight, sigma, bits=spec.bits)
    if args.quantease:
        fns["quantease"] = lambda: solve("quantease", weight, sigma, bits=spec.bits, preset="paper")
    t = timed_together(fns, args.repeat, device)
    gflops = 2 * q * p * p / 1e9

    def cells(name: str, base: str = "gemm") -> list[str]:
        if name not in t:
            return ["-", "-"]
        return [f"{1e3 * t[name]:.1f}", f"{t[name] / t[base]:.2f}"]

    row = [p, q, f"{1e3 * t['gemm']:.1f}", f"{gflops / t['gemm']:.0f}"]
    row += cells("sweep") + cells("greedy")
    row += ["-" if "greedy" not in t else f"{t['greedy'] / t['sweep']:.2f}"]
    row += cells("gptq")
    if args.quantease:
        row += cells("quantease", base="gptq")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 2048, 4096])
    parser.add_argument(
        "--greedy-sizes",
        type=int,
        nargs="*",
        default=[576, 1536],
        help="time the per-row greedy order where both p and q are in this list",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--no-gptq", action="store_true", help="skip the GPTQ timing")
    parser.add_argument("--quantease", action="store_true", help="time QuantEase's paper schedule too")
    parser.add_argument("--square", action="store_true", help="only p = q (the diagonal of --sizes)")
    parser.add_argument("--backend", choices=kernels.BACKENDS, help="in-block kernel (default: automatic)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    backend = kernels.resolve(torch.empty(0, device=device), args.backend)
    extra = ""
    if backend == "numba":
        import numba

        extra = f", numba {numba.__version__} (NUMBA_NUM_THREADS {numba.config.NUMBA_NUM_THREADS})"
    print(
        f"# bench_speed: torch {torch.__version__}, device {device} ({name}), "
        f"{torch.get_num_threads()} CPU threads, in-block kernel {backend}{extra}; "
        f"median of {args.repeat} after 1 warm-up; argv: {' '.join(sys.argv[1:])}\n",
        flush=True,
    )
    spec = GridSpec(bits=args.bits)
    rows = []
    pairs = [(p, p) for p in args.sizes] if args.square else itertools.product(args.sizes, repeat=2)
    for p, q in pairs:
        row = measure(p, q, spec, device, args)
        rows.append(row)
        print("# " + " ".join(str(c) for c in row), file=sys.stderr, flush=True)
    headers = ["p (in)", "q (out)", "GEMM ms", "GEMM GFLOP/s", "sweep ms", "sweep/GEMM", "greedy ms"]
    headers += ["greedy/GEMM", "greedy/sweep", "GPTQ ms", "GPTQ/GEMM"]
    headers += ["QuantEase ms", "QuantEase/GPTQ"] if args.quantease else []
    print_table(headers, rows)
    if backend == "numba":
        try:
            print(f"# numba threading layer: {numba.threading_layer()}")
        except ValueError:
            print("# numba ran on one thread only (no parallel region started)")


if __name__ == "__main__":
    main()
