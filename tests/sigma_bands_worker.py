"""Run by tests/test_distributed.py under torchrun: every rank records its contiguous range of
seeded calibration batches into Σ accumulators of several widths (one band, several, a partial
last band) and a paired one (relayed), reduces them with :meth:`Ranks.reduce_in_order`, and writes
the totals (rank 0) to ``OUT``; the single-process totals are made by the same script without
torchrun."""

from __future__ import annotations

import sys

import torch

from cdq_cli.parallel import Deferred, close, from_environment
from cdq_cli.solvers.sigma import PairedSigmaAccumulator, SigmaAccumulator

WIDTHS = (64, 256, 600)
BATCHES = 7


def batch(i: int, features: int, fp: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * features + 10 * i + int(fp))
    return torch.randn(2, 17 + 5 * i, features, generator=gen)  # uneven token counts


def main(out: str) -> None:
    torch.set_num_threads(1)
    ranks, _ = from_environment(torch.device("cpu"))
    plain = [SigmaAccumulator(width) for width in WIDTHS]
    paired = PairedSigmaAccumulator(torch.randn(40, 96, generator=torch.Generator().manual_seed(5)), 96)
    accs = [*plain, paired]
    recorded = [Deferred(acc) for acc in accs] if ranks.active else accs
    for i in ranks.batches(BATCHES):
        for acc, width in zip(recorded[: len(WIDTHS)], WIDTHS, strict=True):
            acc.add_linear(batch(i, width))
        recorded[-1].add_pair(batch(i, 96, fp=True), batch(i, 96))
    if ranks.active:
        ranks.reduce_in_order(recorded)
    if ranks.leader:
        state = {f"sigma{w}": acc.sigma for acc, w in zip(plain, WIDTHS, strict=True)}
        state |= {f"tokens{w}": torch.tensor(acc.tokens) for acc, w in zip(plain, WIDTHS, strict=True)}
        state |= {"paired_sigma": paired.sigma, "residual": paired.residual, "energy": paired.energy}
        state |= {"upstream": paired.upstream}
        torch.save(state, out)
    close(ranks)  # leave the process group before exiting (gloo's threads abort an exit without it)


if __name__ == "__main__":
    main(sys.argv[1])
