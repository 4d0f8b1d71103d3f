"""The fixed choices of command-line options, as enums typer can show in ``--help``."""

from __future__ import annotations

from enum import Enum

from ..solvers import SOLVERS

Method = Enum("Method", {name: name for name in SOLVERS}, type=str)  # type: ignore[misc]


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Offload(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


class SigmaDType(str, Enum):
    float32 = "float32"
    float64 = "float64"


class ExportFormat(str, Enum):
    native = "native"
    gptq = "gptq"
    compressed_tensors = "compressed-tensors"
    gguf = "gguf"


class ExportTarget(str, Enum):
    gptq = "gptq"
    compressed_tensors = "compressed-tensors"
    gguf = "gguf"


class CheckpointFormat(str, Enum):
    gptq = "gptq"
    gptq_v2 = "gptq_v2"
