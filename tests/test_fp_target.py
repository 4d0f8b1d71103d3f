"""The full-precision target (-o target=fp, GPTAQ's objective ‖W X̃ − Ŵ X‖², taken a share α of the
way by -o fp_share): the reduction to a least-squares target W*_α, the paired statistics the
driver captures from two activation streams, the report's error checked against the objective
computed from the two models' real inputs, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from tiny_lm import save_tiny

from cdq_cli.models import load_causal_lm
from cdq_cli.solvers import solve
from cdq_cli.solvers.sigma import PairedSigmaAccumulator
from cdq_cli.solvers.target import FP_SHARE, fp_correction, fp_objective, fp_target
from cdq_cli.store.reopen import load_quantized

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


def _streams(seed: int = 0, p: int = 12, n: int = 300, q: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(p, n, generator=gen, dtype=torch.float64)
    x_fp = x + 0.2 * torch.randn(p, n, generator=gen, dtype=torch.float64)  # the FP model's inputs
    w = torch.randn(q, p, generator=gen, dtype=torch.float64)
    return w, x, x_fp, gen


def _paired(w: torch.Tensor, x: torch.Tensor, x_fp: torch.Tensor, batches: int = 3) -> PairedSigmaAccumulator:
    """The statistics of the two streams, folded in a few batches of tokens at a time."""
    acc = PairedSigmaAccumulator(w, x.shape[0], dtype=x.dtype)
    for cols, fp_cols in zip(x.T.chunk(batches), x_fp.T.chunk(batches), strict=True):
        acc.add_pair(fp_cols, cols)
    return acc


def test_the_paired_statistics_are_what_w_makes_of_both_streams() -> None:
    """Σ = X Xᵀ, the residual W (X̃ − X) Xᵀ = W (C − Σ), and per row ‖W X̃‖² and ‖W (X̃ − X)‖²,
    against their definitions."""
    w, x, x_fp, _ = _streams(5)
    acc = _paired(w, x, x_fp)
    torch.testing.assert_close(acc.sigma, x @ x.T, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(acc.residual, w @ (x_fp @ x.T - x @ x.T), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(acc.energy, ((w @ x_fp) ** 2).sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.upstream, ((w @ (x_fp - x)) ** 2).sum(1), rtol=1e-10, atol=0)
    assert acc.tokens == x.shape[1]


def test_a_layer_sharing_sigma_reads_its_owners_and_keeps_its_own_products() -> None:
    w, x, x_fp, gen = _streams(6)
    other = torch.randn(4, x.shape[0], generator=gen, dtype=torch.float64)
    owner = PairedSigmaAccumulator(w, x.shape[0], dtype=x.dtype)
    sharer = PairedSigmaAccumulator(other, x.shape[0], dtype=x.dtype)
    sharer.share_sigma(owner)
    owner.add_pair(x_fp.T, x.T)
    sharer.add_pair(x_fp.T, x.T)
    assert sharer.sigma is owner.sigma and len(sharer.state_tensors()) == 3
    torch.testing.assert_close(sharer.residual, _paired(other, x, x_fp, 1).residual, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="before the first batch"):
        owner.share_sigma(sharer)


@pytest.mark.parametrize("share", [1.0, FP_SHARE, 0.6])
def test_the_solvers_objective_on_w_star_is_the_true_objective_up_to_a_constant(share) -> None:
    """On W*_α the solver's ‖(W*_α − Ŵ) X‖² (plus the ridge's term) differs from
    ‖W X_α − Ŵ X‖², X_α = X + α (X̃ − X), by a constant; α = 1 is ‖W X̃ − Ŵ X‖² itself, which
    the report's :func:`fp_objective` gives."""
    w, x, x_fp, gen = _streams()
    acc = _paired(w, x, x_fp)
    sigma, residual, upstream = acc.sigma, acc.residual, float(acc.upstream.sum())
    x_share = x + share * (x_fp - x)
    for damping in (0.0, 0.01):
        target = fp_target(w, sigma, residual, damping, share)
        correction = fp_correction(sigma, residual, damping)
        lam = max(damping, 1e-10) * float(sigma.diagonal().mean())
        offsets = []
        for _ in range(4):
            approx = w + 0.3 * torch.randn(w.shape, generator=gen, dtype=torch.float64)
            true = float(((w @ x_share - approx @ x) ** 2).sum())
            if share == 1.0:
                value = fp_objective(w, approx, sigma, correction, damping, upstream)
                assert value == pytest.approx(true, rel=1e-10)
            surrogate = float((((target - approx) @ x) ** 2).sum())
            ridge = 2 * lam * float(((target - w) * (target - approx)).sum())
            offsets.append(true - surrogate - ridge)
        assert max(offsets) - min(offsets) <= 1e-8 * abs(offsets[0]), damping
    assert float(acc.energy.sum()) == pytest.approx(float(((w @ x_fp) ** 2).sum()), rel=1e-12)


def test_float32_statistics_give_the_float64_target_and_objective() -> None:
    """The driver's statistics and factor are in Σ's dtype (float32 by default): W*_α and the
    report's error against the same computed in float64, on real-scale inputs."""
    w, x, x_fp, gen = _streams(7, p=64, n=2000, q=16)
    exact = _paired(w, x, x_fp)
    single = _paired(w.float(), x.float(), x_fp.float())
    approx = (w * 4).round() / 4
    for share in (1.0, FP_SHARE):
        want = fp_target(w, exact.sigma, exact.residual, 0.01, share)
        got = fp_target(w.float(), single.sigma, single.residual, 0.01, share)
        assert float((got.double() - want).abs().max()) <= 1e-4 * float((want - w).abs().max())
    want = float((((w @ x_fp) - approx @ x) ** 2).sum())
    correction = fp_correction(single.sigma, single.residual, 0.01)
    upstream = float(single.upstream.sum())
    got = fp_objective(w.float(), approx.float(), single.sigma, correction, 0.01, upstream)
    assert got == pytest.approx(want, rel=1e-5)


def test_a_share_of_the_way_is_that_share_of_the_correction() -> None:
    """W*_α = W + α (W*_1 − W) (the correction is linear in α), α = 1 is the whole target and
    α → 0 tends to W."""
    w, x, x_fp, _ = _streams(3)
    acc = _paired(w, x, x_fp)
    whole = fp_target(w, acc.sigma, acc.residual, 0.01, 1.0)
    for share in (FP_SHARE, 0.5, 1e-9):
        part = fp_target(w, acc.sigma, acc.residual, 0.01, share)
        torch.testing.assert_close(part, w + share * (whole - w))
    assert not torch.allclose(fp_target(w, acc.sigma, acc.residual, 0.01, FP_SHARE), whole)


def test_w_star_is_w_when_the_streams_agree_and_the_minimiser_otherwise() -> None:
    w, x, x_fp, _ = _streams(1)
    same = _paired(w.float(), x.float(), x.float())
    assert not bool(same.residual.any())  # W X̃ − W X is exactly zero, batch by batch
    for share in (1.0, FP_SHARE):
        assert torch.equal(fp_target(w.float(), same.sigma, same.residual, 0.01, share), w.float())
    acc = _paired(w, x, x_fp)
    target = fp_target(w, acc.sigma, acc.residual, 0.0, 1.0)
    exact = torch.linalg.lstsq(x.T, (w @ x_fp).T).solution.T  # argmin_V ‖W X̃ − V X‖²
    torch.testing.assert_close(target, exact, rtol=1e-8, atol=1e-9)


def test_grouped_statistics_are_the_groups_problems_side_by_side() -> None:
    gen = torch.Generator().manual_seed(2)
    groups, c, m = 3, 4, 50
    cols, fp_cols = torch.randn(groups, c, m, generator=gen), torch.randn(groups, c, m, generator=gen)
    w = torch.randn(groups * 2, c, generator=gen)
    acc = PairedSigmaAccumulator(w, c, groups=groups)
    acc.add_pair_columns(fp_cols, cols)
    approx = w.round()
    target = fp_target(w, acc.sigma, acc.residual, 0.01, FP_SHARE)
    correction = fp_correction(acc.sigma, acc.residual, 0.01)
    value = fp_objective(w, approx, acc.sigma, correction, 0.01, float(acc.upstream.sum()))
    for g in range(groups):
        rows = slice(2 * g, 2 * g + 2)
        one = PairedSigmaAccumulator(w[rows], c)
        one.add_pair(fp_cols[g].T, cols[g].T)
        torch.testing.assert_close(target[rows], fp_target(w[rows], one.sigma, one.residual, 0.01, FP_SHARE))
        torch.testing.assert_close(acc.energy[rows], one.energy)
    direct = sum(
        float(((w[2 * g : 2 * g + 2] @ fp_cols[g] - approx[2 * g : 2 * g + 2] @ cols[g]) ** 2).sum())
        for g in range(groups)
    )
    assert value == pytest.approx(direct, rel=1e-5)


def test_the_python_api_refuses_target_fp_without_the_cross_term() -> None:
    w, x, _, _ = _streams()
    for options in ({"target": "fp"}, {"target": "fp", "fp_share": 0.5}, {"fp_share": 0.5}):
        with pytest.raises(ValueError, match=r"target=fp \(and its fp_share\) needs the full-precision"):
            solve("cdq", w, x @ x.T, bits=3, **options)


# -- the driver ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _model, tokenizer = load_causal_lm(str(data_dir / "models" / "stories260K"))
    return save_tiny("llama", tmp_path_factory.mktemp("fp-target") / "llama", tokenizer)


def _inputs(model: torch.nn.Module, name: str, batches: torch.Tensor) -> torch.Tensor:
    """Every calibration token's input to layer ``name`` of ``model``, as (features, tokens)."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        for batch in batches.split(8):
            model(batch, use_cache=False)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).T.to(torch.float64)


@pytest.mark.parametrize("method", ["cdq", "gptq", "quantease"])
def test_the_reported_error_is_the_objective_on_the_two_models_inputs(method, llama, calib, tmp_path, capsys):
    """The report's error for a layer of block 1 equals ‖W X̃ − Ŵ X‖² computed from scratch: X̃ from
    the original model, X from the quantized model reloaded from the output folder (block 0 and
    the earlier groups of block 1 quantized), Ŵ from the folder."""
    from cdq_cli.calib import calibration_windows, load_texts

    out = tmp_path / "q"
    code, _, err = cli(capsys, "quantize", llama, "--method", method, "--bits", "3", "-o", "target=fp",
                       "--calib", calib, *FAST, "--output", out)  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["target"] == "fp"
    original, tokenizer = load_causal_lm(str(llama))
    windows = calibration_windows(load_texts(calib), tokenizer, nsamples=4, seqlen=32, seed=0)
    quantized, _ = load_quantized(out)
    rows = {row["name"]: row for row in report["layers"]}
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        x_fp = _inputs(original, name, windows)
        x = _inputs(quantized, name, windows)
        w = original.get_submodule(name).weight.detach().to(torch.float64)
        approx = quantized.get_submodule(name).weight.detach().to(torch.float64)
        true = float(((w @ x_fp - approx @ x) ** 2).sum())
        assert rows[name]["error"] == pytest.approx(true, rel=1e-4), name
        assert rows[name]["solver_error"] is not None and rows[name]["rtn_error"] > 0
        assert rows[name]["relative_error"] == pytest.approx(true / float(((w @ x_fp) ** 2).sum()), rel=1e-4)


def _stopped_after_one_block(capsys, monkeypatch, *argv) -> None:
    """Run ``cdq ARGV`` interrupted (Ctrl-C) once its first block is journaled: exit 130."""
    from cdq_cli.store import journal as resume

    real = resume.Journal.on_block_done

    def stop(self, index, rows, layers):
        real(self, index, rows, layers)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(resume.Journal, "on_block_done", stop)
        assert cli(capsys, *argv)[0] == 130


def test_target_fp_changes_the_result_and_resumes_to_the_same_bytes(
    llama, calib, tmp_path, capsys, monkeypatch
):
    args = ["quantize", llama, "--method", "gptq", "--bits", "3", "--calib", calib, *FAST]
    assert cli(capsys, *args, "--output", tmp_path / "plain")[0] == 0
    assert cli(capsys, *args, "-o", "target=fp", "--output", tmp_path / "whole")[0] == 0
    weights = "model.safetensors"
    assert (tmp_path / "plain" / weights).read_bytes() != (tmp_path / "whole" / weights).read_bytes()
    _stopped_after_one_block(capsys, monkeypatch, *args, "-o", "target=fp", "--output", tmp_path / "q")
    assert cli(capsys, *args, "-o", "target=fp", "--output", tmp_path / "q", "--resume")[0] == 0
    assert (tmp_path / "whole" / weights).read_bytes() == (tmp_path / "q" / weights).read_bytes()


def test_the_share_changes_the_result_is_recorded_and_a_run_resumes_only_with_its_own(
    llama, calib, tmp_path, capsys, monkeypatch
):
    args = ["quantize", llama, "--method", "cdq", "--bits", "3", "--calib", calib, *FAST, "-o", "target=fp"]
    assert cli(capsys, *args, "--output", tmp_path / "default")[0] == 0
    assert cli(capsys, *args, "-o", f"fp_share={FP_SHARE}", "--output", tmp_path / "given")[0] == 0
    assert cli(capsys, *args, "-o", "fp_share=1", "--output", tmp_path / "whole")[0] == 0
    weights = "model.safetensors"
    assert (tmp_path / "default" / weights).read_bytes() == (tmp_path / "given" / weights).read_bytes()
    assert (tmp_path / "default" / weights).read_bytes() != (tmp_path / "whole" / weights).read_bytes()
    for folder, share in (("default", FP_SHARE), ("whole", 1.0)):
        report = json.loads((tmp_path / folder / "report.json").read_text())
        assert report["run"]["target"] == "fp" and report["run"]["fp_share"] == share, folder
    _stopped_after_one_block(capsys, monkeypatch, *args, "-o", "fp_share=1", "--output", tmp_path / "q")
    capsys.readouterr()
    code, _, err = cli(capsys, *args, "--output", tmp_path / "q", "--resume")  # the default share
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert cli(capsys, *args, "-o", "fp_share=1", "--output", tmp_path / "q", "--resume")[0] == 0
    assert (tmp_path / "whole" / weights).read_bytes() == (tmp_path / "q" / weights).read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "target=quantized", "-o", "fp_share=0.5"], "it needs -o target=fp"),
        (["--fp-inputs", "-o", "fp_share=0.5"], "--fp-inputs turns off its default target=fp"),
        (["-o", "target=fp", "-o", "fp_share=0"], "must be a number in (0, 1]"),
        (["-o", "target=fp", "-o", "fp_share=1.5"], "must be a number in (0, 1]"),
    ],
)
def test_a_share_without_the_target_or_out_of_range_is_refused_before_any_work(
    extra, message, llama, calib, tmp_path, capsys
) -> None:
    out = tmp_path / "refused"
    code, _, err = cli(capsys, "quantize", llama, "--calib", calib, *FAST, *extra, "--output", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_target_fp_with_fp_inputs_or_fused_experts_is_refused_before_any_work(
    llama, data_dir, calib, tmp_path, capsys
) -> None:
    code, _, err = cli(
        capsys, "quantize", llama, "-o", "target=fp", "--fp-inputs", "--output", tmp_path / "a"
    )
    assert code == 2 and "choose one" in err and len(err.strip().splitlines()) == 1
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128,
    )  # fmt: skip
    folder = tmp_path / "mixtral"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_causal_lm(str(data_dir / "models" / "stories260K"))[1].save_pretrained(folder)
    capsys.readouterr()
    code, _, err = cli(
        capsys, "quantize", folder, "-o", "target=fp", "--calib", calib, *FAST, "--output", tmp_path / "m"
    )
    assert code == 2 and "does not support fused experts" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
    # cdq's default target=fp yields on that model, and says so
    code, _, err = cli(capsys, "quantize", folder, "--calib", calib, *FAST[:-1], "--output", tmp_path / "d")
    assert code == 0 and "the model has fused experts" in err and "-o target=quantized" in err, err
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["run"]["target"] == "quantized" and "fp_share" not in report["run"]


def test_target_fp_is_cdqs_default_and_yields_to_fp_inputs(llama, calib, tmp_path, capsys) -> None:
    """cdq without -o target runs the full-precision target at its default share, bit for bit
    the run that asks for it; the baselines keep their own target; with --fp-inputs cdq's default
    is its own target (no refusal)."""
    args = ["quantize", llama, "--bits", "3", "--calib", calib, *FAST]
    runs = {
        "default": [],
        "fp": ["-o", "target=fp"],
        "quantized": ["-o", "target=quantized"],
        "gptq": ["--method", "gptq"],
        "fp-inputs": ["--fp-inputs"],
    }
    reports, weights = {}, {}
    for label, extra in runs.items():
        out = tmp_path / label
        code, _, err = cli(capsys, *args, *extra, "--output", out)
        assert code == 0, (label, err)
        reports[label] = json.loads((out / "report.json").read_text())["run"]
        weights[label] = (out / "model.safetensors").read_bytes()
    assert reports["default"]["target"] == "fp" and reports["default"]["fp_share"] == FP_SHARE
    assert weights["default"] == weights["fp"] != weights["quantized"]
    for label in ("quantized", "gptq", "fp-inputs"):
        assert reports[label]["target"] == "quantized" and "fp_share" not in reports[label], label


def test_target_is_an_option_of_the_three_methods_only(llama, tmp_path, capsys) -> None:
    code, _, err = cli(
        capsys, "quantize", llama, "--method", "comq", "-o", "target=fp", "--output", tmp_path / "c"
    )
    assert code == 2 and "unknown option(s) target" in err
    code, out, _ = cli(capsys, "methods", "--json")
    listed = json.loads(out)
    assert {name for name, entry in listed.items() if "target" in entry["options"]} == {
        "cdq",
        "gptq",
        "quantease",
    }


def test_convolutions_take_the_target_too() -> None:
    """Dense and depthwise convs (EfficientNet-Lite layout): where both streams are still equal
    (the first group of the first block) the residual W (X̃ − X) Xᵀ is exactly zero, W* = W and the
    result is the usual one bit for bit; later layers (depthwise ones included) are solved for the
    other target."""
    from tiny_vision import images, tiny_model

    from cdq_cli.models.vision import vision_adapter_for
    from cdq_cli.pipeline import quantize_model
    from cdq_cli.run.plan import make_settings

    outcomes = {}
    for target in ("quantized", "fp"):
        model = tiny_model("lite0-small")
        adapter = vision_adapter_for(model)
        x = images()
        settings = make_settings(method="gptq", bits=4, device="cpu", options={"target": target})
        outcomes[target] = quantize_model(model, adapter, [x[:3], x[3:]], settings)
    plain, fp = ({row.name: row for row in o.rows} for o in outcomes.values())
    first = outcomes["fp"].rows[0].name
    assert torch.equal(outcomes["fp"].layers[first].qweight, outcomes["quantized"].layers[first].qweight)
    assert fp[first].error == pytest.approx(plain[first].error, rel=1e-6)
    grouped = [name for name in fp if "conv_dw" in name]
    assert grouped and all(fp[name].solver_error is not None for name in grouped)
    fp_layers, plain_layers = outcomes["fp"].layers, outcomes["quantized"].layers
    changed = [name for name in fp if not torch.equal(fp_layers[name].qweight, plain_layers[name].qweight)]
    assert changed  # later layers are solved for another target


def test_the_resume_fingerprint_names_the_targets_revision(tmp_path) -> None:
    """A state saved by a target=fp run of other statistics (revision 1: X̃ Xᵀ in float64) is not
    finished by this one; runs on the layer's own target keep their fingerprints."""
    from cdq_cli.run.plan import make_settings
    from cdq_cli.solvers.target import FP_REVISION
    from cdq_cli.store.journal import fingerprint

    windows = torch.zeros(2, 8, dtype=torch.long)

    def solver(**given) -> str:
        settings = make_settings(device="cpu", **given)
        return fingerprint(str(tmp_path), torch.nn.Linear(2, 2), windows, settings)["versions"]["solver"]

    assert solver(method="cdq").endswith(f", target=fp revision {FP_REVISION}")
    assert solver(method="gptq", options={"target": "fp"}).endswith(f", target=fp revision {FP_REVISION}")
    assert "target" not in solver(method="cdq", options={"target": "quantized"})
    assert "target" not in solver(method="gptq")


def test_add_outputs_is_add_pair_from_the_layers_own_products() -> None:
    """A bias-free Linear's outputs W X̃ and W X give the accumulator the very statistics its own
    products give (F.linear is the same product); outputs that do not fit the inputs are refused."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 10, bias=False)
    pair = PairedSigmaAccumulator(layer.weight, 24)
    outs = PairedSigmaAccumulator(layer.weight, 24)
    for _ in range(3):
        x = torch.randn(2, 7, 24)
        x_fp = x + 0.1 * torch.randn_like(x)
        pair.add_pair(x_fp, x)
        with torch.no_grad():
            outs.add_outputs(layer(x_fp), layer(x), x)
    for a, b in zip(pair.state_tensors(), outs.state_tensors(), strict=True):
        assert torch.equal(a, b)
    assert pair.tokens == outs.tokens == 42
    with pytest.raises(ValueError, match=r"paired outputs must both be \(tokens, 10\)"):
        outs.add_outputs(torch.zeros(14, 10), torch.zeros(14, 9), torch.zeros(14, 24))
