"""Per-token loss-gradient weights of every Linear of a Llama-family model (issue 19 experiment).

For each Linear z = W x in the decoder layers, a_n = ||dL/dz_n||^2 for every calibration token n
(L: the summed next-token loss of the full-precision model on the calibration windows), the
weights of GuidedQuant's objective sum_n a_n (dW x_n)^2; with ``--groups G`` the squared gradient
is summed over G contiguous slices of the output channels instead (one weight per token and
slice). The gradient norm is unchanged by cdq's Hadamard transform (R1 rotates o_proj/down_proj
outputs, R2 rotates v_proj's within each head: orthogonal maps), so the weights are computed on
the untransformed model; per-slice weights of o_proj/down_proj are not (the rotated residual mixes
the slices), so with ``--groups`` those two get the total in every slice.

Saved as {"<block>.<layer>": tensor (nsamples, seqlen) or (nsamples, seqlen, G)}, read by the
pipeline patches next to this file (``CDQ_TOKW`` / ``CDQ_TOKWG``): README.md says how to run it.

    python scripts/experiments/token_weights/weights.py ~/.cache/cdq/smollm2-135m-instruct /tmp/tokw.pt
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cdq_cli.calib import calibration_windows, load_texts

ROTATED_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--calib", default="../shared/data/text/c4-sample.jsonl")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups", type=int, default=0, help="slices of the output channels (0: none)")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    windows = calibration_windows(
        load_texts(args.calib), tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed
    )
    found: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        def on_grad(grad: torch.Tensor) -> None:
            squared = grad.detach().pow(2)
            if args.groups:
                squared = squared.unflatten(-1, (args.groups, -1))
            found.setdefault(name, []).append(squared.sum(-1))

        def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
            output.register_hook(on_grad)  # a forward hook that returned something would replace the output

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.register_forward_hook(record(name))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # so that the graph reaches every layer
    for batch in windows.split(args.batch):  # each layer's hook fires once per batch, in batch order
        output = model(batch, labels=batch)
        output.loss.backward()
        print(f"loss {output.loss.item():.4f}", flush=True)
    weights = {}
    for name, parts in found.items():
        block, layer = name.split(".layers.")[1].split(".", 1)
        value = torch.cat(parts)
        if args.groups and layer in ROTATED_OUTPUTS:
            value = value.sum(-1, keepdim=True).expand_as(value).clone()
        weights[f"{block}.{layer}"] = value
    torch.save(weights, args.out)
    print(f"wrote {len(weights)} layers' weights to {args.out}")


if __name__ == "__main__":
    main()
