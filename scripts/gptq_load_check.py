"""Load a cdq GPTQ export with transformers (optimum + gptqmodel) and compare it with cdq's output.

    PYTHONPATH=$CDQ_GPTQ_SITE .venv/bin/python scripts/gptq_load_check.py OUT OUT-gptq \
        --data ../shared/data/text/wikitext2-raw-test.txt --seqlen 512 --max-windows 20

Prints one JSON line: perplexity of the native cdq folder (cdq's loader) and of the GPTQ export
(transformers + gptqmodel's torch kernel, CPU) on the same windows, and the largest weight
difference after float16 rounding. gptqmodel stays out of the project's venv (it pulls torchao,
which makes every transformers import print warnings): install it with ``pip install --target``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, GPTQConfig

from cdq_cli.calib import evaluation_ids, load_texts
from cdq_cli.evaluate.perplexity import perplexity
from cdq_cli.store.folder import read_table
from cdq_cli.store.reopen import load_quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("native")
    parser.add_argument("export")
    parser.add_argument("--data", required=True)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=20)
    args = parser.parse_args()

    native, tokenizer = load_quantized(args.native)
    ids = evaluation_ids(load_texts(args.data), tokenizer)
    bits = read_table(args.native)["bits"]
    began = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(
        args.export, dtype=torch.float32, quantization_config=GPTQConfig(bits=bits, backend="torch")
    ).eval()
    load_seconds = time.perf_counter() - began
    worst = 0.0
    for name, module in loaded.named_modules():
        if hasattr(module, "qzeros"):
            mine = native.get_submodule(name).weight.detach()
            theirs = module.dequantize_weight().T.float()
            worst = max(worst, float(((theirs - mine).abs() / mine.abs().max()).max()))
    common = {"seqlen": args.seqlen, "max_windows": args.max_windows, "device": "cpu", "batch_size": 4}
    result = {
        "native_ppl": perplexity(native, ids, **common).ppl,
        "gptq_ppl": perplexity(loaded, ids, **common).ppl,
        "max_weight_diff_vs_layer_max": worst,
        "kernel": type(next(m for m in loaded.modules() if hasattr(m, "qzeros"))).__name__,
        "load_seconds": round(load_seconds, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
