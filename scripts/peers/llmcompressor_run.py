"""llm-compressor (vLLM project) on the shared calibration windows, symmetric per-channel; writes a
dequantized float32 folder for ``cdq eval``. Runs in ``.venv-peer-llmcompressor``.

    .venv-peer-llmcompressor/bin/python scripts/peers/llmcompressor_run.py --bits 3 --recipe gptq \
        --calib runs/peers/calib-c4-32x512-seed0.safetensors --out runs/peers/llmc-gptq-w3

Recipes (every modifier at its defaults except the grid; ``lm_head`` and embeddings stay FP):

- ``gptq``: ``GPTQModifier`` (block 128, dampening 0.01, its default static act-order).
- ``spinquant-gptq``: ``SpinQuantModifier(rotations=["R1", "R2"])`` (mergeable rotations: norms
  fused into the following Linears, embeddings centred, R1 on the residual stream, R2 per head
  between v_proj and o_proj) before the same ``GPTQModifier``. Its default ``transform_type``
  ``"hadamard"`` is Sylvester's construction (powers of two only) and SmolLM2's hidden size is 576,
  so ``--transform-type`` defaults to ``random-hadamard`` (576 = 36 x 16, a Hadamard that
  compressed-tensors ships); ``hadamard`` can be asked for to see the refusal.
- ``awq``: ``AWQModifier()`` (duo scaling, 20-point grid) then ``QuantizationModifier`` (min-max
  round to nearest) on the same grid.

On a machine without a GPU, ``AWQModifier`` (0.14.0.1) fails in ``_apply_smoothing``: it pins its
cached activations with ``Tensor.pin_memory()`` unconditionally, which needs a CUDA driver
("RuntimeError: Found no NVIDIA driver on your system"). Pinning only speeds host-to-device copies,
so where no accelerator is available ``IntermediatesCache.pin_memory`` is made a no-op here (the
arithmetic is unchanged); ``--no-cpu-fix`` runs the tool unpatched.

The grid is compressed-tensors' ``int``, ``symmetric: true``, ``strategy: channel`` at ``--bits``.
After ``oneshot`` every quantized Linear's weight is fake-quantized with its own scale (what the
in-memory model computes in its forward) and written as plain float32 weights; the written
weights are checked to give the in-memory model's logits on one calibration window.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peer_common as common  # noqa: E402  (sets one thread and offline before torch)
import torch  # noqa: E402

RECIPES = ("gptq", "spinquant-gptq", "awq")


def grid(bits: int) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel"}
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def recipe_of(name: str, bits: int, transform_type: str) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SpinQuantModifier

    if name == "gptq":
        return [GPTQModifier(config_groups=grid(bits), ignore=["lm_head"])]
    if name == "spinquant-gptq":
        spin = SpinQuantModifier(rotations=["R1", "R2"], transform_type=transform_type)
        return [spin, GPTQModifier(config_groups=grid(bits), ignore=["lm_head"])]
    return [AWQModifier(), QuantizationModifier(config_groups=grid(bits), ignore=["lm_head"])]


@torch.no_grad()
def dequantized_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """The plain (HF) state of the quantized model: every quantized Linear's weight replaced by
    its fake-quantized value; quantization and transform parameters dropped."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    state = {}
    quantized = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        for pname, param in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if pname == "weight" and scheme is not None and scheme.weights is not None:
                param = forward_quantize(module, param.data, "weight", scheme.weights)
                quantized += 1
            state[key] = param.detach().clone()
        for bname, buffer in module.named_buffers(recurse=False):
            key = f"{name}.{bname}" if name else bname
            state[key] = buffer.detach().clone()
    return state, quantized


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/cdq/smollm2-135m-instruct")
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--bits", type=int, choices=(2, 3, 4, 8), required=True)
    parser.add_argument("--recipe", choices=RECIPES, required=True)
    parser.add_argument("--transform-type", default="random-hadamard", help="SpinQuant's transform_type")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-cpu-fix", action="store_true", help="keep AWQ's unconditional pin_memory")
    args = parser.parse_args()

    torch_version = common.check_torch()
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    patched = not args.no_cpu_fix and not torch.cuda.is_available()
    if patched:
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    torch.manual_seed(0)
    ids = common.read_calib(args.calib)
    model, tokenizer = common.load_fp(args.model)
    nsamples, seqlen = ids.shape
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    began = time.process_time()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=recipe_of(args.recipe, args.bits, args.transform_type),
        dataset=data,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
    )
    print(f"# llmcompressor oneshot: {time.process_time() - began:.0f} CPU s", flush=True)

    state, quantized = dequantized_state(model)
    config = model.config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    names = set(plain.state_dict())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    keep = {k: v for k, v in state.items() if k in names}
    missing = names - set(keep) - ({"lm_head.weight"} if tied else set())
    if missing:
        raise SystemExit(f"quantized model lacks {sorted(missing)[:5]}")
    plain.load_state_dict(keep, strict=False)
    if tied:
        plain.tie_weights()
    window = ids[:1]
    reference = model(window).logits.float()
    written = plain(window).logits.float()
    diff = float((reference - written).abs().max())
    scale = float(reference.abs().max())
    if not diff <= 1e-3 * scale:
        raise SystemExit(f"written weights do not reproduce the quantized model: max |Δlogit| {diff:.3g}")
    if tied:
        keep.pop("lm_head.weight", None)
    record = {
        "tool": "llmcompressor",
        "version": llmcompressor.__version__,
        "torch": torch_version,
        "recipe": args.recipe,
        "modifiers": [type(m).__name__ for m in recipe_of(args.recipe, args.bits, args.transform_type)],
        "transform_type": args.transform_type if args.recipe == "spinquant-gptq" else None,
        "bits": args.bits,
        "grid": grid(args.bits)["group_0"]["weights"],
        "quantized_linears": quantized,
        "tie_word_embeddings": tied,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "logits_max_abs_diff_vs_in_memory": diff,
        "pin_memory_disabled": patched,
        "calib": str(args.calib),
    }
    common.write_folder(keep, config.to_dict(), tokenizer, args.out, record)
    print(f"# wrote {args.out} ({quantized} quantized Linears; written vs in-memory logits {diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
