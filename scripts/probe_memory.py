"""Where a ``cdq`` command's resident memory peaks: run it in this process and sample it.

A thread reads ``/proc/self/status`` (VmRSS, VmHWM) every ``--interval`` seconds together with
the main thread's stack (``sys._current_frames``); at the end it prints the peak, the stack at the
peak, and, per place in cdq (the innermost ``cdq_cli`` frame and the frame below it), the largest
resident size seen there, so what sets the peak is named rather than guessed. It also prints the
largest VmRSS per phase of the block loop (``quantize block 3``, ``forward head``: read from the
driver's frames, :func:`phase`) and, with ``--cuda``, the largest allocated GPU memory per phase
(``torch.cuda.max_memory_allocated`` read and reset at every sample, so each sample's figure is
the peak since the one before):

    python scripts/probe_memory.py -- quantize MODEL --method rtn ... --output OUT
    python scripts/probe_memory.py --top 15 --json trace.json -- eval OUT --data TEXT
    python scripts/probe_memory.py --cuda --json gpu.json -- quantize MODEL --device cuda ...

The sampled command runs exactly as ``python -m cdq_cli ARGS`` would (same entry point); the probe
adds one sleeping thread and a few kB of samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in wanted:
                values[key] = int(rest.split()[0]) * 1024
    return values


def where(frame) -> tuple[str, str]:
    """(the innermost cdq_cli frame, the innermost frame of all) of a stack, as file:function:line."""
    stack = traceback.extract_stack(frame)
    inner = stack[-1]
    ours = next((f for f in reversed(stack) if "/cdq_cli/" in f.filename), inner)

    def name(f) -> str:
        path = f.filename.split("/cdq_cli/")[-1] if "/cdq_cli/" in f.filename else Path(f.filename).name
        return f"{path}:{f.name}:{f.lineno}"

    return name(ours), name(inner)


PASSES = {"quantize_model": "quantize", "forward_blocks": "forward"}


def phase(frame) -> str:
    """Which part of cdq's block loop a stack is in: ``quantize block 3``, ``forward embeddings``,
    ``forward head``, or ``outside the block loop`` (loading, writing, scoring)."""
    inner = None
    while frame is not None:
        code, file = frame.f_code.co_name, frame.f_code.co_filename
        if "/cdq_cli/" in file:
            if inner is None and code == "capture" and file.endswith("pipeline.py"):
                inner = "embeddings"
            elif inner is None and code == "head" and "/models/" in file:
                inner = "head"
            elif code in PASSES and file.endswith("pipeline.py"):
                index = frame.f_locals.get("index")
                where = inner or (f"block {index}" if index is not None else "embeddings")
                return f"{PASSES[code]} {where}"
        frame = frame.f_back
    return "outside the block loop"


class Sampler(threading.Thread):
    def __init__(self, interval: float, cuda: bool = False) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.cuda = cuda
        self.samples: list[dict] = []
        self.peak: dict | None = None
        self.stop = threading.Event()
        self.main = threading.main_thread().ident
        self.began = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)

    def sample(self) -> None:
        values = status()
        frame = sys._current_frames().get(self.main)
        ours, inner = where(frame) if frame is not None else ("?", "?")
        sample = {
            "t": round(time.perf_counter() - self.began, 3),
            **values,
            "cdq": ours,
            "inner": inner,
            "phase": phase(frame) if frame is not None else "?",
        }
        if self.cuda:
            import torch

            if torch.cuda.is_initialized():
                sample["cuda_peak"] = int(torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
        self.samples.append(sample)
        if self.peak is None or values["VmRSS"] > self.peak["VmRSS"]:
            self.peak = {**sample, "stack": traceback.format_stack(frame)[-14:] if frame else []}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--top", type=int, default=12, help="How many places to list.")
    parser.add_argument("--json", type=Path, default=None, help="Write every sample here.")
    parser.add_argument("--cuda", action="store_true", help="Also sample the GPU's allocated memory.")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the cdq command and its arguments")
    options = parser.parse_args()
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    sampler = Sampler(options.interval, options.cuda)
    sampler.start()
    from cdq_cli.cli import main as cdq_main

    try:
        code = cdq_main(args)
    finally:
        sampler.stop.set()
        sampler.join()
        sampler.sample()
    mib = 2**20
    final = status()
    places: dict[tuple[str, str], dict] = {}
    for sample in sampler.samples:
        key = (sample["cdq"], sample["inner"])
        entry = places.setdefault(key, {"rss": 0, "first": sample["t"], "count": 0})
        entry["rss"] = max(entry["rss"], sample["VmRSS"])
        entry["count"] += 1
    print(
        f"exit {code}; VmHWM {final['VmHWM'] / mib:.0f} MiB; {len(sampler.samples)} samples", file=sys.stderr
    )
    peak = sampler.peak or {}
    print(
        f"largest sampled VmRSS {peak.get('VmRSS', 0) / mib:.0f} MiB "
        f"(anon {peak.get('RssAnon', 0) / mib:.0f}, file {peak.get('RssFile', 0) / mib:.0f}) "
        f"at {peak.get('t')} s, in:",
        file=sys.stderr,
    )
    print("".join(peak.get("stack", [])).rstrip(), file=sys.stderr)
    print("| largest VmRSS MiB | first seen s | samples | cdq frame | innermost frame |", file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    ranked = sorted(places.items(), key=lambda item: -item[1]["rss"])[: options.top]
    for (ours, inner), entry in ranked:
        print(
            f"| {entry['rss'] / mib:.0f} | {entry['first']:.1f} | {entry['count']} | {ours} | {inner} |",
            file=sys.stderr,
        )
    phases: dict[str, dict] = {}  # per phase: largest VmRSS, largest GPU peak, time spent there
    for sample, after in zip(sampler.samples, [*sampler.samples[1:], None], strict=True):
        entry = phases.setdefault(sample["phase"], {"rss": 0, "cuda": None, "first": sample["t"], "s": 0.0})
        entry["rss"] = max(entry["rss"], sample["VmRSS"])
        entry["s"] += (after["t"] - sample["t"]) if after is not None else 0.0
        if "cuda_peak" in sample:
            entry["cuda"] = max(entry["cuda"] or 0, sample["cuda_peak"])
    print("| phase | largest VmRSS MiB | largest GPU MiB | first seen s | seconds |", file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for label, entry in phases.items():
        gpu = "" if entry["cuda"] is None else f"{entry['cuda'] / mib:.0f}"
        print(
            f"| {label} | {entry['rss'] / mib:.0f} | {gpu} | {entry['first']:.1f} | {entry['s']:.1f} |",
            file=sys.stderr,
        )
    if options.json is not None:
        payload = {"peak": peak, "phases": phases, "samples": sampler.samples}
        options.json.write_text(json.dumps(payload) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
