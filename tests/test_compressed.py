"""compressed-tensors export (``pack-quantized``): an independent reader, transformers loading it
with the compressed-tensors package, refusals, and the command line.

The reference reader is written from the layout's description, not from cdq's packing:
``weight_packed`` (out, ceil(in·b/32)) holds, per output row, the codes of consecutive inputs as one
little-endian bit stream over int32 words (value k at stream bits k·b…, 3-bit values straddling
words); ``weight_zero_point`` (ceil(out·b/32), G) holds the zero-points the same way down each group's
column; ``W[o, i] = scale[o, i // group] · (code[o, i] − zero[o, i // group])`` with
``zero = 2^(b−1)`` when symmetric (no zero-point tensor). Scales are stored in the model's dtype
(float32 here), so the reader's weights must equal cdq's EXACTLY.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from safetensors import safe_open
from safetensors.torch import save_file
from test_export import quantized_folder, reference_unpack, round_scales

from cdq_cli.solvers import GridSpec
from cdq_cli.store.compressed import export_compressed
from cdq_cli.store.exports import ExportError
from cdq_cli.store.folder import read_layers
from cdq_cli.store.layer import QuantizedLayer
from cdq_cli.store.reopen import load_quantized
from cdq_cli.store.shards import shard_files

FAST = ["--method", "rtn", "--nsamples", "4", "--seqlen", "32", "--quiet"]


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, file in shard_files(folder).items():
        with safe_open(str(folder / file), framework="pt") as fh:
            out[name] = fh.get_tensor(name)
    return out


def reference_weight(tensors: dict[str, torch.Tensor], name: str, bits: int, sym: bool) -> torch.Tensor:
    """(out, in) float64 weight of one layer, read from its compressed-tensors tensors."""
    out, columns = tensors[f"{name}.weight_shape"].tolist()
    packed = tensors[f"{name}.weight_packed"]
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (out, math.ceil(columns * bits / 32)), name
    padded = torch.nn.functional.pad(packed, (0, bits))  # the reader may look one word past the end
    codes = reference_unpack(padded, bits, columns, dim=1)
    scales = tensors[f"{name}.weight_scale"].to(torch.float64)
    groups = scales.shape[1]
    if sym:
        assert f"{name}.weight_zero_point" not in tensors
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    else:
        stored = tensors[f"{name}.weight_zero_point"]
        assert stored.dtype == torch.int32 and tuple(stored.shape) == (math.ceil(out * bits / 32), groups)
        zeros = reference_unpack(torch.nn.functional.pad(stored, (0, 0, 0, bits)), bits, out, dim=0)
    group = columns // groups
    column_group = torch.arange(columns) // group
    return scales[:, column_group] * (codes - zeros[:, column_group].to(torch.int64)).to(torch.float64)


def exact_weight(layer: QuantizedLayer) -> torch.Tensor:
    """cdq's Ŵ of a stored layer, computed in float64 (its float32 scales, products exact)."""
    wide = QuantizedLayer(
        layer.name, layer.spec, layer.shape, layer.qweight, layer.scales.double(), layer.zeros.double()
    )
    return wide.dequantize()


CASES = {
    "opt-w4g16-gptq": ("opt", {"bits": 4, "group_size": 16}),
    "opt-w3-rtn": ("opt", {"method": "rtn", "bits": 3}),  # 3-bit values straddle int32 words
    "bloom-w2g32-sym": ("bloom", {"method": "rtn", "bits": 2, "group_size": 32, "sym": True}),
    "opt-w8-sym-quantease": (
        "opt",
        {"method": "quantease", "bits": 8, "sym": True, "options": {"sweeps": 2}},
    ),
    "llama-w4-comq-per-layer": ("llama", {"method": "comq", "bits": 4, "per_layer": True}),
    # act-order keeps groups on their natural columns: read without any g_idx permutation
    "llama-w4g16-gptq-act-order": ("llama", {"bits": 4, "group_size": 16, "options": {"act_order": True}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_an_independent_reader(case: str, tmp_path: Path) -> None:
    family, settings = CASES[case]
    source, _model = quantized_folder(tmp_path, family, **settings)
    summary = export_compressed(source, tmp_path / "ct")
    tensors = tensors_of(tmp_path / "ct")
    layers = read_layers(source)
    bits, sym = settings["bits"], settings.get("sym", False)
    for name, layer in layers.items():
        assert f"{name}.weight" not in tensors and tensors[f"{name}.weight_shape"].dtype == torch.int64
        assert torch.equal(reference_weight(tensors, name, bits, sym), exact_weight(layer)), name
    assert summary.layers == len(layers) and summary.max_scale_rounding == 0.0  # float32 scales: exact
    block = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "compressed-tensors" and block["format"] == "pack-quantized"
    assert block["quantization_status"] == "compressed" and list(block["config_groups"]) == ["group_0"]
    group = block["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    weights = group["weights"]
    size = settings.get("group_size")
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"]) == (bits, sym, size)
    assert weights["strategy"] == ("group" if size else "channel") and weights["type"] == "int"
    assert "lm_head" in block["ignore"] and not set(block["ignore"]) & set(layers)


def test_widths_that_are_not_multiples_of_32_and_a_sharded_export(data_dir, tmp_path, capsys) -> None:
    """stories260K: inputs of 172 and outputs of 32 and 172, so words and zero-point columns end
    part-filled; written as several shards, every layer still reads back exactly."""
    out = tmp_path / "q"
    model = data_dir / "models" / "stories260K"
    calib = data_dir / "text" / "c4-sample.jsonl"
    code, _, err = cli(capsys, "quantize", model, *FAST, "--calib", calib, "--bits", "3", "--output", out)
    assert code == 0, err
    export_compressed(out, tmp_path / "ct", max_shard_bytes=40_000)
    assert (tmp_path / "ct" / "model.safetensors.index.json").is_file()
    tensors = tensors_of(tmp_path / "ct")
    widths = set()
    for name, layer in read_layers(out).items():
        widths.update(layer.shape)
        assert torch.equal(reference_weight(tensors, name, 3, False), exact_weight(layer)), name
    assert {32, 64, 172} <= widths


# -- loading in transformers with compressed-tensors ----------------------------------------------


@pytest.fixture(scope="module")
def compressed_tensors_installed() -> None:
    pytest.importorskip("compressed_tensors", reason="the serve extra (compressed-tensors) is not installed")


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_transformers_loads_a_mixed_symmetric_export(
    compressed_tensors_installed, data_dir, tmp_path, capsys
) -> None:
    """`cdq quantize --format compressed-tensors` with --layer/--skip (three grids, a skipped layer):
    transformers + compressed-tensors load <output>-ct as is, and its logits and weights equal cdq's
    own output folder's."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    code, stdout, err = cli(
        capsys, "quantize", data_dir / "models" / "stories260K", *FAST,
        "--calib", data_dir / "text" / "c4-sample.jsonl", "--bits", "4", "--group-size", "32", "--sym",
        "--layer", "down_proj=8ch", "--layer", r"layers\.0\.self_attn\.[qkv]_proj=2g16",
        "--skip", r"layers\.4\.mlp\.up_proj", "--output", out, "--format", "compressed-tensors", "--json",
    )  # fmt: skip
    assert code == 0, err
    payload = json.loads(stdout)["export"]
    assert payload["output"] == str(tmp_path / "q-ct") and payload["format"] == "compressed-tensors"
    assert "vLLM: no (2-bit" in payload["engines"]
    assert [(g["bits"], g["group_size"], g["layers"]) for g in payload["grids"]] == [
        (4, 32, 26),
        (8, None, 5),
        (2, 16, 3),
    ]
    assert "model.layers.4.mlp.up_proj" in payload["ignore"]
    block = json.loads((tmp_path / "q-ct" / "config.json").read_text())["quantization_config"]
    assert len(block["config_groups"]) == 3
    native, _ = load_quantized(out)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q-ct", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    reference, got = logits_of(native, ids), logits_of(loaded, ids)
    assert torch.allclose(got, reference, rtol=0, atol=2**-11 * float(reference.abs().max()))
    for name, module in loaded.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            assert torch.equal(module.weight, native.get_submodule(name).weight), name
    # `cdq export` of the same folder writes the same weights (nothing time-dependent).
    code, stdout, err = cli(
        capsys, "export", out, "--format", "compressed-tensors", "--dest", tmp_path / "again"
    )
    assert code == 0 and "compressed-tensors pack-quantized, 4-bit group 32 sym (26 layers)" in stdout, err
    assert "runs in: " in stdout
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "q-ct" / "model.safetensors"
    ).read_bytes()


def test_transformers_loads_an_asymmetric_3bit_export(
    compressed_tensors_installed, data_dir, tmp_path, capsys
):
    """3-bit asymmetric per channel, act-order GPTQ (packed zero-points, widths 32/64/172), loaded
    the default way: logits equal cdq's. compressed-tensors 0.20's compressed-load path allocates
    unpacked zero-points, so the export's config asks transformers to dequantize on load."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    code, _, err = cli(
        capsys, "quantize", data_dir / "models" / "stories260K", *FAST, "--method", "gptq",
        "-o", "act_order=true", "--calib", data_dir / "text" / "c4-sample.jsonl", "--bits", "3",
        "--output", out,
    )  # fmt: skip
    assert code == 0, err
    export_compressed(out, tmp_path / "ct")
    block = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert block["config_groups"]["group_0"]["weights"]["actorder"] == "weight"  # static groups: no g_idx
    native, _ = load_quantized(out)
    assert block["dequantize"] is True
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    reference, got = logits_of(native, ids), logits_of(loaded, ids)
    assert torch.allclose(got, reference, rtol=0, atol=2**-11 * float(reference.abs().max()))


# Every configuration the export accepts, on stories260K (widths 32, 64 and 172: down_proj's 172
# inputs cannot take a group of 32, so a grouped run gives it another grid with --layer or keeps it
# with --skip). Several grids with an asymmetric one are refused (test_what_the_format_cannot_hold).
MATRIX = {  # quantize options, and what the engines line says about vLLM for that folder
    "sym-channel": (["--bits", "4", "--sym"], "vLLM (compressed-tensors WNA16)"),
    "asym-channel": (["--bits", "4"], "vLLM (compressed-tensors WNA16)"),
    "asym-group-skipping-the-layer": (
        ["--group-size", "32", "--skip", "down_proj"], "vLLM (compressed-tensors WNA16)",
    ),
    "sym-group-and-the-layer-per-channel": (
        ["--group-size", "32", "--sym", "--layer", "down_proj=4ch"], "vLLM (compressed-tensors WNA16)",
    ),
    "sym-group-and-the-layer-in-groups-of-4": (
        ["--group-size", "32", "--sym", "--layer", "down_proj=4g4"],
        "its Marlin kernels take group 32/64/128 or per channel, not [4]",
    ),
    "sym-mixed-bits-and-skip": (
        ["--group-size", "32", "--sym", "--layer", "down_proj=8ch",
         "--layer", r"layers\.0\.self_attn\.[qkv]_proj=2g16", "--skip", r"layers\.4\.mlp\.up_proj"],
        "vLLM: no (2-bit",
    ),
    "asym-per-layer-8bit": (["--bits", "8", "--per-layer"], "vLLM: no (8-bit asymmetric"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_configuration_loads_in_transformers_and_scores_as_the_folder(
    case, compressed_tensors_installed, data_dir, tmp_path, capsys
) -> None:
    """sym/asym x per-channel/grouped/per-layer x mixed --layer rules x a layer that cannot take the
    group: (1) the config has one group per distinct grid, and compressed-tensors' own matching of
    each group's targets (minus ignore) selects exactly the layers stored with that grid; (2)
    transformers + compressed-tensors load the export the default way (asymmetric ones through the
    config's dequantize flag) with every layer's weight equal to cdq's and the logits of cdq's
    folder; (3) `cdq eval` of the export prints the folder's perplexity, bit for bit (float32
    scales: the export holds cdq's codes, zero-points and scales exactly); (4) the engines line
    says how transformers loads this folder, and what vLLM's compressed-tensors scheme takes of it
    (4/8-bit, zero-points at 4 bits only, Marlin's group sizes: vLLM is not installed here)."""
    from compressed_tensors.utils.match import match_named_modules
    from transformers import AutoConfig, AutoModelForCausalLM

    args, vllm = MATRIX[case]
    out = tmp_path / "q"
    code, stdout, err = cli(
        capsys, "quantize", data_dir / "models" / "stories260K", *FAST, "--calib",
        data_dir / "text" / "c4-sample.jsonl", *args, "--output", out,
        "--format", "compressed-tensors", "--json",
    )  # fmt: skip
    assert code == 0, err
    export = json.loads(stdout)["export"]
    ct = Path(export["output"])
    stored = read_layers(out)
    stored_grids: dict[tuple, set[str]] = {}
    for name, layer in stored.items():
        stored_grids.setdefault((layer.spec.bits, layer.spec.group_size, layer.spec.sym), set()).add(name)
    block = json.loads((ct / "config.json").read_text())["quantization_config"]
    config = AutoConfig.from_pretrained(ct)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    claimed: dict[tuple, set[str]] = {}
    for group in block["config_groups"].values():
        weights = group["weights"]
        grid = (weights["num_bits"], weights["group_size"], weights["symmetric"])
        assert grid not in claimed
        claimed[grid] = {name for name, _ in match_named_modules(plain, group["targets"], block["ignore"])}
    assert claimed == stored_grids
    asymmetric = any(not sym for _, _, sym in stored_grids)
    assert block.get("dequantize", False) is asymmetric
    assert ("dequantized while loading" in export["engines"]) is asymmetric
    assert vllm in export["engines"] and "cdq eval" in export["engines"]

    native, _ = load_quantized(out)
    loaded = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    reference, got = logits_of(native, ids), logits_of(loaded, ids)
    assert torch.allclose(got, reference, rtol=0, atol=2**-11 * float(reference.abs().max()))
    for name in stored:
        assert torch.equal(loaded.get_submodule(name).weight, native.get_submodule(name).weight), name

    ptb = data_dir / "text" / "ptb-valid.txt"
    scores = []
    for target in (out, ct):
        code, stdout, err = cli(
            capsys, "eval", target, "--data", ptb, "--max-windows", "2", "--seqlen", "128", "--json"
        )
        assert code == 0, err
        scores.append(json.loads(stdout)["ppl"])
    assert scores[0] == scores[1]


def bfloat16_copy(source: Path, dest: Path) -> Path:
    """``source`` (a float32 safetensors checkpoint) stored in bf16, as models ship: every floating
    tensor rounded to bf16, the config saying so, the tokenizer files copied."""
    dest.mkdir()
    for item in source.iterdir():
        if item.name not in ("model.safetensors", "config.json"):
            shutil.copy(item, dest / item.name)
    tensors = {}
    with safe_open(str(source / "model.safetensors"), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor = fh.get_tensor(name)
            tensors[name] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


def test_eval_of_a_bfloat16_export_equals_the_folder(data_dir, calib, tmp_path, capsys) -> None:
    """A model stored in bf16 (stories260K rounded to bf16, as models ship; computed in float32,
    the default on a CPU) is exported with its scales in bf16 (the model's dtype, as llm-compressor
    does; cdq keeps them in float32), so "equal" means: with the folder's scales rounded to bf16 in
    place (its export stays byte-for-byte the same), `cdq eval` of the export prints exactly the
    folder's perplexity, because the two then hold the same codes, zero-points and scales."""
    model = bfloat16_copy(data_dir / "models" / "stories260K", tmp_path / "bf16")
    out = tmp_path / "q"
    code, _, err = cli(
        capsys, "quantize", model, *FAST, "--calib", calib, "--bits", "4",
        "--group-size", "32", "--skip", "down_proj", "--output", out,
    )  # fmt: skip
    assert code == 0, err
    run = json.loads((out / "report.json").read_text())["run"]
    assert (run["dtype"], run["compute_dtype"]) == ("bfloat16", "float32")
    before = export_compressed(out, tmp_path / "before")
    assert before.scale_dtype == "bfloat16" and before.max_scale_rounding > 0
    round_scales(out, torch.bfloat16)
    export_compressed(out, tmp_path / "ct")
    assert (tmp_path / "ct" / "model.safetensors").read_bytes() == (
        tmp_path / "before" / "model.safetensors"
    ).read_bytes()
    scores = []
    for target in (out, tmp_path / "ct"):
        code, stdout, err = cli(
            capsys, "eval", target, "--data", data_dir / "text" / "ptb-valid.txt", "--max-windows", "2",
            "--seqlen", "128", "--json",
        )  # fmt: skip
        assert code == 0, err
        scores.append(json.loads(stdout)["ppl"])
    assert scores[0] == scores[1]


# -- refusals ----------------------------------------------------------------------------------------


def test_what_the_format_cannot_hold(tmp_path: Path, data_dir, capsys) -> None:
    options = {"iterations": 2, "final_sweeps": 1, "outlier_fraction": 0.05}
    source, _ = quantized_folder(tmp_path, "opt", method="quantease-outlier", bits=4, options=options)
    with pytest.raises(ExportError, match="outliers, which compressed-tensors cannot hold"):
        export_compressed(source, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    with pytest.raises(ExportError, match="needs its own folder"):
        export_compressed(source, source)
    code, _, err = cli(
        capsys, "export", source, "--format", "compressed-tensors", "--checkpoint-format", "gptq_v2"
    )
    assert (
        code == 2
        and err.strip()
        == "error: --checkpoint-format is an option of the gptq export, not of compressed-tensors"
    )
    calib = data_dir / "text" / "c4-sample.jsonl"
    model = data_dir / "models" / "stories260K"
    for args, message in (
        (
            ["--method", "quantease-outlier"],
            "keeps full-precision outliers, which compressed-tensors cannot hold",
        ),
        (["--bits", "16"], "--format compressed-tensors needs quantized layers"),
        (["--group-size", "32", "--layer", "down_proj=4ch"], MIXED_ASYMMETRIC),
    ):
        code, _, err = cli(
            capsys, "quantize", model, *FAST, *args, "--calib", calib, "--output", tmp_path / "new",
            "--format", "compressed-tensors",
        )  # fmt: skip
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
        assert not (tmp_path / "new").exists() and not (tmp_path / "new-ct").exists()


MIXED_ASYMMETRIC = "one of them asymmetric, do not load in transformers"


def test_several_grids_with_an_asymmetric_one_are_refused_before_writing(data_dir, calib, tmp_path, capsys):
    """transformers loads asymmetric compressed-tensors checkpoints only dequantized, and then
    decodes every layer with the first config group's grid: such an export of a finished folder
    is refused in one line, nothing written (a --layer grid that is symmetric does not help: the
    rest is still asymmetric)."""
    model = data_dir / "models" / "stories260K"
    out = tmp_path / "q"
    code, _, err = cli(
        capsys, "quantize", model, *FAST, "--calib", calib, "--group-size", "32",
        "--layer", "down_proj=4chsym", "--output", out,
    )  # fmt: skip
    assert code == 0, err
    code, out_text, err = cli(capsys, "export", out, "--format", "compressed-tensors")
    assert code == 2 and out_text == "" and err.count("\n") == 1 and MIXED_ASYMMETRIC in err, err
    assert "4-bit g32 asym" in err and "4-bit per channel sym" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


# -- cdq's reader of pack-quantized checkpoints (what cdq eval decodes) -------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [None, 16])
def test_cdq_reads_what_compressed_tensors_writes(bits, sym, group, compressed_tensors_installed) -> None:
    """A layer packed by compressed-tensors' own compressor (llm-compressor's writer, not cdq's;
    48 columns and 40 rows, so weight and zero-point words end part-filled) decodes in cdq to
    exactly what compressed-tensors' own decompressor returns."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from cdq_cli.store.compressed import unpack_compressed
    from cdq_cli.store.exported import dequantize_columns

    gen = torch.Generator().manual_seed(bits * 10 + sym)
    rows, columns = 40, 48
    groups = 1 if group is None else columns // group
    args = QuantizationArgs(
        num_bits=bits, symmetric=sym, strategy="group" if group else "channel", group_size=group
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {
        "weight": torch.randn(rows, columns, generator=gen),
        "weight_scale": torch.rand(rows, groups, generator=gen) * 0.1 + 0.01,
    }
    if not sym:
        half = 2 ** (bits - 1)
        state["weight_zero_point"] = torch.randint(-half, half, (rows, groups), generator=gen).to(torch.int8)
    packed = PackedQuantizationCompressor.compress(state, scheme)
    theirs = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    mine = dequantize_columns(*unpack_compressed(packed, "layer", bits=bits, symmetric=sym))
    assert torch.equal(mine, theirs)


def test_what_cdq_decodes_itself_and_what_it_leaves_to_transformers() -> None:
    """Weight-only pack-quantized and GPTQ v1/v2 are decoded by cdq; activation quantization,
    sparsity, KV-cache schemes, other formats and methods are not (transformers loads those)."""
    from cdq_cli.store.compressed import quantization_config
    from cdq_cli.store.exported import undecodable

    ours = quantization_config({"a.q": (GridSpec(4, 32, False), (8, 64), 0)}, [], ["a.q.weight"], {})
    assert undecodable(ours) is None
    assert undecodable({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"}) is None
    group = ours["config_groups"]["group_0"]
    cases = {
        "activation quantization": {
            **ours,
            "config_groups": {"g": {**group, "input_activations": {"num_bits": 8}}},
        },
        "format 'float-quantized'": {
            **ours,
            "format": "float-quantized",
            "config_groups": {"g": {**group, "format": None}},
        },
        "sparsity_config": {**ours, "sparsity_config": {"format": "sparse-24-bitmask"}},
        "kv_cache_scheme": {**ours, "kv_cache_scheme": {"num_bits": 8}},
        "quant_method 'awq'": {"quant_method": "awq", "bits": 4},
        "checkpoint format 'marlin'": {"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
    }
    for reason, block in cases.items():
        assert reason in (undecodable(block) or ""), reason


def test_a_quantized_folder_cdq_does_not_decode_goes_to_transformers(data_dir, tmp_path, capsys) -> None:
    """A quantization_config cdq does not decode (here bitsandbytes) is loaded through transformers
    as it would load it, never half-read through the lazy loader: its one-line error, exit 2."""
    folder = tmp_path / "bnb"
    shutil.copytree(data_dir / "models" / "stories260K", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    code, out, err = cli(capsys, "eval", folder, "--data", data_dir / "text" / "ptb-valid.txt")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: cannot load {folder}: ") and "bitsandbytes" in err
