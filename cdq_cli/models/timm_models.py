"""timm image classifiers: build one (weights only from local files) and resolve its eval transform.

There is no hub: ``pretrained=False`` always, and real weights come from ``--checkpoint FILE``
(timm's own ``checkpoint_path`` loader: .pth/.pt/.bin/.safetensors). What rebuilds the model (the
architecture name, ``create_model`` keyword arguments, the checkpoint) is a :class:`TimmSpec`,
which an output folder stores, so ``cdq eval`` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .causal_lm import ModelLoadError

KIND = "timm-classifier"
# create_model arguments that would load weights or configs from elsewhere: never taken from a file.
_NOT_FROM_FILES = ("pretrained", "checkpoint_path")
PREFIX = "timm/"
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass
class TimmSpec:
    """Everything needed to rebuild a timm model: ``create_model(name, pretrained=False, **kwargs)``,
    then ``checkpoint`` (an absolute path, or None for random init)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TimmSpec:
        """The spec an output folder stores, checked: an architecture name, plain keyword arguments
        (never ones that load weights or configs from elsewhere), an optional checkpoint path."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ModelLoadError("the stored timm model has no architecture name")
        kwargs, checkpoint = data.get("kwargs") or {}, data.get("checkpoint")
        if not isinstance(kwargs, dict) or any(
            not isinstance(k, str) or not k.isidentifier() or k in _NOT_FROM_FILES for k in kwargs
        ):
            raise ModelLoadError(f"the stored timm model arguments {kwargs!r} are not allowed")
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise ModelLoadError(f"the stored timm checkpoint {checkpoint!r} is not a path")
        return cls(data["name"], dict(kwargs), checkpoint)


def timm_name(target: str) -> str:
    """The architecture name of ``timm/NAME`` or ``NAME``."""
    return target[len(PREFIX) :] if target.startswith(PREFIX) else target


def is_timm_architecture(target: str) -> bool:
    """True for ``timm/NAME`` and for a plain name timm knows (no path separators)."""
    if target.startswith(PREFIX):
        return True
    if "/" in target or "\\" in target:
        return False
    import timm

    return bool(timm.is_model(target))


def check_spec(spec: TimmSpec) -> str | None:
    """Fail fast (before any data is read) on an unknown architecture or a missing checkpoint;
    return the checkpoint path to load, if any."""
    import timm

    if not timm.is_model(spec.name):
        raise ModelLoadError(f"unknown timm model {spec.name!r} (see timm.list_models())")
    if spec.checkpoint is None:
        return None
    path = Path(spec.checkpoint).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"no such checkpoint file: {spec.checkpoint}")
    return str(path)


def load_timm(spec: TimmSpec) -> nn.Module:
    """Build ``spec`` in eval mode on the CPU (float32); one-line ``ModelLoadError`` on any failure."""
    import timm

    name = spec.name
    checkpoint = check_spec(spec)
    try:
        model = timm.create_model(name, pretrained=False, checkpoint_path=checkpoint, **spec.kwargs)
    except Exception as exc:  # a corrupt or truncated checkpoint, a bad argument: one line
        where = f" from {checkpoint}" if checkpoint else ""
        raise ModelLoadError(f"cannot build timm model {name!r}{where}: {_first_line(exc)}") from exc
    return model.float().eval()


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's own eval data config (timm ``resolve_model_data_config``), with the input size
    of a fixed-size patch embedding when it differs (a ViT built with ``img_size=32``)."""
    from timm.data import resolve_model_data_config

    config = dict(resolve_model_data_config(model))
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is not None and not getattr(embed, "dynamic_img_size", False):
        size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        config["input_size"] = (config["input_size"][0], *size)
    out = {key: config[key] for key in _DATA_KEYS if key in config}
    return json.loads(json.dumps(out))  # tuples -> lists: what the output folder stores


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to ``create_model`` keyword arguments (values as JSON when they parse:
    ``depth=2``, ``img_size=32``, ``depths=[2,2]``; otherwise strings)."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = {"true": True, "false": False, "none": None}.get(raw.strip().lower(), raw.strip())
    return kwargs


def _first_line(exc: BaseException) -> str:
    """The gist of an error: its first line, plus the next when the first only introduces it."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text[:240]
