"""Run a GGUF file in llama.cpp (llama-cpp-python) and save what it computed; executed by
tests/test_gguf_llama_cpp.py with the Python of the llama-cpp-python venv (``make test-gguf``),
which has numpy and llama_cpp but neither torch nor cdq.

    python llama_cpp_probe.py MODEL.gguf REQUEST.json OUT.npz

REQUEST: {"windows": [[ids...], ...], "prompt": [ids...], "greedy": N, "text": "..."}. OUT holds
``logits`` (windows, length, vocab) float32, ``greedy`` (N,) the greedy continuation of the prompt,
``tokens`` llama.cpp's own tokenization of ``text`` (special tokens added as the file says).
"""

from __future__ import annotations

import json
import sys

import llama_cpp
import numpy as np


def main() -> None:
    path, request_file, out = sys.argv[1:4]
    request = json.loads(open(request_file, encoding="utf-8").read())
    windows = request["windows"]
    n_ctx = max(max(len(w) for w in windows), len(request["prompt"]) + request["greedy"]) + 8
    llm = llama_cpp.Llama(
        path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0
    )
    logits = []
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits.append(np.array(llm.scores[: len(window)], dtype=np.float32))
    llm.reset()
    tokens = list(request["prompt"])
    llm.eval(tokens)
    greedy = []
    for _ in range(request["greedy"]):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(nxt)
        llm.eval([nxt])
    text = llm.tokenize(request["text"].encode("utf-8"), add_bos=True, special=False)
    np.savez(out, logits=np.stack(logits), greedy=np.array(greedy), tokens=np.array(text))


if __name__ == "__main__":
    main()
