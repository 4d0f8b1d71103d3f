"""What every peer script shares: one thread, offline, the calibration file, the FP model, and
writing a dequantized (fake-quant) float32 Hugging Face folder that ``cdq eval`` scores.

Imports only torch, transformers and safetensors, so it runs in every peer's own venv.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

# Before torch is imported: one thread everywhere, no hub.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)


def read_calib(path: Path) -> torch.Tensor:
    """The (nsamples, seqlen) int64 ids of ``protocol.py calib``; refuses a file whose bytes do not
    match the sha256 recorded in it."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        ids = handle.get_tensor("input_ids")
        recorded = handle.metadata()["sha256"]
    if hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest() != recorded:
        raise SystemExit(f"{path}: ids do not match their recorded sha256")
    return ids


def load_fp(folder: Path):
    """The float32 model (eval mode) and tokenizer of a local folder; no hub, no remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return model.eval(), tokenizer


def check_torch(expected: str = "2.14.1") -> str:
    """The running torch's version; exits when the tool's install replaced the pinned one."""
    version = torch.__version__.split("+")[0]
    if version != expected:
        raise SystemExit(f"torch {torch.__version__} in {sys.prefix}, expected {expected} (was it replaced?)")
    return torch.__version__


def write_folder(state: dict[str, torch.Tensor], config: dict, tokenizer, out: Path, record: dict) -> None:
    """Write ``state`` as float32 ``model.safetensors`` with ``config`` (its quantization_config
    dropped: the weights are already dequantized) and the tokenizer, into ``out`` — via a
    ``.partial`` folder renamed at the end, so a half-written folder is never left under ``out``.
    ``record`` (tool, versions, recipe) goes to ``peer.json``. Replaces ``out`` only when it holds
    a ``peer.json`` (a folder this script wrote)."""
    from safetensors.torch import save_file

    if out.exists() and not (out / "peer.json").is_file():
        raise SystemExit(f"{out} exists and was not written by a peer script; not overwriting it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in state.items()}
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    (partial / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    tokenizer.save_pretrained(partial)
    (partial / "peer.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied weights written once (as transformers saves them)."""
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    return state
