"""Equivalence transforms (--transform hadamard|awq): Hadamard constructions, exactness in full
precision on stories260K and on tiny Llama / Qwen2 / Qwen3 / Mixtral / Qwen2-MoE / OPT models
(norm weights and biases randomised, so a fold that forgot one would show), lazy = resident, the
refusals, and what the report and the exports record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from tiny_lm import config as tiny_config
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
)

from cdq_cli.models import adapter_for, load_causal_lm
from cdq_cli.pipeline import forward_blocks
from cdq_cli.placement import Placement
from cdq_cli.run.kinds import Loaded
from cdq_cli.run.language import apply_transform, open_model
from cdq_cli.transforms.awq import fold, groups_of, search_block
from cdq_cli.transforms.hadamard import construction, hadamard, paley1, paley2, random_rotation, sylvester
from cdq_cli.transforms.rotation import TransformError

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


# -- Hadamard matrices -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 4, 8, 12, 20, 28, 36, 44, 60, 64, 72, 576, 896, 960, 1536])
def test_hadamard_of_every_reachable_order(order: int) -> None:
    h = hadamard(order)
    assert h.dtype == torch.int64 and set(h.unique().tolist()) <= {-1, 1}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.int64))


def test_paley_constructions_and_the_factorisation() -> None:
    assert torch.equal(paley1(11) @ paley1(11).T, 12 * torch.eye(12, dtype=torch.int64))
    assert torch.equal(paley2(17) @ paley2(17).T, 36 * torch.eye(36, dtype=torch.int64))
    assert construction(576) == "sylvester(16) x paley2(q=17)"  # SmolLM2's hidden size
    assert construction(5120) == "sylvester(256) x paley1(q=19)"
    assert construction(64) == "sylvester(64)" and construction(172) is None
    for bad in (lambda: paley1(13), lambda: paley2(11), lambda: sylvester(12)):
        with pytest.raises(ValueError):
            bad()


def test_random_rotations_are_orthogonal_seeded_and_say_what_they_are() -> None:
    for order in (64, 576, 172):
        rotation = random_rotation(order, seed=3)
        q = rotation.matrix
        torch.testing.assert_close(q @ q.T, torch.eye(order, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(q, random_rotation(order, seed=3).matrix)
        assert not torch.equal(q, random_rotation(order, seed=4).matrix)
    assert random_rotation(576, 0).kind.startswith("randomized Hadamard")
    assert random_rotation(172, 0).kind.startswith("random orthogonal")


# -- tiny models of every family -------------------------------------------------------------------


def _config(kind: str):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    common |= dict(vocab_size=512, max_position_embeddings=128)
    if kind == "llama":
        return tiny_config("llama", vocab=512)
    if kind == "qwen2":
        return Qwen2Config(intermediate_size=64, tie_word_embeddings=True, **common)
    if kind == "qwen3":
        return Qwen3Config(intermediate_size=64, head_dim=16, **common)
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **common)
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(
            intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
            num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[], **common,
        )  # fmt: skip
    if kind in ("opt", "bloom"):
        return tiny_config(kind, vocab=512)
    raise KeyError(kind)


def tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model whose norm weights, biases and weights are all non-trivial."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5) if "norm" in name else param.normal_(0, 0.1)
            else:
                param.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def stories(data_dir: Path) -> Path:
    return data_dir / "models" / "stories260K"


@pytest.fixture(scope="module")
def tokenizer(stories: Path):
    return load_causal_lm(str(stories))[1]


def saved(kind: str, folder: Path, tokenizer) -> Path:
    model = tiny(kind)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _batch(vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


def _logits_of(loaded: Loaded, batch: torch.Tensor) -> torch.Tensor:
    placement = Placement(loaded.model, torch.device("cpu"), loaded.weights)
    return torch.cat(list(forward_blocks(loaded.model, loaded.adapter, placement, [batch])))


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to float32 rounding: the logits move by rounding of the rotated products only."""
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("kind", ["stories", "llama", "qwen2", "qwen3", "mixtral", "qwen2_moe"])
def test_hadamard_is_exact_and_lazy_equals_resident(kind, stories, tokenizer, tmp_path) -> None:
    folder = stories if kind == "stories" else saved(kind, tmp_path / kind, tokenizer)
    batch = _batch()
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = original(batch).logits
    tied = bool(original.config.tie_word_embeddings)
    resident = Loaded(original, adapter_for(original))
    apply_transform(resident, "hadamard", seed=0, note=lambda text: None)
    lazy = open_model(str(folder), "float32")
    try:
        assert lazy.weights is not None
        apply_transform(lazy, "hadamard", seed=0, note=lambda text: None)
        _close(_logits_of(lazy, batch), reference)
        state = resident.model.state_dict()
        assert set(lazy.weights.names()) == set(state) or kind in ("stories", "llama", "qwen2")
        for name, tensor in state.items():  # the same tensors bit for bit, read as blocks are placed
            assert torch.equal(lazy.weights.tensor(name), tensor), name
    finally:
        lazy.close()
    _close(_logits_of(resident, batch), reference)
    described = resident.extra["transform"]
    assert described["name"] == "hadamard" and described["runtime_ops"].startswith("none")
    norms = [
        t for n, t in state.items() if n.endswith("norm.weight") and "q_norm" not in n and "k_norm" not in n
    ]
    assert norms and all(bool((t == 1).all()) for t in norms)  # every norm folded into its readers
    assert (described["untied_head"] is not None) == tied


def test_resident_rotation_equals_transformers_loading_the_result(stories, tmp_path) -> None:
    """The rotated checkpoint is a standard one: transformers loads it unchanged (head untied)."""
    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    batch = _batch()
    with torch.no_grad():
        reference = model(batch).logits
    loaded = Loaded(model, adapter_for(model))
    apply_transform(loaded, "hadamard", seed=7, note=lambda text: None)
    model.save_pretrained(tmp_path / "rotated")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "rotated", dtype=torch.float32).eval()
    assert again.config.tie_word_embeddings is False
    assert again.lm_head.weight.data_ptr() != again.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        _close(again(batch).logits, reference)


@pytest.mark.parametrize(("kind", "transform", "words"), [
    ("opt", "hadamard", "LayerNorm subtracts the mean"),
    ("bloom", "hadamard", "does not support the bloom family"),
    ("bloom", "awq", "does not support the bloom family"),
])  # fmt: skip
def test_a_family_that_cannot_take_a_transform_is_refused_before_any_work(
    kind, transform, words, tokenizer, calib, tmp_path, capsys
) -> None:
    folder = saved(kind, tmp_path / kind, tokenizer)
    capsys.readouterr()
    out = tmp_path / "out"
    code, _, err = cli(
        capsys, "quantize", folder, "--transform", transform, "--calib", calib, *FAST, "--output", out
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [kind]


def test_transforms_are_refused_for_vision_models(calib, tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "quantize", "timm/resnet18", "--transform", "awq", "--output", tmp_path / "o")
    assert code == 2 and "is for causal LMs, not vision models" in err and len(err.strip().splitlines()) == 1


# -- AWQ -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt", "mixtral", "qwen2_moe"])
def test_folding_any_positive_scales_is_exact(kind) -> None:
    model = tiny(kind)
    batch = _batch()
    with torch.no_grad():
        reference = model(batch).logits
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(1)
    folded = 0
    with torch.no_grad():
        for block in adapter.blocks(model):
            for group in groups_of(block, adapter.family.stream):
                owner = block.get_submodule(group.prev)
                width = owner.weight.shape[0]
                fold(block, group, torch.rand(width, generator=generator) * 4 + 0.25)
                folded += 1
        out = model(batch).logits
    assert folded >= 2 * len(adapter.blocks(model))
    _close(out, reference)


def test_awq_search_never_ends_above_no_scaling_and_keeps_the_function(stories) -> None:
    from cdq_cli.run.plan import make_settings

    model = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    adapter = adapter_for(model)
    batch = _batch()
    with torch.no_grad():
        reference = model(batch).logits
    settings = make_settings(bits=3, sym=True)
    block = adapter.blocks(model)[1]
    inputs = {}

    def grab(_module, args, kwargs):
        inputs["args"], inputs["kwargs"] = args, kwargs

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(batch)
    handle.remove()
    chosen = search_block(
        block, adapter.family.stream, lambda: block(*inputs["args"], **inputs["kwargs"]), settings.grid_for
    )
    assert [c["prev"] for c in chosen] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert all(c["error"] <= c["error_unscaled"] for c in chosen)
    assert any(c["alpha"] is not None for c in chosen)  # scaling helped somewhere on real weights
    with torch.no_grad():
        _close(model(batch).logits, reference)


# -- the command line: report, exports, resume, lazy = resident ------------------------------------


def test_hadamard_run_records_the_transform_and_loads_in_transformers(
    stories, calib, tmp_path, capsys
) -> None:
    out = tmp_path / "rotated"
    args = ["--bits", "16", "--transform", "hadamard", "--calib", calib, *FAST, "--output", out]
    code, _, err = cli(capsys, "quantize", stories, *args)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["transform"]["name"] == "hadamard"
    assert report["run"]["transform"]["untied_head"]["extra_bytes"] == 512 * 64 * 4
    assert json.loads((out / "quantization.json").read_text())["transform"]["r1"]["size"] == 64
    original = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    rotated = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # a standard checkpoint
    batch = _batch()
    with torch.no_grad():
        _close(rotated(batch).logits, original(batch).logits)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "gguf"])
def test_every_export_records_the_transform_and_refuses_one_it_cannot_express(
    fmt, tokenizer, calib, tmp_path, capsys
) -> None:
    folder = saved("llama", tmp_path / "llama", tokenizer)
    out = tmp_path / "q"
    grid = ["--type", "Q8_0"] if fmt == "gguf" else ["--bits", "4", "--sym"]
    code, _, err = cli(capsys, "quantize", folder, "--method", "rtn", *grid, "--transform", "hadamard",
                       "--calib", calib, *FAST, "--output", out, "--format", fmt)  # fmt: skip
    assert code == 0, err
    if fmt == "gguf":
        import gguf

        field = gguf.GGUFReader(tmp_path / "q-gguf" / "model-Q8_0.gguf").get_field("cdq.transform")
        recorded = json.loads(field.contents())
    else:
        suffix = "-gptq" if fmt == "gptq" else "-ct"
        block = json.loads((tmp_path / f"q{suffix}" / "config.json").read_text())["quantization_config"]
        recorded = block["meta"]["cdq_transform"] if fmt == "gptq" else block["cdq_transform"]
    assert recorded["name"] == "hadamard" and recorded["untied_head"] is not None
    table_path = out / "quantization.json"
    table = json.loads(table_path.read_text())
    table["transform"]["runtime_ops"] = "an online Hadamard before down_proj"
    table_path.write_text(json.dumps(table))
    code, _, err = cli(capsys, "export", out, "--format", fmt, "--output", tmp_path / "again")
    assert code == 2 and "needs operations at inference time" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("transform", ["hadamard", "awq"])
def test_a_transformed_gguf_file_loads_in_transformers_equal_to_cdqs_folder(
    transform, tokenizer, calib, tmp_path, capsys
) -> None:
    """``--transform T --format gguf``: the file transformers reads (its own dequantizer) holds
    cdq's folder's weights bit for bit, so it computes the same model."""
    folder = saved("llama", tmp_path / "llama", tokenizer)
    out = tmp_path / "q"
    code, _, err = cli(capsys, "quantize", folder, "--method", "cdq", "--transform", transform, "--calib",
                       calib, *FAST, "--output", out, "--format", "gguf", "--type", "Q4_0")  # fmt: skip
    assert code == 0, err
    from cdq_cli.store.reopen import load_quantized

    native, _ = load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path / "q-gguf", gguf_file="model-Q4_0.gguf", dtype=torch.float32
    ).state_dict()
    for name, tensor in native.state_dict().items():
        assert torch.equal(theirs[name], tensor), name


def test_lazy_and_resident_models_give_the_same_transformed_output(
    tokenizer, calib, tmp_path, capsys
) -> None:
    """The same model from safetensors (opened lazily, rotated as blocks are read) and from a
    pickled checkpoint (held resident, rotated in place) quantizes to the same bytes."""
    model = tiny("qwen2")
    model.save_pretrained(tmp_path / "lazy")
    model.save_pretrained(tmp_path / "resident", safe_serialization=False)
    for folder in ("lazy", "resident"):
        tokenizer.save_pretrained(tmp_path / folder)
        args = ["--method", "gptq", "--transform", "hadamard", "--calib", calib, *FAST]
        code, _, err = cli(capsys, "quantize", tmp_path / folder, *args, "--output", tmp_path / f"{folder}-q")
        assert code == 0, err
    assert (tmp_path / "lazy-q" / "model.safetensors").read_bytes() == (
        tmp_path / "resident-q" / "model.safetensors"
    ).read_bytes()


def test_resume_of_a_run_made_without_the_transform_is_refused(stories, calib, tmp_path, capsys, monkeypatch):
    from cdq_cli.store import journal as resume

    real = resume.Journal.on_block_done

    def stop(self, index, rows, layers):
        real(self, index, rows, layers)
        raise KeyboardInterrupt

    args = ["quantize", stories, "--method", "rtn", "--calib", calib, *FAST, "--output", tmp_path / "q"]
    with monkeypatch.context() as patch:
        patch.setattr(resume.Journal, "on_block_done", stop)
        assert cli(capsys, *args)[0] == 130
    code, _, err = cli(capsys, *args, "--transform", "hadamard", "--resume")
    assert code == 2 and "cannot resume" in err and "transform" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("transform", ["awq", "hadamard"])
def test_an_interrupted_transformed_run_resumes_to_the_same_bytes(
    transform, stories, calib, tmp_path, capsys, monkeypatch
) -> None:
    from cdq_cli.store import journal as resume

    args = ["quantize", stories, "--method", "gptq", "--bits", "3", "--transform", transform]
    args += ["--calib", calib, *FAST]
    assert cli(capsys, *args, "--output", tmp_path / "whole")[0] == 0
    real = resume.Journal.on_block_done

    def stop(self, index, rows, layers):
        real(self, index, rows, layers)
        if index == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(resume.Journal, "on_block_done", stop)
        assert cli(capsys, *args, "--output", tmp_path / "q")[0] == 130
    assert cli(capsys, *args, "--output", tmp_path / "q", "--resume")[0] == 0
    for name in ("model.safetensors", "quantization.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "q" / name).read_bytes(), name


def test_awq_with_several_processes_and_with_16_bits_is_refused(
    stories, tmp_path, capsys, monkeypatch
) -> None:
    code, _, err = cli(
        capsys, "quantize", stories, "--bits", "16", "--transform", "awq", "--output", tmp_path / "a"
    )
    assert code == 2 and "--bits 16 quantizes nothing" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli(capsys, "quantize", stories, "--transform", "awq", "--output", tmp_path / "b")
    assert code == 2 and "runs in one process" in err and len(err.strip().splitlines()) == 1


def test_a_transform_error_is_a_value_error() -> None:
    assert issubclass(TransformError, ValueError)


@pytest.mark.parametrize("kind", ["opt", "mixtral", "qwen2_moe"])
def test_awq_runs_on_opt_and_mixture_of_experts_and_reports_its_choices(
    kind, tokenizer, calib, tmp_path, capsys
):
    folder = saved(kind, tmp_path / kind, tokenizer)
    capsys.readouterr()
    out = tmp_path / "q"
    args = ["--method", "rtn", "--bits", "4", "--transform", "awq", "--calib", calib, *FAST, "--output", out]
    code, _, err = cli(capsys, "quantize", folder, *args)
    assert code == 0, err
    transform = json.loads((out / "report.json").read_text())["run"]["transform"]
    assert transform["name"] == "awq" and len(transform["blocks"]) == 2
    for block in transform["blocks"]:
        assert block["tokens"] == 4 * 32
        assert all(group["error"] <= group["error_unscaled"] for group in block["groups"])
