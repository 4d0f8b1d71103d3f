"""llama-imatrix's statistic, reimplemented: for every matrix of a Llama, the sum of its squared
inputs over the calibration tokens and the token count, written as llama.cpp's imatrix GGUF
(``NAME.in_sum2``, ``NAME.counts``; llama-quantize divides one by the other). Checked against
llama-imatrix itself by tests/test_gguf_llama_cpp.py.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch


@torch.no_grad()
def imatrix_sums(
    model: torch.nn.Module, windows: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(sum of squared inputs, token count) per GGUF tensor name, the model run on each window."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            target = f"{names.get_name(name)}.weight"

            def hook(_module, args, target=target):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[target] = sums.get(target, 0) + x.pow(2).sum(dim=0)
                counts[target] = counts.get(target, 0) + x.shape[0]

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        for window in windows:
            model(window.unsqueeze(0))
    finally:
        for handle in hooks:
            handle.remove()
    return sums, counts


def write_imatrix(
    path: Path, sums: dict[str, torch.Tensor], counts: dict[str, int], *, chunks: int, chunk_size: int
) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["cdq calibration windows"])
    writer.add_uint32("imatrix.chunk_count", chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for target in sums:
        writer.add_tensor(f"{target}.in_sum2", sums[target].float().numpy())
        writer.add_tensor(f"{target}.counts", torch.tensor([float(counts[target])]).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_imatrix(path: Path) -> dict[str, torch.Tensor]:
    """{tensor name: mean squared input} of an imatrix GGUF (llama-imatrix's or ours)."""
    reader = gguf.GGUFReader(path)
    raw = {t.name: torch.from_numpy(t.data.copy()).reshape(-1).double() for t in reader.tensors}
    return {
        name.removesuffix(".in_sum2"): raw[name] / raw[name.removesuffix(".in_sum2") + ".counts"][0]
        for name in raw
        if name.endswith(".in_sum2")
    }
