"""What a user asked for (a request, as the command line gives it) and the checked plan made from it.

:func:`settle` turns a :class:`QuantizeRequest` into a :class:`Plan` before anything heavy
happens: the grid spec is built and validated once, solver options are typed and range-checked
once, the device is resolved once, and the output location is checked, so a bad flag fails in
milliseconds with one line, never after hours of work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..pipeline import OFFLOAD_CHOICES
from ..records import Settings
from ..solvers import SOLVERS
from ..store.shards import DEFAULT_SHARD_SIZE, parse_size

DTYPES = ("auto", "float32", "float16", "bfloat16")
SIGMA_DTYPES = ("float32", "float64")
FORMATS = ("native", "gptq", "compressed-tensors")


class UsageError(ValueError):
    """Bad command-line input (exit 2)."""


@dataclass
class QuantizeRequest:
    """One ``cdq quantize``: the values of its options, as given (``options`` are raw ``-o`` values
    over a preset's, strings or typed). Vision-only fields are ignored for language models."""

    target: str
    method: str = "cdq"
    bits: int = 4
    group_size: int | None = None
    sym: bool = False
    per_layer: bool = False
    skip: list[str] = field(default_factory=list)  # --skip PATTERN: layers kept in full precision
    layer: list[str] = field(default_factory=list)  # --layer PATTERN=SPEC: their own grid
    options: dict[str, Any] = field(default_factory=dict)
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    output: Path | None = None
    device: str | None = None
    dtype: str = "auto"
    sigma_dtype: str = "float32"
    batch_size: int = 8
    fp_inputs: bool = False
    true_sequential: bool = True
    overwrite: bool = False
    resume: bool = False
    eval_data: str | None = None
    eval_max_windows: int | None = None
    eval_seqlen: int | None = None
    export_format: str = "native"
    max_shard_size: str = DEFAULT_SHARD_SIZE
    offload_activations: str = "auto"
    checkpoint: str | None = None
    model_args: list[str] = field(default_factory=list)
    quantize_embed: bool = False
    quantize_head: bool = False
    augment: bool = False
    command: str = "cdq quantize"
    config: dict[str, Any] | None = None  # which preset supplied what (report provenance)


@dataclass
class EvalRequest:
    """One ``cdq eval``: a model or a cdq output folder, scored on ``data`` (perplexity, top-1) or
    on lm-eval ``tasks`` (zero-shot accuracy; ``limit``: at most that many items per task;
    ``trust_task_code``: let local task files run code of their own)."""

    target: str
    data: str | None = None
    seqlen: int | None = None
    max_windows: int | None = None
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = 8
    offload_activations: str = "auto"
    checkpoint: str | None = None
    model_args: list[str] = field(default_factory=list)
    tasks: str | None = None
    limit: int | None = None
    trust_task_code: bool = False


def plan_sources(request: QuantizeRequest) -> list[Path]:
    """The local files a run reads and must never replace: the model, its checkpoint, the data."""
    paths = [request.target, request.checkpoint, request.calib, request.eval_data]
    return [Path(p).expanduser() for p in paths if p is not None and Path(p).expanduser().exists()]


def check_writable(output: Path) -> None:
    """Fail now, not after hours, when the output's location cannot be written (read-only, no
    permission): try a temporary folder in the nearest existing ancestor."""
    import tempfile

    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        Path(tempfile.mkdtemp(prefix=".cdq-write-check-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise UsageError(
            f"cannot write the output {output}: {ancestor} is not writable ({exc.strerror})"
        ) from None


@dataclass
class Plan:
    """A checked request: the settings carried to every layer, and where things go."""

    request: QuantizeRequest
    settings: Settings
    output: Path
    export_dest: Path | None
    max_shard_bytes: int

    @property
    def device(self) -> torch.device:
        return self.settings.device


def settle(request: QuantizeRequest) -> Plan:
    """Check every value that can be checked without the model, and build the run's settings."""
    from ..store.exports import default_dest
    from ..store.files import check_output_dir

    if request.method not in SOLVERS:
        raise UsageError(f"unknown method {request.method!r}: choose one of {', '.join(SOLVERS)}")
    for flag, value, least in (
        ("--nsamples", request.nsamples, 1),
        ("--batch-size", request.batch_size, 1),
        ("--seqlen", request.seqlen, 2),
        ("--eval-seqlen", request.eval_seqlen, 2),
        ("--eval-max-windows", request.eval_max_windows, 1),
        ("--seed", request.seed, 0),
    ):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    choose("--dtype", request.dtype, DTYPES)
    choose("--sigma-dtype", request.sigma_dtype, SIGMA_DTYPES)
    choose("--format", request.export_format, FORMATS)
    settings = Settings.make(
        method=request.method,
        bits=request.bits,
        group_size=request.group_size,
        sym=request.sym,
        per_layer=request.per_layer,
        skip=request.skip,
        layer=request.layer,
        options=request.options,
        true_sequential=request.true_sequential,
        fp_inputs=request.fp_inputs,
        device=resolve_device(request.device),
        sigma_dtype=getattr(torch, request.sigma_dtype),
        offload_activations=choose("--offload-activations", request.offload_activations, OFFLOAD_CHOICES),
    )
    try:
        max_shard_bytes = parse_size(request.max_shard_size)
    except ValueError as exc:
        raise UsageError(f"--max-shard-size: {exc}") from None
    output = (request.output or Path(default_output(request))).absolute()
    check_output_dir(output, overwrite=request.overwrite, protect=plan_sources(request))
    check_writable(output)
    export_dest = None
    if request.export_format != "native":
        export_dest = default_dest(output, request.export_format)
        check_output_dir(export_dest, overwrite=request.overwrite, protect=[*plan_sources(request), output])
    return Plan(request, settings, output, export_dest, max_shard_bytes)


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch.device (default: cuda when available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available")
    return device


def model_dtype(choice: str) -> torch.dtype | str:
    """The dtype a model is loaded in: ``auto`` keeps the checkpoint's (bf16 stays bf16)."""
    choose("--dtype", choice, DTYPES)
    return "auto" if choice == "auto" else getattr(torch, choice)


def default_output(request: QuantizeRequest) -> str:
    base = Path(request.target.rstrip("/")).name
    base = base.removesuffix(".gguf") or "model"
    group = f"g{request.group_size}" if request.group_size else ""
    return f"{base}-{request.method}-w{request.bits}{group}"


def choose(flag: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    return value
