"""Peer quantizers against cdq on SmolLM2-135M, one protocol (issue 19): runs rows, prints a table.

Every row quantizes SmolLM2-135M-Instruct (float32) symmetric per-channel at 3 or 4 bits on the
same 32 x 512 C4-sample calibration windows (``protocol.py calib``: cdq's sampler, seed 0), in its
own process at one thread (OMP_NUM_THREADS=MKL_NUM_THREADS=1, torch.set_num_threads(1)); CPU
seconds (user + system of the process tree) and peak RSS come from ``scripts/_peak_rss.py``. Each
output is then scored by ONE evaluator, ``python -m cdq_cli eval OUT --data FILE --seqlen 512
--max-windows 40 --json --dtype float32``, on WikiText-2 test and PTB test (the first 40 windows of
512 tokens, GPTQ protocol). Peers write dequantized (fake-quant) float32 folders, checked to lie on
their grid (``protocol.py grid``) before scoring; cdq's rows are checked to have used the very
calibration windows of the file (report.json ``calibration.windows_sha256``).

    python scripts/peers/run_all.py --rows cdq-cdq-w3 llmc-gptq-w3        # run rows, print table
    python scripts/peers/run_all.py --rows 'cdq-*' --cdq-extra '-o target=fp' --label fp-target
    python scripts/peers/run_all.py --table                                # rebuild from JSON
    python scripts/peers/run_all.py --list

Results: one JSON per row under runs/peers/results/ (git-ignored), logs beside the outputs under
runs/peers/<row>/. Rows run one after another; start nothing else heavy beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fnmatch
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = REPO / "runs" / "peers"
sys.path.insert(0, str(HERE))

from protocol import CALIB_FILE, MODEL, read_calib  # noqa: E402

DATA = Path(os.environ.get("CDQ_DATA_DIR", REPO.parent / "shared" / "data"))
TEXTS = {"wikitext2": DATA / "text" / "wikitext2-raw-test.txt", "ptb": DATA / "text" / "ptb-test.txt"}
EVAL_SEQLEN, EVAL_WINDOWS = 512, 40
PEAK = [sys.executable, str(REPO / "scripts" / "_peak_rss.py")]


@dataclass
class Row:
    name: str
    tool: str
    recipe: str
    bits: int | None
    kind: str  # "peer", "cdq" or "fp"
    argv: list[str] = field(default_factory=list)  # the quantize command (peers, cdq)
    rerun_flags: list[str] = field(default_factory=list)  # run_all.py flags that rebuild this row


def venv_python(tool: str) -> str:
    """The peer's own venv: ``.venv-peer-TOOL`` under $PEER_VENV_ROOT (as setup.sh), else this checkout."""
    root = Path(os.environ.get("PEER_VENV_ROOT") or REPO)
    return str(root / f".venv-peer-{tool}" / "bin" / "python")


def rows(cdq_extra: list[str], label: str | None) -> dict[str, Row]:
    table: dict[str, Row] = {"fp": Row("fp", "full precision", "-", None, "fp")}
    for bits in (3, 4):
        for recipe in ("default", "light"):
            name = f"autoround-{recipe}-w{bits}"
            argv = [venv_python("autoround"), str(HERE / "autoround_run.py"), "--bits", str(bits)]
            argv += ["--recipe", recipe, "--calib", str(CALIB_FILE)]
            table[name] = Row(name, "AutoRound", recipe, bits, "peer", argv)
        for recipe in ("gptq", "spinquant-gptq", "awq"):
            name = f"llmc-{recipe}-w{bits}"
            argv = [venv_python("llmcompressor"), str(HERE / "llmcompressor_run.py"), "--bits", str(bits)]
            argv += ["--recipe", recipe, "--calib", str(CALIB_FILE)]
            table[name] = Row(name, "llm-compressor", recipe, bits, "peer", argv)
        for key, recipe, flags in (
            ("cdq", "cdq (default: -o target=fp)", ["--method", "cdq"]),
            # cdq against each layer's own outputs: its default before the full-precision target
            ("cdq-own", "cdq -o target=quantized", ["--method", "cdq", "-o", "target=quantized"]),
            # cdq's best recipe in BENCHMARKS.md: the preset (cdq after the Hadamard rotation,
            # against the full-precision target a quarter of the way)
            (
                "cdq-hadamard",
                "cdq-hadamard preset",
                ["--config", str(REPO / "configs" / "cdq-hadamard.yaml")],
            ),
            ("gptq", "gptq", ["--method", "gptq"]),  # act-order, cdq's default GPTQ
        ):
            name = f"cdq-{key}-w{bits}"
            argv = [sys.executable, "-m", "cdq_cli", "quantize", str(MODEL), *flags, "--bits", str(bits)]
            argv += ["--sym", "--calib", str(DATA / "text" / "c4-sample.jsonl"), "--nsamples", "32"]
            argv += ["--seqlen", "512", "--seed", "0", "--overwrite", "--json", "--quiet", *cdq_extra]
            shown = " ".join([recipe, *cdq_extra])
            again = []
            if label:
                name = f"{name}+{label}"
                again = ["--cdq-extra", shlex.join(cdq_extra), "--label", label]
            table[name] = Row(name, "cdq", shown, bits, "cdq", argv, again)
    return table


def env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CDQ_DATA_DIR": str(DATA),
        "PYTHONPATH": str(REPO),  # this checkout's cdq_cli, whatever the cwd
    }


def run_logged(argv: list[str], log: Path) -> tuple[int, float, str]:
    """Run ``argv`` with stdout+stderr into ``log``; return (exit code, wall s, stdout tail).
    Ctrl-C / SIGTERM end the child too and exit this driver (130 / 143)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        handle.write(f"$ {shlex.join(argv)}\n")
        handle.flush()
        # its own process group: an interrupt ends the wrapper (_peak_rss.py) and the tool under it
        proc = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, env=env(), cwd=REPO, start_new_session=True
        )
        try:
            code = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            raise
    return code, time.perf_counter() - began, log.read_text(encoding="utf-8", errors="replace")[-4000:]


def reported(text: str, key: str) -> float | None:
    for line in reversed(text.splitlines()):
        if line.startswith(f"{key}="):
            return float(line.split("=", 1)[1])
    return None


def last_json(text: str) -> dict:
    """The last line of ``text`` that is one JSON object (``--json`` output)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise ValueError("no JSON object in the output")


def evaluate(folder: Path, work: Path) -> dict[str, dict]:
    scores = {}
    for text, path in TEXTS.items():
        argv = [sys.executable, "-m", "cdq_cli", "eval", str(folder), "--data", str(path)]
        argv += ["--seqlen", str(EVAL_SEQLEN), "--max-windows", str(EVAL_WINDOWS), "--json"]
        argv += ["--dtype", "float32", "--device", "cpu"]
        code, _, out = run_logged(argv, work / f"eval-{text}.log")
        if code != 0:
            raise RuntimeError(f"eval on {text} failed ({code}); see {work / f'eval-{text}.log'}")
        result = last_json(out)
        scores[text] = {k: result[k] for k in ("ppl", "nll", "windows", "seqlen", "tokens") if k in result}
    return scores


def check_and_score(row: Row, record: dict) -> dict:
    """A peer's written model: the grid check, then the scores (the record gets ``grid`` and
    ``scores``, or ``failed``)."""
    work = RESULTS / row.name
    out = work / "model"
    code, _, grid = run_logged(
        [sys.executable, str(HERE / "protocol.py"), "grid", str(out), "--bits", str(row.bits)],
        work / "grid.log",
    )
    record["grid"] = last_json(grid)
    if code != 0:
        record["failed"] = {"exit": code, "error": "weights are not on a symmetric per-channel grid"}
        return record
    record["scores"] = evaluate(out, work)
    return record


def rescore(row: Row, saved: Path) -> dict:
    """``--rescore``: a peer row whose quantization finished (its saved record has the quantize
    command, CPU seconds and peak RSS, and its model folder exists) is checked and scored again,
    its quantization measurements kept: for a row the grid check or the scoring failed on."""
    path = saved / f"{row.name}.json"
    out = RESULTS / row.name / "model"
    if row.kind != "peer" or not path.is_file():
        raise SystemExit(f"{row.name}: --rescore needs a peer row with a saved record")
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("cpu_seconds") is None or not (out / "peer.json").is_file():
        raise SystemExit(f"{row.name}: its quantization did not finish; run it again without --rescore")
    record.pop("failed", None)
    record.pop("scores", None)
    record["rescored"] = dt.datetime.now().isoformat(timespec="seconds")
    return check_and_score(row, record)


def run_row(row: Row, calib_sha: str) -> dict:
    work = RESULTS / row.name
    out = work / "model"
    record: dict = {
        "row": row.name,
        "tool": row.tool,
        "recipe": row.recipe,
        "bits": row.bits,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.node()}",
        "calib_sha256": calib_sha,
        "rerun": shlex.join(["python", "scripts/peers/run_all.py", "--rows", row.name, *row.rerun_flags]),
    }
    if row.kind == "fp":
        record["scores"] = evaluate(MODEL, work)
        return record
    if row.kind == "cdq" and out.exists() and not (out / "report.json").is_file():
        raise RuntimeError(f"{out} exists and is not a cdq output; not overwriting it")
    argv = [*row.argv, "--output" if row.kind == "cdq" else "--out", str(out)]
    record["command"] = shlex.join(argv)
    code, wall, tail = run_logged([*PEAK, *argv], work / "quantize.log")
    if code != 0:
        errors = [line for line in tail.splitlines() if "Error" in line or line.startswith("error")]
        record["failed"] = {"exit": code, "error": errors[-1] if errors else tail.splitlines()[-1:]}
        return record
    record.update(
        cpu_seconds=reported(tail, "cpu_seconds"),
        peak_rss_mib=reported(tail, "peak_rss_mib"),
        wall_seconds=round(wall, 1),
    )
    if row.kind == "peer":
        record["peer"] = json.loads((out / "peer.json").read_text(encoding="utf-8"))
        return check_and_score(row, record)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    used = report.get("run", {}).get("calibration", {}).get("windows_sha256")
    record["calibration_check"] = used == calib_sha
    if used != calib_sha:
        record["failed"] = {"exit": 1, "error": f"cdq drew other windows ({used} != {calib_sha})"}
        return record
    record["scores"] = evaluate(out, work)
    return record


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(records: list[dict]) -> None:
    order = {"full precision": 0, "AutoRound": 1, "llm-compressor": 2, "cdq": 3}
    records = sorted(records, key=lambda r: (r["bits"] or 0, order.get(r["tool"], 9), r["row"]))
    print("| tool | recipe | bits | WikiText-2 ppl | PTB ppl | CPU s | peak RSS MiB | rerun |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        scores = r.get("scores", {})
        if "failed" in r:
            wiki = ptb = f"failed: {r['failed']['error']}"
        else:
            wiki = fmt(scores.get("wikitext2", {}).get("ppl"), 2)
            ptb = fmt(scores.get("ptb", {}).get("ppl"), 2)
        bits = "FP32" if r["bits"] is None else f"W{r['bits']}"  # the model is float32
        print(
            f"| {r['tool']} | {r['recipe']} | {bits} | {wiki} | {ptb} | {fmt(r.get('cpu_seconds'), 0)} "
            f"| {fmt(r.get('peak_rss_mib'), 0)} | `{r['rerun']}` |"
        )


def targets(records: list[dict]) -> list[str]:
    """Issue 19's targets, judged from the saved rows (only rows that finished count). cdq's best recipe
    at each bit width is the cdq row with the lowest WikiText-2 perplexity; that same row must be below
    every peer row on both texts."""
    done = [r for r in records if "failed" not in r and "scores" in r]
    fp = next((r for r in done if r["bits"] is None), None)
    lines = []
    for bits, factor in ((3, 2.0), (4, 1.15)):
        ours = [r for r in done if r["tool"] == "cdq" and r["bits"] == bits]
        peers = [r for r in done if r["tool"] not in ("cdq", "full precision") and r["bits"] == bits]
        if not ours:
            lines.append(f"- W{bits}: no cdq row yet")
            continue
        # cdq's best recipe is ONE row (lowest WikiText-2), judged on both texts
        best = min(ours, key=lambda r: r["scores"]["wikitext2"]["ppl"])
        for text, label in (("wikitext2", "WikiText-2"), ("ptb", "PTB")):
            value = best["scores"][text]["ppl"]
            above = [
                f"{p['tool']} {p['recipe']} {p['scores'][text]['ppl']:.2f}"
                for p in peers
                if p["scores"][text]["ppl"] <= value
            ]
            verdict = "met" if peers and not above else ("missed" if above else "no peer row yet")
            lines.append(
                f"- W{bits} {label}: cdq's best is {best['recipe']} at {value:.2f}; below every peer"
                f" ({len(peers)} rows): **{verdict}**"
                + (f" (at or below it: {'; '.join(above)})" if above else "")
            )
        if fp is not None:
            bound = factor * fp["scores"]["wikitext2"]["ppl"]
            value = best["scores"]["wikitext2"]["ppl"]
            verdict = "met" if value <= bound else "missed"
            lines.append(f"- W{bits} WikiText-2 <= {factor}x FP = {bound:.2f}: {value:.2f}, **{verdict}**")
        rounds = [r for r in peers if r["tool"] == "AutoRound" and r.get("cpu_seconds")]
        for ar in rounds:
            verdict = "met" if best["cpu_seconds"] <= ar["cpu_seconds"] else "missed"
            lines.append(
                f"- W{bits} CPU time of cdq's best ({best['recipe']}) {best['cpu_seconds']:.0f} s vs"
                f" AutoRound {ar['recipe']} {ar['cpu_seconds']:.0f} s: **{verdict}**"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=[], help="row names or shell patterns (--list)")
    parser.add_argument("--cdq-extra", default="", help="more `cdq quantize` flags for cdq's rows")
    parser.add_argument("--label", help="suffix of cdq rows run with --cdq-extra (their own results)")
    parser.add_argument("--table", action="store_true", help="print the table of saved results only")
    parser.add_argument("--list", action="store_true", help="list the rows")
    parser.add_argument(
        "--rescore", action="store_true", help="peer rows: grid check and scores again, quantization kept"
    )
    args = parser.parse_args()
    extra = shlex.split(args.cdq_extra)
    if extra and not args.label:
        parser.error("--cdq-extra needs --label (results of other flags are kept apart)")
    available = rows(extra, args.label)
    if args.list:
        for row in available.values():
            print(f"{row.name:32s} {row.tool} {row.recipe}")
        return 0
    saved = RESULTS / "results"
    if args.table:
        records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(saved.glob("*.json"))]
        table(records)
        print("\n".join(targets(records)))
        return 0
    chosen = [n for n in available if any(fnmatch.fnmatchcase(n, p) for p in args.rows)]
    unknown = [p for p in args.rows if not any(fnmatch.fnmatchcase(n, p) for n in available)]
    if unknown or not chosen:
        parser.error(f"no such row: {' '.join(unknown) or '(none given)'}; see --list")
    for name in chosen:
        interpreter = Path(available[name].argv[0]) if available[name].argv else None
        if interpreter is not None and not interpreter.exists():
            parser.error(f"{name}: {interpreter} missing; run make peers-setup")
    if not CALIB_FILE.is_file():
        parser.error(f"{CALIB_FILE} missing; run make peers-calib")
    _, calib_sha = read_calib(CALIB_FILE)
    saved.mkdir(parents=True, exist_ok=True)
    done = []
    for name in chosen:
        print(f"# {name}: started {dt.datetime.now():%H:%M:%S}", flush=True)
        record = rescore(available[name], saved) if args.rescore else run_row(available[name], calib_sha)
        partial = saved / f"{name}.json.partial"
        partial.write_text(json.dumps(record, indent=1), encoding="utf-8")
        partial.replace(saved / f"{name}.json")
        done.append(record)
        print(
            f"# {name}: {json.dumps({k: record.get(k) for k in ('scores', 'cpu_seconds', 'failed')})}",
            flush=True,
        )
    table(done)
    return 1 if any("failed" in r for r in done) else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
