"""Lazy loading: a causal LM's skeleton on the meta device, its weights read one block at a time.

transformers' own loader builds the model with every weight offloaded to "disk"
(``device_map={"": "disk"}``): tensors stay in the checkpoint's safetensors shards (HF layout with
``model.safetensors.index.json``, or one file) and only their locations are recorded, in the
model's own naming. Weights that transformers converts while loading (the fused 3-D experts of
Mixtral or Qwen-MoE, built from per-expert checkpoint tensors) are converted once and written to a
temporary offload folder next to the output. cdq then removes accelerate's per-forward hooks and
keeps the map of locations, from which a :class:`~cdq_cli.records.Weights` source
(:class:`cdq_cli.store.checkpoint.CheckpointWeights`) reads each block when its turn comes.

GGUF files are dequantized whole by transformers, so they load resident (in memory), as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cleanup import release, scratch_folder
from .causal_lm import (
    ModelLoadError,
    _folder_tokenizer,
    _looks_like_hub_id,
    _resolve_local,
    check_index,
    load_causal_lm,
    load_failure,
    refuse_remote_code,
)


@dataclass
class LazyModel:
    """A causal LM opened lazily: the skeleton, its tokenizer, where each tensor is stored (by
    state-dict name: accelerate's index entries, ``safetensors_file`` + ``weight_name`` for tensors
    read from the checkpoint), the loader that reads the converted ones, and the folder holding
    those (removed by the weights source that uses it)."""

    model: Any
    tokenizer: Any
    index: Mapping[str, dict]
    loader: Mapping[str, torch.Tensor]
    offload: Path


def open_causal_lm(
    name_or_path: str, *, dtype: torch.dtype | str = "auto", scratch: Path | None = None
) -> LazyModel | tuple[Any, Any]:
    """A :class:`LazyModel` for a safetensors folder or hub id, or ``(model, tokenizer)`` held
    resident for GGUF and pickled (``.bin``) checkpoints.

    A lazily opened model keeps its checkpoint's dtype at rest (bf16 stays bf16; the placement
    converts each block to the compute dtype as it visits the device); ``dtype`` is the dtype a
    resident model is loaded in ("auto": float32). ``scratch`` is where a
    temporary folder of converted weights may be made (default: the system's temporary folder,
    ``$TMPDIR``; a mixture-of-experts model needs room there for its converted experts).
    """
    from transformers import AutoModelForCausalLM

    path = Path(name_or_path).expanduser()
    if path.exists():
        folder, gguf = _resolve_local(path, None)
    elif _looks_like_hub_id(name_or_path):
        folder, gguf = _snapshot(name_or_path), None
    else:
        raise ModelLoadError(f"no such file or folder: {name_or_path}")
    if gguf is not None or not _has_safetensors(folder):
        model, tokenizer = load_causal_lm(
            str(folder / gguf) if gguf else str(folder), dtype=_resident_dtype(dtype)
        )
        return model, tokenizer
    refuse_remote_code(folder)
    check_index(folder)
    offload = scratch_folder("cdq-offload", scratch)
    quiet = logging.getLogger("accelerate.big_modeling")  # "parameters are on the meta device": as asked
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype="auto",
            device_map={"": "disk"},
            offload_folder=str(offload),
            trust_remote_code=False,
            output_loading_info=True,
        )
        tokenizer = _folder_tokenizer(folder)
    except ModelLoadError:
        release(offload)
        raise
    except Exception as exc:  # a corrupt or truncated file, a bad config: one line naming the model
        release(offload)
        raise ModelLoadError(f"cannot load {name_or_path}: {load_failure(exc)}") from exc
    finally:
        quiet.setLevel(level)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        release(offload)
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"cannot load {name_or_path}: its checkpoint has no weights for {missing[0]}{more} "
            "(they would be random); is it a complete model folder?"
        )
    loader = _detach_hooks(model)
    return LazyModel(model.eval(), tokenizer, dict(getattr(loader, "index", {})), loader, offload)


def _detach_hooks(model: Any) -> Mapping[str, Any]:
    """Take accelerate's map of weight locations off the model and remove its per-forward hooks
    (cdq places each block itself, once, instead of reloading it for every batch)."""
    from accelerate.hooks import remove_hook_from_submodules

    locations = None
    for module in model.modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        dataset = getattr(weights_map, "dataset", None)
        if dataset is not None:
            locations = dataset
            break
    remove_hook_from_submodules(model)
    if locations is None:
        raise ModelLoadError("transformers did not offload the model's weights: cannot load it lazily")
    return locations


def _has_safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def _resident_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return torch.float32 if dtype == "auto" else dtype  # type: ignore[return-value]


def _snapshot(name: str) -> Path:
    """The local folder of hub model ``name`` (downloaded, or from the cache when offline)."""
    from huggingface_hub import snapshot_download

    from ..offline import hub_calls, hub_offline

    local_only = hub_offline()
    try:
        with hub_calls(local_only):
            return Path(snapshot_download(name, local_files_only=local_only))
    except Exception as exc:
        why = "offline and not in the local cache" if local_only else "not found or not reachable"
        raise ModelLoadError(
            f"cannot load '{name}' from the Hugging Face hub ({why}); download it elsewhere and pass "
            f"the local folder, e.g. cdq quantize /path/to/{name.rsplit('/', 1)[-1]}"
        ) from exc
