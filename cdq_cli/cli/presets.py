"""``cdq quantize --config FILE``: YAML presets whose keys are the quantize option names.

A preset fills in the defaults of the options the user did NOT give, so the command line always
wins: the file becomes click's ``default_map`` (set by an eager ``--config`` callback, before any other
option is read), and click records each value's origin (``ctx.get_parameter_source``: COMMANDLINE
beats DEFAULT_MAP beats DEFAULT). Keys are option names in snake_case or kebab-case (``group_size``,
``group-size``, or the flag's own name such as ``json``/``eval``), plus an ``options:`` mapping of
solver options, merged key by key under any ``--option KEY=VALUE`` given on the command line.
Unknown keys and wrongly typed values are refused with the key's name (exit 2). Relative paths
in a preset are read relative to the folder cdq runs in, like paths typed on the command line.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import types
import typing
from pathlib import Path
from typing import Any

CONFIG_META = "cdq.config"  # ctx.meta key: {"path", "sha256", "options"}
_NOT_FROM_FILE = {"config", "option", "ctx"}


class ConfigError(ValueError):
    """A preset that cannot be used; one line naming the file and the key (exit 2)."""


def apply_config(ctx: Any, _param: Any, value: Path | None) -> Path | None:
    """Eager ``--config`` callback: read the preset and install it as the command's default_map."""
    if value is None:
        return None
    path = Path(value)
    data = load_yaml(path)
    hints = _option_types(ctx)
    aliases = _aliases(ctx)
    defaults: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for raw_key, raw_value in data.items():
        key = str(raw_key).strip().replace("-", "_")
        if key == "options":
            options = _solver_options(path, raw_value)
            continue
        name = aliases.get(key)
        if name is None:
            hint = " (use an 'options:' mapping for solver options)" if key == "option" else ""
            raise ConfigError(f"{path}: unknown key {raw_key!r}{hint}")
        defaults[name] = check_value(path, str(raw_key), raw_value, hints[name])
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[CONFIG_META] = {
        "path": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "options": options,
    }
    return path


def load_yaml(path: Path) -> dict[str, Any]:
    """The preset's top-level mapping (an empty file is an empty preset)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no such config file: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def solver_options(ctx: Any) -> dict[str, Any]:
    """The preset's ``options:`` mapping (empty without --config); command-line --option wins."""
    return dict((ctx.meta.get(CONFIG_META) or {}).get("options", {}))


def provenance(ctx: Any) -> dict[str, Any] | None:
    """For report.json: which file was used and which settings it actually supplied."""
    info = ctx.meta.get(CONFIG_META)
    if not info:
        return None
    from_file = sorted(
        name
        for name in (ctx.default_map or {})
        if (source := ctx.get_parameter_source(name)) is not None and source.name == "DEFAULT_MAP"
    )
    return {
        "path": info["path"],
        "sha256": info["sha256"],
        "from_file": from_file,
        "options": info["options"],
    }


def check_value(path: Path, key: str, value: Any, kind: Any) -> Any:
    """``value`` if it has type ``kind`` (an annotation: int, float, bool, str, Path, Enum, X | None,
    list[str]); enums and paths come back as the strings click expects."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: key {key!r} expects a list, got {_shown(value)}")
        return [check_value(path, key, item, args[0] if args else str) for item in value]
    if inspect.isclass(kind) and issubclass(kind, enum.Enum):
        choices = [member.value for member in kind]
        if value not in choices:
            raise ConfigError(
                f"{path}: key {key!r} must be one of {', '.join(map(str, choices))}, got {_shown(value)}"
            )
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str),
    }.get(kind)
    if ok is None:
        raise ConfigError(f"{path}: key {key!r} cannot be set from a config file")
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "a string")
        raise ConfigError(f"{path}: key {key!r} expects {expected}, got {_shown(value)}")
    return value


def _solver_options(path: Path, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: key 'options' expects a mapping of solver options, got {_shown(value)}")
    options: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, (dict, list)):
            raise ConfigError(f"{path}: solver option {key!r} expects a single value, got {_shown(item)}")
        options[str(key).strip().replace("-", "_")] = item
    return options


def _option_types(ctx: Any) -> dict[str, Any]:
    """Python annotations of the command's parameters (typer builds the options from them)."""
    return typing.get_type_hints(inspect.unwrap(ctx.command.callback))


def _aliases(ctx: Any) -> dict[str, str]:
    """Accepted key → parameter name: the parameter's own name and its long flag (``--json``)."""
    names: dict[str, str] = {}
    for param in ctx.command.params:
        if param.name in _NOT_FROM_FILE:
            continue
        names[param.name] = param.name
        for opt in param.opts:
            if opt.startswith("--"):
                names.setdefault(opt[2:].replace("-", "_"), param.name)
    return names


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
