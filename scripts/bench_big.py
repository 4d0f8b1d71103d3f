"""Memory and time of ``cdq quantize`` and ``cdq eval`` on a model far larger than one block.

Builds (once, in ``--cache``) a synthetic Llama with real architecture and random weights in bf16
safetensors shards, written tensor by tensor (never held whole; tests/synthetic_lm.py), then runs
``cdq quantize`` (with ``--eval``: the full-precision and the quantized model are scored block by
block) and ``cdq eval`` of the output, each in its own process, and reports each one's peak
resident memory (``wait4``) against the model's size:

    .venv/bin/python scripts/bench_big.py                     # 1.6B parameters, 3.2 GB of bf16
    .venv/bin/python scripts/bench_big.py --layers 4          # a quick look
    .venv/bin/python scripts/bench_big.py --layers 4 --exports  # also cdq eval of its exports

``--exports`` also writes the output's compressed-tensors and GPTQ exports (``cdq export``) and
measures ``cdq eval`` of each, which decodes their packed layers block by block: its memory should
be that of ``cdq eval OUTPUT``, and its perplexity equal (compressed-tensors, scales in the model's
bf16: equal to the output's once its scales are rounded to bf16; GPTQ: float16 scales).

Targets (issue 21): peak RSS of each below 60% of the model's bf16 size; rtn within 3x one
full-precision forward of the calibration data plus reading the shards. The checkpoint stays bf16
at rest and its blocks are computed in the compute dtype, ``--dtype auto``: float32 on a CPU
(where bf16 GEMMs are several times slower), bf16 on a GPU that computes it natively. The default
method is rtn so that the run measures loading, writing and evaluating rather than a solver (the
GPU check, scripts/device_check.sh, runs gptq and cdq at this size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from _bench_common import data_dir, measured_process, print_table  # noqa: E402
from synthetic_lm import write_synthetic_llama  # noqa: E402


def measured(command: list[str]) -> dict:
    """Run ``python -m cdq_cli COMMAND`` alone; its exit code, peak RSS, CPU and wall seconds, JSON."""
    run = measured_process(
        [sys.executable, "-m", "cdq_cli", *command, "--json"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    return {
        "code": run["code"],
        "peak_rss": run["peak_rss"],
        "cpu_seconds": run["cpu"],
        "wall_seconds": run["wall"],
        "json": json.loads(run["stdout"]) if run["stdout"].strip() else None,
        "stderr": run["stderr"][-800:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--nsamples", default="4")
    parser.add_argument("--seqlen", default="64")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/cdq/bench-big").expanduser())
    parser.add_argument("--threads", default="2")
    parser.add_argument("--exports", action="store_true", help="also measure cdq eval of the exports")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="compute dtype of both commands (auto: float32 on a CPU, the checkpoint's bf16 on a bf16 GPU)",
    )
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = args.threads
    from cdq_cli.models import load_causal_lm

    data = data_dir()
    shape = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab)
    name = "llama-" + "-".join(f"{k}{v}" for k, v in shape.items())
    source = args.cache / name
    if not (source / "config.json").is_file():
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
    out = args.cache / f"{name}-{args.method}-w{args.bits}"
    text = str(data / "text" / "wikitext2-raw-test.txt")
    quantize = measured(
        ["quantize", str(source), "--method", args.method, "--bits", args.bits, "--calib",
         str(data / "text" / "c4-sample.jsonl"), "--nsamples", args.nsamples, "--seqlen", args.seqlen,
         "--eval", text, "--eval-seqlen", "128", "--eval-max-windows", "2", "--output", str(out),
         "--overwrite", "--max-shard-size", "1GB", "--dtype", args.dtype]
    )  # fmt: skip
    evaluate = measured(
        ["eval", str(out), "--data", text, "--seqlen", "128", "--max-windows", "2", "--dtype", args.dtype]
    )
    runs = [("cdq quantize --eval", quantize), ("cdq eval OUTPUT", evaluate)]
    if args.exports:
        for fmt, suffix in (("compressed-tensors", "-ct"), ("gptq", "-gptq")):
            dest = out.with_name(out.name + suffix)
            exported = measured(["export", str(out), "--format", fmt, "--dest", str(dest), "--overwrite"])
            runs.append((f"cdq export --format {fmt}", exported))
            scored = measured(["eval", str(dest), "--data", text, "--seqlen", "128", "--max-windows", "2"])
            runs.append((f"cdq eval OUTPUT{suffix}", scored))
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    rows = []
    for label, run in runs:
        rows.append(
            [
                label,
                run["code"],
                f"{run['peak_rss'] / 2**30:.2f}",
                f"{run['peak_rss'] / size:.2f}",
                f"{run['cpu_seconds']:.0f}",
                f"{run['wall_seconds']:.0f}",
                _ppl(run),
            ]
        )
        if run["code"] != 0:
            print(run["stderr"], file=sys.stderr)
    layers = len(report.get("layers", []))
    print(
        f"model: synthetic Llama {shape}, bf16 safetensors {size / 2**30:.2f} GiB in "
        f"{len(list(source.glob('*.safetensors')))} shards; {args.method} w{args.bits}, {layers} layers; "
        f"calibration {args.nsamples} x {args.seqlen}; {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, --dtype {args.dtype}"
    )
    print_table(["run", "exit", "peak RSS GiB", "peak / bf16 size", "CPU s", "wall s", "ppl"], rows)
    return 0 if all(run["code"] == 0 for _, run in runs) else 1


def _ppl(run: dict) -> str:
    """The perplexity a run printed (``--eval`` or ``cdq eval``), or an empty cell."""
    payload = run["json"] or {}
    value = payload.get("ppl", (payload.get("evaluation") or {}).get("ppl"))
    return f"{value:.4f}" if isinstance(value, float) else ""


if __name__ == "__main__":
    sys.exit(main())
