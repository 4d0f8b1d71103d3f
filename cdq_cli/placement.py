"""Where modules live while they run: the one place that moves a model, or parts of it, to a device.

The model stays on its home device (the CPU) and the parts that are about to run visit the compute
device: the preamble while block-0 inputs are captured, one block while it is solved, the whole
model while it is evaluated. Adapters and evaluators never move modules themselves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

Placeable = nn.Module | torch.Tensor


def home_of(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (the CPU for a model without parameters)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def move(item: Placeable, device: torch.device) -> None:
    """Move a module, or a parameter/buffer in place (so every reference to it follows)."""
    if isinstance(item, nn.Module):
        item.to(device)
    else:
        item.data = item.data.to(device)


@contextmanager
def visiting(items: Sequence[Placeable], device: torch.device, home: torch.device) -> Iterator[None]:
    """Move ``items`` to ``device`` for the body of the ``with``, then back to ``home``."""
    for item in items:
        move(item, device)
    try:
        yield
    finally:
        for item in items:
            move(item, home)
