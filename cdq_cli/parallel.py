"""Many processes through torch.distributed (launched by ``torchrun``; NCCL on GPUs, gloo on CPUs).

One quantization runs on every rank. What is split, and how the result stays the single-process
result to the byte:

* **Calibration batches** are split into contiguous ranges, rank r taking the r-th range, so the
  forward passes of every block run data-parallel (:meth:`Ranks.batches`).
* **Σ** is made of the very products the single-process run makes, in the same order, so it is
  bitwise that run's (an all-reduce would sum in an order the backend chooses and could not
  promise that). A rank records the inputs its hooks see (the tensors the single-process run
  folds in). A plain Σ (:class:`~cdq_cli.solvers.SigmaAccumulator`: it has ``bands`` and
  ``add_bands``) is accumulated a band of rows at a time, and the bands are split between the ranks:
  every batch's inputs are broadcast from the rank that computed them, in batch order, each rank
  adds them into its own bands, and then each band is broadcast from its rank
  (:meth:`Ranks._by_bands`). The products run in parallel; only the copies are extra. The other
  statistics (the paired ones of ``-o target=fp``, grouped convolutions' per-group Σ) are relayed
  rank to rank: rank r receives the sum of ranks 0..r-1, folds in its own batches in order and
  passes it on; the last rank broadcasts the total (:meth:`Ranks._relay`).
* **Layers** of a group are solved in parallel, assigned by cost, largest first onto the
  least-loaded rank (:func:`assign`). The cost of a layer is the measured time of the layers of
  its shape solved so far (every rank knows them: each solved layer comes with its time), and
  before a shape was timed the method's estimate (:meth:`~cdq_cli.solvers.Method.cost`) scaled to
  seconds by the layers timed so far (:class:`Costs`). Every rank first solves all of its own
  layers of the group, then each result is broadcast from its rank in layer order, and every rank
  writes the same Ŵ into its copy of the block, so all run the same quantized forward.
* One rank (0) keeps the resume journal and writes the output folder; the others compute.

A rank that dies takes the run down: torchrun ends the other workers (SIGTERM, handled like
Ctrl-C), rank 0 keeps the journal, and ``--resume`` continues from the last finished block.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_ENV = "CDQ_DIST_TIMEOUT_S"  # how long a collective may wait for a slow rank (default 2 h)
RENDEZVOUS_ENV = "CDQ_RENDEZVOUS_S"  # how long the processes may take to find each other (default 120 s)
KILL_RANK_ENV = "CDQ_TEST_KILL_RANK"  # test hook "R:B": rank R SIGKILLs itself after block B


class PeerLost(OSError):
    """Another process of the run stopped (its collective broke off): resumable, like Ctrl-C."""


class RendezvousError(ValueError):
    """The processes of a run did not find each other (a stale torchrun environment, say): exit 2."""


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """A broken collective (a peer died, its connection reset) as one resumable error line."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise PeerLost(f"another process of the run stopped during {what} ({first})") from exc


@dataclass
class Ranks:
    """This process's place in the run (``world`` 1: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    backend: str = ""
    solve_seconds: float = 0.0
    assignments: dict[str, int] = field(default_factory=dict)
    balance: Balance = field(default_factory=lambda: Balance())

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def batches(self, count: int) -> range:
        """The contiguous range of ``count`` batches this rank computes."""
        return range(self.rank * count // self.world, (self.rank + 1) * count // self.world)

    def barrier(self) -> None:
        if self.active:
            with _collective("a barrier"):
                dist.barrier()

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """``value`` of rank ``src`` on every rank (any picklable object; tensors go as CPU)."""
        if not self.active:
            return value
        box = [value if self.rank == src else None]
        with _collective("a broadcast"):
            dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def gather_values(self, value: float) -> list[float]:
        """``value`` of every rank, on every rank, in rank order."""
        if not self.active:
            return [value]
        box: list[Any] = [None] * self.world
        with _collective("a gather"):
            dist.all_gather_object(box, value)
        return [float(v) for v in box]

    def sum_value(self, value: float) -> float:
        """The sum over ranks of a float (reported metrics: not bitwise-stable across world sizes)."""
        return sum(self.gather_values(value))

    def reduce_in_order(self, accumulators: Sequence[Deferred]) -> None:
        """Every accumulator's recorded additions made in batch order, the same on every rank (see
        the module doc): plain Σ's band by band across the ranks, the others relayed."""
        plain = [acc for acc in accumulators if acc.banded]
        relayed = [acc for acc in accumulators if not acc.banded]
        with _collective("the Σ reduction"):
            if self.active:
                self._by_bands(plain)
            else:
                relayed = list(accumulators)
            self._relay(relayed)

    def _by_bands(self, accumulators: Sequence[Deferred]) -> None:
        """Plain Σ's: band ``i`` is rank ``i mod world``'s; every batch's inputs go to every rank in
        batch order (rank order, then each rank's order), each rank adds them into its bands, then
        each band goes from its rank to all (and the token count is every rank's sum)."""
        shapes: list[Any] = [None] * self.world
        dist.all_gather_object(shapes, [acc.row_shapes() for acc in accumulators])
        for index, acc in enumerate(accumulators):
            real = acc.real
            every = real.bands()
            mine = [i for i in range(len(every)) if i % self.world == self.rank]
            own = acc.recorded_rows()
            for src in range(self.world):
                for k, shape in enumerate(shapes[src][index]):
                    if src == self.rank:
                        rows = real.rows_of(own[k]).contiguous()
                    else:
                        rows = torch.empty(shape, dtype=real.sigma.dtype, device=real.sigma.device)
                    dist.broadcast(rows, src=src)
                    real.add_bands(rows, mine)
                    real.tokens += int(shape[0])
            acc.clear()
            for i, band in enumerate(every):
                dist.broadcast(real.sigma[band], src=i % self.world)

    def _relay(self, accumulators: Sequence[Deferred]) -> None:
        for acc in accumulators:
            if self.active and self.rank > 0:
                for tensor in acc.state():
                    dist.recv(tensor, src=self.rank - 1)
                acc.settle()
            acc.replay()
            if self.active and self.rank < self.world - 1:
                for tensor in acc.state():
                    dist.send(tensor, dst=self.rank + 1)
        if self.active:  # the last rank holds the totals: everyone gets them
            for acc in accumulators:
                for tensor in acc.state():
                    dist.broadcast(tensor, src=self.world - 1)
                acc.settle()

    def _object_device(self) -> torch.device | None:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None


def env_world() -> int:
    """The number of processes of the run, as torchrun's environment says (1: a plain run)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """This process's rank, as torchrun's environment says (0: a plain run, or the leader)."""
    return _env_int("RANK", 0) if env_world() > 1 else 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise RendezvousError(
            f"{name}={value!r} is not a number (torchrun sets it; unset it to run alone)"
        ) from None


def from_environment(device: torch.device) -> tuple[Ranks, torch.device]:
    """The run's ranks, joining the process group when torchrun started this process, and the
    device this rank computes on (``cuda`` becomes ``cuda:LOCAL_RANK``).

    Joining waits at most ``CDQ_RENDEZVOUS_S`` seconds (default 120) for the other processes, then
    fails in one line saying which variables to unset (a shell that kept torchrun's environment
    would otherwise wait without a word); Ctrl-C and SIGTERM end the wait at once."""
    world = env_world()
    if world <= 1:
        return Ranks(), device
    rank, local = env_rank(), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise RendezvousError(
            f"RANK={rank} is not a rank of WORLD_SIZE={world}; unset RANK and WORLD_SIZE to run alone"
        )
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 7200)))
        store = _rendezvous(rank, world)
        store.set_timeout(timeout)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Ranks(rank=rank, world=world, backend=backend), device


def _rendezvous(rank: int, world: int) -> Any:
    """The store of the run's processes (torch's ``env://`` rendezvous), joined in a helper thread
    so that this one stays free to handle Ctrl-C and SIGTERM while it waits.

    The wait is on an event the helper sets when it returns, not on ``Thread.join``: a
    KeyboardInterrupt inside ``join``'s lock wait makes CPython 3.11 release the still-running
    thread's state lock and mark it stopped (its bpo-45274 clean-up), which leaves that thread's
    state wrong for the rest of the process."""
    seconds = float(os.environ.get(RENDEZVOUS_ENV, 120))
    found: dict[str, Any] = {}
    returned = threading.Event()

    def join() -> None:
        try:
            found["store"] = next(dist.rendezvous("env://", timeout=timedelta(seconds=seconds)))[0]
        except BaseException as exc:  # handed to the waiting thread
            found["error"] = exc
        finally:
            returned.set()

    threading.Thread(target=join, name="cdq-rendezvous", daemon=True).start()
    while not returned.wait(0.1):  # a signal is handled between these short waits
        pass
    if "store" in found:
        return found["store"]
    raise RendezvousError(_rendezvous_failure(found.get("error"), rank, world, seconds)) from None


def _rendezvous_failure(error: BaseException | None, rank: int, world: int, seconds: float) -> str:
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    alone = "unset WORLD_SIZE and RANK to run alone"
    text = str(error or "")
    if "expected, but not set" in text:
        missing = text.split("environment variable ")[-1].split(" ")[0]
        return f"WORLD_SIZE={world} is set but {missing} is not (not started by torchrun?); {alone}"
    if rank == 0:
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        waiting = world - int(joined.group(1)) if joined else world - 1
        if "Timed out" in text or joined:
            more = "process" if waiting == 1 else "processes"
            return (
                f"waited {seconds:g} s at {where} for {waiting} more {more} of WORLD_SIZE={world}, "
                f"in vain; {alone}"
            )
    elif "Timed out" in text or "timed out" in text or "Connection refused" in text:
        return f"could not reach process 0 of WORLD_SIZE={world} at {where} within {seconds:g} s; {alone}"
    first = text.strip().splitlines()[0][:160] if text.strip() else type(error).__name__
    return f"the processes of WORLD_SIZE={world} did not find each other at {where} ({first}); {alone}"


def test_hook(ranks: Ranks, block: int) -> None:
    """``CDQ_TEST_KILL_RANK=R:B``: rank R dies (SIGKILL) right after finishing block B, so tests can
    take one process of a real run down at a known point."""
    wanted = os.environ.get(KILL_RANK_ENV, "")
    if wanted and wanted == f"{ranks.rank}:{block}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def close(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Balance:
    """How evenly the assignments spread the solves, summed over the groups solved so far:
    ``predicted`` the slowest rank's estimated load and the mean load (so that
    :attr:`predicted_imbalance` is what the estimates promised), ``critical`` the measured
    seconds the slowest rank took per group (what the block loop waited for: the solve phase's
    wall time) and ``total`` all solve seconds (one process's solve time)."""

    predicted_max: float = 0.0
    predicted_mean: float = 0.0
    critical: float = 0.0
    total: float = 0.0

    def planned(self, costs: dict[str, float], owners: dict[str, int], world: int) -> None:
        loads = loads_of(costs, owners, world)
        self.predicted_max += max(loads)
        self.predicted_mean += sum(loads) / world

    def solved(self, seconds: dict[str, float], owners: dict[str, int], world: int) -> None:
        self.critical += max(loads_of(seconds, owners, world))
        self.total += sum(seconds.values())

    @property
    def predicted_imbalance(self) -> float:
        """max / mean - 1 of the estimated loads, over all groups (0: perfectly even)."""
        return self.predicted_max / self.predicted_mean - 1 if self.predicted_mean > 0 else 0.0


def loads_of(costs: dict[str, float], owners: dict[str, int], world: int) -> list[float]:
    """Each rank's summed cost under an assignment."""
    loads = [0.0] * world
    for name, cost in costs.items():
        loads[owners[name]] += cost
    return loads


class Costs:
    """A layer's solve cost by its shape: the mean measured seconds of the layers of that shape
    solved so far, else the method's estimate (``estimate(rows, columns)``, arbitrary units)
    times the seconds per unit of everything measured so far (the estimate alone before any
    layer was timed). Fed the same timings in the same order, every rank gets the same costs."""

    def __init__(self, estimate: Callable[[int, int], float]) -> None:
        self.estimate = estimate
        self.seconds: dict[tuple[int, int], list[float]] = {}
        self._units = 0.0
        self._measured = 0.0

    def cost(self, shape: tuple[int, int]) -> float:
        times = self.seconds.get(shape)
        if times:
            return sum(times) / len(times)
        guess = self.estimate(*shape)
        return guess * self._measured / self._units if self._units > 0 else guess

    def record(self, shape: tuple[int, int], seconds: float) -> None:
        self.seconds.setdefault(shape, []).append(seconds)
        self._units += self.estimate(*shape)
        self._measured += seconds


# A layer goes to one rank whole while that rank's load stays within this fraction above the mean
# load; beyond it, its bands of rows are assigned one by one.
SPLIT_SLACK = 0.05


def layer_of(unit: str) -> str:
    """The layer a unit of work belongs to: ``NAME[rows LO:HI]`` (a band, pipeline.Unit) → ``NAME``."""
    return unit.split("[rows ", 1)[0]


def assign(costs: dict[str, float], world: int) -> dict[str, int]:
    """Each unit of work to a rank, deterministic on every rank: layers largest first onto the
    least-loaded rank (ties: lowest rank), each whole (all its bands on that rank, which then does
    the layer's Σ-only work once) unless that would lift the rank more than :data:`SPLIT_SLACK`
    above the mean load; such a layer's bands go one by one, largest first, the same way."""
    layers: dict[str, list[str]] = {}
    for unit in costs:
        layers.setdefault(layer_of(unit), []).append(unit)
    totals = {layer: sum(costs[unit] for unit in units) for layer, units in layers.items()}
    bound = (1 + SPLIT_SLACK) * sum(totals.values()) / world
    load = [0.0] * world
    owner: dict[str, int] = {}

    def least() -> int:
        return min(range(world), key=lambda r: (load[r], r))

    for layer in sorted(totals, key=lambda n: (-totals[n], n)):
        rank = least()
        units = layers[layer]
        if len(units) == 1 or load[rank] + totals[layer] <= bound:
            for unit in units:
                owner[unit] = rank
            load[rank] += totals[layer]
            continue
        for unit in sorted(units, key=lambda n: (-costs[n], n)):
            rank = least()
            owner[unit] = rank
            load[rank] += costs[unit]
    return owner


def replay(
    groups: Sequence[Mapping[str, tuple[tuple[int, int], float]]],
    estimate: Callable[[int, int], float],
    world: int,
) -> Balance:
    """The balance ``world`` ranks would have had on a run whose layers took the given seconds:
    ``groups`` in solve order, each {name: (matrix shape, measured seconds)}. Each group is
    assigned as the driver assigns it (:class:`Costs` fed the earlier groups' times, then
    :func:`assign`), so ``predicted_imbalance`` is what such a run would report; ``critical`` is its
    solve phase had every layer taken the time it took in the run measured (one process)."""
    costs, balance = Costs(estimate), Balance()
    for group in groups:
        estimated = {name: costs.cost(shape) for name, (shape, _) in group.items()}
        owners = assign(estimated, world)
        balance.planned(estimated, owners, world)
        balance.solved({name: seconds for name, (_, seconds) in group.items()}, owners, world)
        for shape, seconds in group.values():
            costs.record(shape, seconds)
    return balance


class Deferred:
    """A Σ accumulator whose additions are recorded now and made later, in order.

    Stands in for a :class:`~cdq_cli.solvers.SigmaAccumulator` (``add_linear``), a
    ``GroupedSigmaAccumulator`` (``add_columns``) or a ``PairedSigmaAccumulator`` (``add_pair``,
    ``add_pair_columns``, ``add_outputs``) while a rank runs its forward passes; its inputs
    are copied (the forward may reuse their memory) to ``keep``'s device. :meth:`replay` makes the
    additions, in the order recorded, on the real accumulator.
    """

    def __init__(self, real: Any, keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        self.real = real
        self._keep = keep
        self._calls: list[tuple[str, tuple[torch.Tensor, ...]]] = []

    def _record(self, method: str, *tensors: torch.Tensor) -> None:
        self._calls.append((method, tuple(self._keep(t.detach().clone()) for t in tensors)))

    def add_linear(self, inputs: torch.Tensor) -> None:
        self._record("add_linear", inputs)

    def add_columns(self, columns: torch.Tensor) -> None:
        self._record("add_columns", columns)

    def add_pair(self, fp_inputs: torch.Tensor, inputs: torch.Tensor) -> None:
        self._record("add_pair", fp_inputs, inputs)

    def add_pair_columns(self, fp_columns: torch.Tensor, columns: torch.Tensor) -> None:
        self._record("add_pair_columns", fp_columns, columns)

    def add_outputs(self, fp_outputs: torch.Tensor, outputs: torch.Tensor, inputs: torch.Tensor) -> None:
        self._record("add_outputs", fp_outputs, outputs, inputs)

    @property
    def banded(self) -> bool:
        """Whether the accumulator is a plain Σ made of row bands (``add_bands``, ``bands``)."""
        return hasattr(self.real, "add_bands") and hasattr(self.real, "bands")

    def row_shapes(self) -> list[tuple[int, int]]:
        """The (tokens, features) shape of each recorded batch of a plain Σ, in order."""
        return [tuple(rows.shape) for rows in self.recorded_rows()]

    def recorded_rows(self) -> list[torch.Tensor]:
        """The recorded inputs of a plain Σ as (tokens, features) rows, in order."""
        return [self._rows(tensors) for _, tensors in self._calls]

    def clear(self) -> None:
        self._calls.clear()

    def _rows(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (inputs,) = tensors
        return inputs.reshape(-1, inputs.shape[-1])

    def replay(self) -> None:
        for method, tensors in self._calls:
            getattr(self.real, method)(*(t.to(self.real.sigma.device) for t in tensors))
        self._calls.clear()

    def state(self) -> list[torch.Tensor]:
        """What the relay passes on: Σ (and the full-precision target's other statistics) and the
        token count (a one-element tensor, current)."""
        self._tokens = torch.full(
            (1,), float(self.real.tokens), dtype=torch.float64, device=self.real.sigma.device
        )
        tensors = getattr(self.real, "state_tensors", None)
        return [*(tensors() if tensors is not None else [self.real.sigma]), self._tokens]

    def settle(self) -> None:
        """After receiving: the token count that came with Σ is the real one."""
        self.real.tokens = int(self._tokens[0].item())

    @property
    def sigma(self) -> torch.Tensor:
        return self.real.sigma

    @property
    def tokens(self) -> int:
        return self.real.tokens

    @property
    def residual(self) -> torch.Tensor:
        return self.real.residual

    @property
    def energy(self) -> torch.Tensor:
        return self.real.energy

    @property
    def upstream(self) -> torch.Tensor:
        return self.real.upstream

    def share_sigma(self, owner: Any) -> None:
        self.real.share_sigma(owner)


def timed(ranks: Ranks, work: Callable[[], Any]) -> Any:
    """Run ``work`` and add its seconds to this rank's solve time."""
    began = time.perf_counter()
    try:
        return work()
    finally:
        ranks.solve_seconds += time.perf_counter() - began
