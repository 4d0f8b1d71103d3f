"""Perplexity of a causal LM, GPTQ protocol, as a small result dataclass with ``to_dict()``.

The protocol follows GPTQ so numbers compare with published tables; the protocol string goes into
the report so a reader knows exactly what was measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_MAX_NLL = 700.0  # exp(700) ≈ 1e304: beyond, perplexity is not a finite float64
PPL_PROTOCOL = "gptq: non-overlapping windows, exp(mean NLL)"
C4_PROTOCOL = (
    "gptq c4: 256 random windows of random validation documents longer than the window (seed 0), "
    "exp(mean NLL)"
)


@dataclass(frozen=True)
class PerplexityResult:
    """``nll`` is the mean next-token NLL (nats) over all windows; ``tokens`` the input tokens
    covered (windows x seqlen), ``stream_tokens`` the length of the whole tokenized text."""

    ppl: float
    nll: float
    windows: int
    seqlen: int
    tokens: int
    stream_tokens: int
    protocol: str = PPL_PROTOCOL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows_of(input_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """The GPTQ protocol's windows: the first ``N // seqlen`` non-overlapping slices of the token
    stream ``input_ids`` (1, N), at most ``max_windows``, as a (windows, seqlen) tensor."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, N), got {tuple(input_ids.shape)}")
    if seqlen < 2 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"need seqlen >= 2 and max_windows >= 1 (got {seqlen}, {max_windows})")
    n = input_ids.shape[1]
    if n < seqlen + 1:
        raise ValueError(f"evaluation text has {n} tokens, fewer than one window of {seqlen} plus one")
    windows = n // seqlen if max_windows is None else min(n // seqlen, max_windows)
    return input_ids[0, : windows * seqlen].view(windows, seqlen)


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL (float64, nats) of each window of ``batch`` given the model's ``logits``
    (upcast to float32 for the loss, whatever the model's dtype)."""
    logits = logits[:, :-1].float()
    token_nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
    )
    return token_nll.view(len(batch), -1).mean(dim=1).double()


def result_of(
    nll_sum: float, windows: torch.Tensor, stream_tokens: int, protocol: str = PPL_PROTOCOL
) -> PerplexityResult:
    """``ppl = exp(mean per-window NLL)``; a non-finite or overflowing loss is an error, never a
    number (a broken model must not read as a result)."""
    count, seqlen = windows.shape
    nll = nll_sum / count
    if not math.isfinite(nll) or nll > _MAX_NLL:
        raise ValueError(
            f"the model's mean loss on the evaluation windows is {nll:.4g} nats: its logits are "
            "non-finite or its perplexity overflows (a broken model, or try --dtype float32)"
        )
    return PerplexityResult(math.exp(nll), nll, count, seqlen, count * seqlen, stream_tokens, protocol)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    seqlen: int,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """GPTQ perplexity of a causal LM held whole, on ``input_ids`` (1, N).

    Each window is scored on its own, predicting tokens 1..seqlen-1 from the preceding ones, and
    ``ppl = exp(mean per-window NLL)``, equal to the mean token NLL as windows have equal length.
    The model runs in eval mode (its previous mode is restored); windows are sent to ``device``
    (default: where the model's first parameter is); placing the model is the caller's business.
    A model too large to hold whole is scored block by block (:func:`cdq_cli.pipeline.forward_blocks`)
    with the same windows, loss and result.
    """
    if batch_size < 1:
        raise ValueError(f"need batch_size >= 1, got {batch_size}")
    chunks = windows_of(input_ids, seqlen, max_windows)
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        nll_sum = 0.0
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size].to(device)
            out = model(batch)
            nll_sum += window_nll(out.logits if hasattr(out, "logits") else out, batch).sum().item()
    finally:
        model.train(was_training)
    return result_of(nll_sum, chunks, input_ids.shape[1])


def default_seqlen(model: nn.Module | Any, *, cap: int = 2048) -> int:
    """min(``cap``, the model's context length): GPTQ evaluates at 2048, shorter-context models at
    their own context. Accepts a model or its config."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(cap, value)
    return cap


def perplexity_on(
    texts: list[str],
    tokenizer: Any,
    forward: Callable[[list[torch.Tensor]], Iterable[torch.Tensor]],
    *,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 8,
    source: str | None = None,
    ranks: Any = None,
) -> dict[str, Any]:
    """Perplexity (GPTQ protocol) of a model on ``texts``, as a JSON-ready dict.

    ``forward(batches)`` yields the model's logits for each batch of windows, in order (the run
    computes them block by block, so peak memory is one block plus the activations). ``source``
    is where the texts came from: the named source ``c4`` is scored on GPTQ's 256 random
    validation windows, every other text on the non-overlapping windows of its joined token
    stream. With several ``ranks`` (:class:`cdq_cli.parallel.Ranks`) each scores its range of the
    batches and the losses are summed.
    """
    from ..calib import C4_EVAL_WINDOWS, c4_validation_windows, evaluation_ids

    if source is not None and source.lower() == "c4":
        count = min(C4_EVAL_WINDOWS, max_windows or C4_EVAL_WINDOWS)
        chunks = c4_validation_windows(texts, tokenizer, seqlen=seqlen, count=count)
        stream, protocol = chunks.numel(), C4_PROTOCOL
    else:
        ids = evaluation_ids(texts, tokenizer)
        chunks, stream, protocol = windows_of(ids, seqlen, max_windows), ids.shape[1], PPL_PROTOCOL
    batches = list(chunks.split(batch_size))
    shared = ranks is not None and ranks.active
    if shared:
        batches = [batches[b] for b in ranks.batches(len(batches))]
    nll_sum = 0.0
    for batch, logits in zip(batches, forward(batches), strict=True):
        nll_sum += window_nll(logits, batch.to(logits.device)).sum().item()
    if shared:
        nll_sum = ranks.sum_value(nll_sum)
    return result_of(nll_sum, chunks, stream, protocol).to_dict()
