"""How far ``-o target=fp``'s correction ``K = R (Σ + λI)⁻¹`` in float32 (cdq's, since the sixth
session) is from the same in float64, on real SmolLM2-135M layers: Σ from 16 × 512 calibration
tokens of the C4 sample (the full-precision model's inputs), R = W E Xᵀ for a random E at 2% of
the inputs' spread (the solve's accuracy depends on Σ's conditioning, not on R). Prints each
layer's condition number of the damped Σ and K's relative error (Frobenius, and the largest entry
against the largest of K):

    CDQ_DATA_DIR=../shared/data .venv/bin/python scripts/check_fp_precision.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as bench  # noqa: E402

from cdq_cli.calib import calibration_windows, load_texts  # noqa: E402
from cdq_cli.solvers.target import fp_correction  # noqa: E402

LAYERS = [
    "model.layers.5.mlp.down_proj",
    "model.layers.20.mlp.down_proj",
    "model.layers.5.self_attn.q_proj",
    "model.layers.20.self_attn.o_proj",
]


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = bench.load_smollm2()
    texts = load_texts(str(bench.data_dir() / "text" / "c4-sample.jsonl"))
    windows = calibration_windows(texts, tokenizer, nsamples=16, seqlen=512, seed=0)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    for name in LAYERS:
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1]).float())
        )
    with torch.no_grad():
        for batch in windows.split(4):
            model(batch, use_cache=False)
    generator = torch.Generator().manual_seed(0)
    print("| layer | cond(Σ + λI) | K float32 vs float64, Frobenius | largest entry |")
    print("|---|---|---|---|")
    for name in LAYERS:
        x = torch.cat(seen[name]).double()
        sigma = x.T @ x
        weight = model.get_submodule(name).weight.detach().double()
        noise = 0.02 * x.std() * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        residual = weight @ (noise.T @ x)
        exact = fp_correction(sigma, residual, 0.01)
        single = fp_correction(sigma.float(), residual.float(), 0.01).double()
        damped = sigma + 0.01 * sigma.diagonal().mean() * torch.eye(sigma.shape[0], dtype=torch.float64)
        values = torch.linalg.eigvalsh(damped)
        error = float((single - exact).norm() / exact.norm())
        largest = float((single - exact).abs().max() / exact.abs().max())
        print(f"| {name} | {float(values[-1] / values[0]):.2e} | {error:.2e} | {largest:.2e} |")


if __name__ == "__main__":
    main()
