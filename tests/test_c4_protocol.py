"""`cdq eval --data c4`: GPTQ's C4 protocol (256 random windows of random validation documents
longer than the window, seed 0), and named sources streamed through ``datasets``.

The hub is unreachable here, so the named source is fed local C4 documents by replacing the one
function that streams rows (:func:`cdq_cli.calib.text._stream_rows`); the reference windows come
from GPTQ's loop written out below, with the global ``random`` module as GPTQ uses it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaTokenizer

from cdq_cli.calib import C4_EVAL_WINDOWS, DataSourceError, c4_validation_windows, load_texts
from cdq_cli.calib import text as text_module
from cdq_cli.cli import main
from cdq_cli.evaluate.perplexity import C4_PROTOCOL, perplexity
from cdq_cli.models import load_causal_lm


@pytest.fixture(scope="module")
def stories(data_dir: Path) -> Path:
    return data_dir / "models" / "stories260K"


@pytest.fixture(scope="module")
def tokenizer(stories: Path):
    return LlamaTokenizer.from_pretrained(stories)


@pytest.fixture(scope="module")
def c4_rows(data_dir: Path) -> list[dict]:
    lines = (data_dir / "text" / "c4-sample.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def gptq_c4_reference(rows: list[dict], tokenizer, seqlen: int, count: int = 256) -> torch.Tensor:
    """GPTQ's get_c4 validation loop (IST-DASLab/gptq datautils), on the global random module."""
    state = random.getstate()
    try:
        random.seed(0)
        pieces = []
        for _ in range(count):
            while True:
                doc = random.randint(0, len(rows) - 1)
                ids = tokenizer(rows[doc]["text"], return_tensors="pt").input_ids
                if ids.shape[1] > seqlen:
                    break
            start = random.randint(0, ids.shape[1] - seqlen - 1)
            pieces.append(ids[:, start : start + seqlen])
        return torch.hstack(pieces)
    finally:
        random.setstate(state)


def test_windows_are_gptqs(c4_rows, tokenizer) -> None:
    seqlen = 256  # many sample documents are shorter: the loop must redraw exactly as GPTQ does
    short = sum(len(tokenizer(row["text"]).input_ids) <= seqlen for row in c4_rows)
    assert short > 50
    windows = c4_validation_windows([row["text"] for row in c4_rows], tokenizer, seqlen=seqlen)
    assert windows.shape == (C4_EVAL_WINDOWS, seqlen)
    assert torch.equal(windows.reshape(1, -1), gptq_c4_reference(c4_rows, tokenizer, seqlen))


def test_no_document_long_enough_is_one_line(tokenizer) -> None:
    with pytest.raises(DataSourceError, match="no C4 evaluation document is longer than 64 tokens"):
        c4_validation_windows(["short", "also short"], tokenizer, seqlen=64)


@pytest.fixture()
def streamed_c4(monkeypatch: pytest.MonkeyPatch, c4_rows: list[dict]) -> list[tuple]:
    """The hub replaced by the local C4 sample; records every streaming call."""
    calls: list[tuple] = []

    def stream(path, config, split, *, data_files=None, revision=None):
        calls.append((path, config, split, data_files, revision))
        return iter(c4_rows)

    monkeypatch.setattr(text_module, "_stream_rows", stream)
    monkeypatch.setattr(text_module, "hub_offline", lambda: False)
    return calls


def test_cdq_eval_c4_scores_gptqs_windows(streamed_c4, c4_rows, stories, tokenizer, capsys) -> None:
    code = main(["eval", str(stories), "--data", "c4", "--seqlen", "64", "--max-windows", "12", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert streamed_c4 == [
        ("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}, None)
    ]
    assert (result["protocol"], result["windows"], result["seqlen"]) == (C4_PROTOCOL, 12, 64)
    reference = gptq_c4_reference(c4_rows, tokenizer, 64, count=12)  # the first 12 of GPTQ's 256
    model, _ = load_causal_lm(str(stories))
    expected = perplexity(model, reference, seqlen=64, batch_size=4)
    assert result["ppl"] == pytest.approx(expected.ppl, rel=1e-5)


def test_named_sources_stream(streamed_c4, c4_rows) -> None:
    assert load_texts("c4") == [row["text"] for row in c4_rows]
    assert streamed_c4[-1][:4] == (
        "allenai/c4",
        None,
        "train",
        {"train": "en/c4-train.00000-of-01024.json.gz"},
    )
    with pytest.raises(DataSourceError, match="c4 has splits train, validation, not 'test'"):
        load_texts("c4", split="test")


def test_a_failing_stream_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args, **_kwargs):
        raise ConnectionError("Connection reset by peer\nmore detail")

    monkeypatch.setattr(text_module, "_stream_rows", broken)
    monkeypatch.setattr(text_module, "hub_offline", lambda: False)
    with pytest.raises(DataSourceError) as info:
        load_texts("wikitext2", split="test")
    assert str(info.value).endswith("(Connection reset by peer)") and "\n" not in str(info.value)
