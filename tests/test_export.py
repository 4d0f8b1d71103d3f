"""GPTQ export: the round trip through an independent reader, refusals, the CLI, and (where gptqmodel
is installed) transformers loading the export.

The reference reader below is written from the GPTQ format's description, not from cdq's packing:
``qweight`` (in·bits/32, out) holds, per output column, the codes of consecutive input rows as one
little-endian bit stream over int32 words (value k at stream bits k·bits…); ``qzeros`` (G,
out·bits/32) holds the zero-points the same way along the output dim, minus 1 in the v1 format;
``scales`` (G, out) are float16; ``g_idx[i]`` is input row i's group. Dequantized:
``W[o, i] = scales[g_idx[i], o] · (q[i, o] − (qzeros[g_idx[i], o] + 1))``. GPTQ stores scales in
float16, so the reference is cdq's Ŵ computed with float16-rounded scales, and it must match EXACTLY.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_lm import save_tiny, tiny_model

from cdq_cli.cli import main
from cdq_cli.models import adapter_for, load_causal_lm
from cdq_cli.pipeline import quantize_model
from cdq_cli.run.plan import make_settings
from cdq_cli.solvers import GridSpec
from cdq_cli.store.folder import read_layers, save_quantized
from cdq_cli.store.gptq import ExportError, check_shape, export_gptq, gptq_tensors
from cdq_cli.store.layer import QuantizedLayer

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


def reference_unpack(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Codes packed along ``dim`` of an int32 tensor, read bit by bit from the word stream."""
    words = words.movedim(dim, -1)
    unsigned = words.to(torch.int64) & 0xFFFFFFFF  # int32 words as unsigned 32-bit integers
    mask = (1 << bits) - 1
    values = []
    for k in range(count):
        first_bit = k * bits
        word, shift = first_bit // 32, first_bit % 32
        value = unsigned[..., word] >> shift
        if shift + bits > 32:  # the value continues in the low bits of the next word
            value = value | (unsigned[..., word + 1] << (32 - shift))
        values.append(value & mask)
    return torch.stack(values, dim=-1).movedim(-1, dim)


def reference_dequantize(tensors: dict[str, torch.Tensor], bits: int, v2: bool = False) -> torch.Tensor:
    """(out, in) float64 weight from one layer's GPTQ tensors."""
    columns, out = tensors["qweight"].shape[0] * 32 // bits, tensors["qweight"].shape[1]
    codes = reference_unpack(tensors["qweight"], bits, columns, dim=0)  # (in, out)
    stored = reference_unpack(tensors["qzeros"], bits, out, dim=1)  # (groups, out)
    zeros = stored if v2 else stored + 1
    g_idx = tensors["g_idx"].long()
    scales = tensors["scales"].to(torch.float64)
    return (scales[g_idx] * (codes - zeros[g_idx]).to(torch.float64)).T


def cdq_weight_with_fp16_scales(layer: QuantizedLayer) -> torch.Tensor:
    rounded = QuantizedLayer(
        layer.name,
        layer.spec,
        layer.shape,
        layer.qweight,
        layer.scales.to(torch.float16).to(torch.float64),
        layer.zeros.to(torch.float64),
    )
    return rounded.dequantize()


def quantized_folder(tmp_path: Path, family: str, **settings) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(family)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    base = {"method": "gptq", "bits": 4, "device": "cpu"} | settings
    outcome = quantize_model(model, adapter_for(model), list(ids.split(2)), make_settings(**base))
    info = {"method": base["method"], "bits": base["bits"], "group_size": base.get("group_size")}
    return save_quantized(tmp_path / "q", model, outcome.layers, info=info), model


CASES = {
    "opt-w4g16-gptq": ("opt", {"bits": 4, "group_size": 16}),
    "opt-w3-rtn": ("opt", {"method": "rtn", "bits": 3}),  # 3-bit values straddle int32 words
    "bloom-w2g32-sym": ("bloom", {"method": "rtn", "bits": 2, "group_size": 32, "sym": True}),
    "opt-w8-quantease": ("opt", {"method": "quantease", "bits": 8, "options": {"sweeps": 2}}),
    "llama-w4-comq-per-layer": ("llama", {"method": "comq", "bits": 4, "per_layer": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_an_independent_reader(case: str, tmp_path: Path) -> None:
    family, settings = CASES[case]
    source, _model = quantized_folder(tmp_path, family, **settings)
    summary = export_gptq(source, tmp_path / "gptq")
    layers = read_layers(source)
    bits = settings["bits"]
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        for name, layer in layers.items():
            tensors = {
                leaf: fh.get_tensor(f"{name}.{leaf}") for leaf in ("qweight", "qzeros", "scales", "g_idx")
            }
            out, columns = layer.shape
            groups = columns // (settings.get("group_size") or columns)
            assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (
                columns * bits // 32,
                out,
            )
            assert tensors["qzeros"].dtype == torch.int32 and tensors["qzeros"].shape == (
                groups,
                out * bits // 32,
            )
            assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (groups, out)
            assert tensors["g_idx"].dtype == torch.int32 and tensors["g_idx"].shape == (columns,)
            assert torch.equal(reference_dequantize(tensors, bits), cdq_weight_with_fp16_scales(layer)), name
            assert f"{name}.weight" not in keys
    assert summary.layers == len(layers) and summary.bits == bits
    assert summary.max_scale_rounding < 2**-11  # float16 rounding of the scales, nothing more
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    block = config["quantization_config"]
    assert block["quant_method"] == "gptq" and block["checkpoint_format"] == "gptq"
    assert block["bits"] == bits and block["desc_act"] is False and block["sym"] == settings.get("sym", False)
    assert block["group_size"] == (settings.get("group_size") or -1)
    assert block["meta"]["quantizer"][0].startswith("cdq:") and block["meta"]["cdq_method"] == settings.get(
        "method", "gptq"
    )
    quantize_config = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert {k: quantize_config[k] for k in block} == block


def test_symmetric_zero_point_is_stored_as_the_usual_constant(tmp_path: Path) -> None:
    """4-bit sym: zero 8 is stored as 7 in every nibble (0x77777777), as auto-gptq writes it."""
    source, _ = quantized_folder(tmp_path, "opt", method="rtn", bits=4, sym=True, group_size=16)
    export_gptq(source, tmp_path / "gptq")
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), framework="pt") as fh:
        qzeros = fh.get_tensor("model.decoder.layers.0.fc1.qzeros")
    assert bool((qzeros == 0x77777777).all())


def handmade_layer(zero: int, bits: int = 4) -> QuantizedLayer:
    from cdq_cli.solvers.packing import pack

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**bits, (32, 64), generator=gen)
    zeros = torch.full((32, 2), float(zero))
    zeros[5, 1] = 3.0
    scales = torch.rand(32, 2, generator=gen) + 0.1
    return QuantizedLayer("blk.0.proj", GridSpec(bits, 32), (32, 64), pack(codes, bits), scales, zeros)


def test_zero_point_zero_is_refused_in_v1_and_stored_as_is_in_v2() -> None:
    layer = handmade_layer(zero=0)
    with pytest.raises(ExportError, match=r"blk\.0\.proj: 63 zero-point\(s\) outside \[1, 15\].*gptq_v2"):
        gptq_tensors(layer, "gptq")
    tensors = gptq_tensors(layer, "gptq_v2")
    assert torch.equal(reference_dequantize(tensors, 4, v2=True), cdq_weight_with_fp16_scales(layer))
    top = handmade_layer(zero=15)  # z − 1 = 14 fits v1 without carrying into the next field
    assert torch.equal(reference_dequantize(gptq_tensors(top), 4), cdq_weight_with_fp16_scales(top))


def test_shapes_and_outliers_the_format_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="input width 48 is not a multiple of 32"):
        check_shape("x", (32, 48), 4)
    with pytest.raises(ExportError, match="output width 16 is not a multiple of 32, which 3-bit"):
        check_shape("x", (16, 64), 3)
    with pytest.raises(ExportError, match="Linear layers only"):
        check_shape("conv", (32, 3, 3, 3), 4)
    check_shape("x", (40, 64), 4)  # 4-bit qzeros pack 8 outputs a word
    options = {"iterations": 2, "final_sweeps": 1, "outlier_fraction": 0.05}
    source, _ = quantized_folder(tmp_path, "opt", method="quantease-outlier", bits=4, options=options)
    with pytest.raises(ExportError, match="outliers"):
        export_gptq(source, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()


@pytest.fixture(scope="module")
def tiny(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    _model, tokenizer = load_causal_lm(str(data_dir / "models" / "stories260K"))
    root = tmp_path_factory.mktemp("tiny-export")
    return {family: save_tiny(family, root / family, tokenizer) for family in ("opt", "llama")}


def test_quantize_format_gptq_and_cdq_export(tiny, calib, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    code = main(
        ["quantize", str(tiny["opt"]), "--method", "gptq", "--bits", "4", "--group-size", "16",
         "--calib", calib, *FAST, "--output", str(out), "--format", "gptq", "--json"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out)
    exported = Path(payload["export"]["output"])
    assert exported == tmp_path / "q-gptq" and payload["export"]["checkpoint_format"] == "gptq"
    assert "vLLM" in payload["export"]["engines"] and "cdq eval" in payload["export"]["engines"]
    assert "Marlin kernels need --sym and group size 32, 64 or 128" in payload["export"]["engines"]
    assert {"tokenizer.json", "tokenizer_config.json", "quantize_config.json"} <= {
        p.name for p in exported.iterdir()
    }
    # `cdq export` writes the same bytes (nothing time-dependent in the export).
    code = main(["export", str(out), "--dest", str(tmp_path / "again")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "runs in: 4-bit GPTQ v1" in captured.out
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        exported / "model.safetensors"
    ).read_bytes()
    code = main(["export", str(out), "--dest", str(tmp_path / "again")])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith("error: output folder") and "--overwrite" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "3"], "model.layers.0.self_attn.k_proj: output width 16 is not a multiple of 32"),
        (["--method", "quantease-outlier"], "outliers, which the GPTQ format cannot hold"),
        (["--bits", "16"], "--format gptq needs quantized layers"),
        (
            ["--group-size", "8"],
            "group size 8: transformers' GPTQ loader (gptqmodel) takes group sizes 16, 32",
        ),
    ],
)
def test_quantize_format_gptq_refuses_before_any_work(args, message, tiny, calib, tmp_path, capsys) -> None:
    code = main(["quantize", str(tiny["llama"]), *args, "--calib", calib, *FAST,
                 "--output", str(tmp_path / "q"), "--format", "gptq"])  # fmt: skip
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
        captured.err
    )
    assert list(tmp_path.iterdir()) == []


def test_a_group_size_transformers_cannot_load_is_refused_on_export(tiny, calib, tmp_path, capsys) -> None:
    """gptqmodel's kernels take group sizes 16...1024 (or per channel): an export of a group-8
    folder failed to load in transformers (`only supports [-1, 16, 32, ...] group_size`); now it is
    refused in one line and nothing is written."""
    out = tmp_path / "q"
    code = main(["quantize", str(tiny["opt"]), "--method", "rtn", "--group-size", "8", "--calib", calib,
                 *FAST, "--output", str(out)])  # fmt: skip
    assert code == 0
    capsys.readouterr()
    code = main(["export", str(out), "--dest", str(tmp_path / "gptq")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and captured.err.count("\n") == 1
    assert "group size 8: transformers' GPTQ loader (gptqmodel) takes group sizes" in captured.err
    assert "--format compressed-tensors" in captured.err and not (tmp_path / "gptq").exists()


def round_scales(folder: Path, dtype: torch.dtype = torch.float16) -> None:
    """Replace every stored ``*.scales`` of a cdq output folder by its rounding to ``dtype`` (dtype
    and shard metadata kept): the folder then holds exactly what an export storing scales in
    ``dtype`` (GPTQ: float16; compressed-tensors: the model's dtype) can hold."""
    from safetensors.torch import save_file

    from cdq_cli.store.shards import shard_files

    for shard in sorted(set(shard_files(folder).values())):
        with safe_open(str(folder / shard), framework="pt") as fh:
            metadata = fh.metadata()
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        for name, tensor in tensors.items():
            if name.endswith(".scales"):
                tensors[name] = tensor.to(dtype).to(tensor.dtype)
        save_file(tensors, str(folder / shard), metadata=metadata)


EVAL_CASES = {
    "w4-g16-asym-gptq": ["--method", "gptq", "--bits", "4", "--group-size", "16"],
    "w4-g16-act-order-v2": ["--method", "gptq", "--group-size", "16", "-o", "act_order=true", "--v2"],
    "w3-channel-asym": ["--method", "rtn", "--bits", "3"],
    "w2-g32-sym": ["--method", "rtn", "--bits", "2", "--group-size", "32", "--sym"],
    "w8-channel-sym": ["--method", "rtn", "--bits", "8", "--sym"],
    "w4-per-layer-comq": ["--method", "comq", "--bits", "4", "--per-layer"],
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval_of_the_export_equals_the_folder(case, tiny, calib, wikitext, tmp_path, capsys) -> None:
    """`cdq eval` of a GPTQ export scores exactly what `cdq eval` of its cdq folder scores, once the
    folder holds what the format can hold. GPTQ stores scales in float16 (the format's dtype), so the
    export holds cdq's codes and zero-points exactly and each scale rounded to float16 (the
    export's max_scale_rounding). "Equal" therefore means: with the folder's scales rounded to
    float16 in place (which leaves its export byte-for-byte the same), the two perplexities are
    equal to the last bit, because cdq decodes the export to the very weights cdq's own folder
    dequantizes to. The unrounded folder's perplexity differs only by that rounding (checked to
    1e-3 relative, a bound for the tiny model, not the claim)."""
    args = [a for a in EVAL_CASES[case] if a != "--v2"]
    layout = ["--checkpoint-format", "gptq_v2"] if "--v2" in EVAL_CASES[case] else []
    out = tmp_path / "q"
    code = main(["quantize", str(tiny["opt"]), *args, "--calib", calib, *FAST, "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()

    def run(*argv: object) -> dict:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out) if "--json" in argv else {}

    def ppl(target: Path) -> float:
        return run("eval", target, "--data", wikitext, "--max-windows", 3, "--seqlen", 64, "--json")["ppl"]

    run("export", out, "--dest", tmp_path / "before", *layout)
    unrounded = ppl(out)
    round_scales(out, torch.float16)
    run("export", out, "--dest", tmp_path / "gptq", *layout)
    assert (tmp_path / "gptq" / "model.safetensors").read_bytes() == (
        tmp_path / "before" / "model.safetensors"
    ).read_bytes()
    exported, native = ppl(tmp_path / "gptq"), ppl(out)
    assert exported == native
    assert abs(exported - unrounded) <= 1e-3 * unrounded


def test_export_of_a_folder_that_is_not_a_cdq_output(tmp_path, capsys) -> None:
    code = main(["export", str(tmp_path)])
    captured = capsys.readouterr()
    assert (
        code == 2
        and captured.err.strip() == f"error: {tmp_path} is not a cdq output folder (no quantization.json)"
    )


_LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
jobs, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
results = []
for folder in jobs:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # the default way
    with torch.no_grad():
        logits = model(ids).logits
    quantized = {n: m for n, m in model.named_modules() if hasattr(m, "qzeros")}
    results.append({
        "logits": logits.tolist(),
        "weights": {n: m.dequantize_weight().T.float().tolist() for n, m in quantized.items()},
        "kind": type(next(iter(quantized.values()))).__name__,
    })
print("RESULT " + json.dumps(results))
"""


def gptq_site() -> str | None:
    """Where gptqmodel + optimum are importable: this environment, or ``$CDQ_GPTQ_SITE`` (a
    ``pip install --target`` folder kept out of the project's venv, see docs/results.md)."""
    import importlib.util

    if importlib.util.find_spec("gptqmodel") and importlib.util.find_spec("optimum"):
        return ""
    site = os.environ.get("CDQ_GPTQ_SITE")
    return site if site and Path(site, "gptqmodel").is_dir() else None


def test_transformers_loads_the_export(tmp_path: Path) -> None:
    """transformers + optimum + gptqmodel load the exports the default way (no quantization_config
    given; on the CPU gptqmodel picks its torch kernel): sym and asym, grouped and per channel, 3,
    4 and 8 bits. Every layer's dequantized weight equals cdq's codes on float16 scales after
    float16 rounding, equals what cdq's own reader of the export decodes (store/exported.py, what
    cdq eval runs) after the same rounding, and the logits agree."""
    from cdq_cli.store.exported import ExportedWeights

    site = gptq_site()
    if site is None:
        pytest.skip("gptqmodel/optimum not importable (set CDQ_GPTQ_SITE to a pip --target folder)")
    cases = [(4, 16, False), (3, None, False), (4, 32, True), (8, None, True)]
    jobs, references, readers = [], [], []
    for bits, group_size, sym in cases:
        root = tmp_path / f"w{bits}-{group_size}-{sym}"
        source, model = quantized_folder(root, "opt", bits=bits, group_size=group_size, sym=sym)
        export_gptq(source, root / "gptq")
        for name, layer in read_layers(source).items():  # the reference: cdq's codes on float16 scales
            model.get_submodule(name).weight.data.copy_(cdq_weight_with_fp16_scales(layer).to(torch.float32))
        jobs.append(str(root / "gptq"))
        references.append(model)
        block = json.loads((root / "gptq" / "config.json").read_text())["quantization_config"]
        readers.append(ExportedWeights(root / "gptq", block, torch.float32, {}))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(7))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(jobs), json.dumps(ids.tolist())],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for case, model, reader, result in zip(cases, references, readers, results, strict=True):
        print(f"{case}: gptqmodel kernel {result['kind']}")
        assert set(result["weights"]) == set(reader.layers)
        for name, weight in result["weights"].items():
            loaded = torch.tensor(weight)
            expected = model.get_submodule(name).weight.detach().to(torch.float16).to(torch.float32)
            assert torch.equal(loaded, expected), name  # the kernel dequantizes in float16
            assert torch.equal(loaded, reader.layer(name).to(torch.float16).to(torch.float32)), name
        with torch.no_grad():
            reference = model(ids).logits
        loaded = torch.tensor(result["logits"])
        assert torch.allclose(loaded, reference, rtol=0, atol=5e-3 * float(reference.abs().max())), case


@pytest.mark.parametrize("layout", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cdq_reads_act_order_gptq_layers(layout, bits) -> None:
    """What cdq eval decodes from a GPTQ layer (store/exported.py) equals the independent reader
    above, for act-order checkpoints too (desc_act: g_idx maps input rows to groups in any order),
    v1 (zeros stored minus one) and v2."""
    from cdq_cli.solvers.packing import pack
    from cdq_cli.store.exported import dequantize_columns
    from cdq_cli.store.gptq import unpack_gptq

    gen = torch.Generator().manual_seed(bits)
    rows, columns, groups = 64, 96, 3
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (rows, columns), generator=gen)
    low = 1 if layout == "gptq" else 0
    zeros = torch.randint(low, maxq + 1, (groups, rows), generator=gen)
    stored = zeros - 1 if layout == "gptq" else zeros
    tensors = {
        "qweight": pack(codes, bits).T.contiguous(),
        "qzeros": pack(stored, bits)[:, : rows * bits // 32].contiguous(),
        "scales": (torch.rand(groups, rows, generator=gen) + 0.01).to(torch.float16),
        "g_idx": torch.randperm(columns, generator=gen).remainder(groups).to(torch.int32),
    }
    mine = dequantize_columns(
        *unpack_gptq(tensors, "layer", bits=bits, group_size=32, checkpoint_format=layout)
    )
    assert torch.equal(mine.to(torch.float64), reference_dequantize(tensors, bits, v2=layout == "gptq_v2"))
