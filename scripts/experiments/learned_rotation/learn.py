"""Experiment (issue 19): a residual-stream rotation R1 learned on the calibration windows, SpinQuant
style, then cdq on the rotated model. Not a cdq feature; see README.md here for the commands.

``--transform hadamard`` merges a seeded random Hadamard R1 (and a per-head R2) into the weights.
This script starts from that same R1 (cdq's plan for ``--seed 0``), folds the norms and applies R2
as cdq does, and then learns ``R1 = R0 · cayley(A)`` (``cayley(A) = (I − A/2)⁻¹ (I + A/2)``, A
skew-symmetric, so R1 stays orthogonal and the full-precision model's logits stay the same) by
Adam on the cross-entropy of the model with its seven Linears per block fake-quantized to the
run's grid (symmetric per channel, round to nearest, straight-through gradients), on the 32 × 512
C4 calibration windows cdq draws with ``--seed 0`` (nothing from the evaluation texts). It then
writes the original model rotated by the learned R1 and cdq's R2 (cdq's own rotation code, in
float64) as a float32 folder that ``cdq quantize`` takes without ``--transform``.

    python scripts/experiments/learned_rotation/learn.py --bits 4 --steps 100 --out runs/rot-w4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from cdq_cli.calib import calibration_windows, load_texts  # noqa: E402
from cdq_cli.models.families import adapter_for  # noqa: E402
from cdq_cli.transforms.hadamard import Rotation  # noqa: E402
from cdq_cli.transforms.rotation import plan_hadamard, rotate_resident  # noqa: E402

MODEL = Path("~/.cache/cdq/smollm2-135m-instruct").expanduser()
C4 = REPO.parent / "shared" / "data" / "text" / "c4-sample.jsonl"
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def plan_for(model, seed: int):
    adapter = adapter_for(model)
    blocks = [adapter.block_name(i) for i in range(model.config.num_hidden_layers)]
    state = {name: tensor.detach() for name, tensor in model.state_dict(keep_vars=True).items()}
    return plan_hadamard(model, adapter.family, blocks, seed, state.__getitem__)


def cayley(b: torch.Tensor) -> torch.Tensor:
    a = (b - b.T) / 2
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(eye - a / 2, eye + a / 2)


def fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """cdq's symmetric per-row grid (GPTQ's min–max convention: scale 2·max|w| / (2^b − 1), codes
    −2^(b−1) … 2^(b−1) − 1) by round to nearest, with straight-through rounding (the scale keeps
    its gradient)."""
    scale = 2 * w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / (2**bits - 1)
    x = w / scale
    q = torch.clamp(x + (torch.round(x) - x).detach(), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q * scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2, help="windows per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--loss",
        choices=("ce", "kl"),
        default="kl",
        help="ce: the calibration text's cross-entropy (SpinQuant); kl: KL(full precision || quantized) "
        "of the next-token distributions (the full-precision model run alongside)",
    )
    parser.add_argument("--seed", type=int, default=0, help="cdq's --seed: the windows and R0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, tokenizer = load(MODEL)
    windows = calibration_windows(load_texts(str(C4)), tokenizer, nsamples=32, seqlen=512, seed=args.seed)
    plan0 = plan_for(model, args.seed)
    hidden = plan0.r1.matrix.shape[0]
    # the folded model with cdq's R2 and R1 = I: the learned R1 is applied on top of it
    eye = Rotation(torch.eye(hidden, dtype=torch.float64), "identity")
    rotate_resident(model, dataclasses.replace(plan0, r1=eye))
    for p in model.parameters():
        p.requires_grad_(False)
    roles = {name: kind for name, (kind, _) in plan0.roles.items()}
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    r0 = plan0.r1.matrix.to(torch.float32)
    b = torch.zeros(hidden, hidden, requires_grad=True)
    opt = torch.optim.Adam([b], lr=args.lr)

    def params(rotation: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in base.items():
            kind = roles.get(name)
            if kind in ("embed", "reader", "value", "head"):
                value = value @ rotation
            elif kind in ("writer", "output"):
                value = rotation.T @ value
            else:
                continue
            if name.endswith(".weight") and name.split(".")[-2] in QUANTIZED:
                value = fake_quant(value, args.bits)
            out[name] = value
        return out

    log = []
    began = time.perf_counter()
    order = torch.randperm(len(windows))
    for step in range(args.steps):
        pick = order[(step * args.batch) % len(windows) :][: args.batch]
        if len(pick) < args.batch:
            order = torch.randperm(len(windows))
            pick = order[: args.batch]
        ids = windows[pick]
        rotation = r0 @ cayley(b)
        if args.loss == "ce":
            loss = torch.func.functional_call(model, params(rotation), (ids,), {"labels": ids}).loss
        else:
            with torch.no_grad():
                teacher = torch.log_softmax(model(ids).logits, dim=-1)
            student = torch.log_softmax(
                torch.func.functional_call(model, params(rotation), (ids,)).logits, dim=-1
            )
            loss = torch.nn.functional.kl_div(
                student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean"
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append(float(loss))
        print(f"step {step} loss {float(loss):.4f} ({time.perf_counter() - began:.0f} s)", flush=True)

    learned = plan0.r1.matrix @ cayley(b.detach().double())
    error = float((learned.T @ learned - torch.eye(hidden, dtype=torch.float64)).abs().max())
    model, tokenizer = load(MODEL)
    plan = dataclasses.replace(plan0, r1=Rotation(learned, "learned (Cayley from cdq's seeded Hadamard)"))
    rotate_resident(model, plan)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    summary = {
        "bits": args.bits,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "loss": args.loss,
        "seconds": time.perf_counter() - began,
        "orthogonality_error": error,
        "first_loss_mean10": sum(log[:10]) / min(10, len(log)),
        "last_loss_mean10": sum(log[-10:]) / min(10, len(log)),
        "moved": float(b.detach().norm()) / math.sqrt(hidden),
    }
    (args.out / "learned_rotation.json").write_text(json.dumps({**summary, "losses": log}, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
