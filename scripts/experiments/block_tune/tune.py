"""Experiment (issue 19): does a block-output pass after cdq's layer solutions lower perplexity?

Not part of cdq. Starting from a cdq output (its codes and per-row scales, read back from the
dequantized weights) and the same model's rotated full-precision weights, each decoder block in
turn is tuned so that its output on the quantized model's stream matches the full-precision
block's output on the full-precision stream (AutoRound's objective and its signed-gradient steps),
over the rounding offsets ``V`` (a weight's code is ``round(W/s + V)``, started at cdq's code,
with ``W/s + V`` placed as close to ``W/s`` as ``--margin`` allows) and a per-row log-scale ``a``
(``Ŵ = s·e^a·code``). The best step's weights (lowest mini-batch loss) replace cdq's only if their
block-output MSE over all windows is lower; the tuned model is written as a plain float32
checkpoint for ``cdq eval`` (README.md beside this file has the figures' commands):

    cdq quantize MODEL --method rtn --bits 16 --transform hadamard --seed 0 ... --output FP_ROT
    cdq quantize MODEL --method cdq --bits 4 --sym --transform hadamard --seed 0 ... --output Q
    python scripts/experiments/block_tune/tune.py --fp FP_ROT --quant Q --bits 4 --out TUNED
    cdq eval TUNED --data TEXT --seqlen 512 --max-windows 40 --dtype float32

(``--bits 16`` with the same ``--transform`` and ``--seed`` writes the rotated full-precision model.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "scripts" / "peers"))

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def tune_block(fp_block, q_block, x_q, y, kwargs, args) -> tuple[dict, float, float, int]:
    """The block's tuned weights, its block-output MSE (over all windows) before and after, and how
    many codes differ from cdq's."""
    from protocol import row_scales

    low, high = -(2 ** (args.bits - 1)), 2 ** (args.bits - 1) - 1
    scale_lr = args.lr if args.scale_lr is None else args.scale_lr
    params = {}
    for name in LINEARS:
        w = fp_block.get_submodule(name).weight.detach().double()
        w_hat = q_block.get_submodule(name).weight.detach().double()
        s, off = row_scales(w_hat, args.bits)
        if float(off.max()) > 0.02:
            raise SystemExit(f"{name}: weights off their grid by {float(off.max()):.3f}")
        k0 = (w_hat / s).round().clamp(low, high)
        x = w / s
        # rounds to k0, as near W/s as a margin of 0.5 - args.margin from a flip allows
        start = torch.minimum(torch.maximum(x, k0 - args.margin), k0 + args.margin)
        params[name] = {
            "x": x.float(),
            "s": s.float(),
            "k0": k0.float(),
            "v": (start - x).float().requires_grad_(True),
            "a": torch.zeros_like(s, dtype=torch.float32, requires_grad=True),
        }

    def weights() -> dict:
        out = {}
        for name, p in params.items():
            z = p["x"] + p["v"]
            code = (z + (z.round() - z).detach()).clamp(
                low, high
            )  # rounding with a straight-through gradient
            out[name + ".weight"] = p["s"] * p["a"].exp() * code
        return out

    def loss_on(batch, weights_now) -> torch.Tensor:
        out = functional_call(q_block, weights_now, (x_q[batch],), kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return torch.nn.functional.mse_loss(out, y[batch])

    def full_loss(weights_now) -> float:
        with torch.no_grad():
            spans = range(0, len(x_q), args.batch)
            return sum(float(loss_on(slice(i, i + args.batch), weights_now)) for i in spans) / len(spans)

    start_loss = full_loss(weights())
    best_loss, best = float("inf"), None
    for step in range(args.iters):
        loss = loss_on(torch.randperm(len(x_q))[: args.batch], weights())
        if loss.item() < best_loss:
            best_loss, best = (
                loss.item(),
                {n: (p["v"].detach().clone(), p["a"].detach().clone()) for n, p in params.items()},
            )
        loss.backward()
        if args.debug:
            flips = sum(
                int(((p["x"] + p["v"]).round().clamp(low, high) != p["k0"]).sum()) for p in params.values()
            )
            print(f"  step {step}: loss {loss.item():.5g}, {flips} codes changed", flush=True)
        decay = 1 - step / args.iters
        with torch.no_grad():
            for p in params.values():
                p["v"] -= args.lr * decay * p["v"].grad.sign()
                p["a"] -= scale_lr * decay * p["a"].grad.sign()
                p["v"].grad = p["a"].grad = None
    with torch.no_grad():
        for name, (v, a) in best.items():
            params[name]["v"].copy_(v)
            params[name]["a"].copy_(a)
        final = {k: t.detach() for k, t in weights().items()}
        changed = sum(
            int(((p["x"] + p["v"]).round().clamp(low, high) != p["k0"]).sum()) for p in params.values()
        )
    return final, start_loss, full_loss(final), changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp", type=Path, required=True)
    parser.add_argument("--quant", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--scale-lr", type=float, default=None, help="default: --lr")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--margin", type=float, default=0.4, help="start W/s + V at most this far from cdq's code"
    )
    parser.add_argument("--debug", action="store_true", help="print every step's loss and changed codes")
    parser.add_argument("--blocks", type=int, default=None, help="tune only the first N blocks")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    from protocol import c4_path, cdq_windows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cdq_cli.store.reopen import load_quantized

    began = time.process_time()
    fp = AutoModelForCausalLM.from_pretrained(str(args.fp), torch_dtype=torch.float32).eval()
    quant, _ = load_quantized(args.quant, torch.float32)
    quant.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.fp))
    windows = cdq_windows(tokenizer, c4_path(), args.nsamples, args.seqlen, args.seed)

    # the decoder layers' keyword arguments (rotary embeddings, mask), captured once
    captured: dict = {}

    def grab(_module, call_args, kwargs):
        captured.setdefault("kwargs", kwargs)
        raise StopIteration

    handle = fp.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            fp(windows[: args.batch], use_cache=False)
    except StopIteration:
        pass
    handle.remove()
    dropped = ("hidden_states", "past_key_values", "past_key_value", "use_cache")  # no cache between calls
    kwargs = {k: v for k, v in captured["kwargs"].items() if k not in dropped}

    def run(block, hidden):
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        x_fp = torch.cat(
            [fp.model.embed_tokens(windows[i : i + args.batch]) for i in range(0, len(windows), args.batch)]
        )
    x_q = x_fp.clone()
    log = []
    count = len(fp.model.layers) if args.blocks is None else args.blocks
    for index in range(count):
        fp_block, q_block = fp.model.layers[index], quant.model.layers[index]
        with torch.no_grad():
            y = torch.cat([run(fp_block, x_fp[i : i + args.batch]) for i in range(0, len(x_fp), args.batch)])
        final, start_loss, end_loss, changed = tune_block(fp_block, q_block, x_q, y, kwargs, args)
        with torch.no_grad():
            keep = end_loss < start_loss
            if keep:
                for name in LINEARS:
                    q_block.get_submodule(name).weight.copy_(final[name + ".weight"])
            x_q = torch.cat([run(q_block, x_q[i : i + args.batch]) for i in range(0, len(x_q), args.batch)])
            x_fp = y
        log.append({"block": index, "start": start_loss, "end": end_loss, "kept": keep, "changed": changed})
        verdict = "kept" if keep else "dropped"
        print(
            f"block {index}: block-output MSE {start_loss:.5g} -> {end_loss:.5g} ({verdict}), "
            f"{changed} codes changed, {time.process_time() - began:.0f} CPU s",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    quant.save_pretrained(str(args.out), safe_serialization=True)
    tokenizer.save_pretrained(str(args.out))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    summary = {"args": settings, "blocks": log, "cpu_seconds": time.process_time() - began}
    (args.out / "tune.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}; {time.process_time() - began:.0f} CPU s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
