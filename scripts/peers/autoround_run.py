"""AutoRound (Intel ``auto-round``) on the shared calibration windows, symmetric per-channel;
writes a dequantized float32 folder for ``cdq eval``. Runs in ``.venv-peer-autoround``.

    .venv-peer-autoround/bin/python scripts/peers/autoround_run.py --bits 3 --recipe default \
        --calib runs/peers/calib-c4-32x512-seed0.safetensors --out runs/peers/autoround-default-w3

Recipes are AutoRound's own (``auto_round/cli/main.py`` RECIPES): ``default`` = 200 iterations
(lr 1/iters), ``light`` = 50 iterations at lr 5e-3; both batch size 8. The calibration is the
protocol's 32 x 512 windows (not the recipes' 128 x 2048), for every tool alike. Everything else is
AutoRound's default, including its tuning dtype on this CPU (``amp``: bfloat16 where the CPU has
avx512_bf16, recorded in peer.json). ``--blocks N`` quantizes only the first N decoder blocks (a
timing trial; its output is not a full model and is not written).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peer_common as common  # noqa: E402  (sets one thread and offline before torch)
import torch  # noqa: E402

RECIPES = {"default": {"iters": 200, "lr": None}, "light": {"iters": 50, "lr": 5e-3}}


@torch.no_grad()
def dequantized_state(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The model as a deployed AutoRound checkpoint holds it, in float32.

    After ``quantize()`` each quantized Linear carries its tuned per-row ``scale`` (float16) and
    ``zp`` (2^(bits-1) for a symmetric grid) and a weight fake-quantized in the tuning dtype
    (bfloat16 on this CPU). Its codes are ``round(weight / scale)`` and the written weight is
    ``code * scale`` in float32: what the packed export (int codes and float16 scales) dequantizes
    to. Every other tensor (embeddings, norms) is AutoRound's untouched FP32 original; that it is
    untouched is checked (equal to the original after the tuning dtype's rounding).

    (AutoRound 0.16.1's own ``format="fake"`` export cannot be used here: for a float32 model it
    "restores" every tensor cast to bfloat16 to its FP32 original, the quantized Linear weights
    included, so it writes the full-precision model; ``protocol.py grid`` caught that.)
    """
    state, codes_off, linears = {}, 0.0, 0
    for name, module in model.named_modules():
        scale = getattr(module, "scale", None)
        if isinstance(module, torch.nn.Linear) and isinstance(scale, torch.Tensor) and module.bits < 16:
            weight = module.weight.detach().float()
            s = scale.detach().float().reshape(weight.shape[0], -1)
            ratio = weight / s
            codes = ratio.round()
            half = 2 ** (module.bits - 1)
            if codes.min() < -half or codes.max() > half - 1:
                raise SystemExit(f"{name}: codes outside [-{half}, {half - 1}]")
            codes_off = max(codes_off, float((ratio - codes).abs().max()))
            state[f"{name}.weight"] = codes * s
            linears += 1
    params = dict(model.named_parameters())
    for key, value in original.items():
        if key in state:
            continue
        current = params.get(key)
        if current is not None and not torch.equal(current.detach().float(), value.to(current.dtype).float()):
            raise SystemExit(f"{key} was changed by AutoRound but is not a quantized Linear")
        state[key] = value
    return state, {"quantized_linears": linears, "max_code_rounding": round(codes_off, 6)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/cdq/smollm2-135m-instruct")
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--bits", type=int, choices=(2, 3, 4, 8), required=True)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    parser.add_argument("--blocks", type=int, help="timing trial: only the first N blocks, nothing written")
    parser.add_argument("--iters", type=int, help="override the recipe's iterations (smoke tests only)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.blocks is None and args.out is None:
        parser.error("--out is required unless --blocks (a timing trial)")

    torch_version = common.check_torch()
    import auto_round
    from auto_round import AutoRound

    ids = common.read_calib(args.calib)
    model, tokenizer = common.load_fp(args.model)
    pad = tokenizer.pad_token_id
    if pad is not None and bool((ids == pad).any()):
        # AutoRound masks pad-token positions out of attention and loss; none may be in the windows.
        raise SystemExit(f"calibration windows contain the pad token id {pad}")
    recipe = dict(RECIPES[args.recipe])
    if args.iters is not None:
        recipe["iters"] = args.iters
    nsamples, seqlen = ids.shape
    blocks = None
    if args.blocks is not None:
        blocks = [[f"model.layers.{i}" for i in range(args.blocks)]]  # AutoRound's list of block lists
    began = time.process_time()
    ar = AutoRound(
        model,
        tokenizer=tokenizer,
        scheme={"bits": args.bits, "group_size": -1, "sym": True, "data_type": "int"},
        dataset=[row.unsqueeze(0) for row in ids],  # the protocol's windows, one per item
        nsamples=nsamples,
        seqlen=seqlen,
        batch_size=8,
        iters=recipe["iters"],
        lr=recipe["lr"],
        device_map="cpu",
        seed=42,
        to_quant_block_names=blocks,
    )
    quantized_model = ar.quantize()[0]
    print(f"# autoround quantize: {time.process_time() - began:.0f} CPU s", flush=True)
    if args.blocks is not None:
        return 0
    from safetensors.torch import load_file

    original = {}  # the FP32 checkpoint, read again from disk (no second copy held while tuning)
    for file in sorted(args.model.glob("*.safetensors")):
        original.update(load_file(file))
    state, check = dequantized_state(quantized_model, original)
    amp_dtype = str(getattr(getattr(ar, "model_context", None), "amp_dtype", "unknown"))
    record = {
        "tool": "auto-round",
        "version": auto_round.__version__,
        "torch": torch_version,
        "recipe": args.recipe,
        **recipe,
        "bits": args.bits,
        "group_size": -1,
        "sym": True,
        "batch_size": 8,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "tuning_dtype": amp_dtype,
        "calib": str(args.calib),
        **check,
    }
    common.write_folder(state, model.config.to_dict(), tokenizer, args.out, record)
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
