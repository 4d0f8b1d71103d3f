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

``--profile`` (CPU) prints instead where the time of a sweep and of GPTQ goes, on one thread and
in CPU seconds of that thread (which a loaded machine inflates far less than wall time): the
sweep's block GEMMs ``Σ[b0:b1] Eᵀ`` timed alone, the in-block kernel calls inside the sweep (and
their rate on the sweep's ``p·B·q`` in-block flops), and the rest (working copies, Python);
GPTQ's Cholesky factorisation, its kernel calls and the rest (its GEMMs, block inverses, grids).
On the CPU each thread runs this one-thread work on its own rows, so these shares are also those
of a many-thread run.

    .venv/bin/python scripts/bench_speed.py --sizes 576 1536 --repeat 3
    .venv/bin/python scripts/bench_speed.py --device cuda --sizes 4096 --square --quantease
    .venv/bin/python scripts/bench_speed.py --square --profile
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


class CpuClock:
    """Accumulates the calling thread's CPU time spent inside wrapped functions."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, owner: object, attribute: str, label: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            began = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.thread_time() - began

        setattr(owner, attribute, timed)

    def median(self, fn: Callable[[], object], repeat: int) -> tuple[float, dict[str, float]]:
        """Median CPU time of ``fn`` (after one warm-up) and the wrapped parts of that run."""
        fn()
        runs = []
        for _ in range(repeat):
            self.spent = {}
            began = time.thread_time()
            fn()
            runs.append((time.thread_time() - began, self.spent))
        runs.sort(key=lambda run: run[0])
        return runs[len(runs) // 2]


def profile(p: int, q: int, spec: GridSpec, args, clock: CpuClock) -> list[object]:
    """One row of the --profile table (one thread, CPU time)."""
    weight, sigma = problem(p, q, torch.device("cpu"), args.seed)
    grid = fit_minmax(weight, spec)
    start = grid.round(weight)
    err_t = (weight - start).T.contiguous()
    block = args.block_size
    bounds = [(b0, min(b0 + block, p)) for b0 in range(0, p, block)]

    def block_gemms():
        for b0, b1 in bounds:
            sigma[b0:b1] @ err_t

    def sweep():
        cd_sweeps(weight, sigma, grid, start, sweeps=1, stop_at_fixed_point=False, backend=args.backend)

    gemm, _ = clock.median(lambda: weight @ sigma, args.repeat)
    gemms, _ = clock.median(block_gemms, args.repeat)
    total, parts = clock.median(sweep, args.repeat)
    kernel = parts.get("kernel", 0.0)
    gptq, gparts = clock.median(lambda: solve("gptq", weight, sigma, bits=spec.bits), args.repeat)
    chol, gkernel = gparts.get("cholesky", 0.0), gparts.get("kernel", 0.0)

    def share(seconds: float, base: float = gemm) -> str:
        return f"{seconds / base:.2f}"

    return [
        p,
        q,
        f"{1e3 * gemm:.1f}",
        share(total),
        share(gemms),
        share(kernel),
        f"{p * block * q / kernel / 1e9:.0f}" if kernel else "-",
        share(total - gemms - kernel),
        share(gptq),
        share(chol),
        share(gkernel),
        share(gptq - chol - gkernel),
    ]


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
    parser.add_argument("--profile", action="store_true", help="where the time goes (CPU, one thread)")
    args = parser.parse_args()
    if args.profile:
        args.threads, args.device = 1, "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    backend = kernels.resolve(torch.empty(0, device=device), args.backend)
    extra = ""
    if backend == "numba":
        import numba

        extra = f", numba {numba.__version__}"
    print(
        f"# bench_speed: torch {torch.__version__}, device {device} ({name}), "
        f"{torch.get_num_threads()} CPU threads, in-block kernel {backend}{extra}; "
        f"median of {args.repeat} after 1 warm-up; argv: {' '.join(sys.argv[1:])}\n",
        flush=True,
    )
    spec = GridSpec(bits=args.bits)
    rows = []
    pairs = [(p, p) for p in args.sizes] if args.square else itertools.product(args.sizes, repeat=2)
    if args.profile:
        clock = CpuClock()
        clock.wrap(kernels.backend_module(backend), "block", "kernel")
        clock.wrap(torch.linalg, "cholesky", "cholesky")
        for p, q in pairs:
            rows.append(profile(p, q, spec, args, clock))
            print("# " + " ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
        print("Shares in units of the one-thread GEMM's CPU time:\n")
        headers = ["p (in)", "q (out)", "GEMM ms", "sweep", "block GEMMs", "kernel", "kernel GFLOP/s"]
        headers += ["rest", "GPTQ", "Cholesky", "GPTQ kernel", "GPTQ rest"]
        print_table(headers, rows)
        return
    for p, q in pairs:
        row = measure(p, q, spec, device, args)
        rows.append(row)
        print("# " + " ".join(str(c) for c in row), file=sys.stderr, flush=True)
    headers = ["p (in)", "q (out)", "GEMM ms", "GEMM GFLOP/s", "sweep ms", "sweep/GEMM", "greedy ms"]
    headers += ["greedy/GEMM", "greedy/sweep", "GPTQ ms", "GPTQ/GEMM"]
    headers += ["QuantEase ms", "QuantEase/GPTQ"] if args.quantease else []
    print_table(headers, rows)


if __name__ == "__main__":
    main()
