"""Storage dtype and compute dtype are two things: a bf16 checkpoint stays bf16 at rest and in the
output, its blocks are computed in the compute dtype (float32 on a CPU by default)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from safetensors import safe_open
from synthetic_lm import write_synthetic_llama
from transformers import AutoModelForCausalLM

from cdq_cli.models import load_causal_lm
from cdq_cli.run import plan
from cdq_cli.store.folder import OutputWeights
from cdq_cli.store.shards import shard_files

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


@pytest.fixture(scope="module")
def checkpoints(data_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The same 2-block Llama twice: as bf16 shards, and as a float32 checkpoint of exactly those
    values (bf16 → float32 is exact)."""
    tokenizer = load_causal_lm(str(data_dir / "models" / "stories260K"))[1]
    root = tmp_path_factory.mktemp("dtypes")
    bf16 = root / "bf16"
    write_synthetic_llama(
        bf16, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512,
        tokenizer=tokenizer, max_shard_bytes=80_000, context=128,
    )  # fmt: skip
    fp32 = root / "fp32"
    AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).save_pretrained(fp32)
    tokenizer.save_pretrained(fp32)
    return bf16, fp32


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = shard_files(folder)
    out = {}
    for name, file in files.items():
        with safe_open(str(folder / file), framework="pt") as fh:
            out[name] = fh.get_tensor(name)
    return out


def test_bf16_checkpoint_is_computed_in_float32_and_stays_bf16(
    checkpoints, calib, wikitext, tmp_path, capsys
):
    """On a CPU the default computes a bf16 checkpoint's blocks in float32: its quantized layers
    are byte for byte those of the float32 checkpoint of the same values, every other tensor is
    written back in bf16, the report names both dtypes, and the written model scores exactly what
    the float32 one does."""
    bf16, fp32 = checkpoints
    outs, reports = {}, {}
    for label, source in (("bf16", bf16), ("fp32", fp32)):
        out = tmp_path / label
        code, stdout, stderr = cli(
            capsys, "quantize", source, "--method", "gptq", "--calib", calib, *FAST, "--output", out,
            "--eval", wikitext, "--eval-seqlen", "64", "--eval-max-windows", "2", "--json", "--device", "cpu",
        )  # fmt: skip
        assert code == 0, stderr
        outs[label], reports[label] = out, json.loads((out / "report.json").read_text())
    assert (reports["bf16"]["run"]["dtype"], reports["bf16"]["run"]["compute_dtype"]) == (
        "bfloat16",
        "float32",
    )
    assert (reports["fp32"]["run"]["dtype"], reports["fp32"]["run"]["compute_dtype"]) == (
        "float32",
        "float32",
    )
    assert json.loads((outs["bf16"] / "quantization.json").read_text())["dtype"] == "bfloat16"
    a, b = tensors(outs["bf16"]), tensors(outs["fp32"])
    assert a.keys() == b.keys()
    layers = OutputWeights(outs["bf16"]).layer_meta
    assert layers
    for name in a:
        if name.rpartition(".")[0] in layers:  # packed codes, scales, zeros: the same bytes
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
        else:  # embeddings, norms, head: bf16 at rest, the same values
            assert a[name].dtype == torch.bfloat16 and b[name].dtype == torch.float32, name
            assert torch.equal(a[name].float(), b[name]), name
    assert reports["bf16"]["evaluation"] == reports["fp32"]["evaluation"]
    scores = []
    for out in outs.values():
        code, stdout, stderr = cli(
            capsys, "eval", out, "--data", wikitext, "--seqlen", "64", "--max-windows", "2", "--json",
            "--device", "cpu",
        )  # fmt: skip
        assert code == 0, stderr
        scores.append(json.loads(stdout))
    assert scores[0]["ppl"] == scores[1]["ppl"] == reports["bf16"]["evaluation"]["ppl"]
    assert (scores[0]["dtype"], scores[0]["compute_dtype"]) == ("bfloat16", "float32")


def test_dtype_chooses_the_compute_dtype(checkpoints, calib, tmp_path, capsys) -> None:
    bf16, _ = checkpoints
    out = tmp_path / "q"
    code, _, stderr = cli(
        capsys, "quantize", bf16, "--method", "rtn", "--calib", calib, *FAST, "--output", out,
        "--dtype", "bfloat16", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stderr
    run = json.loads((out / "report.json").read_text())["run"]
    assert (run["dtype"], run["compute_dtype"]) == ("bfloat16", "bfloat16")


def test_a_dtype_the_device_cannot_compute_in_is_one_line_before_any_work(
    monkeypatch, calib, tmp_path, capsys
) -> None:
    """Refused before the model is even looked at (here it does not exist): exit 2, one line."""
    missing = tmp_path / "no-such-model"
    monkeypatch.setattr(plan, "_computes", lambda device, dtype: "'addmm' not implemented for 'Half'")
    code, _, stderr = cli(
        capsys, "quantize", missing, "--calib", calib, "--dtype", "float16", "--device", "cpu",
        "--output", tmp_path / "q",
    )  # fmt: skip
    assert code == 2
    assert stderr.strip() == (
        "error: --dtype float16: cpu cannot compute in float16 ('addmm' not implemented for 'Half')"
    )
    assert not (tmp_path / "q").exists()
    code, _, stderr = cli(capsys, "eval", missing, "--data", calib, "--dtype", "float16", "--device", "cpu")
    assert code == 2 and "cpu cannot compute in float16" in stderr and len(stderr.strip().splitlines()) == 1


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch, calib, tmp_path, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    code, _, stderr = cli(
        capsys, "quantize", tmp_path / "model", "--calib", calib, "--dtype", "bfloat16", "--device", "cuda",
        "--output", tmp_path / "q",
    )  # fmt: skip
    assert code == 2
    assert stderr.strip() == (
        "error: --dtype bfloat16: cuda (Tesla V100) does not compute in bfloat16; "
        "use --dtype float16 or float32"
    )


@pytest.mark.parametrize(
    ("device", "capability", "stored", "expected"),
    [
        ("cpu", None, torch.bfloat16, torch.float32),
        ("cpu", None, torch.float16, torch.float32),
        ("cpu", None, torch.float32, torch.float32),
        ("cuda", (9, 0), torch.bfloat16, torch.bfloat16),
        ("cuda", (7, 0), torch.bfloat16, torch.float32),
        ("cuda", (7, 0), torch.float16, torch.float16),
        ("cuda", (9, 0), torch.float32, torch.float32),
    ],
)
def test_auto_is_the_fast_dtype_of_each_device(monkeypatch, device, capability, stored, expected) -> None:
    if capability is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert plan.compute_dtype("auto", torch.device(device), stored) == expected
    assert plan.compute_dtype("float16", torch.device(device), stored) == torch.float16


def test_a_stored_head_is_computed_a_slice_at_a_time() -> None:
    """One slice is exactly F.linear of the converted weight; several slices compute the same dot
    products (a BLAS may round a thin slice differently: within float32 rounding)."""
    from cdq_cli.placement import sliced_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=gen)
    weight = torch.randn(300, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(300, generator=gen).to(torch.bfloat16)
    for b in (None, bias):
        whole = torch.nn.functional.linear(x, weight.float(), None if b is None else b.float())
        assert torch.equal(sliced_linear(x, weight, b), whole)  # the default budget: one slice here
        for rows in (1, 7, 128):
            sliced = sliced_linear(x, weight, b, budget=rows * 64 * 4)
            torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-5)


def test_embeddings_and_head_stay_stored_while_they_compute(checkpoints) -> None:
    """The lean visit keeps the vocabulary-sized matrices in bf16 (no float32 copy of them) and
    computes what float32 copies compute."""
    from cdq_cli.placement import Placement
    from cdq_cli.run.language import open_model

    bf16, _ = checkpoints
    lazy = open_model(str(bf16), "auto")
    whole = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    try:
        placement = Placement(lazy.model, torch.device("cpu"), lazy.weights, dtype=torch.float32)
        model, ids = lazy.model, torch.arange(12).reshape(2, 6)
        embed, head = model.model.embed_tokens, model.lm_head
        with torch.no_grad(), placement.using([embed, head], lean=True):
            assert embed.weight.dtype == head.weight.dtype == torch.bfloat16
            hidden = embed(ids)
            assert torch.equal(hidden, whole.model.embed_tokens(ids))
            assert torch.equal(head(hidden), whole.lm_head(hidden))
        assert embed.weight.device.type == "meta" and "forward" not in vars(head)
    finally:
        lazy.close()


def test_a_subclassed_embedding_is_converted_not_kept_stored(checkpoints) -> None:
    """Only plain nn.Embedding/nn.Linear stay stored: a subclass with its own forward (Gemma's
    scaled embedding computes in its weight's dtype) is read in the compute dtype as before."""
    from cdq_cli.placement import Placement
    from cdq_cli.run.language import open_model

    class Scaled(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * torch.tensor(3.0, dtype=self.weight.dtype)

    bf16, _ = checkpoints
    lazy = open_model(str(bf16), "auto")
    try:
        placement = Placement(lazy.model, torch.device("cpu"), lazy.weights, dtype=torch.float32)
        embed = lazy.model.model.embed_tokens
        embed.__class__ = Scaled
        with torch.no_grad(), placement.using([embed], lean=True):
            assert embed.weight.dtype == torch.float32
            out = embed(torch.arange(6).reshape(1, 6))
        assert out.dtype == torch.float32 and embed.weight.device.type == "meta"
    finally:
        lazy.close()
