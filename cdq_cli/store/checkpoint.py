"""A source checkpoint's tensors, read on demand by state-dict name (the weights of a lazily
opened model): from the checkpoint's own safetensors shards, slice by slice, or, for tensors
transformers converted while opening it (fused experts), from its temporary offload folder.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..cleanup import release
from .folder import DTYPES
from .shards import read_tensor, tensor_chunks


class CheckpointReadError(ValueError):
    """A checkpoint tensor that cannot be read (a shard truncated or replaced since it was opened)."""


class CheckpointWeights:
    """:class:`~cdq_cli.records.Weights` of a lazily opened checkpoint (see the module doc)."""

    def __init__(
        self, index: Mapping[str, dict], loader: Mapping[str, torch.Tensor], offload: Path | None
    ) -> None:
        self._index = dict(index)
        self._loader = loader
        self._offload = offload

    def names(self) -> list[str]:
        return list(self._loader)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        entry = self._index.get(name, {})
        try:
            if entry.get("safetensors_file") and entry.get("dtype") in DTYPES:
                file, key = entry["safetensors_file"], entry.get("weight_name", name)
                return read_tensor(file, key, dtype or DTYPES[entry["dtype"]])
            loaded = self._loader[name]
            return loaded if dtype is None else loaded.to(dtype)
        except KeyError:
            raise CheckpointReadError(f"the checkpoint holds no tensor {name}") from None
        except Exception as exc:
            raise CheckpointReadError(f"cannot read {name} from the checkpoint: {_first_line(exc)}") from exc

    def where(self, name: str) -> str | None:
        """The file of the checkpoint that holds ``name`` (None: converted while opening)."""
        file = self._index.get(name, {}).get("safetensors_file")
        return Path(file).name if file else None

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` in slices, never whole (for scans over every weight)."""
        entry = self._index.get(name, {})
        if entry.get("safetensors_file"):
            yield from tensor_chunks(entry["safetensors_file"], entry.get("weight_name", name))
        else:
            yield self.tensor(name)

    def close(self) -> None:
        """Remove the temporary folder of converted weights, if any."""
        if self._offload is not None:
            release(self._offload)
            self._offload = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
