"""Top-1 / top-5 accuracy of an image classifier, and its agreement with a reference model.

Agreement (the share of images where the quantized model's top-1 class equals the full-precision
model's) is less noisy than accuracy on a small evaluation set: it does not depend on whether the
FP model was right, only on whether quantization changed its decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

TOP1_PROTOCOL = "timm eval transform of the model's data config; label = class index; top-k by logits"


@dataclass(frozen=True)
class ClassificationResult:
    """``agreement`` is None without reference predictions; ``k`` is the top-k used for ``top5``
    (5, or the number of classes if fewer)."""

    images: int
    top1: float
    top5: float
    agreement: float | None
    k: int
    protocol: str = TOP1_PROTOCOL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def topk_predictions(
    model: nn.Module, batches: Iterable[torch.Tensor], *, k: int = 5, device: torch.device | str | None = None
) -> torch.Tensor:
    """(N, k) class indices, best first, of ``model`` on every batch (eval mode, restored after)."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in batches:
            logits = model(batch.to(device)).float()
            if not torch.isfinite(logits).all():
                raise ValueError("the model produced NaN/Inf logits")
            out.append(logits.topk(min(k, logits.shape[-1]), dim=-1).indices.cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("no images to evaluate")
    return torch.cat(out)


def scores(
    predictions: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None
) -> ClassificationResult:
    """Top-1, top-k and agreement from (N, k) predictions, (N,) labels and optional (N,) or (N, k)
    reference predictions (their first column is the reference top-1)."""
    if predictions.shape[0] != labels.shape[0] or predictions.shape[0] == 0:
        raise ValueError(f"{predictions.shape[0]} predictions for {labels.shape[0]} labels")
    hits = predictions == labels.unsqueeze(1)
    agreement = None
    if reference is not None:
        ref = reference if reference.dim() == 1 else reference[:, 0]
        agreement = float((predictions[:, 0] == ref).double().mean())
    return ClassificationResult(
        images=int(labels.shape[0]),
        top1=float(hits[:, 0].double().mean()),
        top5=float(hits.any(dim=1).double().mean()),
        agreement=agreement,
        k=int(predictions.shape[1]),
    )


def top1(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    reference: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[ClassificationResult, torch.Tensor]:
    """Score ``model`` on (images, labels) batches: (result, its (N, k) predictions, to serve as
    the ``reference`` of a quantized model)."""
    labels: list[torch.Tensor] = []

    def images() -> Iterable[torch.Tensor]:
        for batch, label in batches:
            labels.append(label)
            yield batch

    predictions = topk_predictions(model, images(), device=device)
    return scores(predictions, torch.cat(labels), reference), predictions
