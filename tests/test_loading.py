"""Model loading: the real stories260K folder, its bare sentencepiece variant, and failure messages."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cdq_cli.models.causal_lm import ModelLoadError, load_causal_lm, smollm2_gguf
from cdq_cli.offline import data_dir as find_data_dir


@pytest.fixture(scope="module")
def stories_dir(data_dir: Path) -> Path:
    return data_dir / "models" / "stories260K"


def _story_tokens(tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer("Once upon a time")["input_ids"])


def test_stories_folder(stories_dir: Path) -> None:
    model, tokenizer = load_causal_lm(str(stories_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 260_032
    assert next(model.parameters()).dtype == torch.float32
    assert _story_tokens(tokenizer) == ["<s>", "▁Once", "▁upon", "▁a", "▁time"]
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "Once upon a time"
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0], skip_special_tokens=True).startswith("Once upon a time, there was")


def test_bare_sentencepiece_folder_gets_llama_tokenizer(stories_dir: Path, tmp_path: Path) -> None:
    """Without tokenizer.json, AutoTokenizer mis-reads tokenizer.model ("O", "n", "ce"): detected."""
    for name in ("config.json", "tokenizer.model", "model.safetensors"):
        shutil.copy(stories_dir / name, tmp_path / name)
    _, tokenizer = load_causal_lm(str(tmp_path), dtype=torch.float64)
    assert _story_tokens(tokenizer) == ["<s>", "▁Once", "▁upon", "▁a", "▁time"]
    # What an output folder stores reads back the same way (BOS included).
    tokenizer.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert _story_tokens(again) == ["<s>", "▁Once", "▁upon", "▁a", "▁time"]


def test_configured_folder_keeps_its_own_bos_setting(stories_dir: Path, tmp_path: Path) -> None:
    """A folder whose tokenizer_config.json turns BOS off is obeyed, not second-guessed."""
    for name in ("config.json", "tokenizer.model", "model.safetensors"):
        shutil.copy(stories_dir / name, tmp_path / name)
    _, tokenizer = load_causal_lm(str(tmp_path), dtype=torch.float64)
    tokenizer.add_bos_token = False
    tokenizer.save_pretrained(tmp_path)
    _, again = load_causal_lm(str(tmp_path), dtype=torch.float64)
    assert _story_tokens(again) == ["▁Once", "▁upon", "▁a", "▁time"]


def test_hub_id_offline_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_causal_lm("facebook/opt-1.3b")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message
    assert "cannot load 'facebook/opt-1.3b' from the Hugging Face hub" in message
    assert "cdq quantize /path/to/opt-1.3b" in message


@pytest.mark.parametrize("name", ["./definitely-not-here", "missing/deeper/model", "weights.gguf"])
def test_missing_paths(name: str) -> None:
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_causal_lm(name)


def test_bad_local_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_causal_lm(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="expected a model folder"):
        load_causal_lm(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelLoadError, match="no config.json and no .gguf"):
        load_causal_lm(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_causal_lm(str(tmp_path), gguf_file="model.gguf")


def test_smollm2_gguf_is_located_without_import() -> None:
    path = smollm2_gguf()
    assert path is None or (path.suffix == ".gguf" and path.is_file())


def test_data_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CDQ_DATA_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path
    monkeypatch.delenv("CDQ_DATA_DIR")
    found = find_data_dir()
    assert found is None or (found / "text").is_dir()


def test_a_pickled_checkpoint_opens_resident_and_quantizes(stories_dir: Path, tmp_path: Path, capsys) -> None:
    """A folder with only pytorch_model.bin is held whole (not lazily): it opens, in float32, and
    quantizes to the same layers as the same weights stored as safetensors."""
    import json

    from cli_runner import cli
    from safetensors.torch import load_file
    from tiny_lm import save_tiny

    from cdq_cli.run.language import open_model

    tokenizer = load_causal_lm(str(stories_dir))[1]
    lazy = Path(save_tiny("llama", tmp_path / "lazy", tokenizer))
    pickled = tmp_path / "pickled"
    shutil.copytree(lazy, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    opened = open_model(str(pickled), "auto")
    assert opened.weights is None and opened.dtype == opened.compute_dtype == torch.float32
    calib = str(find_data_dir() / "text" / "c4-sample.jsonl")
    outs = []
    for source in (lazy, pickled):
        out = tmp_path / f"q-{source.name}"
        args = ["quantize", source, "--method", "gptq", "--calib", calib, "--nsamples", "4", "--seqlen", "32"]
        code, _, stderr = cli(capsys, *args, "--quiet", "--output", out)
        assert code == 0, stderr
        outs.append(out)
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    assert json.loads((outs[1] / "report.json").read_text())["run"]["dtype"] == "float32"
