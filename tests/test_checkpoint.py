"""Packed checkpoint: layout, bit-exact reload, atomic writes, one-line write errors."""

from __future__ import annotations

import copy
import errno
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_lm import BLOCK_LAYERS, FAMILIES, expected_layers, tiny_model

from cdq_cli.evaluate.perplexity import perplexity
from cdq_cli.models import adapter_for
from cdq_cli.pipeline import quantize_model
from cdq_cli.run.plan import make_settings
from cdq_cli.solvers import METHODS
from cdq_cli.solvers.packing import unpack
from cdq_cli.store import folder as checkpoint
from cdq_cli.store.files import OutputExistsError, WriteError, atomic_folder, write_json_atomic
from cdq_cli.store.folder import read_layers, save_quantized
from cdq_cli.store.reopen import load_quantized

LLAMA_LAYERS = BLOCK_LAYERS["llama"]


def calibration() -> list[torch.Tensor]:
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    return list(ids.split(2))


def quantized(family: str, **settings):
    model = tiny_model(family)
    base = {"method": "rtn", "bits": 3, "device": "cpu"} | settings
    outcome = quantize_model(model, adapter_for(model), calibration(), make_settings(**base))
    return model, outcome


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_equals_in_memory_model(family: str, tmp_path: Path) -> None:
    model, outcome = quantized(family, method="gptq", group_size=16)
    out = save_quantized(tmp_path / "q", model, outcome.layers, info={"method": "gptq"})
    reloaded, tokenizer = load_quantized(out)
    assert tokenizer is None
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    for key, value in model.state_dict().items():  # bit for bit, quantized or not
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_layout_packed_codes_scales_and_marker(tmp_path: Path) -> None:
    model, outcome = quantized("opt", bits=4, group_size=16)
    out = save_quantized(tmp_path / "q", model, outcome.layers, info={"method": "rtn"})
    names = expected_layers("opt")
    table = json.loads((out / "quantization.json").read_text())
    assert list(table["layers"]) == names
    assert table["layers"][names[0]] == {
        "bits": 4,
        "group_size": 16,
        "sym": False,
        "per_layer": False,
        "shape": [32, 32],
        "outliers": 0,
    }
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        assert json.loads(fh.metadata()["cdq_layers"]) == table["layers"]
        fc1 = "model.decoder.layers.0.fc1"
        qweight = fh.get_tensor(f"{fc1}.qweight")
        assert qweight.dtype == torch.int32 and qweight.shape == (64, 32 * 4 // 32)
        assert torch.equal(unpack(qweight, 4, 32).to(torch.uint8), outcome.layers[fc1].codes())
        assert fh.get_tensor(f"{fc1}.scales").shape == (64, 2)
        assert torch.equal(fh.get_tensor(f"{fc1}.bias"), model.get_submodule(fc1).bias)
    for name in names:
        assert f"{name}.weight" not in keys and f"{name}.qweight" in keys and f"{name}.zeros" in keys
    assert {"lm_head.weight", "model.decoder.embed_tokens.weight"} & keys  # full precision, stored once
    assert (out / "config.json").is_file()


def test_outliers_are_stored_as_coo(tmp_path: Path) -> None:
    options = {"iterations": 2, "final_sweeps": 1, "outlier_fraction": 0.05}
    model, outcome = quantized("llama", method="quantease-outlier", bits=2, options=options)
    out = save_quantized(tmp_path / "q", model, outcome.layers)
    stored = read_layers(out)
    for name, layer in outcome.layers.items():
        assert layer.outlier_count > 0
        assert stored[name].outliers_idx.shape == (2, layer.outlier_count)
        assert torch.equal(stored[name].dequantize(), layer.dequantize())
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_quantized(out)[0](ids).logits, model(ids).logits)


def test_overwrite_replaces_only_what_cdq_wrote(tmp_path: Path) -> None:
    """A folder with a file cdq did not write survives even --overwrite; cdq's own is replaced."""
    model, outcome = quantized("bloom")
    dest = tmp_path / "q"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_quantized(dest, model, outcome.layers)
    with pytest.raises(OutputExistsError, match="cdq did not write it"):
        save_quantized(dest, model, outcome.layers, overwrite=True)
    assert (dest / "keep.txt").read_text() == "mine" and siblings(dest) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    save_quantized(empty, model, outcome.layers)  # an empty folder is fine without --overwrite
    manifest = json.loads((empty / ".cdq-manifest.json").read_text())["files"]
    assert sorted(manifest) == sorted(p.name for p in empty.iterdir() if p.name != ".cdq-manifest.json")
    save_quantized(empty, model, outcome.layers, overwrite=True)  # cdq's own folder: replaced
    assert (empty / "quantization.json").is_file() and siblings(empty) == []
    (empty / "notes.txt").write_text("added later by a person")
    with pytest.raises(OutputExistsError, match="holds 'notes.txt', which cdq did not write"):
        save_quantized(empty, model, outcome.layers, overwrite=True)
    assert (empty / "notes.txt").is_file()
    (empty / "notes.txt").unlink()
    (empty / "sub").mkdir()
    with pytest.raises(OutputExistsError, match="holds 'sub'"):
        save_quantized(empty, model, outcome.layers, overwrite=True)


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_write_leaves_nothing(tmp_path: Path, interrupt: BaseException) -> None:
    dest = tmp_path / "q"
    with pytest.raises(type(interrupt)):
        with atomic_folder(dest) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise interrupt
    assert not dest.exists() and siblings(dest) == []


def test_interrupted_overwrite_keeps_the_old_folder(tmp_path: Path) -> None:
    dest = tmp_path / "q"
    with atomic_folder(dest) as tmp:  # a folder cdq wrote (its manifest lists old.txt)
        (tmp / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(dest, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert (dest / "old.txt").read_text() == "old" and siblings(dest) == []


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, outcome = quantized("llama")

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cdq_cli.store.shards.ShardWriter.write", full)
    dest = tmp_path / "q"
    with pytest.raises(WriteError) as info:
        save_quantized(dest, model, outcome.layers)
    assert str(info.value) == f"no space left on device while writing {dest}"
    assert info.value.errno == errno.ENOSPC
    assert not dest.exists() and siblings(dest) == []


def test_json_rewrite_is_atomic_and_rejects_nan(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_not_a_cdq_folder(tmp_path: Path) -> None:
    with pytest.raises(checkpoint.CheckpointError, match="not a cdq output folder"):
        load_quantized(tmp_path)


@pytest.fixture(scope="module")
def stories(data_dir: Path):
    """stories260K, 16 x 128 C4 calibration windows, 40 x 512 WikiText-2 windows and their FP ppl."""
    from cdq_cli.calib import calibration_windows, evaluation_ids, load_texts
    from cdq_cli.models import load_causal_lm

    folder = data_dir / "models" / "stories260K"
    if not folder.is_dir():
        pytest.skip(f"missing shared model {folder}")
    model, tokenizer = load_causal_lm(str(folder))
    calib = load_texts(str(data_dir / "text" / "c4-sample.jsonl"))
    windows = calibration_windows(calib, tokenizer, nsamples=16, seqlen=128, seed=0)
    wiki = evaluation_ids(load_texts(str(data_dir / "text" / "wikitext2-raw-test.txt")), tokenizer)
    wiki = wiki[:, : 40 * 512 + 1]
    return model, windows, wiki, perplexity(model, wiki, seqlen=512, batch_size=8).ppl


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stories260k_every_method_reloads_exactly(method: str, stories, tmp_path: Path) -> None:
    """Real weights, every method at 4 bits: finite perplexity near FP, and the saved folder
    reloads to exactly the in-memory quantized model."""
    original, windows, wiki, fp = stories
    model = copy.deepcopy(original)
    outcome = quantize_model(
        model, adapter_for(model), windows.split(8), make_settings(method=method, device="cpu")
    )
    assert [r.name for r in outcome.rows] == [f"model.layers.{i}.{n}" for i in range(5) for n in LLAMA_LAYERS]
    q = perplexity(model, wiki, seqlen=512, batch_size=8).ppl
    print(f"stories260K w4 {method}: FP {fp:.2f} -> {q:.2f} ({q / fp - 1:+.1%})")
    assert math.isfinite(q) and q < 1.15 * fp
    out = save_quantized(tmp_path / method, model, outcome.layers)
    reloaded, _ = load_quantized(out)
    ids = wiki[:, :256]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
