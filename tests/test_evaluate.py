"""GPTQ perplexity on the real stories260K model against a plain reference computation."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cdq_cli.calib import evaluation_ids, load_texts
from cdq_cli.evaluate.perplexity import PPL_PROTOCOL, default_seqlen, perplexity
from cdq_cli.models.causal_lm import load_causal_lm


@pytest.fixture(scope="module")
def stories(data_dir: Path):
    return load_causal_lm(str(data_dir / "models" / "stories260K"))


@pytest.fixture(scope="module")
def wikitext_ids(data_dir: Path, stories) -> torch.Tensor:
    (text,) = load_texts(str(data_dir / "text" / "wikitext2-raw-test.txt"))
    return evaluation_ids(text[:60_000], stories[1])  # a prefix keeps the test fast; same protocol


def _reference_ppl(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    losses = []
    with torch.no_grad():
        for i in range(windows):
            chunk = ids[:, i * seqlen : (i + 1) * seqlen]
            losses.append(model(chunk, labels=chunk).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_matches_reference_computation(stories, wikitext_ids: torch.Tensor) -> None:
    model, _ = stories
    result = perplexity(model, wikitext_ids, seqlen=128, max_windows=6)
    assert math.isfinite(result.ppl) and result.ppl > 1
    assert result.ppl == pytest.approx(_reference_ppl(model, wikitext_ids, 128, 6), rel=1e-4)
    assert result.nll == pytest.approx(math.log(result.ppl), rel=1e-9)
    batched = perplexity(model, wikitext_ids, seqlen=128, max_windows=6, batch_size=4)  # 4 + 2
    assert batched.ppl == pytest.approx(result.ppl, rel=1e-5)


def test_window_count_and_record(stories, wikitext_ids: torch.Tensor) -> None:
    model, _ = stories
    ids = wikitext_ids[:, :1000]
    full = perplexity(model, ids, seqlen=128)
    assert (full.windows, full.tokens, full.stream_tokens, full.seqlen) == (7, 896, 1000, 128)
    assert perplexity(model, ids, seqlen=128, max_windows=3).windows == 3
    assert perplexity(model, ids, seqlen=128, max_windows=50).windows == 7
    record = full.to_dict()
    assert record["protocol"] == PPL_PROTOCOL and record["windows"] == 7 and record["ppl"] == full.ppl


def test_restores_training_mode_and_rejects_short_input(stories, wikitext_ids: torch.Tensor) -> None:
    model, _ = stories
    model.train()
    try:
        perplexity(model, wikitext_ids, seqlen=64, max_windows=1)
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="fewer than one window of 128"):
        perplexity(model, wikitext_ids[:, :128], seqlen=128)
    with pytest.raises(ValueError, match=r"shape \(1, N\)"):
        perplexity(model, wikitext_ids[0], seqlen=16)


def test_default_seqlen(stories) -> None:
    assert default_seqlen(stories[0]) == 512
    assert default_seqlen(SimpleNamespace(n_positions=1024)) == 1024
    assert default_seqlen(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=131072))) == 2048
    assert default_seqlen(SimpleNamespace(seq_length=4096), cap=8192) == 4096
    assert default_seqlen(SimpleNamespace()) == 2048
