"""Calibration error against held-out error: does a layer solution that is better on the
calibration Σ stay better on inputs it was not fitted to?

SmolLM2-135M (full precision): Σ of the chosen layers from the calibration protocol of the peer
comparison (32 x 512 windows of the C4 sample, seed 0) and, held out, from the first 16 x 512
tokens of WikiText-2 test. For each layer, grid (``W3``/``W4``: symmetric per channel; a GGUF type
such as ``Q4_0``) and Σ shrinkage α (``-o shrink=α``: the solve runs on Σ + α·Diag(Σ)), the error of
cdq's solution ``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)`` on the calibration Σ and on the held-out Σ, each divided
by round-to-nearest's on the same Σ (for a GGUF type llama.cpp's importance-weighted choice, the
importance being diag Σ of the calibration). Below 1: better than RTN.

    CDQ_DATA_DIR=../shared/data .venv/bin/python scripts/bench_heldout.py --grids Q4_0 W4 --shrink 0 0.1 0.3 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cdq_cli

from _bench_common import data_dir, load_smollm2, print_table  # noqa: E402

from cdq_cli.calib import calibration_windows, load_texts  # noqa: E402
from cdq_cli.calib.text import evaluation_ids  # noqa: E402
from cdq_cli.capture import linear_sigmas  # noqa: E402
from cdq_cli.solvers import GridSpec  # noqa: E402
from cdq_cli.solvers.gguf import fit, importance_of  # noqa: E402
from cdq_cli.solvers.registry import run_solver  # noqa: E402
from cdq_cli.solvers.result import objective  # noqa: E402
from cdq_cli.solvers.rtn import solve_rtn  # noqa: E402


def grid_spec(name: str) -> GridSpec:
    if name.upper().startswith("W"):
        return GridSpec(bits=int(name[1:]), sym=True)
    return GridSpec.of_type(name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grids", nargs="+", default=["Q4_0", "W4"])
    parser.add_argument("--shrink", nargs="+", type=float, default=[0.0, 0.1, 0.3, 1.0])
    parser.add_argument("--blocks", nargs="+", type=int, default=[4, 12])
    parser.add_argument(
        "--layers",
        nargs="+",
        default=["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"],
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = data_dir()
    model, tokenizer = load_smollm2()
    model.eval()
    calib = calibration_windows(
        load_texts(str(data / "text" / "c4-sample.jsonl")), tokenizer, nsamples=32, seqlen=512, seed=0
    )
    held = evaluation_ids(load_texts(str(data / "text" / "wikitext2-raw-test.txt")), tokenizer)
    held = held.reshape(-1)[: 16 * 512].reshape(16, 512)
    names = {f"model.layers.{b}.{layer}" for b in args.blocks for layer in args.layers}
    pick = lambda name, module: name in names  # noqa: E731
    fitted = linear_sigmas(model, [calib[i : i + 4] for i in range(0, 32, 4)], include=pick)
    unseen = linear_sigmas(model, [held[i : i + 4] for i in range(0, 16, 4)], include=pick)
    rows = []
    for grid in args.grids:
        spec = grid_spec(grid)
        for name in sorted(fitted, key=lambda n: (int(n.split(".")[2]), n)):
            layer, acc = fitted[name]
            weight, sigma, other = layer.weight.detach().float(), acc.sigma, unseen[name][1].sigma
            start = fit(weight, spec, importance_of(sigma)) if spec.block_type else None
            base = solve_rtn(weight, sigma, spec, grid=start).weight
            scale = (objective(weight, base, sigma), objective(weight, base, other))
            cells = []
            for alpha in args.shrink:
                solved = run_solver("cdq", weight, sigma, spec, {"shrink": alpha}).weight
                fit_error = objective(weight, solved, sigma) / scale[0]
                held_error = objective(weight, solved, other) / scale[1]
                cells.append(f"{fit_error:.3f} / {held_error:.3f}")
            rows.append([grid, name.removeprefix("model."), *cells])
            print(" | ".join(rows[-1]), flush=True)
    print()
    print_table(["grid", "layer", *(f"α={a:g}: calib / held out" for a in args.shrink)], rows)


if __name__ == "__main__":
    main()
