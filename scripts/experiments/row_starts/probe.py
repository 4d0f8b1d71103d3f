"""cdq with its start chosen row by row instead of for the whole layer (issue 21 experiment).

Splitting a layer's rows between ranks keeps the bytes of one process only if every choice cdq
makes is a row's own (rows are independent in tr((W − Ŵ) Σ (W − Ŵ)ᵀ)). The first of those
choices is the start: cdq keeps the start (of its GPTQ starts) with the lower objective for the
whole layer. This probe replaces that choice (by patching ``cdq_cli.solvers.cdq.best_start`` in
this process only) with the lower-objective start of each row, then runs cdq's descent as usual,
and prints both final objectives for real SmolLM2-135M layers (Σ from the full-precision inputs of
the calibration protocol: 32 x 512 C4 windows, seed 0; symmetric per channel, one thread).

    CDQ_DATA_DIR=../shared/data .venv/bin/python scripts/experiments/row_starts/probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))  # this checkout's cdq_cli

from _bench_common import print_table, smollm2_sigmas  # noqa: E402

from cdq_cli.solvers import cdq as cdq_module  # noqa: E402
from cdq_cli.solvers import run_solver  # noqa: E402
from cdq_cli.solvers.grid import Grid, GridSpec  # noqa: E402
from cdq_cli.solvers.starts import scored_start_point  # noqa: E402

BLOCKS = (1, 7, 15, 25)
LAYERS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def row_objectives(weight: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    error = weight - approx
    return ((error @ sigma) * error).sum(1)


def best_start_per_row(kinds, weight, sigma, spec, grid=None, *, damping=0.01):
    """Each row from the start whose objective on that row is lowest (uniform grids only)."""
    points = [scored_start_point(kind, weight, sigma, spec, grid, damping=damping) for kind in kinds]
    values = torch.stack([row_objectives(weight, approx, sigma) for approx, _, _ in points])
    pick = values.argmin(0)
    approx, first, _ = points[0]
    approx, scale, zero = approx.clone(), first.scale.clone(), first.zero.clone()
    for index, (other, other_grid, _) in enumerate(points[1:], 1):
        rows = pick == index
        approx[rows], scale[rows], zero[rows] = other[rows], other_grid.scale[rows], other_grid.zero[rows]
    return approx, Grid(spec, scale, zero), float(values.gather(0, pick[None]).sum()), "per row"


def _row(bits: int, label: str, per_layer: float, per_row: float) -> list[str]:
    return [f"W{bits}", label, f"{per_layer:.6g}", f"{per_row:.6g}", f"{per_row / per_layer:.4f}"]


def main() -> None:
    torch.set_num_threads(1)
    found = smollm2_sigmas({f"model.layers.{block}.{layer}" for block in BLOCKS for layer in LAYERS})
    per_layer = cdq_module.best_start
    rows = []
    for bits in (4, 3):
        spec = GridSpec(bits, None, True)
        totals = [0.0, 0.0]
        for name in sorted(found):
            layer, acc = found[name]
            weight, sigma = layer.weight.detach().float(), acc.sigma
            values = []
            for choice in (per_layer, best_start_per_row):
                cdq_module.best_start = choice
                values.append(run_solver("cdq", weight, sigma, spec, {}).objective)
            cdq_module.best_start = per_layer
            totals = [totals[0] + values[0], totals[1] + values[1]]
            rows.append(_row(bits, name.removeprefix("model.layers."), *values))
        rows.append(_row(bits, "all of the above", *totals))
    print_table(["grid", "layer", "cdq (start per layer)", "start per row", "ratio"], rows)


if __name__ == "__main__":
    main()
