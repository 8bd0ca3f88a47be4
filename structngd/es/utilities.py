"""Fitness shaping: ranks, utilities and recombination weights (MATH.md §5)."""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from .. import checks


def default_popsize(dim: int) -> int:
    """``4 + floor(3 ln d)``: the population size of xNES, SNES and CMA-ES."""
    checks.count("dim", dim)
    return 4 + int(math.floor(3 * math.log(dim)))


def _normalized_weights(popsize: int) -> list:
    checks.count("popsize", popsize, minimum=2)
    top = math.log(popsize / 2 + 1)
    raw = [max(0.0, top - math.log(r)) for r in range(1, popsize + 1)]
    total = sum(raw)
    return [v / total for v in raw]


def utilities(popsize: int, dtype=torch.float64, device=None) -> Tensor:
    """The xNES utilities ``u_r`` of ranks ``r = 1..popsize`` (1 = best = lowest cost).

    ``u_r = max(0, ln(lambda/2 + 1) - ln r) / sum_j max(0, ln(lambda/2 + 1) - ln j) - 1/lambda``: they sum
    to zero, do not increase with the rank, and for ``lambda = 10`` the first is 0.3295 (MATH.md §5).
    """
    return torch.tensor([w - 1.0 / popsize for w in _normalized_weights(popsize)], dtype=dtype, device=device)


def recombination_weights(popsize: int, dtype=torch.float64, device=None) -> Tensor:
    """The positive part ``w_r = u_r + 1/lambda`` (sums to one, zero for the worse half)."""
    return torch.tensor(_normalized_weights(popsize), dtype=dtype, device=device)


def effective_mu(popsize: int) -> float:
    """Variance-effective selection mass ``mu_eff = 1 / sum w_r^2`` of the recombination weights."""
    w = recombination_weights(popsize)
    return float(1.0 / (w * w).sum())


def rank_order(fitness: Tensor) -> Tuple[Tensor, int]:
    """Indices sorting ``fitness`` from best (lowest) to worst, and the number of non-finite values.

    Non-finite values (NaN, +inf and -inf alike) rank after every finite value; ties keep the sampling
    order (a stable sort), so equal fitness values give reproducible runs.
    """
    finite = torch.isfinite(fitness)
    n_bad = int((~finite).sum())
    order = torch.sort(torch.where(finite, fitness, torch.zeros_like(fitness)), stable=True).indices
    if n_bad:
        order = torch.cat([order[finite[order]], torch.nonzero(~finite).flatten()])  # bad ones in index order
    return order, n_bad
