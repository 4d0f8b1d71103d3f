"""Run a GGUF file in llama.cpp (llama-cpp-python) and save what it computed; executed by
tests/test_gguf_llama_cpp.py with the Python of the llama-cpp-python venv (``make test-gguf``),
which has numpy and llama_cpp but neither torch nor cdq.

    python llama_cpp_probe.py MODEL.gguf REQUEST.json OUT.npz

REQUEST: {"windows": [[ids...], ...], "prompt": [ids...], "greedy": N, "text": "...",
"nll_only": bool, "threads": T}. OUT holds ``nll`` (windows,) the mean next-token NLL of each
window, and unless ``nll_only``: ``logits`` (windows, length, vocab) float32, ``greedy`` (N,) the
greedy continuation of the prompt, ``tokens`` llama.cpp's own tokenization of ``text`` (special
tokens added as the file says).
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
    greedy_n = request.get("greedy", 0)
    n_ctx = max(max(len(w) for w in windows), len(request.get("prompt", [])) + greedy_n) + 8
    threads = int(request.get("threads", 2))
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=threads)
    logits, nll = [], []
    for window in windows:
        llm.reset()
        llm.eval(window)
        scores = np.array(llm.scores[: len(window)], dtype=np.float64)
        shifted = scores[:-1] - scores[:-1].max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        nll.append(-logp[np.arange(len(window) - 1), np.array(window[1:])].mean())
        if not request.get("nll_only"):
            logits.append(scores.astype(np.float32))
    result = {"nll": np.array(nll)}
    if not request.get("nll_only"):
        llm.reset()
        tokens = list(request["prompt"])
        llm.eval(tokens)
        greedy = []
        for _ in range(greedy_n):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(nxt)
            llm.eval([nxt])
        text = llm.tokenize(request["text"].encode("utf-8"), add_bos=True, special=False)
        result.update(logits=np.stack(logits), greedy=np.array(greedy), tokens=np.array(text))
    np.savez(out, **result)


if __name__ == "__main__":
    main()
