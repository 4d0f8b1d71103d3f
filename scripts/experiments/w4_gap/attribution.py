"""Experiment (issue 19): which layers carry the W4 gap. Not a cdq feature; see README.md here.

Takes a cdq output folder of SmolLM2-135M quantized with ``--transform hadamard`` (rotation seed 0,
the preset), rebuilds the rotated full-precision model with cdq's own plan (the same bytes the run
quantized: the norms and embeddings of both are compared first), then puts the full-precision
weights back into chosen layers of the quantized model and scores WikiText-2 test and PTB
validation (the first 40 × 512 windows, as ``cdq eval``; the unswapped model reproduces its
``cdq eval`` figures to the last digit).

    python scripts/experiments/w4_gap/attribution.py OUT types
    python scripts/experiments/w4_gap/attribution.py OUT layers 11:down_proj,28:down_proj 0:down_proj
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts" / "experiments" / "learned_rotation"))

from learn import MODEL, load, plan_for  # noqa: E402

from cdq_cli.calib import load_texts  # noqa: E402
from cdq_cli.calib.text import evaluation_ids  # noqa: E402
from cdq_cli.evaluate.perplexity import perplexity  # noqa: E402
from cdq_cli.store.reopen import load_quantized  # noqa: E402
from cdq_cli.transforms.rotation import rotate_resident  # noqa: E402

TEXTS = {"wikitext2": "wikitext2-raw-test.txt", "ptb_valid": "ptb-valid.txt"}
WINDOWS = {"seqlen": 512, "max_windows": 40, "batch_size": 8}  # as the runs above scored them
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> int:
    folder, mode, groups = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    fp, tokenizer = load(MODEL)
    rotate_resident(fp, plan_for(fp, 0))
    quantized, _ = load_quantized(folder, torch.float32)
    quantized.eval()
    data = REPO.parent / "shared" / "data" / "text"
    ids = {key: evaluation_ids(load_texts(str(data / name)), tokenizer) for key, name in TEXTS.items()}
    fps, qs = dict(fp.named_parameters()), dict(quantized.named_parameters())
    gap = max((fps[n] - qs[n]).abs().max().item() for n in qs if "proj" not in n)
    assert gap == 0.0, f"the rotated model is not the one quantized (norms/embeddings differ by {gap})"

    def score(tag: str) -> None:
        start = time.time()
        ppl = {k: perplexity(quantized, v, **WINDOWS).ppl for k, v in ids.items()}
        line = {"fp_weights_in": tag, **{k: round(x, 3) for k, x in ppl.items()}}
        print(json.dumps({**line, "seconds": round(time.time() - start)}), flush=True)

    def with_fp(names: list[str], tag: str) -> None:
        saved = {n: qs[n].data.clone() for n in names}
        for n in names:
            qs[n].data.copy_(fps[n].data)
        score(tag)
        for n, value in saved.items():
            qs[n].data.copy_(value)

    score("none")
    if mode == "types":
        for kind in TYPES:
            with_fp([n for n in qs if n.endswith(f"{kind}.weight")], kind)
    elif mode == "layers":  # each argument: BLOCK:TYPE[,BLOCK:TYPE...]
        for group in groups:
            names = []
            for item in group.split(","):
                block, kind = item.split(":")
                names += [n for n in qs if f"layers.{block}." in n and n.endswith(f"{kind}.weight")]
            with_fp(names, group)
    return 0


if __name__ == "__main__":
    sys.exit(main())
