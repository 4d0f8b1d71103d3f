"""The names of every file and folder cdq writes, in one place."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = "model.safetensors"  # the packed model of an output folder (when it fits one shard)
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded model: tensor name -> shard file
MARKER = "quantization.json"  # an output folder's quantization table; its presence marks a cdq folder
REPORT = "report.json"  # run settings, one row per layer, summary
REPORT_PLOT = "report.png"  # written by `cdq report`
GPTQ_CONFIG = "quantize_config.json"  # GPTQ export: read by auto-gptq and vLLM
MANIFEST = ".cdq-manifest.json"  # in every folder cdq writes: the files it wrote there
JOURNAL_STATE = "state.json"  # inside a journal folder: blocks done, report rows, fingerprint
JOURNAL_OUTPUT = "output"  # inside a journal folder: the output folder being built
# What a folder cdq wrote holds (its manifest's "kind"): `cdq quantize`'s output, or an export.
QUANTIZED = "quantize"
EXPORT = "export"


def journal_folder(output: Path) -> Path:
    """The resume journal of an output folder: the hidden sibling ``.<OUTPUT>.partial``."""
    output = Path(output).absolute()
    return output.with_name(f".{output.name}.partial")


def journal_block(index: int) -> str:
    """The journal file holding block ``index``'s packed layers."""
    return f"block-{index:05d}.safetensors"


def lock_file(output: Path) -> Path:
    """The lock a run holds on its output while it writes it: the hidden sibling ``.<OUTPUT>.lock``
    (in the real parent folder, so two spellings of one output share it)."""
    output = Path(output).absolute()
    return output.parent.resolve() / f".{output.name}.lock"
