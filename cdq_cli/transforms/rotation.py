"""``--transform hadamard``: rotate the residual stream (R1) and each attention head's values (R2),
merged into the weights as they are read, so the output is a standard checkpoint of the same
architecture and nothing runs at inference time (QuaRot / SpinQuant's mergeable rotations).

Row-vector convention (a Linear computes ``y = x Wᵀ + b``, ``W`` is (out, in)). With ``Q`` (d × d)
orthogonal, the rotated network carries ``x' = x Q`` in its residual stream. For an RMSNorm with
weight ``g``, ``rms(x Q) = rms(x)`` (``Q`` keeps the sum of squares), so ``n(x') = n(x) Q`` for the
unweighted normalisation ``n(x) = x / rms(x)``, and every tensor changes as follows:

* embedding rows: ``E' = E Q``;
* a layer reading a norm's output, ``y = (n(x) ⊙ g) Wᵀ``: ``W' = W diag(g) Q`` and the norm's
  weight becomes 1 (q/k/v, gate/up, a router, every expert's gate/up, the shared expert's, the
  head with the final norm); biases of readers are unchanged;
* a layer writing into the stream, ``x += z Wᵀ + b``: ``W' = Qᵀ W``, ``b' = b Q`` (o_proj,
  down_proj, every expert's down_proj);
* R2, per head between ``v_proj`` and ``o_proj``: with ``P`` (head_dim × head_dim) orthogonal, each
  key-value head's values become ``v_h P`` (``W_v,h' = Pᵀ W_v,h``, ``b_v,h' = b_v,h P``); attention
  mixes values linearly, so each query head's output is ``o_h P`` and o_proj's columns of head h
  become ``W_o,h P``. One ``P`` serves every head, so grouped-query attention holds.

So ``x' W'ᵀ`` equals ``x Wᵀ`` for every layer, and the logits are unchanged up to rounding.

**Tied embeddings.** The head reads the final norm: its rotated matrix is ``E diag(g) Q`` while the
embedding must become ``E Q``; one matrix cannot be both unless ``g`` is all ones (then the tie is
kept). No other exact construction keeps them tied (moving ``g`` into the embedding would scale
the residual stream, which RMSNorm does not commute with), so the head is untied: it becomes its own
matrix, ``config.tie_word_embeddings`` false, and the report says so with the size it costs.

LayerNorm families (OPT) subtract the mean, which a rotation does not commute with; BLOOM and
unknown layouts have no declared stream: they are refused before any work. So is any tensor of a
block the layout does not name (it could read or write the stream unseen).

:class:`RotatedWeights` wraps a lazily opened model's weights so each tensor is rotated as its
block is read (memory stays about one block); :func:`rotate_resident` rotates a model held in
memory. Both call :meth:`HadamardPlan.transform`, so they give the same tensors bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.families import Family, Stream
from ..records import Weights
from .hadamard import Rotation, random_rotation

Read = Callable[[str], torch.Tensor]
# Rows (or columns) of a weight rotated at once: float64 pieces of at most this many elements.
_PIECE = 8 * 2**20


class TransformError(ValueError):
    """A transform a model cannot take; one line, exit 2."""


def stream_of(family: Family, config: Any, transform: str) -> Stream:
    """The family's stream layout, or a one-line refusal naming why ``transform`` cannot apply."""
    stream = family.stream
    if stream is None:
        raise TransformError(
            f"--transform {transform} does not support the {family.name} family "
            "(supported: the Llama family - llama, mistral, qwen2/3, smollm, mixtral, qwen-moe - and, "
            "for awq, OPT)"
        )
    for key, wanted in stream.requires:
        if getattr(config, key, wanted) != wanted:
            raise TransformError(
                f"--transform {transform} needs {key}={wanted!r} in a {family.name} model's config "
                f"(this one has {getattr(config, key)!r})"
            )
    return stream


@dataclass
class HadamardPlan:
    """What ``--transform hadamard`` does to each state-dict tensor of one model: ``roles`` maps a
    name to its role and the norm it folds (see the module doc); names not in it are unchanged."""

    r1: Rotation
    r2: Rotation
    heads: int
    kv_heads: int
    head_dim: int
    roles: dict[str, tuple[str, str | None]]
    untie: tuple[str, str] | None  # (head, embedding): the head becomes its own matrix
    seed: int
    untie_bytes: int = 0  # what the untied head adds to the checkpoint
    counts: dict[str, int] = field(default_factory=dict)

    def transform(self, name: str, read: Read) -> torch.Tensor:
        """Tensor ``name`` of the rotated model; ``read`` gives the original model's tensors."""
        role = self.roles.get(name)
        if role is None:
            return read(name)
        kind, norm = role
        value = read(name)
        if kind == "norm":
            return torch.ones_like(value)
        q = self.r1.matrix
        if kind in ("embed", "reader", "value", "head"):
            gain = None if norm is None else read(norm).to(torch.float64)
            out = _right(value, q, gain)
            if kind == "value":
                out = self._heads_left(out)
            return out.to(value.dtype)
        if kind in ("writer", "output"):
            matrix = value.to(torch.float64)
            if kind == "output":  # o_proj's columns of each head: W_o,h P
                rows = matrix.shape[:-1]
                matrix = (matrix.reshape(*rows, self.heads, self.head_dim) @ self.r2.matrix).reshape(
                    *rows, self.heads * self.head_dim
                )
            return _left(q.T, matrix).to(value.dtype)
        if kind == "writer_bias":
            return (value.to(torch.float64) @ q).to(value.dtype)
        if kind == "value_bias":
            out = value.to(torch.float64).reshape(self.kv_heads, self.head_dim) @ self.r2.matrix
            return out.reshape(value.shape).to(value.dtype)
        raise AssertionError(f"unknown role {kind}")

    def _heads_left(self, value: torch.Tensor) -> torch.Tensor:
        """``Pᵀ W_v,h`` for every key-value head's rows of a value projection."""
        d = value.shape[-1]
        heads = value.reshape(self.kv_heads, self.head_dim, d)
        return (self.r2.matrix.T @ heads).reshape(self.kv_heads * self.head_dim, d)

    def describe(self) -> dict[str, Any]:
        """For report.json and every export's config."""
        return {
            "name": "hadamard",
            "seed": self.seed,
            "r1": {**self.r1.describe(), "where": "residual stream"},
            "r2": {**self.r2.describe(), "where": "per head, between v_proj and o_proj", "heads": self.heads},
            "folded_norms": self.counts.get("norm", 0),
            "untied_head": None
            if self.untie is None
            else {
                "head": self.untie[0],
                "embedding": self.untie[1],
                "why": "the final norm's weight is folded into the head, so the head and the "
                "embedding differ; kept tied they could not both be exact",
                "extra_bytes": self.untie_bytes,
            },
            "runtime_ops": "none: merged into the weights",
        }


def plan_hadamard(model: nn.Module, family: Family, blocks: list[str], seed: int, read: Read) -> HadamardPlan:
    """The rotation of ``model`` (a skeleton or a resident model) of ``family``, whose blocks are
    at the prefixes ``blocks``. ``read`` gives original tensors (only the final norm's weight is
    read here: to decide whether a tied head can stay tied). One-line :class:`TransformError` for
    a model the rotation cannot be exact on."""
    config = model.config
    state = model.state_dict(keep_vars=True)
    names = list(state)
    ties = tied_pairs(state)
    stream = stream_of(family, config, "hadamard")
    if stream.norm != "rms":
        raise TransformError(
            f"--transform hadamard does not support {family.name}: its LayerNorm subtracts the mean, "
            "which a rotation of the residual stream does not commute with (use --transform awq)"
        )
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    present = set(names)
    roles: dict[str, tuple[str, str | None]] = {}

    def matrix(prefix: str, layer: str) -> str | None:
        for candidate in (f"{prefix}.{layer}.weight", f"{prefix}.{layer}"):
            if candidate in present:
                return candidate
        return None

    value, output = stream.values
    for prefix in blocks:
        for readers in stream.readers:
            norm = f"{prefix}.{readers.norm}.weight"
            if norm not in present or f"{prefix}.{readers.norm}.bias" in present:
                raise TransformError(f"--transform hadamard: {prefix} has no RMSNorm {readers.norm}")
            roles[norm] = ("norm", None)
            for layer in readers.layers:
                name = matrix(prefix, layer)
                if name is None:
                    continue
                roles[name] = ("value" if layer == value else "reader", norm)
                if layer == value and f"{prefix}.{layer}.bias" in present:
                    roles[f"{prefix}.{layer}.bias"] = ("value_bias", None)
                elif f"{prefix}.{layer}.bias" in present:
                    roles[f"{prefix}.{layer}.bias"] = ("same", None)
        for layer in stream.writers:
            name = matrix(prefix, layer)
            if name is None:
                continue
            roles[name] = ("output" if layer == output else "writer", None)
            if f"{prefix}.{layer}.bias" in present:
                roles[f"{prefix}.{layer}.bias"] = ("writer_bias", None)
        for leaf in stream.untouched:
            if f"{prefix}.{leaf}" in present:
                roles[f"{prefix}.{leaf}"] = ("same", None)
    final = f"{stream.final_norm}.weight"
    if final not in present or f"{stream.final_norm}.bias" in present:
        raise TransformError(f"--transform hadamard: the model has no final RMSNorm {stream.final_norm}")
    roles[final] = ("norm", None)
    roles[stream.embedding] = ("embed", None)
    untie = None
    if stream.head in present:
        tied = ties.get(stream.head) == stream.embedding or ties.get(stream.embedding) == stream.head
        if tied and bool((read(final) == 1).all()):
            roles[stream.head] = ("embed", None)  # the final norm folds to nothing: E Q serves both
        else:
            roles[stream.head] = ("head", final)
            if tied:
                untie = (stream.head, stream.embedding)
    unknown = [name for name in names if name not in roles]
    if unknown:
        raise TransformError(
            f"--transform hadamard: {unknown[0]} is a tensor the {family.name} layout does not name, so "
            "rotating the model around it could not be exact"
        )
    for name, (kind, _) in list(roles.items()):
        if kind == "same":
            del roles[name]
    if heads % kv_heads:
        raise TransformError(
            f"--transform hadamard: {heads} attention heads do not split into {kv_heads} key-value groups"
        )
    for name, (kind, _) in roles.items():
        rows = state[name].shape[-2] if kind == "value" else None
        columns = state[name].shape[-1] if kind == "output" else None
        if (rows is not None and rows != kv_heads * head_dim) or (
            columns is not None and columns != heads * head_dim
        ):
            raise TransformError(
                f"--transform hadamard: {name} does not have {kv_heads if rows else heads} heads of "
                f"{head_dim} (shape {tuple(state[name].shape)})"
            )
    counts: dict[str, int] = {}
    for kind, _ in roles.values():
        counts[kind] = counts.get(kind, 0) + 1
    return HadamardPlan(
        r1=random_rotation(hidden, seed),
        r2=random_rotation(head_dim, seed + 1),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        roles=roles,
        untie=untie,
        seed=seed,
        counts=counts,
        untie_bytes=0 if untie is None else state[untie[0]].numel() * state[untie[0]].element_size(),
    )


def tied_pairs(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: the earlier name} of state-dict entries that are one tensor object (tied weights)."""
    first: dict[int, str] = {}
    ties = {}
    for name, tensor in state.items():
        if id(tensor) in first:
            ties[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return ties


def _right(value: torch.Tensor, q: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """``value · diag(gain) · q`` over the last dimension, in float64, a piece of rows at a time."""
    flat = value.reshape(-1, value.shape[-1])
    out = torch.empty(flat.shape, dtype=torch.float64)
    step = max(1, _PIECE // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        piece = flat[start : start + step].to(torch.float64)
        if gain is not None:
            piece = piece * gain
        out[start : start + step] = piece @ q
    return out.reshape(value.shape)


def _left(q: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``q · value`` for a (d, in) matrix or each (d, in) matrix of a stack, in float64 pieces."""
    if value.dim() == 3:
        return torch.stack([_left(q, item) for item in value])
    out = torch.empty(value.shape, dtype=torch.float64)
    step = max(1, _PIECE // max(1, value.shape[0]))
    for start in range(0, value.shape[1], step):
        out[:, start : start + step] = q @ value[:, start : start + step]
    return out


class RotatedWeights:
    """A :class:`~cdq_cli.records.Weights` source giving the rotated model's tensors: each one is
    read from ``inner`` (the checkpoint) and rotated when its block is placed."""

    def __init__(self, inner: Weights, plan: HadamardPlan) -> None:
        self.inner = inner
        self.plan = plan
        stored = set(inner.names())
        # the untied head has no tensor of its own in a tied checkpoint: it is read as the embedding
        self._alias = {}
        if plan.untie is not None:
            head, embedding = plan.untie
            if head not in stored:
                self._alias[head] = embedding
            elif embedding not in stored:
                self._alias[embedding] = head

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.inner.names(), *self._alias]))

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The rotated tensor in the checkpoint's dtype (what the output stores), then in ``dtype``."""
        value = self.plan.transform(name, self._read)
        return value if dtype is None else value.to(dtype)

    def _read(self, name: str) -> torch.Tensor:
        return self.inner.tensor(self._alias.get(name, name))

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """The ORIGINAL tensor in slices (for the scan for NaN/Inf: a rotation of finite values is
        finite, and the original is what the user gave)."""
        source = self._alias.get(name, name)
        chunks = getattr(self.inner, "chunks", None)
        if chunks is not None:
            yield from chunks(source)
        else:
            yield self.inner.tensor(source)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def untie_head(model: nn.Module, head: str) -> None:
    """Give the head its own parameter (on the device and with the dtype the tied one has, the meta
    device for a lazy skeleton) and record in the config that it is not tied."""
    owner, _, leaf = head.rpartition(".")
    module = model.get_submodule(owner)
    tied = getattr(module, leaf)
    module._parameters[leaf] = nn.Parameter(torch.empty_like(tied), requires_grad=False)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False


def rotate_resident(model: nn.Module, plan: HadamardPlan) -> None:
    """Rotate a model held in memory, in place (every new tensor computed from the originals first)."""
    state = {name: tensor.detach() for name, tensor in model.state_dict(keep_vars=True).items()}
    new = {name: plan.transform(name, state.__getitem__) for name in plan.roles}
    if plan.untie is not None:
        untie_head(model, plan.untie[0])
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for name, value in new.items():
        target = params.get(name, buffers.get(name))
        if target is None:
            raise AssertionError(f"{name} is not a tensor of the model (a cdq bug)")
        target.data = value


def rotate_model(
    model: nn.Module, family: Family, blocks: list[str], weights: Weights | None, seed: int
) -> tuple[Weights | None, dict[str, Any]]:
    """Apply ``--transform hadamard`` to an opened model: a lazy one (``weights`` given) gets a
    :class:`RotatedWeights` source in place of ``weights`` (returned; the skeleton's head is untied
    when the plan says so), a resident one is rotated in place (None returned). Also returns the
    transform's description for the report."""
    if weights is None:
        state = {name: tensor.detach() for name, tensor in model.state_dict(keep_vars=True).items()}
        plan = plan_hadamard(model, family, blocks, seed, state.__getitem__)
        rotate_resident(model, plan)
        return None, plan.describe()
    plan = plan_hadamard(model, family, blocks, seed, weights.tensor)
    if plan.untie is not None:
        untie_head(model, plan.untie[0])
    return RotatedWeights(weights, plan), plan.describe()
