"""``cdq quantize --method rtn`` against one full-precision forward pass (issue 21's time target).

On bench_big.py's synthetic Llama in bf16 shards (built once in ``--cache``, the same folder
bench_big.py uses), each in its own process, measured by ``wait4`` (CPU seconds, wall seconds,
peak RSS):

- ``fp forward``: the model opened as ``cdq quantize`` opens it (lazily, shards read block by
  block, computed in ``--dtype auto``), the calibration windows ``cdq quantize`` draws (same text,
  seed, sizes and batches), block 0's inputs captured and every block run once; its own timer
  around that capture-and-blocks part (reading the shards plus the forward) is printed too;
- ``cdq quantize --method rtn`` (no ``--eval``), the output written as usual;
- with ``--sigma-path``, the same command with the Σ-free path switched off (every block collects
  Σ per layer group and computes the report from it, as before that path existed).

The ratio column is each run's CPU seconds over the forward process's (both include the process's
imports and opening the checkpoint); the target is rtn within 3x::

    .venv/bin/python scripts/bench_rtn.py --layers 4 --threads 1 --sigma-path
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from _bench_common import data_dir, measured_process, print_table  # noqa: E402


def measured(argv: list[str], threads: str) -> dict:
    """Run ``python ARGV`` alone; its exit code, peak RSS, CPU and wall seconds, last stdout line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads}
    run = measured_process([sys.executable, *argv], env=env, cwd=REPO)
    lines = run["stdout"].strip().splitlines()
    return {**run, "last": lines[-1] if lines else "", "stderr": run["stderr"][-800:]}


def forward(source: str, calib: str, nsamples: int, seqlen: int, batch_size: int) -> None:
    """The child of ``fp forward``: prints the CPU seconds of capture + blocks as JSON."""
    import torch

    from cdq_cli.calib import calibration_windows, load_texts
    from cdq_cli.memory import release
    from cdq_cli.pipeline import _forward, capture
    from cdq_cli.placement import Placement
    from cdq_cli.run.language import open_model

    loaded = open_model(source, "auto")
    texts = load_texts(calib)
    windows = calibration_windows(texts, loaded.tokenizer, nsamples=nsamples, seqlen=seqlen, seed=0)
    batches = list(windows.split(batch_size))
    began, wall = time.process_time(), time.perf_counter()
    with torch.no_grad():
        placement = Placement(loaded.model, torch.device("cpu"), loaded.weights, dtype=loaded.compute)
        acts = capture(loaded.model, loaded.adapter, placement, batches)
        for block in loaded.adapter.blocks(loaded.model):
            with placement.using([block]):
                _forward(loaded.adapter, block, acts)
            release()
    print(json.dumps({"cpu": time.process_time() - began, "wall": time.perf_counter() - wall}))


def sigma_quantize(argv: list[str]) -> int:
    """The child of ``--sigma-path``: ``cdq ARGV`` with the Σ-free path switched off."""
    from cdq_cli import pipeline
    from cdq_cli.cli import main

    pipeline._Run._unweighted = lambda self, block, index, names: False  # type: ignore[method-assign]
    return main(argv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bits", default="4")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/cdq/bench-big").expanduser())
    parser.add_argument("--threads", default="1")
    parser.add_argument("--sigma-path", action="store_true", help="also time rtn with Σ collected")
    parser.add_argument("--child-forward", nargs=2, metavar=("SOURCE", "CALIB"), help=argparse.SUPPRESS)
    parser.add_argument("--child-sigma", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_forward:
        forward(*args.child_forward, args.nsamples, args.seqlen, args.batch_size)
        return 0
    if args.child_sigma is not None:
        return sigma_quantize(args.child_sigma)

    from synthetic_lm import write_synthetic_llama

    from cdq_cli.models import load_causal_lm

    data = data_dir()
    shape = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab)
    name = "llama-" + "-".join(f"{k}{v}" for k, v in shape.items())
    source = args.cache / name
    if not (source / "config.json").is_file():  # the same model bench_big.py builds
        _, tokenizer = load_causal_lm(str(data / "models" / "stories260K"))
        heads = max(1, args.hidden // 128)
        write_synthetic_llama(
            source,
            **shape,
            heads=heads,
            kv_heads=max(1, heads // 2),
            tokenizer=tokenizer,
            max_shard_bytes=2**30,
        )
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    calib = str(data / "text" / "c4-sample.jsonl")
    sizes = [
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--batch-size",
        str(args.batch_size),
    ]
    fp = measured([__file__, *sizes, "--child-forward", str(source), calib], args.threads)
    quantize = ["quantize", str(source), "--method", "rtn", "--bits", args.bits, "--calib", calib, *sizes]
    quantize += ["--output", str(args.cache / f"{name}-rtn-w{args.bits}"), "--overwrite"]
    quantize += ["--max-shard-size", "1GB", "--quiet"]
    runs = [("fp forward (process)", fp)]
    runs.append(("cdq quantize --method rtn", measured(["-m", "cdq_cli", *quantize], args.threads)))
    if args.sigma_path:
        runs.append(("the same, Σ path", measured([__file__, "--child-sigma", *quantize], args.threads)))
    rows = []
    for label, run in runs:
        rows.append(
            [
                label,
                run["code"],
                f"{run['cpu']:.1f}",
                f"{run['wall']:.1f}",
                f"{run['peak_rss'] / 2**30:.2f}",
                f"{run['cpu'] / fp['cpu']:.2f}",
            ]
        )
        if run["code"] != 0:
            print(run["stderr"], file=sys.stderr)
    inner = json.loads(fp["last"]) if fp["code"] == 0 else {"cpu": float("nan"), "wall": float("nan")}
    print(
        f"model: synthetic Llama {shape}, bf16 safetensors {size / 2**30:.2f} GiB; rtn w{args.bits}; "
        f"calibration {args.nsamples} x {args.seqlen} in batches of {args.batch_size}; {args.threads} threads"
    )
    print(
        f"fp forward inside its process (reading the shards + capture + every block once): "
        f"{inner['cpu']:.1f} CPU s, {inner['wall']:.1f} wall s"
    )
    print_table(["run", "exit", "CPU s", "wall s", "peak RSS GiB", "CPU / fp forward process"], rows)
    return 0 if all(run["code"] == 0 for _, run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
