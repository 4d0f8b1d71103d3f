"""cdq's GGUF files against llama.cpp's own quantizer on SmolLM2-135M, at the same per-tensor types
and file size.

For every --type T:

* llama.cpp round-to-nearest: ``llama-quantize F32.gguf out.gguf T``;
* llama.cpp with an importance matrix: ``llama-quantize --imatrix imatrix.gguf F32.gguf out.gguf T``,
  the importance matrix being llama-imatrix's (the mean squared input of every matrix) computed on
  the same calibration windows as cdq's run (--imatrix-from ours: a reimplementation, checked
  against llama-imatrix by tests/test_gguf_llama_cpp.py; --imatrix-from llama: llama-imatrix run
  on the windows' text, which re-tokenizes it);
* cdq: ``cdq quantize --format gguf --type T`` (its own process), calibration 32 x 512 tokens from
  the C4 sample (seed 0).

``F32.gguf`` is the full-precision model written by llama.cpp's own convert_hf_to_gguf.py (from the
llama-cpp-python source distribution, ``--llama-src``). Every file is then scored the same way:
transformers loads it (gguf-py's dequantizer, float32) and the GPTQ-protocol perplexity runs on the
first 40 x 512-token windows of WikiText-2 test and of PTB test, in llama.cpp itself
(``--evaluate llama``, the default: llama-cpp-python built from source runs each window, the NLL
is computed from its logits, tests/llama_cpp_probe.py) or in transformers (``--evaluate
transformers``: gguf-py's dequantizer, float32). The table also lists each file's size and whether
its tensor types equal the importance-matrix file's.

    .venv/bin/python scripts/bench_gguf.py --llama-bin build/llama-cpp/build/bin \
        --llama-src build/llama-cpp/src/vendor/llama.cpp --llama-python build/llama-cpp/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from _bench_common import CACHE, REPO, data_dir, load_smollm2, print_table
from _llama_imatrix import imatrix_sums, write_imatrix

from cdq_cli.calib import calibration_windows, load_texts
from cdq_cli.calib.text import evaluation_ids
from cdq_cli.evaluate.perplexity import perplexity, windows_of


def source_folder(work: Path) -> Path:
    """The cached SmolLM2 folder as a Hugging Face checkpoint of a tied Llama: ``architectures``
    restored (a model loaded from GGUF saves none, and llama.cpp's converter needs it) and the
    tied matrix stored under its embedding name (the cache holds it as ``lm_head.weight``, which
    the converter would write as ``output.weight`` and leave llama.cpp without ``token_embd``)."""
    from safetensors.torch import load_file, save_file

    load_smollm2()  # builds the cache on first use
    cached = CACHE / "smollm2-135m-instruct"
    folder = work / "smollm2-src"
    folder.mkdir(parents=True, exist_ok=True)
    for item in cached.iterdir():
        if item.name not in ("config.json", "model.safetensors") and not (folder / item.name).exists():
            (folder / item.name).symlink_to(item)
    if not (folder / "model.safetensors").is_file():
        state = load_file(cached / "model.safetensors")
        if "lm_head.weight" in state and "model.embed_tokens.weight" not in state:
            state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((cached / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def run(cmd: list[str], env: dict | None = None) -> float:
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - began


def convert_f32(folder: Path, llama_src: Path, out: Path) -> Path:
    if not out.is_file():
        env = {"PYTHONPATH": str(llama_src / "gguf-py")}
        run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
             "--outfile", str(out)], env)  # fmt: skip
    return out


def imatrix_ours(model, windows: torch.Tensor, out: Path) -> Path:
    sums, counts = imatrix_sums(model, windows)
    return write_imatrix(out, sums, counts, chunks=int(windows.shape[0]), chunk_size=int(windows.shape[1]))


def imatrix_llama(bin_dir: Path, f32: Path, tokenizer, windows: torch.Tensor, out: Path) -> Path:
    text = out.with_suffix(".txt")
    text.write_text("".join(tokenizer.decode(w) for w in windows), encoding="utf-8")
    run([str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-c", str(windows.shape[1]),
         "--chunks", str(windows.shape[0]), "-o", str(out), "-t", "2"])  # fmt: skip
    return out


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def score(path: Path, texts: dict[str, torch.Tensor], windows: int, seqlen: int, args) -> dict[str, float]:
    """Perplexity of the file on each text's first ``windows`` windows (GPTQ protocol)."""
    if args.evaluate == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            return {
                name: perplexity(model.eval(), ids, seqlen=seqlen, max_windows=windows, batch_size=4).ppl
                for name, ids in texts.items()
            }
    out = {}
    for name, ids in texts.items():
        chunks = windows_of(ids, seqlen, windows)
        request = path.with_suffix(f".{name}.json")
        request.write_text(
            json.dumps({"windows": chunks.tolist(), "nll_only": True, "threads": args.threads})
        )
        result = path.with_suffix(f".{name}.npz")
        run(
            [
                str(args.llama_python),
                str(REPO / "tests" / "llama_cpp_probe.py"),
                str(path),
                str(request),
                str(result),
            ]
        )
        out[name] = math.exp(float(np.load(result)["nll"].mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--llama-bin", type=Path, required=True, help="folder of llama-quantize, llama-imatrix"
    )
    parser.add_argument(
        "--llama-src", type=Path, required=True, help="llama.cpp sources (convert_hf_to_gguf.py)"
    )
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q4_0", "Q2_K"])
    parser.add_argument("--method", default="cdq")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--imatrix-from", choices=("ours", "llama"), default="ours")
    parser.add_argument("--evaluate", choices=("llama", "transformers"), default="llama")
    parser.add_argument(
        "--llama-python", type=Path, help="the llama-cpp-python venv's python (--evaluate llama)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/cdq-bench-gguf"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--extra", default="", help="more cdq quantize arguments, e.g. --extra=--no-true-sequential"
    )
    parser.add_argument(
        "--imatrix", type=Path, help="an importance-matrix file of an earlier run with the same calibration"
    )
    parser.add_argument("--no-fp", action="store_true", help="do not score the F32 file")
    parser.add_argument("--no-rtn", action="store_true", help="leave out llama.cpp's round-to-nearest files")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--score", type=Path, nargs="+", help="only score these GGUF files (of SmolLM2) on the same windows"
    )
    parser.add_argument("--texts", nargs="+", choices=("wikitext2", "ptb"), default=["wikitext2", "ptb"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    data = data_dir()
    model, tokenizer = load_smollm2()
    names = {"wikitext2": "wikitext2-raw-test.txt", "ptb": "ptb-test.txt"}
    if args.score:
        chosen = {
            name: evaluation_ids(load_texts(str(data / "text" / names[name])), tokenizer)
            for name in args.texts
        }
        for path in args.score:
            ppl = score(path, chosen, args.eval_windows, args.seqlen, args)
            shown = ", ".join(f"{name} {value:.3f}" for name, value in ppl.items())
            size = f"{path.stat().st_size:,} bytes"
            print(f"{path}: {size}; perplexity {shown} ({args.eval_windows} x {args.seqlen})", flush=True)
        return
    folder = source_folder(args.work)
    f32 = convert_f32(folder, args.llama_src, args.work / "smollm2-f32.gguf")
    calib = str(data / "text" / "c4-sample.jsonl")
    windows = calibration_windows(
        load_texts(calib), tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0
    )
    imatrix = args.imatrix or args.work / f"imatrix-{args.imatrix_from}.gguf"
    if args.imatrix is not None:
        print(f"# importance matrix: {imatrix} (given)", flush=True)
    elif args.imatrix_from == "ours":
        imatrix_ours(model, windows, imatrix)
    else:
        imatrix_llama(args.llama_bin, f32, tokenizer, windows, imatrix)
    texts = {
        "wikitext2": evaluation_ids(load_texts(str(data / "text" / "wikitext2-raw-test.txt")), tokenizer),
        "ptb": evaluation_ids(load_texts(str(data / "text" / "ptb-test.txt")), tokenizer),
    }
    fp = None if args.no_fp else score(f32, texts, args.eval_windows, args.seqlen, args)
    if fp is not None:
        windows_text = f"({args.eval_windows} x {args.seqlen})"
        print(f"# FP: WikiText-2 {fp['wikitext2']:.3f}, PTB {fp['ptb']:.3f} {windows_text}", flush=True)
    del model
    rows, results = [], []
    quantize = [args.llama_bin / "llama-quantize"]
    env = {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    for kind in args.types:
        files: dict[str, tuple[Path, float]] = {}  # scored in this order: imatrix, cdq, RTN
        imat = args.work / f"llama-imatrix-{kind}.gguf"
        seconds = run([*quantize, "--imatrix", str(imatrix), str(f32), str(imat), kind, str(args.threads)])
        files["llama.cpp imatrix"] = (imat, seconds)
        out = args.work / f"cdq-{kind}"
        cmd = [sys.executable, "-m", "cdq_cli", "quantize", str(folder), "--method", args.method,
               "--format", "gguf", "--type", kind, "--calib", calib, "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--output", str(out), "--overwrite", "--quiet",
               *args.extra.split()]  # fmt: skip
        shutil.rmtree(Path(f"{out}-gguf"), ignore_errors=True)
        files[f"cdq ({args.method})"] = (Path(f"{out}-gguf") / f"model-{kind}.gguf", run(cmd, env))
        if not args.no_rtn:
            rtn = args.work / f"llama-rtn-{kind}.gguf"
            files["llama.cpp RTN"] = (rtn, run([*quantize, str(f32), str(rtn), kind, str(args.threads)]))
        reference = tensor_types(imat)
        for label, (path, seconds) in files.items():
            ppl = score(path, texts, args.eval_windows, args.seqlen, args)
            same = "yes" if tensor_types(path) == reference else "no"
            size = path.stat().st_size
            rows.append(
                [
                    kind,
                    label,
                    f"{size:,}",
                    same,
                    f"{ppl['wikitext2']:.3f}",
                    f"{ppl['ptb']:.3f}",
                    f"{seconds:.0f}",
                ]
            )
            results.append({"type": kind, "file": label, "bytes": size,
                            "same_types_as_imatrix": same == "yes", **ppl, "seconds": seconds})  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
            if args.json_out:  # after every file, so a run cut short keeps what it measured
                args.json_out.write_text(json.dumps({"fp": fp, "results": results}, indent=1))
    print()
    print_table(
        ["type", "file", "bytes", "types = imatrix file", "WikiText-2 ppl", "PTB ppl", "quantize s"], rows
    )
    machine = platform.processor() or platform.machine()
    full = f"FP (F32): WikiText-2 {fp['wikitext2']:.3f}, PTB {fp['ptb']:.3f}; " if fp is not None else ""
    print(f"{full}{machine}, {args.threads} thread(s), imatrix: {args.imatrix_from}, "
          f"evaluated in {args.evaluate}")  # fmt: skip


if __name__ == "__main__":
    main()
