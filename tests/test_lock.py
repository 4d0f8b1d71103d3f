"""The lock that development and CI install holds every dependency pyproject.toml declares.

A dependency added to pyproject.toml but not to requirements/lock.txt is silently absent in CI
(the numba kernel once fell back to torch there, and its tests skipped): `make lock` must follow
every change of pyproject's dependencies or extras.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement line (PEP 503)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_every_declared_dependency_is_pinned_in_the_lock():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_name(r) for r in extra}
    lock = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    pinned = {_name(line) for line in lock if line and not line.startswith((" ", "#"))}
    torch_pins = (REPO / "requirements" / "torch.txt").read_text().splitlines()
    pinned |= {_name(line) for line in torch_pins if line.strip() and not line.startswith("#")}
    missing = declared - pinned
    assert missing == set(), f"in pyproject.toml but not in requirements/lock.txt: {missing} (make lock)"
    assert all("==" in line for line in lock if line and not line.startswith((" ", "#")))
