"""Solving a layer in bands of rows: does it give the same bytes, and what does it cost? (issue 21)

A layer's rows are independent in tr((W − Ŵ) Σ (W − Ŵ)ᵀ), so splitting a large layer by rows
between ranks would balance 4 ranks where one layer is more than a quarter of a group's solve
(SmolLM2's down_proj: 39%). For each chosen layer of SmolLM2-135M (Σ from its full-precision
inputs on the calibration protocol's windows: 32 x 512 of the C4 sample, seed 0; symmetric per
channel) this solves W whole and in 2, 3 and 4 bands of rows with the same Σ and prints the
seconds (one thread, best of ``--repeat``), the summed objective and whether the stacked codes
and Ŵ equal the whole solve's bit for bit.

    CDQ_DATA_DIR=../shared/data .venv/bin/python scripts/bench_bands.py --bits 4 --block 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cdq_cli

from _bench_common import print_table, smollm2_sigmas  # noqa: E402

from cdq_cli.solvers import run_solver  # noqa: E402
from cdq_cli.solvers.grid import GridSpec  # noqa: E402

LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--method", default="cdq")
    parser.add_argument("--bands", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    found = smollm2_sigmas({f"model.layers.{args.block}.{layer}" for layer in LAYERS})
    spec = GridSpec(args.bits, None, True)
    run_solver(args.method, torch.randn(8, 64), torch.eye(64), spec, {})  # compile the kernels first
    rows = []
    for name in sorted(found):
        layer, acc = found[name]
        weight, sigma = layer.weight.detach().float(), acc.sigma
        whole = None
        for bands in [1, *args.bands]:
            best = float("inf")
            for _ in range(args.repeat):
                began = time.perf_counter()
                results = [run_solver(args.method, part, sigma, spec, {}) for part in weight.chunk(bands)]
                best = min(best, time.perf_counter() - began)
            codes = torch.cat([r.codes for r in results])
            approx = torch.cat([r.weight for r in results])
            if whole is None:
                whole = (codes, approx, best)
            rows.append(
                [
                    name.removeprefix("model.layers."),
                    "x".join(map(str, weight.shape)),
                    bands,
                    f"{best:.3f}",
                    f"{best / whole[2]:.2f}x",
                    f"{sum(r.objective for r in results):.6g}",
                    "yes" if torch.equal(codes, whole[0]) else "no",
                    "yes" if torch.equal(approx, whole[1]) else "no",
                ]
            )
    print_table(["layer", "shape", "bands", "s", "vs whole", "objective", "same codes", "same Ŵ"], rows)


if __name__ == "__main__":
    main()
