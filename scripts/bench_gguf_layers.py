"""Layer objective of every method on GGUF block types' exact grids, real stories260K layers.

Σ of each Linear from the full-precision model on C4 windows (every layer sees FP inputs). For each
type the table gives the geometric mean over layers of tr((W−Ŵ)Σ(W−Ŵ)ᵀ) relative to round-to-
nearest on llama.cpp's own importance-weighted scales (the ``rtn`` row: what llama.cpp's quantizer
does with an imatrix), for GPTQ, cdq without and with its width-keeping refits, and COMQ. Only the
32-block types fit stories260K's widths (64; 172 takes none).

    .venv/bin/python scripts/bench_gguf_layers.py --types Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from _bench_common import data_dir, geomean, load_stories260k, print_table

from cdq_cli.capture import linear_sigmas
from cdq_cli.solvers import GridSpec, solve

METHODS = {
    "gptq": ("gptq", {}),
    "cdq, no refit": ("cdq", {"refit": "none"}),
    "cdq": ("cdq", {}),
    "comq": ("comq", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--types", nargs="+", default=["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_stories260k()
    ids: list[int] = []
    with (data_dir() / "text" / "c4-sample.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            ids.extend(tokenizer(json.loads(line)["text"]).input_ids)
            if len(ids) >= args.nsamples * args.seqlen:
                break
    batch = torch.tensor(ids[: args.nsamples * args.seqlen]).reshape(args.nsamples, args.seqlen)
    layers = linear_sigmas(model, batch.split(8), include=lambda name, _m: "lm_head" not in name)
    rows = []
    for kind in args.types:
        spec = GridSpec.of_type(kind)
        ratios: dict[str, list[float]] = {label: [] for label in METHODS}
        count = 0
        for _name, (layer, acc) in layers.items():
            weight = layer.weight.detach().float()
            if weight.shape[1] % 32:
                continue
            count += 1
            base = solve("rtn", weight, acc.sigma, spec).objective
            for label, (method, options) in METHODS.items():
                ratios[label].append(solve(method, weight, acc.sigma, spec, **options).objective / base)
        rows.append([kind, count, *(f"{geomean(ratios[label]):.3f}" for label in METHODS)])
        print(" | ".join(map(str, rows[-1])), flush=True)
    print()
    print_table(["type", "layers", *(f"{label} / rtn" for label in METHODS)], rows)
    assert all(math.isfinite(float(value)) for row in rows for value in row[2:])


if __name__ == "__main__":
    main()
