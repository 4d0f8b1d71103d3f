"""What a user asked for (a request, as the command line gives it) and the checked plan made from it.

This module owns the flags. Every fixed choice of an option is declared once, here or by the
registry it comes from (the solvers' :data:`~cdq_cli.solvers.METHODS`, the export formats'
:data:`~cdq_cli.store.exports.FORMATS`, the driver's :class:`~cdq_cli.pipeline.Offload`), as an
enum the command line re-exports; the grammar of ``--skip``/``--layer`` rules is parsed here.

:func:`settle` turns a :class:`QuantizeRequest` into a :class:`Plan` before anything heavy
happens: the grid spec is built and validated once, solver options are typed and range-checked
once, the output location is checked, and the processes of the run (torchrun) and this process's
device are resolved, so a bad flag fails in milliseconds with one line, never after hours of work.
The plan and its :class:`~cdq_cli.records.Settings` are frozen: everything downstream trusts them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from ..parallel import Ranks
from ..pipeline import Offload
from ..records import NO_QUANTIZATION, LayerRule, Settings
from ..solvers import DEFAULT_METHOD, METHODS, SUPPORTED_BITS, GridSpec, check_options, find_method
from ..store.exports import FORMATS
from ..store.gguf_mix import FILE_TYPES, check_type, default_type
from ..store.gptq import CHECKPOINT_FORMATS
from ..store.shards import DEFAULT_SHARD_SIZE, parse_size

__all__ = [
    "CheckpointFormat",
    "DType",
    "EvalRequest",
    "ExportTarget",
    "GGUFType",
    "Method",
    "Offload",
    "OutputFormat",
    "Plan",
    "QuantizeRequest",
    "SigmaDType",
    "Transform",
    "UsageError",
    "check_compute_dtype",
    "compute_dtype",
    "make_settings",
    "settle",
]


def _choices(name: str, values: Sequence[str]) -> type[Enum]:
    """A str enum whose members are ``values`` (what typer shows and checks)."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


class DType(str, Enum):
    """``--dtype``: the dtype blocks are computed in (:func:`compute_dtype`). Weights stay in the
    checkpoint's dtype at rest; auto is float32 on a CPU and the checkpoint's dtype on a GPU that
    computes it natively."""

    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Transform(str, Enum):
    """``--transform``: an equivalence transform applied before quantization (exact in full
    precision; :mod:`cdq_cli.transforms`)."""

    none = "none"
    hadamard = "hadamard"  # rotate the residual stream (R1) and each head's values (R2), merged
    awq = "awq"  # activation-aware per-channel scales, searched per block, folded into norms/linears


class SigmaDType(str, Enum):
    """``--sigma-dtype``: the dtype Σ is accumulated in."""

    float32 = "float32"
    float64 = "float64"


Method = _choices("Method", list(METHODS))  # --method: every declared solver
ExportTarget = _choices("ExportTarget", list(FORMATS))  # cdq export --format
OutputFormat = _choices("OutputFormat", ["native", *FORMATS])  # cdq quantize --format
CheckpointFormat = _choices("CheckpointFormat", CHECKPOINT_FORMATS)  # cdq export --checkpoint-format
GGUFType = _choices("GGUFType", list(FILE_TYPES))  # --type, with --format gguf
NATIVE = "native"
GGUF = "gguf"


class UsageError(ValueError):
    """Bad command-line input (exit 2)."""


@dataclass
class QuantizeRequest:
    """One ``cdq quantize``: the values of its options, as given (``options`` are raw ``-o`` values
    over a preset's, strings or typed). Vision-only fields are ignored for language models."""

    target: str
    method: str = DEFAULT_METHOD
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
    dtype: str = DType.auto.value
    sigma_dtype: str = SigmaDType.float32.value
    batch_size: int = 8
    fp_inputs: bool = False
    true_sequential: bool = True
    transform: str = "none"
    overwrite: bool = False
    resume: bool = False
    eval_data: str | None = None
    eval_max_windows: int | None = None
    eval_seqlen: int | None = None
    export_format: str = NATIVE
    gguf_type: str | None = None  # --type T, with --format gguf (the grid is then the type's)
    max_shard_size: str = DEFAULT_SHARD_SIZE
    offload_activations: str = Offload.auto.value
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
    dtype: str = DType.auto.value
    batch_size: int = 8
    offload_activations: str = Offload.auto.value
    checkpoint: str | None = None
    model_args: list[str] = field(default_factory=list)
    tasks: str | None = None
    limit: int | None = None
    trust_task_code: bool = False


@dataclass(frozen=True)
class Plan:
    """A checked request: the settings carried to every layer, the processes of the run, and where
    things go (``export_dest``: the ``--format`` export's folder, None for the native output only)."""

    request: QuantizeRequest
    settings: Settings
    ranks: Ranks
    output: Path
    export_dest: Path | None
    max_shard_bytes: int

    @property
    def device(self) -> torch.device:
        return self.settings.device


def settle(request: QuantizeRequest) -> Plan:
    """Check every value that can be checked without the model, build the run's settings, and join
    the other processes of the run when torchrun started this one (last: a bad flag fails first)."""
    from ..parallel import env_world, from_environment
    from ..store.exports import default_dest
    from ..store.files import check_output_dir
    from ..store.names import EXPORT, QUANTIZED

    choose("--method", request.method, Method)
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
    choose("--format", request.export_format, OutputFormat)
    check_gguf(request)
    choose("--transform", request.transform, Transform)
    device = resolve_device(request.device)
    check_compute_dtype(request.dtype, device)
    settings = make_settings(
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
        device=device,
        sigma_dtype=getattr(torch, choose("--sigma-dtype", request.sigma_dtype, SigmaDType)),
        offload_activations=choose("--offload-activations", request.offload_activations, Offload),
        gguf_type=request.gguf_type,
        transform=request.transform,
    )
    try:
        max_shard_bytes = parse_size(request.max_shard_size)
    except ValueError as exc:
        raise UsageError(f"--max-shard-size: {exc}") from None
    output = (request.output or Path(default_output(request))).absolute()
    check_output_dir(output, overwrite=request.overwrite, protect=plan_sources(request), kind=QUANTIZED)
    export_dest = None
    if request.export_format != NATIVE:
        export_dest = default_dest(output, request.export_format)
        check_output_dir(
            export_dest, overwrite=request.overwrite, protect=[*plan_sources(request), output], kind=EXPORT
        )
    if settings.transform == Transform.awq and not settings.quantizing:
        raise UsageError("--transform awq searches scales for the run's grid; --bits 16 quantizes nothing")
    if "fp_share" in settings.options and settings.target != "fp":
        why = "--fp-inputs turns off its default target=fp" if settings.fp_inputs else "it needs -o target=fp"
        raise UsageError(f"-o fp_share sets how far -o target=fp's target goes; {why}")
    if settings.target == "fp" and settings.fp_inputs:
        raise UsageError(
            "-o target=fp quantizes each layer against its full-precision inputs and outputs; "
            "--fp-inputs feeds every layer full-precision inputs instead: choose one"
        )
    if env_world() > 1 and settings.transform == Transform.awq:
        raise UsageError(
            "--transform awq runs in one process (its scale search would need the batches of every "
            "process, and its choices must not depend on how they are split): drop --nproc/torchrun"
        )
    check_processes(request, env_world(), settings.device, hardware=False)  # before waiting for them
    ranks, device = from_environment(settings.device)  # torchrun: this rank's part and its device
    return Plan(request, replace(settings, device=device), ranks, output, export_dest, max_shard_bytes)


def make_settings(
    method: str = DEFAULT_METHOD,
    bits: int = 4,
    group_size: int | None = None,
    sym: bool = False,
    per_layer: bool = False,
    options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    skip: Sequence[str] = (),
    layer: Sequence[str] = (),
    gguf_type: str | None = None,
    **rest: Any,
) -> Settings:
    """Settings from flag-like values: the grid built by :func:`grid_spec`, the ``--skip`` /
    ``--layer`` rules by :func:`layer_rules`, the options typed and checked by
    :func:`cdq_cli.solvers.check_options` (``ValueError``, one line, on bad input).
    ``gguf_type``: a GGUF ``--type`` (the run's grid is then its default block type's, and a
    ``--layer`` SPEC is a block type)."""
    if gguf_type is not None:
        gguf_type = check_type(gguf_type)
        grid: GridSpec | None = GridSpec.of_type(default_type(gguf_type))
    else:
        grid = grid_spec(bits, group_size, sym, per_layer)
    checked = check_options(method, options or {}) if grid is not None else dict(options or {})
    if grid is None and (skip or layer):
        raise ValueError("--skip and --layer choose layers to quantize differently; --bits 16 quantizes none")
    rules = layer_rules(grid, skip, layer) if grid is not None else ()
    return Settings(
        method=method,
        grid=grid,
        options=checked,
        device=torch.device(device),
        overrides=rules,
        gguf_type=gguf_type,
        **rest,
    )


def check_gguf(request: QuantizeRequest) -> None:
    """``--format gguf`` takes its grid from ``--type`` alone, and ``--type`` means nothing without it."""
    if request.export_format != GGUF:
        if request.gguf_type is not None:
            raise UsageError("--type is a GGUF type: use it with --format gguf")
        return
    if request.gguf_type is None:
        raise UsageError(f"--format gguf needs --type T: one of {', '.join(FILE_TYPES)}")
    try:
        check_type(request.gguf_type)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if request.bits != 4 or request.group_size is not None or request.sym or request.per_layer:
        raise UsageError(
            "--format gguf takes its grid from --type: drop --bits/--group-size/--sym/--per-layer"
        )
    if find_method(request.method).fixed_grid is None:
        raise UsageError(
            f"--method {request.method} keeps full-precision outliers, which a GGUF file cannot hold"
        )
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UsageError("--format gguf needs the gguf package: pip install 'cdq[gguf]'") from None


def grid_spec(bits: int, group_size: int | None, sym: bool, per_layer: bool) -> GridSpec | None:
    """The one grid spec of a run, from its flags (None for ``--bits 16``: no quantization)."""
    if bits == NO_QUANTIZATION:
        return None
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"--bits {bits} is not supported: choose one of 2, 3, 4, 8 (16 = no quantization)")
    if group_size is not None and group_size <= 0:
        raise ValueError(f"--group-size must be positive, got {group_size}")
    if per_layer and group_size is not None:
        raise ValueError("--per-layer means one scale for the whole layer; it cannot have a --group-size")
    return GridSpec(bits, group_size, sym, per_layer)


LAYER_SPEC = re.compile(r"^(?P<bits>\d+)(?:g(?P<group>\d+)|(?P<channel>ch))?(?P<sym>sym|asym)?$")
SPEC_GRAMMAR = (
    "BITS[gGROUP|ch][sym|asym], e.g. 8, 4g128, 3g64sym, 8ch (bits 2, 3, 4 or 8; gGROUP: one scale per "
    "GROUP columns, ch: one per output row; what is left out comes from --group-size/--sym)"
)


def layer_rules(default: GridSpec, skip: Sequence[str], layer: Sequence[str]) -> tuple[LayerRule, ...]:
    """The ``--skip`` and ``--layer`` rules of a run, checked: every pattern compiles, every SPEC
    follows :data:`SPEC_GRAMMAR` and makes a valid grid (one-line ``ValueError`` otherwise)."""
    rules = []
    for pattern in skip:
        rules.append(LayerRule(_pattern("--skip", pattern, pattern), None, None))
    for item in layer:
        pattern, sep, spec = str(item).rpartition("=")
        if not sep or not pattern.strip():
            raise ValueError(f"--layer expects PATTERN=SPEC, got {item!r}")
        spec = spec.strip()
        rules.append(LayerRule(_pattern("--layer", pattern, item), spec, parse_layer_spec(spec, default)))
    return tuple(rules)


def parse_layer_spec(spec: str, default: GridSpec) -> GridSpec:
    """The grid a ``--layer`` SPEC gives (see :data:`SPEC_GRAMMAR`); what the SPEC leaves out comes
    from ``default`` (the run's --group-size, --sym, --per-layer). In a GGUF run (``default`` on a
    block type) a SPEC is a GGUF block type (``Q6_K``...)."""
    if default.block_type is not None:
        try:
            return GridSpec.of_type(spec)
        except ValueError as exc:
            raise ValueError(f"--layer SPEC {spec!r} in a --format gguf run: {exc}") from None
    found = LAYER_SPEC.match(spec.lower())
    if not found:
        raise ValueError(f"--layer SPEC {spec!r} is not {SPEC_GRAMMAR}")
    bits = int(found["bits"])
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"--layer SPEC {spec!r}: {bits} bits is not one of 2, 3, 4, 8 "
            "(--skip keeps a layer in full precision)"
        )
    group, per_layer = default.group_size, default.per_layer
    if found["group"] is not None:
        group, per_layer = int(found["group"]), False
        if group < 1:
            raise ValueError(f"--layer SPEC {spec!r}: the group size must be positive")
    elif found["channel"]:
        group, per_layer = None, False
    sym = default.sym if found["sym"] is None else found["sym"] == "sym"
    return GridSpec(bits, group, sym, per_layer)


def _pattern(flag: str, pattern: str, shown: str) -> str:
    """``pattern`` checked: Python's ``re`` syntax (what the docs promise); it is matched by the
    ``regex`` package (:meth:`~cdq_cli.records.LayerRule.matches`), which takes the same syntax and
    can stop a search that runs too long."""
    import regex

    try:
        re.compile(pattern)
        regex.compile(pattern)
    except (re.error, regex.error) as exc:
        raise ValueError(f"{flag} {shown!r}: not a valid regular expression ({exc})") from None
    return pattern


def plan_sources(request: QuantizeRequest) -> list[Path]:
    """The local files a run reads and must never replace: the model, its checkpoint, the data."""
    paths = [request.target, request.checkpoint, request.calib, request.eval_data]
    return [Path(p).expanduser() for p in paths if p is not None and Path(p).expanduser().exists()]


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
    """The dtype a model held whole in memory is loaded in (``auto``: the loader's default)."""
    choose("--dtype", choice, DType)
    return "auto" if choice == DType.auto.value else getattr(torch, choice)


def compute_dtype(choice: str, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype a model stored in ``stored`` is computed in on ``device``: ``--dtype`` when given;
    ``auto``: float32 on a CPU (its bf16 and fp16 GEMMs run several times slower than float32
    ones), and on a GPU the stored dtype when the GPU computes it natively (bf16 needs compute
    capability 8.0), else float32. Σ is accumulated in float32 (``--sigma-dtype``) whatever this is."""
    choose("--dtype", choice, DType)
    if choice != DType.auto.value:
        return getattr(torch, choice)
    if device.type != "cuda" or not stored.is_floating_point:
        return torch.float32
    if stored == torch.bfloat16 and not _native_bf16(device):
        return torch.float32
    return stored if stored in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def check_compute_dtype(choice: str, device: torch.device) -> None:
    """A ``--dtype`` that ``device`` cannot compute in, refused before any work (one line): bf16
    on a GPU without native bf16, or any dtype whose basic operations (a matrix product, softmax
    attention) the device does not implement."""
    choose("--dtype", choice, DType)
    if choice == DType.auto.value:
        return
    dtype = getattr(torch, choice)
    if device.type == "cuda" and dtype == torch.bfloat16 and not _native_bf16(device):
        raise UsageError(
            f"--dtype bfloat16: {device} ({torch.cuda.get_device_name(device)}) does not compute in "
            "bfloat16; use --dtype float16 or float32"
        )
    problem = _computes(device, dtype)
    if problem is not None:
        raise UsageError(f"--dtype {choice}: {device} cannot compute in {choice} ({problem})")


def _native_bf16(device: torch.device) -> bool:
    """Whether a CUDA device has bf16 tensor cores (compute capability 8.0 and later)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def _computes(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when a tiny matrix product and causal attention run in ``dtype`` on ``device``; else
    the first line of the error."""
    import torch.nn.functional as F

    try:
        x = torch.ones(1, 1, 4, 8, dtype=dtype, device=device)
        F.scaled_dot_product_attention(F.linear(x, torch.ones(8, 8, dtype=dtype, device=device)), x, x)
    except (RuntimeError, TypeError) as exc:
        text = str(exc).strip()
        return text.splitlines()[0][:160] if text else type(exc).__name__
    return None


def default_output(request: QuantizeRequest) -> str:
    base = Path(request.target.rstrip("/")).name
    base = base.removesuffix(".gguf") or "model"
    if request.gguf_type is not None:
        return f"{base}-{request.method}-{request.gguf_type.upper()}"
    group = f"g{request.group_size}" if request.group_size else ""
    return f"{base}-{request.method}-w{request.bits}{group}"


def choose(flag: str, value: str, choices: type[Enum]) -> str:
    """``value`` when it is one of the enum's values; one line naming the choices otherwise."""
    allowed = [member.value for member in choices]
    if value not in allowed:
        raise UsageError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def check_processes(
    request: QuantizeRequest, count: int, device: torch.device, *, hardware: bool = True
) -> None:
    """Refuse, before any process starts or any model loads, ``count`` processes that cannot all
    work: each needs a calibration batch of its own and (``hardware``: processes of this machine)
    a CPU core of its own on the CPU, a GPU of its own on CUDA."""
    if count <= 1:
        return
    batches = -(-request.nsamples // request.batch_size)
    if count > batches:
        raise UsageError(
            f"{count} processes need at least {count} calibration batches, and --nsamples "
            f"{request.nsamples} with --batch-size {request.batch_size} makes {batches}: lower "
            "--batch-size (or --nproc)"
        )
    if not hardware:
        return
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if count > gpus:
            raise UsageError(f"{count} processes need {count} GPUs, and {gpus} are visible: lower --nproc")
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if count > cpus:
        raise UsageError(
            f"{count} processes on the CPU need {count} cores, and this machine gives {cpus}: lower --nproc"
        )
