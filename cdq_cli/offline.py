"""Where offline data lives, and whether the Hugging Face hub can be reached.

Tests, benchmarks and error messages point at the shared offline data instead of copying it into
the repository; the hub check lets loaders fail in milliseconds instead of sitting through
``huggingface_hub``'s retries (about 25 s per file) on a machine without network.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

_REPO = Path(__file__).resolve().parent.parent
_TRUE = {"1", "true", "yes", "on"}


def data_dir() -> Path | None:
    """``$CDQ_DATA_DIR`` if set (even if missing: an explicit setting wins), else ``<repo>/../shared/data``
    when it exists, else None."""
    env = os.environ.get("CDQ_DATA_DIR")
    if env:
        return Path(env).expanduser()
    shared = _REPO.parent / "shared" / "data"
    return shared if shared.is_dir() else None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set or the hub's host cannot be reached within ~3 s.

    The environment is read on every call (``huggingface_hub`` reads it only at import), the
    network probe once per process.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    return not _hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=4)
def _hub_reachable(endpoint: str) -> bool:
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_calls(local_only: bool) -> Iterator[None]:
    """While inside, ``huggingface_hub`` is in offline mode when ``local_only``.

    ``local_files_only=True`` alone is not enough: transformers 5.24's ``from_pretrained`` looks
    for an adapter config without passing it on, and huggingface_hub then retries a HEAD request
    for ~25 s. Its offline switch is read once at import, so it is set here for the duration.
    """
    if not local_only:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
