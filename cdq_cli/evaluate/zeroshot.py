"""Zero-shot accuracy through lm-evaluation-harness (the optional ``zeroshot`` extra:
``pip install 'cdq[zeroshot]'``).

``--tasks`` takes a comma-separated list of lm-eval task names (``hellaswag,arc_easy``), task YAML
files, or folders of task YAMLs. A local YAML is read as lm-eval reads it (``include:`` merged the
same way), and the relative paths in its ``dataset_kwargs.data_files`` are read from the YAML's
folder, so a task and its data travel together::

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]

Named tasks read their data from the Hugging Face hub: offline they are refused at once (one line
saying how to run them from local files). Every task is built (its data read) before the model is
loaded, so a bad task fails in seconds. lm-eval's model wrapper (``HFLM``) runs a whole model: the
caller hands over a model held whole in memory.

Code that comes with a task file runs only when the user says so (``trust_code``, the CLI's
``--trust-task-code``). lm-eval would run it in four ways, each closed otherwise:

* ``!function module.name`` (in the YAML or in a file it includes) imports ``module.py`` from the
  YAML's folder the moment the YAML is parsed: task YAMLs are parsed here with a safe loader that
  only records the tag, and a task that has one is refused in one line. YAMLs that are not tasks
  (no ``task:`` key) in a ``--tasks`` folder are never handed to lm-eval's loader, trusted or not.
* a ``metric`` that is not one of lm-eval's own (or ``hf_evaluate: true``) is loaded with HF
  ``evaluate``, which imports the metric's Python script: refused.
* ``dataset_kwargs.trust_remote_code`` lets older ``datasets`` releases run a dataset script: refused.
* prompts are Jinja templates, which lm-eval renders in an unsandboxed environment (a template can
  reach Python objects through attributes such as ``__globals__``): rendered in Jinja's sandbox.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

INSTALL = "pip install 'cdq[zeroshot]' (lm-evaluation-harness)"
LOCAL_HINT = (
    "write a task YAML whose dataset_kwargs.data_files point at local files and pass --tasks PATH.yaml "
    "(docs/cli.md)"
)
_YAML = (".yaml", ".yml")
_NOT_METRICS = ("alias", "name", "sample_len")  # lm-eval's fixed result keys


class ZeroShotError(ValueError):
    """A task list that cannot be evaluated; one line for the CLI (exit 2)."""


TRUST = "cdq runs code that comes with a task only with --trust-task-code"


@dataclass(frozen=True)
class FunctionTag:
    """A ``!function SPEC`` tag of a task YAML, recorded instead of imported."""

    spec: str
    file: Path


@dataclass
class TaskList:
    """The tasks of ``--tasks``: lm-eval names and local task configs, in the order given."""

    specs: list[str | dict[str, Any]] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)  # what the user typed, per task
    named: list[str] = field(default_factory=list)


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def parse_tasks(text: str, *, offline: Callable[[], bool], trust_code: bool = False) -> TaskList:
    """Resolve ``--tasks`` before any work: names, YAML files and folders of YAMLs (checked to
    exist and to read as task configs); a named task is refused when ``offline()`` (asked only
    then: probing the hub takes seconds). A local task that would run code of its own is refused
    unless ``trust_code`` (see the module doc)."""
    if not available():
        raise ZeroShotError(f"--tasks needs lm-evaluation-harness: {INSTALL}")
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ZeroShotError("--tasks is empty: give task names, task YAML files or folders, comma-separated")
    tasks = TaskList()
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in _YAML and p.is_file())
            configs = [(f, cfg) for f in files if "task" in (cfg := read_task_yaml(f))]
            if not configs:
                raise ZeroShotError(
                    f"--tasks {item}: the folder holds no task YAML (a file with a 'task:' key)"
                )
            for file, cfg in configs:
                tasks.specs.append(_local_config(file, cfg, trust_code))
                tasks.shown.append(str(file))
        elif path.suffix in _YAML or path.exists() or "/" in item:  # a path, not a task name
            if not path.is_file():
                raise ZeroShotError(f"--tasks {item}: no such task file or folder")
            cfg = read_task_yaml(path)
            if "task" not in cfg:
                raise ZeroShotError(
                    f"--tasks {item}: not a task YAML (no 'task:' key; groups are not supported)"
                )
            tasks.specs.append(_local_config(path, cfg, trust_code))
            tasks.shown.append(item)
        else:
            if offline():
                raise ZeroShotError(
                    f"lm-eval task {item!r} reads its data from the Hugging Face hub, which is unreachable "
                    f"(offline): {LOCAL_HINT}"
                )
            tasks.specs.append(item)
            tasks.shown.append(item)
            tasks.named.append(item)
    return tasks


def build_tasks(tasks: TaskList, *, trust_code: bool = False) -> dict[str, Any]:
    """lm-eval Task objects by name (their data read now); one line on any failure. Templates
    render in Jinja's sandbox unless ``trust_code``."""
    _quiet()
    from lm_eval.tasks import TaskManager

    try:  # the built-in index (~15,000 YAMLs, tens of seconds) only when a task is named
        manager = TaskManager(include_defaults=bool(tasks.named))
        with sandboxed_templates(not trust_code):
            loaded = manager.load(list(tasks.specs))
    except ZeroShotError:
        raise
    except KeyError as exc:
        raise ZeroShotError(f"unknown lm-eval task: {_first_line(exc)}") from None
    except Exception as exc:  # the hub, a data file, a template: one line naming the tasks
        where = ", ".join(tasks.shown)
        hint = f"; offline or unreachable? {LOCAL_HINT}" if tasks.named else ""
        raise ZeroShotError(f"cannot build lm-eval task(s) {where}: {_first_line(exc)}{hint}") from None
    return dict(loaded["tasks"])


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    built: dict[str, Any],
    *,
    device: torch.device,
    batch_size: int = 8,
    limit: int | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy (and every other metric the tasks define) with its standard error, per
    task, for ``model`` (held whole, moved to ``device``), as a JSON-ready dict. Templates render
    in Jinja's sandbox unless ``trust_code``."""
    _quiet()
    import lm_eval
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = model.to(device).eval()
    wrapper = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with torch.no_grad(), _no_git_probe(), sandboxed_templates(not trust_code):
        out = simple_evaluate(
            model=wrapper,
            tasks=list(built.values()),
            task_manager=TaskManager(include_defaults=False),
            num_fewshot=0,
            limit=limit,
            log_samples=False,
            bootstrap_iters=1000,
        )
    if out is None:
        raise ValueError("lm-eval returned no results")
    rows = []
    for name in built:
        metrics = out["results"][name]
        samples = out.get("n-samples", {}).get(name, {})
        row: dict[str, Any] = {
            "task": name,
            "samples": samples.get("effective", samples.get("original")),
            "metrics": {},
        }
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or metric in _NOT_METRICS or not isinstance(value, (int, float)):
                continue
            shown = metric if filt in ("", "none") else f"{metric},{filt}"
            if not math.isfinite(value):  # a broken model must not read as a result
                raise ValueError(f"task {name}: {shown} is {value} (the model's outputs are not finite)")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            row["metrics"][shown] = {"value": _number(value), "stderr": _number(stderr)}
        rows.append(row)
    return {
        "tasks": rows,
        "protocol": f"lm-evaluation-harness {lm_eval.__version__}: zero-shot (num_fewshot 0), "
        "log-likelihood of each choice, standard error of the mean",
        "limit": limit,
    }


def read_task_yaml(path: Path, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """A task YAML with its ``include:`` files merged as lm-eval merges them (the included files in
    order, then the file's own keys), read with YAML's safe loader: no Python object is built and
    no code is imported; each ``!function SPEC`` tag becomes a :class:`FunctionTag`."""
    import yaml

    path = Path(path).expanduser().resolve()
    if path in _seen:
        raise ZeroShotError(f"task file {path}: its include: files include it again (a cycle)")
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc, valid-type]
        pass

    def function_tag(loader: Any, node: Any) -> FunctionTag:
        return FunctionTag(str(loader.construct_scalar(node)), path)

    Loader.add_constructor("!function", function_tag)
    try:
        with path.open("rb") as fh:
            cfg = yaml.load(fh, Loader=Loader)  # noqa: S506 (a safe loader plus one inert tag)
    except (OSError, yaml.YAMLError) as exc:
        raise ZeroShotError(f"cannot read task file {path}: {_first_line(exc)}") from None
    if not isinstance(cfg, dict):
        raise ZeroShotError(f"task file {path}: not a mapping of task settings")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict[str, Any] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        target = Path(str(include)).expanduser()
        target = target if target.is_absolute() else path.parent / target
        if not target.is_file():
            raise ZeroShotError(f"task file {path}: include {include} not found (looked at {target})")
        included = read_task_yaml(target, _seen | {path})
        included.pop("task_list", None)
        merged.update(included)
    merged.update(cfg)
    return merged


def function_tags(value: Any, where: str = "") -> list[tuple[str, FunctionTag]]:
    """Every ``!function`` tag in a task config, with the key it sits under."""
    if isinstance(value, FunctionTag):
        return [(where, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in function_tags(item, _key(where, key))]
    if isinstance(value, list):
        return [found for i, item in enumerate(value) for found in function_tags(item, f"{where}[{i}]")]
    return []


def _key(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def refuse_task_code(path: Path, cfg: dict[str, Any]) -> None:
    """One line for the first way ``cfg`` (read from ``path``) would run code of its own."""
    tags = function_tags(cfg)
    if tags:
        key, tag = tags[0]
        module = tag.spec.rpartition(".")[0] or tag.spec
        origin = "" if tag.file == path.resolve() else f" (from {tag.file}, which it includes)"
        raise ZeroShotError(
            f"task file {path}: '{key}: !function {tag.spec}'{origin} would import and run "
            f"{module}.py, Python code that came with the task; {TRUST}"
        )
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("trust_remote_code"):
        raise ZeroShotError(
            f"task file {path}: dataset_kwargs.trust_remote_code lets the dataset run its own script; {TRUST}"
        )
    import lm_eval.api.metrics  # noqa: F401  (fills lm-eval's metric registry)
    from lm_eval.api.registry import metric_registry

    for entry in cfg.get("metric_list") or []:
        if not isinstance(entry, dict):
            continue
        name = entry.get("metric")
        if entry.get("hf_evaluate") or (isinstance(name, str) and name not in metric_registry):
            raise ZeroShotError(
                f"task file {path}: metric {name!r} is not one of lm-eval's own metrics, so lm-eval would "
                f"load it with HF evaluate, which runs the metric's Python script; {TRUST}"
            )


@contextmanager
def sandboxed_templates(active: bool) -> Iterator[None]:
    """While ``active``, lm-eval renders task templates (doc_to_text, doc_to_choice...) in Jinja's
    sandbox: the same options and filters as lm-eval's own environment, but a template that reaches
    for Python internals (``cycler.__init__.__globals__``...) fails instead of running."""
    if not active:
        yield
        return
    import lm_eval.utils
    from jinja2.sandbox import SandboxedEnvironment

    original = lm_eval.utils.env
    sandbox = SandboxedEnvironment(
        loader=original.loader,
        undefined=original.undefined,
        keep_trailing_newline=original.keep_trailing_newline,
    )
    sandbox.filters.update(original.filters)
    lm_eval.utils.env = sandbox
    try:
        yield
    except Exception as exc:
        from jinja2.exceptions import SecurityError

        if isinstance(exc, SecurityError) or isinstance(exc.__cause__, SecurityError):
            raise ZeroShotError(
                f"a task template reaches for Python internals ({_first_line(exc)}); {TRUST}"
            ) from None
        raise
    finally:
        lm_eval.utils.env = original


def _local_config(path: Path, cfg: dict[str, Any], trust_code: bool) -> dict[str, Any]:
    """The task config of ``path`` (``cfg``: what :func:`read_task_yaml` read) as lm-eval reads it,
    its relative data files made absolute from its folder. Refused when it would run code of its
    own, unless ``trust_code``: then a task with ``!function`` tags is read by lm-eval's loader,
    which imports them."""
    if not trust_code:
        refuse_task_code(path, cfg)
    elif function_tags(cfg):
        from lm_eval.tasks._yaml_loader import load_yaml

        try:
            cfg = load_yaml(path)
        except Exception as exc:
            raise ZeroShotError(f"cannot read task file {path}: {_first_line(exc)}") from None
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        kwargs = dict(kwargs)
        kwargs["data_files"] = _absolute(kwargs["data_files"], path.parent.resolve(), path)
        cfg = {**cfg, "dataset_kwargs": kwargs}
    return cfg


def _absolute(files: Any, base: Path, yaml_path: Path) -> Any:
    if isinstance(files, dict):
        return {split: _absolute(value, base, yaml_path) for split, value in files.items()}
    if isinstance(files, (list, tuple)):
        return [_absolute(value, base, yaml_path) for value in files]
    if isinstance(files, str) and "://" not in files:
        resolved = Path(files).expanduser()
        resolved = resolved if resolved.is_absolute() else base / resolved
        if not resolved.exists() and not any(ch in files for ch in "*?["):
            raise ZeroShotError(f"task file {yaml_path}: data file {files} not found (looked at {resolved})")
        if not resolved.exists() and not glob.glob(str(resolved), recursive=True):
            raise ZeroShotError(
                f"task file {yaml_path}: data files {files} match no file (looked for {resolved})"
            )
        return str(resolved)
    return files


def _number(value: Any) -> float | None:
    """A metric as a finite float, or None (lm-eval writes "N/A" where there is no standard error)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@contextmanager
def _no_git_probe() -> Iterator[None]:
    """lm-eval records the git commit of the current folder by running ``git describe``, which
    prints ``fatal: not a git repository`` on stderr outside a checkout; cdq reports no git hash,
    so the probe is skipped while lm-eval runs."""
    import lm_eval.evaluator as evaluator

    probe = getattr(evaluator, "get_git_commit_hash", None)
    if probe is not None:
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        if probe is not None:
            evaluator.get_git_commit_hash = probe


def _quiet() -> None:
    """lm-eval logs every step at INFO and warns about passing a model object: keep stderr clean."""
    for name in ("lm-eval", "lm_eval", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().strip("'\"")
    return text.splitlines()[0][:200] if text else type(exc).__name__
