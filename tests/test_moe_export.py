"""Exports of mixture-of-experts models: transformers 5's fused experts written per expert under the
names the family's checkpoints use, loaded back by transformers + compressed-tensors the default
way and by ``cdq eval``; what the formats cannot hold refused in one line before anything is written.

The names are checked against transformers itself: ``save_pretrained`` of the same model writes
the checkpoint layout its loader fuses back (its conversion mapping, run in reverse), so the export
must hold exactly those names, each quantized matrix as its packed tensors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from safetensors import safe_open
from test_compressed import exact_weight, logits_of, reference_weight, tensors_of
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from cdq_cli.models import load_causal_lm
from cdq_cli.store.compressed import export_compressed
from cdq_cli.store.exports import ExportError
from cdq_cli.store.folder import read_layers
from cdq_cli.store.reopen import load_quantized
from cdq_cli.store.shards import shard_files

FAST = ["--method", "rtn", "--nsamples", "4", "--seqlen", "32", "--quiet"]
SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
    max_position_embeddings=128, num_experts_per_tok=2,
)  # fmt: skip
CONFIGS = {  # four experts each
    "mixtral": lambda: MixtralConfig(**SMALL, intermediate_size=64, num_local_experts=4),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **SMALL, intermediate_size=64, moe_intermediate_size=32, head_dim=8, num_experts=4,
        decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **SMALL, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_experts=4, decoder_sparse_step=2, mlp_only_layers=[],
    ),
    "olmoe": lambda: OlmoeConfig(**SMALL, intermediate_size=32, num_experts=4),
}  # fmt: skip


def tiny_moe(kind: str, folder: Path, tokenizer) -> Path:
    """A tiny random MoE checkpoint as transformers saves it (weights ~ N(0, 0.1))."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind]())
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path):
    return load_causal_lm(str(data_dir / "models" / "stories260K"))[1]


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tokenizer, tmp_path_factory) -> tuple[str, Path]:
    return request.param, tiny_moe(request.param, tmp_path_factory.mktemp(request.param) / "model", tokenizer)


@pytest.fixture(scope="module")
def compressed_tensors_installed() -> None:
    pytest.importorskip("compressed_tensors", reason="the serve extra (compressed-tensors) is not installed")


def keys_of(folder: Path) -> set[str]:
    return set(shard_files(folder))


def packed_keys(keys: set[str]) -> set[str]:
    """The checkpoint keys of ``keys`` with every quantized matrix's packed tensors in place of
    its weight (what a symmetric pack-quantized export of those matrices holds)."""
    owners = {key.rpartition(".")[0] for key in keys if key.endswith(".weight_packed")}
    plain = {key for key in keys if key.rpartition(".")[0] not in owners}
    return plain | {f"{owner}.weight" for owner in owners}


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_the_names_are_the_ones_transformers_saves(kind, tokenizer, tmp_path) -> None:
    """For every MoE family cdq exports: the names :mod:`cdq_cli.store.experts` gives the fused
    experts (and every other tensor) are exactly what transformers' own ``save_pretrained`` writes
    for the model, and the per-expert matrices are the rows transformers fuses them from (gate
    above up): splitting the model's fused parameters by those names gives back the saved tensors."""
    from cdq_cli.store.experts import LAYOUTS, is_fused_name

    source = tiny_moe(kind, tmp_path / "model", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source)
    layout = LAYOUTS[model.config.model_type]
    saved = tensors_of(source)
    mine: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if is_fused_name(name):
            rows = tensor.reshape(-1, tensor.shape[-1])
            for piece in layout.split(name, tuple(tensor.shape)):
                mine[f"{piece.module}.weight"] = rows[piece.start : piece.stop]
        else:
            mine[layout.checkpoint_name(name)] = tensor
    if "lm_head.weight" not in saved:  # a tied head is not saved
        mine.pop("lm_head.weight")
    assert set(mine) == set(saved)
    assert any(".experts.3." in key for key in saved)
    for key, tensor in saved.items():
        assert torch.equal(mine[key], tensor), key


# -- loading the compressed-tensors export -------------------------------------------------------------


GRIDS = {
    "one-grid": ["--bits", "4", "--group-size", "16", "--sym"],
    # attention per channel at 8 bits, the experts in 4-bit groups: three config groups, the
    # experts' one found by transformers through its `re:` targets that mention "experts"
    "mixed-grids": ["--bits", "4", "--group-size", "16", "--sym", "--layer", r"self_attn\.[qkv]_proj=8chsym"],
}


@pytest.mark.parametrize("grids", sorted(GRIDS))
def test_transformers_loads_the_export_and_cdq_eval_scores_it_as_the_folder(
    moe, grids, compressed_tensors_installed, calib, data_dir, tmp_path, capsys
) -> None:
    """`cdq quantize --format compressed-tensors` of a tiny Mixtral / Qwen3-MoE (4 experts):
    (1) the export holds the source checkpoint's names, each quantized matrix packed, one per
    expert, and an independent reader of those matrices gets cdq's fused rows (gate, then up);
    (2) transformers + compressed-tensors load it the default way with every parameter equal to
    cdq's folder (scales in float32: exactly) and the folder's logits; (3) `cdq eval` of the export
    prints the folder's perplexity bit for bit; (4) the router is full precision and ignored."""
    kind, source = moe
    out = tmp_path / "q"
    code, stdout, err = cli(
        capsys, "quantize", source, *FAST, "--calib", calib, *GRIDS[grids], "--output", out,
        "--format", "compressed-tensors", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)["export"]
    ct = Path(summary["output"])
    assert ct == tmp_path / "q-ct"
    layout = (
        "block_sparse_moe.experts.E.w1/w3/w2"
        if kind == "mixtral"
        else "mlp.experts.E.gate_proj/up_proj/down_proj"
    )
    assert summary["experts"] == {"fused": 4, "matrices": 2 * 4 * 3, "names": layout}
    assert f"4 fused-experts layers written as 24 per-expert matrices ({layout})" in summary["headline"]

    keys = keys_of(ct)
    assert packed_keys(keys) == keys_of(source)
    router = "block_sparse_moe.gate" if kind == "mixtral" else "mlp.gate"
    assert f"model.layers.1.{router}.weight" in keys
    assert {f"model.layers.0.{router}", f"model.layers.1.{router}"} <= set(summary["ignore"])

    block = json.loads((ct / "config.json").read_text())["quantization_config"]
    tensors = tensors_of(ct)
    for name, layer in read_layers(out).items():
        if len(layer.shape) != 3:
            continue
        weight = exact_weight(layer)  # (E, out, in) in float64: cdq's codes on its float32 scales
        block_name, leaf = name.rsplit(".experts.", 1)
        base = (
            block_name.replace(".mlp", ".block_sparse_moe") if kind == "mixtral" else block_name
        ) + ".experts"
        names = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}[kind]
        half = weight.shape[1] // 2
        for e in range(weight.shape[0]):
            if leaf == "gate_up_proj":
                expected = {names[0]: weight[e, :half], names[1]: weight[e, half:]}
            else:
                expected = {names[2]: weight[e]}
            for projection, rows in expected.items():
                got = reference_weight(tensors, f"{base}.{e}.{projection}", 4, True)
                assert torch.equal(got, rows), f"{base}.{e}.{projection}"
    if grids == "mixed-grids":
        assert len(block["config_groups"]) == 2
        experts_group = next(
            g for g in block["config_groups"].values()
            if any(t.startswith("re:") and "experts" in t for t in g["targets"])
        )  # fmt: skip
        assert (experts_group["weights"]["num_bits"], experts_group["weights"]["group_size"]) == (4, 16)
    else:
        assert block["config_groups"]["group_0"]["targets"] == ["Linear"]

    native, _ = load_quantized(out)
    loaded = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(4))
    reference, got = logits_of(native, ids), logits_of(loaded, ids)
    assert torch.allclose(got, reference, rtol=0, atol=2**-11 * float(reference.abs().max()))
    for name, param in native.named_parameters():  # compressed Linears hold a weight once run
        assert torch.equal(loaded.get_parameter(name), param), name

    scores = []
    for target in (out, ct):
        code, stdout, err = cli(
            capsys, "eval", target, "--data", data_dir / "text" / "ptb-valid.txt", "--max-windows", "2",
            "--seqlen", "64", "--json",
        )  # fmt: skip
        assert code == 0, err
        scores.append(json.loads(stdout)["ppl"])
    assert scores[0] == scores[1]


def test_experts_without_calibration_tokens_stay_flagged_in_the_export(
    moe, calib, tmp_path, capsys, monkeypatch
) -> None:
    """An expert no calibration token reached is rounded to nearest and flagged in report.json; the
    export's summary names it too (and carries report.json along)."""
    kind, source = moe
    if kind != "mixtral":
        pytest.skip("one family is enough for the routing override")
    from transformers.models.mixtral import modeling_mixtral

    real = modeling_mixtral.MixtralTopKRouter.forward

    def never_expert_3(self, hidden):
        logits, weights, index = real(self, hidden)
        return logits, weights, torch.where(index == 3, torch.zeros_like(index), index)

    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", never_expert_3)
    out = tmp_path / "q"
    code, stdout, err = cli(
        capsys, "quantize", source, *FAST, "--method", "gptq", "--calib", calib, "--sym", "--output", out,
        "--format", "compressed-tensors", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)["export"]
    expected = [f"model.layers.{b}.mlp.experts.{p}[3]" for b in (0, 1) for p in ("gate_up_proj", "down_proj")]
    assert sorted(summary["rounded_experts"]) == sorted(expected)
    assert (
        "4 expert matrices got no calibration tokens and were rounded to nearest (RTN" in summary["headline"]
    )
    rows = {r["name"]: r for r in json.loads((Path(summary["output"]) / "report.json").read_text())["layers"]}
    assert all(rows[name]["method"] == "rtn" and rows[name]["tokens"] == 0 for name in expected)
    code, stdout, _ = cli(
        capsys, "export", out, "--format", "compressed-tensors", "--dest", tmp_path / "again"
    )
    assert code == 0 and "4 expert matrices got no calibration tokens" in stdout


# -- refusals ----------------------------------------------------------------------------------------


REFUSED = {  # quantize options -> the one line's words
    "asymmetric experts": (["--bits", "4"], "asymmetric experts (4-bit per channel asym) do not load"),
    "experts of two grids": (
        ["--bits", "4", "--sym", "--layer", r"experts\.down_proj=8chsym"],
        "fused experts with different grids (4-bit per channel sym, 8-bit per channel sym)",
    ),
    "experts kept in full precision": (
        ["--bits", "4", "--sym", "--skip", r"layers\.1\.mlp\.experts"],
        "fused experts kept in full precision (--skip) do not load in transformers",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_compressed_tensors_cannot_hold_is_refused_before_any_work(
    case, moe, calib, tmp_path, capsys
) -> None:
    """Each was loaded in transformers before it was refused: asymmetric experts fail in its
    experts decoder (no zero-points), experts of two grids would be decoded with one, and
    full-precision experts in a compressed checkpoint fail its conversion."""
    kind, source = moe
    if kind != "mixtral" and case != "asymmetric experts":
        pytest.skip("the refusals do not depend on the family")
    args, message = REFUSED[case]
    code, stdout, err = cli(
        capsys, "quantize", source, *FAST, "--calib", calib, *args, "--output", tmp_path / "q",
        "--format", "compressed-tensors",
    )  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_gptq_refuses_experts_in_one_line(moe, calib, tmp_path, capsys) -> None:
    """transformers' GPTQ loader (optimum + gptqmodel) leaves fused experts uninitialized rather
    than read per-expert GPTQ tensors (see store/gptq.py): `--format gptq` is refused before any
    work, `cdq export --format gptq` of a finished folder before anything is written."""
    kind, source = moe
    code, stdout, err = cli(
        capsys, "quantize", source, *FAST, "--calib", calib, "--bits", "4", "--sym", "--output",
        tmp_path / "q", "--format", "gptq",
    )  # fmt: skip
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert "fused experts" in err and "do not load from a GPTQ checkpoint" in err
    assert "use --format compressed-tensors" in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q-gptq").exists()
    assert (
        cli(capsys, "quantize", source, *FAST, "--calib", calib, "--sym", "--output", tmp_path / "q")[0] == 0
    )
    code, _, err = cli(capsys, "export", tmp_path / "q", "--format", "gptq")
    assert code == 2 and err.count("\n") == 1 and "do not load from a GPTQ checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_an_unknown_family_and_an_asymmetric_folder_are_refused_on_export(
    moe, calib, tmp_path, capsys
) -> None:
    """`cdq export` checks a finished folder as the preflight checks a run: fused experts of a model
    type whose checkpoint names cdq does not know, and asymmetric experts, are refused in one line
    with nothing written."""
    kind, source = moe
    if kind != "mixtral":
        pytest.skip("the refusals do not depend on the family")
    out = tmp_path / "q"
    assert cli(capsys, "quantize", source, *FAST, "--calib", calib, "--output", out)[0] == 0
    with pytest.raises(ExportError, match="asymmetric experts"):
        export_compressed(out, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())
    renamed = tmp_path / "renamed"
    shutil.copytree(out, renamed)
    (renamed / "config.json").write_text(json.dumps({**config, "model_type": "minimax"}))
    code, stdout, err = cli(capsys, "export", renamed, "--format", "compressed-tensors")
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert "fused experts of model type 'minimax' are not exported" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "renamed"]


def test_the_reader_refuses_incomplete_experts(moe, calib, tmp_path, capsys) -> None:
    """cdq eval of an export that lost one expert's matrix says which, in one line."""
    kind, source = moe
    if kind != "qwen3_moe":
        pytest.skip("one family is enough")
    out = tmp_path / "q"
    assert cli(capsys, "quantize", source, *FAST, "--calib", calib, "--sym", "--output", out)[0] == 0
    export_compressed(out, tmp_path / "ct")
    from safetensors.torch import save_file

    path = tmp_path / "ct" / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        kept = {
            k: fh.get_tensor(k) for k in fh.keys() if not re.search(r"layers\.1\.mlp\.experts\.2\.up_proj", k)
        }
    save_file(kept, str(path))
    code, _, err = cli(
        capsys, "eval", tmp_path / "ct", "--data", calib, "--max-windows", "1", "--seqlen", "32"
    )
    assert code == 2 and err.count("\n") == 1, err
    assert (
        "experts of model.layers.1.mlp.experts.gate_up_proj are incomplete (no up projection of expert 2)"
        in err
    )


def test_the_reader_fuses_a_per_expert_gptq_checkpoint(moe, calib, tmp_path, capsys) -> None:
    """A GPTQ checkpoint of a MoE model in the checkpoint layout (per-expert ``qweight``/``qzeros``/
    ``scales``/``g_idx``, as GPTQ tools write MoE models for vLLM; written here from cdq's own layers
    with the GPTQ export's per-layer tensors): cdq's reader fuses it back, and the model it
    reopens holds exactly the weights of cdq's folder once that folder's scales are rounded to
    float16, as GPTQ stores them; `cdq eval` then prints the folder's perplexity."""
    from safetensors.torch import save_file
    from test_export import round_scales

    from cdq_cli.store.experts import LAYOUTS, expert_layer
    from cdq_cli.store.folder import OutputWeights
    from cdq_cli.store.gptq import gptq_tensors, quantization_config
    from cdq_cli.store.reopen import load_whole, open_exported

    kind, source = moe
    out = tmp_path / "q"
    args = ["--bits", "4", "--group-size", "16", "--output", out]
    assert cli(capsys, "quantize", source, *FAST, "--calib", calib, *args)[0] == 0
    round_scales(out, torch.float16)
    stored = OutputWeights(out)
    config = json.loads((out / "config.json").read_text())
    layout = LAYOUTS[config["model_type"]]
    tensors = {}
    for name in stored.names():
        if name not in stored.params:
            tensors[layout.checkpoint_name(name)] = stored.tensor(name)
            continue
        layer = stored.layer(stored.params[name])
        pieces = (
            [expert_layer(layer, p) for p in layout.split(name, layer.shape)]
            if len(layer.shape) == 3
            else [layer]
        )
        for piece in pieces:
            for leaf, tensor in gptq_tensors(piece, "gptq_v2").items():  # zero-points as they are
                tensors[f"{layout.checkpoint_name(piece.name)}.{leaf}"] = tensor
    folder = tmp_path / "gptq"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    spec = next(iter(stored.layers().values())).spec
    (folder / "config.json").write_text(
        json.dumps({**config, "quantization_config": quantization_config(spec, "rtn", {}, "gptq_v2")})
    )
    for companion in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(out / companion, folder / companion)

    native, _ = load_quantized(out)
    reopened, _ = load_whole(open_exported(folder))
    state = reopened.state_dict()
    assert set(state) == set(native.state_dict())
    for name, tensor in native.state_dict().items():
        assert torch.equal(state[name], tensor), name
    scores = []
    for target in (out, folder):
        code, stdout, err = cli(
            capsys, "eval", target, "--data", calib, "--max-windows", "2", "--seqlen", "32", "--json"
        )
        assert code == 0, err
        scores.append(json.loads(stdout)["ppl"])
    assert scores[0] == scores[1]


def test_qwen2_moe_shared_expert_and_what_vllm_takes(
    tokenizer, compressed_tensors_installed, calib, tmp_path, capsys
) -> None:
    """Qwen2-MoE (a shared expert beside the routed ones, a dense block before the sparse one):
    the export loads in transformers with cdq's weights and logits. vLLM's Qwen2-MoE builds
    shared_expert_gate as a plain torch Linear, so the engines line says vLLM does not take an
    export that quantized it, and does once --skip keeps it."""
    source = tiny_moe("qwen2_moe", tmp_path / "model", tokenizer)
    engines = []
    for extra in ([], ["--skip", "shared_expert_gate"]):
        out = tmp_path / f"q{len(extra)}"
        code, stdout, err = cli(
            capsys, "quantize", source, *FAST, "--calib", calib, "--bits", "4", "--group-size", "16",
            "--sym", *extra, "--output", out, "--format", "compressed-tensors", "--json",
        )  # fmt: skip
        assert code == 0, err
        engines.append(json.loads(stdout)["export"]["engines"])
    assert "vLLM: no (its model keeps shared_expert_gate a plain torch Linear" in engines[0]
    assert "vLLM (compressed-tensors WNA16, experts as fused MoE" in engines[1]
    native, _ = load_quantized(tmp_path / "q0")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q0-ct", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5))
    reference, got = logits_of(native, ids), logits_of(loaded, ids)
    assert torch.allclose(got, reference, rtol=0, atol=2**-11 * float(reference.abs().max()))
    for name, param in native.named_parameters():
        assert torch.equal(loaded.get_parameter(name), param), name
