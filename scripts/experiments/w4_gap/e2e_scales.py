"""Experiment (issue 19): end-to-end tuning of cdq's per-row scales against the full-precision
model's next-token distributions. Not a cdq feature; see README.md here.

Takes a cdq output folder (per-channel grids: ``scales`` of shape (rows, 1)), keeps every code and
moves only the scales: each quantized Linear computes ``(s ⊙ L) x`` with its integer levels L fixed
and ``log s`` a parameter (155,520 of them on SmolLM2-135M). The loss is KL(full precision ‖
quantized) of the next-token distributions on the 32 × 512 calibration windows the peers share
(``runs/peers/calib-c4-32x512-seed0.safetensors``, ``make peers-calib``); the teacher is the
original checkpoint (the rotation is exact, so its logits are the rotated model's); Adam, the rate
decaying linearly to 0, ``EPOCHS`` passes over the windows in ``BATCH``-window steps (shuffled,
seed 0). Then WikiText-2 test, PTB validation and PTB test are scored in the process (the first
40 × 512 windows, as ``cdq eval``; the untuned model reproduces its ``cdq eval`` figures).

    python scripts/experiments/w4_gap/e2e_scales.py OUT LR EPOCHS BATCH [THREADS]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts" / "experiments" / "learned_rotation"))

from learn import MODEL  # noqa: E402

from cdq_cli.calib import load_texts  # noqa: E402
from cdq_cli.calib.text import evaluation_ids  # noqa: E402
from cdq_cli.evaluate.perplexity import perplexity  # noqa: E402
from cdq_cli.store.reopen import load_quantized  # noqa: E402

CALIB = REPO / "runs" / "peers" / "calib-c4-32x512-seed0.safetensors"
TEXTS = {"wikitext2": "wikitext2-raw-test.txt", "ptb_valid": "ptb-valid.txt", "ptb_test": "ptb-test.txt"}


class ScaledLevels(nn.Module):
    """A Linear whose weight is ``exp(log_scale) ⊙ levels``: the levels fixed, the scales learned."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor) -> None:
        super().__init__()
        levels = linear.weight.detach() / scale
        if (levels - levels.round()).abs().max() > 1e-3:
            raise ValueError("the layer's weight is not on its grid")
        self.register_buffer("levels", levels.round())
        self.log_scale = nn.Parameter(scale.log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.levels * self.log_scale.exp())


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, lr, epochs, batch = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    student, _ = load_quantized(folder, torch.float32)
    student.eval()
    stored = safe_open(str(folder / "model.safetensors"), "pt")
    windows = next(iter(load_file(str(CALIB)).values())).long()
    scales = []
    for name, module in list(student.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.scales" in stored.keys():
            tuned = ScaledLevels(module, stored.get_tensor(f"{name}.scales"))
            parent, leaf = name.rsplit(".", 1)
            setattr(student.get_submodule(parent), leaf, tuned)
            scales.append(tuned.log_scale)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in scales:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(scales, lr=lr)
    steps, step, start = epochs * (len(windows) // batch), 0, time.time()
    for _ in range(epochs):
        order = torch.randperm(len(windows))
        for b in range(0, len(windows), batch):
            chosen = windows[order[b : b + batch]]
            with torch.no_grad():
                target = F.log_softmax(teacher(chosen).logits.float(), -1)
            guess = F.log_softmax(student(chosen).logits.float(), -1)
            loss = F.kl_div(guess, target, log_target=True, reduction="none").sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - step / steps)
            optimizer.step()
            step += 1
            line = {"step": step, "kl": round(loss.item(), 4)}
            print(json.dumps({**line, "seconds": round(time.time() - start)}), flush=True)
    data = REPO.parent / "shared" / "data" / "text"
    with torch.no_grad():
        ppl = {
            key: round(
                perplexity(
                    student,
                    evaluation_ids(load_texts(str(data / name)), tokenizer),
                    seqlen=512,
                    max_windows=40,
                    batch_size=8,
                ).ppl,
                3,
            )  # fmt: skip
            for key, name in TEXTS.items()
        }
    print(json.dumps({"lr": lr, "epochs": epochs, "batch": batch, **ppl}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
