"""Big models on one node: lazy loading, sharded output, bounded memory, shared Σ, MoE experts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from safetensors import safe_open
from synthetic_lm import write_synthetic_llama
from tiny_lm import save_tiny, tiny_model
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from cdq_cli.evaluate.perplexity import perplexity
from cdq_cli.models import adapter_for, load_causal_lm
from cdq_cli.placement import Placement
from cdq_cli.run.language import open_model, perplexity_of
from cdq_cli.run.plan import make_settings
from cdq_cli.store.journal import KILL_ENV
from cdq_cli.store.names import journal_folder
from cdq_cli.store.reopen import load_quantized

REPO = Path(__file__).resolve().parents[1]
FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path):
    return load_causal_lm(str(data_dir / "models" / "stories260K"))[1]


def peak_rss(command: list[str]) -> tuple[int, float, str]:
    """(exit code, peak RSS in bytes of that process alone, stderr) of ``python -m cdq_cli ...``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "_peak_rss.py"), sys.executable, "-m", "cdq_cli", *command],
        capture_output=True,
        text=True,
        env=env,
    )
    line = next(line for line in done.stderr.splitlines() if line.startswith("peak_rss_mib="))
    return done.returncode, float(line.split("=")[1]) * 2**20, done.stderr


# --------------------------------------------------------------------------------------------
# Memory: a sharded bf16 checkpoint larger than the process's baseline


@pytest.mark.slow
def test_quantize_and_eval_peak_memory_is_bounded_by_the_model_size(
    tokenizer, small, calib, wikitext, tmp_path
):
    """scripts/bench_big.py's runs (cdq quantize --method rtn --eval, then cdq eval of the output,
    each its own process) on a 12-block Llama in bf16 shards (245M parameters, 0.49 GB): each
    peaks below what the same command costs on the 4-block toy model ``small`` (the process
    itself: torch, transformers, the tokenizer) plus 0.6x the checkpoint's size. Holding the model
    whole, even in bf16, would not fit; computed in float32 (the default on a CPU) it would take
    2x. The process's own cost is measured, not assumed, so the bound holds on any torch build."""
    source = tmp_path / "synthetic"
    write_synthetic_llama(
        source, hidden=1024, intermediate=4096, layers=12, heads=8, kv_heads=4, vocab=32000,
        tokenizer=tokenizer, max_shard_bytes=150 * 2**20,
    )  # fmt: skip
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    assert len(list(source.glob("model-*-of-*.safetensors"))) >= 3

    def runs(model: Path, out: Path) -> tuple[float, float]:
        code, quantize, stderr = peak_rss(
            ["quantize", str(model), "--method", "rtn", "--bits", "4", "--calib", calib, *FAST,
             "--eval", wikitext, "--eval-seqlen", "64", "--eval-max-windows", "2",
             "--max-shard-size", "100MB", "--output", str(out), "--json"]
        )  # fmt: skip
        assert code == 0, stderr
        code, evaluate, stderr = peak_rss(
            ["eval", str(out), "--data", wikitext, "--seqlen", "64", "--max-windows", "2", "--json"]
        )
        assert code == 0, stderr
        return quantize, evaluate

    own = runs(small, tmp_path / "toy")
    print("PEAKS own", [x / 2**20 for x in own])
    peaks = runs(source, tmp_path / "q")
    print("PEAKS big", [x / 2**20 for x in peaks], size / 2**20)
    for label, peak, base in zip(("quantize", "eval"), peaks, own, strict=True):
        bound = base + 0.6 * size
        assert peak < bound, (
            f"{label} peak RSS {peak / 2**30:.2f} GiB >= {base / 2**30:.2f} GiB (the process on a toy model) "
            f"+ 0.6 x {size / 2**30:.2f} GiB"
        )
    out = tmp_path / "q"
    report = json.loads((out / "report.json").read_text())
    assert (report["run"]["dtype"], report["run"]["compute_dtype"]) == ("bfloat16", "float32")
    assert (
        len(list(out.glob("model-*-of-*.safetensors"))) >= 3
        and (out / "model.safetensors.index.json").is_file()
    )


# --------------------------------------------------------------------------------------------
# Lazy = resident, sharded output round trip, resume across shards


@pytest.fixture(scope="module")
def small(tokenizer, tmp_path_factory) -> Path:
    """A 4-block bf16 Llama in 3+ shards."""
    folder = tmp_path_factory.mktemp("small") / "llama"
    write_synthetic_llama(
        folder, hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=512,
        tokenizer=tokenizer, max_shard_bytes=80_000, context=128,
    )  # fmt: skip
    return folder


@pytest.mark.parametrize(("choice", "compute"), [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_lazy_model_equals_the_resident_one(small, wikitext, tokenizer, choice, compute) -> None:
    """Block-by-block perplexity of the lazily opened bf16 model, computed in ``compute`` (auto on
    a CPU: float32), = whole-model perplexity of it loaded in that dtype (same windows, same loss),
    while the skeleton stays bf16 at rest."""
    from cdq_cli.calib import evaluation_ids
    from cdq_cli.run.language import evaluation_texts

    lazy = open_model(str(small), choice, device=torch.device("cpu"))
    try:
        assert lazy.weights is not None and next(lazy.model.parameters()).device.type == "meta"
        assert lazy.dtype == torch.bfloat16 and lazy.compute_dtype == compute
        blockwise = perplexity_of(
            lazy,
            evaluation_texts(wikitext),
            seqlen=64,
            device=torch.device("cpu"),
            max_windows=3,
            batch_size=2,
        )
        assert {p.dtype for p in lazy.model.parameters()} == {torch.bfloat16}  # given back as stored
        assert {p.device.type for p in lazy.model.parameters()} == {"meta"}
    finally:
        lazy.close()
    whole = AutoModelForCausalLM.from_pretrained(small, dtype=compute).eval()
    ids = evaluation_ids(evaluation_texts(wikitext), tokenizer)
    reference = perplexity(whole, ids, seqlen=64, max_windows=3, batch_size=2).to_dict()
    assert blockwise == reference


def test_sharded_output_round_trip_and_resume_across_shards(small, calib, wikitext, tmp_path, capsys) -> None:
    args = ["quantize", str(small), "--method", "gptq", "--bits", "4", "--calib", calib, *FAST,
            "--max-shard-size", "20KB"]  # fmt: skip
    reference = tmp_path / "reference"
    assert cli(capsys, *args, "--output", reference)[0] == 0
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((reference / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # every shard is a valid safetensors file holding what the index says
        with safe_open(str(reference / shard), framework="pt") as fh:
            assert {k for k, v in index["weight_map"].items() if v == shard} == set(fh.keys())
    # round trip: the reloaded model computes what the written folder evaluates to
    code, out, _ = cli(
        capsys, "eval", reference, "--data", wikitext, "--seqlen", "64", "--max-windows", "2", "--json"
    )
    model, tokenizer = load_quantized(reference, torch.float32)  # what cdq eval computes in on a CPU
    from cdq_cli.calib import evaluation_ids
    from cdq_cli.run.language import evaluation_texts

    ids = evaluation_ids(evaluation_texts(wikitext), tokenizer)
    whole = perplexity(model, ids, seqlen=64, max_windows=2, batch_size=8).to_dict()
    assert code == 0 and json.loads(out)["ppl"] == whole["ppl"]
    # resume across shards: killed after block 1, resumed: the same bytes in every shard
    out_dir = tmp_path / "q"
    env = {**os.environ, KILL_ENV: "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "cdq_cli", *args, "--output", str(out_dir)], env=env)
    assert killed.returncode < 0 and not out_dir.exists() and journal_folder(out_dir).is_dir()
    assert cli(capsys, *args, "--output", out_dir, "--resume")[0] == 0
    for shard in shards:
        assert (out_dir / shard).read_bytes() == (reference / shard).read_bytes(), shard
    assert (out_dir / "model.safetensors.index.json").read_bytes() == (
        reference / "model.safetensors.index.json"
    ).read_bytes()


# --------------------------------------------------------------------------------------------
# Σ once per distinct input


def test_shared_sigma_equals_separate_sigma(tokenizer) -> None:
    """q/k/v (and gate/up) are fed the same tensor: one Σ object, equal to each layer's own Σ."""
    from cdq_cli.pipeline import _collect, capture

    model = tiny_model("llama")
    adapter = adapter_for(model)
    settings = make_settings(method="rtn", bits=4, sigma_dtype=torch.float64)
    placement = Placement(model, torch.device("cpu"))
    batches = [torch.randint(0, 100, (2, 16)) for _ in range(3)]
    acts = capture(model, adapter, placement, batches)
    block = adapter.blocks(model)[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]
    shared = _collect(adapter, block, acts, names, settings)
    assert shared["self_attn.q_proj"] is shared["self_attn.k_proj"] is shared["self_attn.v_proj"]
    assert shared["mlp.gate_proj"] is shared["mlp.up_proj"]
    assert shared["self_attn.q_proj"] is not shared["mlp.gate_proj"]
    for name in names:  # each against a Σ collected for that layer alone
        alone = _collect(adapter, block, acts, [name], settings)[name]
        assert torch.equal(shared[name].sigma, alone.sigma) and shared[name].tokens == alone.tokens


def test_activations_offloaded_give_the_same_result(tokenizer, calib, tmp_path, capsys) -> None:
    model_dir = save_tiny("llama", tmp_path / "llama", tokenizer)
    outputs = {}
    for policy in ("always", "never"):
        out = tmp_path / policy
        args = ["quantize", model_dir, "--method", "gptq", "--calib", calib, *FAST, "--output", out]
        assert cli(capsys, *args, "--offload-activations", policy)[0] == 0
        outputs[policy] = (out / "model.safetensors").read_bytes()
    assert outputs["always"] == outputs["never"]


# --------------------------------------------------------------------------------------------
# Mixture of experts (transformers 5: fused 3-D experts)


def moe_config(kind: str):
    if kind == "mixtral":
        return MixtralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=128,
        )  # fmt: skip
    return Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=128, decoder_sparse_step=2, mlp_only_layers=[],
    )  # fmt: skip


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe(request, tokenizer, tmp_path_factory) -> tuple[str, Path]:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    model = AutoModelForCausalLM.from_config(moe_config(request.param))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return request.param, folder


def test_every_expert_is_its_own_matrix_with_its_own_sigma(moe, calib, wikitext, tmp_path, capsys) -> None:
    kind, folder = moe
    out = tmp_path / "q"
    code, stdout, stderr = cli(
        capsys, "quantize", folder, "--method", "gptq", "--bits", "4", "--calib", calib,
        "--nsamples", "8", "--seqlen", "32", "--output", out, "--eval", wikitext, "--eval-seqlen", "64",
        "--eval-max-windows", "2", "--json",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    config = moe_config(kind)
    experts = config.num_local_experts if kind == "mixtral" else config.num_experts
    k = config.num_experts_per_tok
    moe_blocks = [0, 1] if kind == "mixtral" else [1]  # qwen2_moe: block 0 is dense (decoder_sparse_step 2)
    for block in moe_blocks:
        for projection in ("gate_up_proj", "down_proj"):
            rows = [
                r
                for r in report["layers"]
                if r["name"].startswith(f"model.layers.{block}.mlp.experts.{projection}[")
            ]
            assert len(rows) == experts
            assert sum(r["tokens"] for r in rows) == 8 * 32 * k  # every routed token, once per choice
            assert all(r["error"] <= r["rtn_error"] * (1 + 1e-9) for r in rows if r["tokens"])
    table = json.loads((out / "quantization.json").read_text())
    fused = table["layers"]["model.layers.1.mlp.experts.down_proj"]
    assert fused["param"] == "model.layers.1.mlp.experts.down_proj" and len(fused["shape"]) == 3
    assert "model.layers.1.mlp.gate.weight" in report["not_quantized"]["layers"]  # the router, named
    # what was written evaluates, block by block, to what the reloaded whole model computes
    model, tokenizer = load_quantized(out)
    from cdq_cli.calib import evaluation_ids
    from cdq_cli.run.language import evaluation_texts

    ids = evaluation_ids(evaluation_texts(wikitext), tokenizer)
    whole = perplexity(model, ids, seqlen=64, max_windows=2, batch_size=8)
    assert json.loads(stdout)["evaluation"]["ppl"] == pytest.approx(whole.ppl, rel=1e-6)
    stored = model.get_parameter("model.layers.1.mlp.experts.gate_up_proj")
    source = AutoModelForCausalLM.from_pretrained(folder).get_parameter(
        "model.layers.1.mlp.experts.gate_up_proj"
    )
    assert stored.shape == source.shape and not torch.equal(stored, source)


def test_an_expert_without_tokens_is_rounded_and_flagged(moe, calib, tmp_path, capsys, monkeypatch) -> None:
    kind, folder = moe
    if kind != "mixtral":
        pytest.skip("one family is enough for the routing override")
    from transformers.models.mixtral import modeling_mixtral

    real = modeling_mixtral.MixtralTopKRouter.forward

    def never_expert_3(self, hidden):
        logits, weights, index = real(self, hidden)
        return logits, weights, torch.where(index == 3, torch.zeros_like(index), index)

    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", never_expert_3)
    out = tmp_path / "q"
    assert (
        cli(capsys, "quantize", folder, "--method", "gptq", "--calib", calib, *FAST, "--output", out)[0] == 0
    )
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["layers"]}
    row = rows["model.layers.0.mlp.experts.gate_up_proj[3]"]
    assert row["tokens"] == 0 and row["method"] == "rtn" and "no calibration tokens" in row["note"]
    assert rows["model.layers.0.mlp.experts.gate_up_proj[0]"]["method"] == "gptq"


def test_experts_capture_refuses_an_unknown_experts_computation(
    moe, calib, tmp_path, capsys, monkeypatch
) -> None:
    kind, folder = moe
    if kind != "mixtral":
        pytest.skip("one family is enough")
    from transformers.models.mixtral import modeling_mixtral

    real = modeling_mixtral.MixtralExperts.forward
    monkeypatch.setattr(modeling_mixtral.MixtralExperts, "forward", lambda self, *a: 2 * real(self, *a))
    code, _, stderr = cli(capsys, "quantize", folder, "--calib", calib, *FAST, "--output", tmp_path / "q")
    assert code == 2 and "experts compute differently" in stderr
