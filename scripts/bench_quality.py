"""Per-layer quality benchmark: objective tr((W−Ŵ)Σ(W−Ŵ)ᵀ) of every method on real Linear layers.

Σ comes from the full-precision model on C4 windows (all layers see FP inputs); layers that share
an input (q/k/v, gate/up) share one Σ. ``lm_head`` is never quantized. For every
(model, bits, grouping) the script prints the geometric-mean objective per method, its ratio to
GPTQ and RTN, and the share of layers where the method is strictly below GPTQ.

    .venv/bin/python scripts/bench_quality.py --model stories260K
    .venv/bin/python scripts/bench_quality.py --model smollm2 --layers ::3 --json-out /tmp/q.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from _bench_common import MODELS, batches, c4_windows, geomean, print_table
from torch import nn

from cdq_cli.capture import linear_sigmas
from cdq_cli.solvers import solve

# Method label → (solver name, solve() keywords). Labels are what the tables print.
METHODS: dict[str, tuple[str, dict]] = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "quantease-paper": ("quantease", {"preset": "paper"}),
    "quantease-fast": ("quantease", {"preset": "fast"}),
    "quantease-outlier1%": ("quantease-outlier", {"outlier_fraction": 0.01}),
    "comq": ("comq", {}),
    # One scale per layer; rtn-layer and gptq-layer are comq-layer's baselines on its own grid.
    "rtn-layer": ("rtn", {"per_layer": True}),
    "gptq-layer": ("gptq", {"per_layer": True}),
    "comq-layer": ("comq", {"per_layer": True}),
}
DEFAULT_METHODS = list(METHODS)
METHODS["cdq"] = ("cdq", {})  # cdq's own method: opt-in (--methods ... cdq), not in the default set
METHODS["cdq-r3"] = ("cdq", {"rounds": 3})  # cdq with two more GPTQ-on-refitted-grid rounds
TARGET_METHODS = ("quantease-paper", "quantease-fast", "comq")
# Per-model defaults: (group sizes, nsamples, seqlen). None = per channel.
DEFAULTS = {
    "stories260K": ([None, 32], 128, 512),
    "smollm2": ([None, 64], 128, 512),
}
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Record:
    model: str
    layer: str
    shape: tuple[int, int]
    bits: int
    group_size: int | None
    method: str
    objective: float
    seconds: float
    sweeps: int
    outliers: int = 0
    extra: dict = field(default_factory=dict)


def parse_groups(values: list[str] | None) -> list[int | None] | None:
    if values is None:
        return None
    out: list[int | None] = []
    for value in values:
        out.append(None if value.lower() in ("none", "0", "channel") else int(value))
    return out


def select_blocks(spec: str, count: int) -> list[int]:
    """``all``, a Python slice (``::3``, ``0:10:2``) or a comma list (``0,3,6``) of block indices."""
    if spec == "all":
        return list(range(count))
    if ":" in spec:
        parts = [int(p) if p else None for p in spec.split(":")]
        return list(range(count))[slice(*parts)]
    chosen = sorted({int(p) for p in spec.split(",")})
    bad = [b for b in chosen if not 0 <= b < count]
    if bad:
        raise SystemExit(f"block(s) {bad} out of range: the model has {count} blocks")
    return chosen


def block_of(name: str) -> int | None:
    match = BLOCK.search(name)
    return int(match.group(1)) if match else None


def sigma_source(name: str) -> str:
    """The layer whose inputs ``name`` shares (itself when none)."""
    head, _, leaf = name.rpartition(".")
    return f"{head}.{SHARED_INPUT[leaf]}" if leaf in SHARED_INPUT else name


@torch.no_grad()
def layer_sigmas(model, tokenizer, blocks, args, nsamples, seqlen):
    """{layer name: (weight, Σ)} for every Linear in ``blocks`` (Σ shared across q/k/v, gate/up)."""
    base = model.model  # decoder without lm_head: the logits are never needed
    layers = [
        (name, module)
        for name, module in base.named_modules()
        if isinstance(module, nn.Linear) and block_of(name) in blocks
    ]
    wanted = {sigma_source(name) for name, _ in layers}
    windows = c4_windows(tokenizer, nsamples, seqlen, seed=args.seed)
    full = base.layers
    base.layers = nn.ModuleList(list(full)[: max(blocks) + 1])  # later blocks cannot affect Σ
    began = time.perf_counter()
    try:
        found = linear_sigmas(
            base,
            batches(windows, args.batch_size),
            include=lambda name, module: name in wanted,
            dtype=getattr(torch, args.sigma_dtype),
        )
    finally:
        base.layers = full
    print(
        f"# Σ from {nsamples} x {seqlen} C4 tokens for {len(wanted)} distinct inputs "
        f"({len(layers)} layers) in {time.perf_counter() - began:.0f} s",
        flush=True,
    )
    solve_dtype = getattr(torch, args.solve_dtype)
    out = {}
    for name, module in layers:
        sigma = found[sigma_source(name)][1].sigma.to(solve_dtype)
        out[name] = (module.weight.detach().to(solve_dtype).clone(), sigma)
    return out


def run_model(key: str, args) -> list[Record]:
    groups_default, ns_default, sl_default = DEFAULTS[key]
    groups = parse_groups(args.group_size) or groups_default
    nsamples = args.nsamples or ns_default
    seqlen = args.seqlen or sl_default
    model, tokenizer = MODELS[key]()
    count = model.config.num_hidden_layers
    blocks = select_blocks(args.layers, count)
    print(f"## {key}: blocks {blocks} of {count}; bits {args.bits}; groups {groups}", flush=True)
    problems = layer_sigmas(model, tokenizer, blocks, args, nsamples, seqlen)
    del model
    records: list[Record] = []
    skipped: dict[int | None, list[str]] = defaultdict(list)
    for name, (weight, sigma) in problems.items():
        layer_began = time.perf_counter()
        for group in groups:
            if group is not None and weight.shape[1] % group:
                skipped[group].append(name)
                continue
            for bits in args.bits:
                for label in args.methods:
                    method, options = METHODS[label]
                    options = dict(options)
                    per_layer = options.pop("per_layer", False)
                    if per_layer and group is not None:
                        continue  # one scale per layer has no groups
                    result = solve(
                        method,
                        weight,
                        sigma,
                        bits=bits,
                        group_size=group,
                        per_layer=per_layer,
                        **options,
                    )
                    records.append(
                        Record(
                            key,
                            name,
                            tuple(weight.shape),
                            bits,
                            group,
                            label,
                            result.objective,
                            result.seconds,
                            result.sweeps,
                            result.outlier_count,
                        )
                    )
        print(
            f"#   {name} {tuple(weight.shape)}: {time.perf_counter() - layer_began:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    for group, names in skipped.items():
        print(f"# g{group} does not divide the input width of {len(names)} layer(s), skipped: {names}")
    return records


def group_label(group: int | None) -> str:
    return "per-channel" if group is None else f"g{group}"


def report(records: list[Record], methods: list[str]) -> None:
    """One table per (model, bits, grouping), then the 3-bit target check per model."""
    tables: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    seconds: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in records:
        key = (r.model, r.bits, r.group_size)
        tables[key][r.method][r.layer] = r.objective
        seconds[key][r.method] += r.seconds
    order = sorted(tables, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2]))
    for key in order:
        model, bits, group = key
        by = tables[key]
        layers = sorted(by["gptq"]) if "gptq" in by else sorted(next(iter(by.values())))
        print(f"### {model}, {bits}-bit, {group_label(group)} ({len(layers)} layers)\n")
        rows = []
        for label in methods:
            if label not in by:
                continue
            # Per-layer-scale methods are compared with the baselines on their own grid.
            suffix = "-layer" if label.endswith("-layer") else ""
            gptq, rtn = by.get("gptq" + suffix, {}), by.get("rtn" + suffix, {})
            gm = geomean([by[label][n] for n in layers])
            cells = [label, f"{gm:.4g}"]
            cells.append(f"{gm / geomean([gptq[n] for n in layers]):.3f}" if gptq else "-")
            cells.append(f"{gm / geomean([rtn[n] for n in layers]):.3f}" if rtn else "-")
            below = sum(by[label][n] < gptq[n] for n in layers) if gptq else None
            cells.append("-" if below is None else f"{100 * below / len(layers):.0f}%")
            cells.append(sum(by[label][n] > rtn[n] for n in layers) if rtn else "-")
            cells.append(f"{seconds[key][label]:.1f}")
            rows.append(cells)
        print_table(
            ["method", "geo-mean obj", "/ GPTQ", "/ RTN", "layers < GPTQ", "layers > RTN", "time s"], rows
        )
    print(
        "(Ratios and counts are against GPTQ and RTN on the same grid: per-channel/group for the "
        "plain rows, one scale per layer for the *-layer rows. Times are summed solver seconds.)\n"
    )
    for model in sorted({k[0] for k in order}):
        print(f"### {model}: target check\n")
        rows = []
        for label in TARGET_METHODS:
            if label not in methods:
                continue
            below = total = 0
            ratios = []
            for key in order:
                if key[0] != model or label not in tables[key] or "gptq" not in tables[key]:
                    continue
                by = tables[key]
                for layer, value in by[label].items():
                    ratios.append(value / by["gptq"][layer])
                    if key[1] == 3:
                        total += 1
                        below += value < by["gptq"][layer]
            share = f"{100 * below / total:.0f}% ({below}/{total})" if total else "-"
            overall = geomean(ratios)
            ok = total and below / total >= 0.9 and overall < 1
            rows.append([label, share, f"{overall:.3f}", "yes" if ok else "no"])
        print(
            "Target: below GPTQ on >= 90% of layers at 3 bits (all groupings pooled) and a lower "
            "geometric-mean error overall (geo-mean of per-layer ratio to GPTQ over all bits and "
            "groupings < 1).\n"
        )
        print_table(["method", "3-bit layers < GPTQ", "geo-mean ratio to GPTQ, all", "met"], rows)


def save_json(path: str, records: list[Record]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"argv": sys.argv[1:], "records": [r.__dict__ for r in records]}, handle, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument(
        "--group-size",
        nargs="+",
        help="group sizes; 'none' = per channel (default: stories260K none 32, smollm2 none 64)",
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--layers", default="all", help="blocks: all, a slice like ::3, or 0,3,6")
    parser.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    parser.add_argument("--seqlen", type=int, help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sigma-dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--solve-dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json-out", help="write every per-layer record here")
    parser.add_argument(
        "--from-json", nargs="+", metavar="FILE", help="solve nothing: re-print the tables of saved runs"
    )
    args = parser.parse_args()
    if args.from_json:
        records = []
        for path in args.from_json:
            with open(path, encoding="utf-8") as handle:
                saved = json.load(handle)
            print(f"# {path}: bench_quality.py {' '.join(saved['argv'])}")
            records += [Record(**r) for r in saved["records"]]
        print()
        present = {r.method for r in records}
        report(records, [m for m in METHODS if m in present])
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(args.methods)
    if "gptq" not in methods:
        methods.insert(0, "gptq")  # every ratio is to GPTQ
    args.methods = methods
    print(
        f"# bench_quality: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}; argv: {' '.join(sys.argv[1:])}",
        flush=True,
    )
    keys = list(MODELS) if args.model == "all" else [args.model]
    records: list[Record] = []
    began = time.perf_counter()
    for key in keys:
        records += run_model(key, args)
        if args.json_out:
            save_json(args.json_out, records)
    elapsed = time.perf_counter() - began
    print(f"# solved {len(records)} (layer, config, method) problems in {elapsed:.0f} s\n")
    report(records, methods)


if __name__ == "__main__":
    main()
