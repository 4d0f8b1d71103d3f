"""Hadamard matrices of many orders, and the seeded random orthogonal rotations built from them.

A Hadamard matrix ``H`` of order n has entries ±1 and ``H Hᵀ = n I``; ``H / √n`` is orthogonal and
spreads every coordinate evenly over all the others, which is what a rotation of a network's
residual stream wants (outlier channels are shared out, so a per-channel grid fits better; QuaRot,
SpinQuant). Orders built here:

* **Sylvester**: ``H_{2n} = [[H_n, H_n], [H_n, −H_n]]`` from ``H_1 = [1]`` (every power of two);
* **Paley I**, order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``: with the Jacobsthal matrix
  ``Q_ij = χ(j − i)`` (χ the quadratic character of the prime field, ``Q`` skew-symmetric),
  ``S = [[0, 1ᵀ], [−1, Q]]`` and ``H = I + S``;
* **Paley II**, order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)``: ``Q`` is then symmetric,
  ``S = [[0, 1ᵀ], [1, Q]]`` and ``H = S ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]]``;
* products: ``H_a ⊗ H_b`` is Hadamard of order ``a·b``, so ``n = 2^k · m`` works whenever ``m`` is
  1 or a Paley order (e.g. 576 = 16 · 36 with Paley II, q = 17; 5120 = 256 · 20 with Paley I,
  q = 19; 3584 = 128 · 28 with Paley II, q = 13).

Every matrix is checked (``H Hᵀ = n I`` in exact integer arithmetic) before it is used.
:func:`random_rotation` multiplies the normalised Hadamard by seeded random signs
(``diag(±1) H / √n``); where no Hadamard of that order is at hand it returns a seeded random
orthogonal matrix (QR of a Gaussian matrix, signs fixed so the result is unique), and says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sylvester(order: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of ``order`` (a power of two), as int64."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester matrices have power-of-two orders, got {order}")
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    k = 2
    while k * k <= n:
        if n % k == 0:
            return False
        k += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q_ij = χ(j − i)`` over the prime field of ``q`` elements (χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.int64)
    index = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q
    return chi[index]


def paley1(q: int) -> torch.Tensor:
    """Paley's first construction: a Hadamard matrix of order ``q + 1`` (prime ``q ≡ 3 mod 4``)."""
    if not is_prime(q) or q % 4 != 3:
        raise ValueError(f"Paley I needs a prime q = 3 (mod 4), got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.int64) + s


def paley2(q: int) -> torch.Tensor:
    """Paley's second construction: a Hadamard matrix of order ``2(q + 1)`` (prime ``q ≡ 1 mod 4``)."""
    if not is_prime(q) or q % 4 != 1:
        raise ValueError(f"Paley II needs a prime q = 1 (mod 4), got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    b = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


def _plan(order: int) -> tuple[int, str, int] | None:
    """``(2^j, kind, q)`` with ``order = 2^j · m``, ``m`` the smallest factor a construction
    reaches (``kind`` "sylvester" with m = 1, "paley1"/"paley2" with their prime ``q``), or None."""
    if order < 1:
        return None
    power = 1
    while order % (power * 2) == 0:
        power *= 2
    while power >= 1:
        m = order // power
        if m == 1:
            return power, "sylvester", 0
        if m % 4 == 0 and is_prime(m - 1) and (m - 1) % 4 == 3:
            return power, "paley1", m - 1
        if m % 4 == 0 and is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
            return power, "paley2", m // 2 - 1
        power //= 2
    return None


def construction(order: int) -> str | None:
    """How :func:`hadamard` builds a Hadamard matrix of ``order`` (None: it cannot)."""
    plan = _plan(order)
    if plan is None:
        return None
    power, kind, q = plan
    if kind == "sylvester":
        return f"sylvester({order})"
    return f"sylvester({power}) x {kind}(q={q})" if power > 1 else f"{kind}(q={q})"


def hadamard(order: int) -> torch.Tensor:
    """A Hadamard matrix of ``order`` (int64, ±1 entries, ``H Hᵀ = order·I``, checked), or
    ``ValueError`` when none of the constructions above reaches that order."""
    plan = _plan(order)
    if plan is None:
        raise ValueError(f"no Hadamard construction for order {order}")
    power, kind, q = plan
    h = sylvester(power)
    if kind != "sylvester":
        h = torch.kron(h, paley1(q) if kind == "paley1" else paley2(q))
    if not torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.int64)):
        raise AssertionError(f"{construction(order)} is not a Hadamard matrix (a cdq bug)")
    return h


@dataclass(frozen=True)
class Rotation:
    """A seeded orthogonal matrix ``matrix`` (float64, n × n) and how it was made (``kind``)."""

    matrix: torch.Tensor
    kind: str

    def describe(self) -> dict[str, object]:
        return {"size": self.matrix.shape[0], "kind": self.kind}


def random_rotation(order: int, seed: int) -> Rotation:
    """``diag(±1) H / √n`` with seeded random signs, a Hadamard ``H`` of ``order`` when one can be
    built; otherwise a seeded random orthogonal matrix (QR of a standard Gaussian matrix, the
    signs of R's diagonal moved into Q so the result is unique). float64."""
    gen = torch.Generator().manual_seed(seed)
    how = construction(order)
    if how is not None:
        signs = torch.randint(0, 2, (order,), generator=gen, dtype=torch.int64) * 2 - 1
        matrix = (signs.unsqueeze(1) * hadamard(order)).to(torch.float64) / order**0.5
        return Rotation(matrix, f"randomized Hadamard {how}")
    gaussian = torch.randn(order, order, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    matrix = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return Rotation(matrix, "random orthogonal (QR of a seeded Gaussian matrix; no Hadamard of this order)")
