"""Fitness shaping: ranks, utilities and recombination weights."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Set as AbstractSet
from typing import Tuple

import numpy as np
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
    to zero, do not increase with the rank, and for ``lambda = 10`` the first is 0.3295.
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


def real_number(value, refusal: str) -> float:
    """``value`` as a float: a real number (numpy's, ``Fraction``, ...) or a one-element real tensor or array;
    ``ValueError`` (``refusal``, then the value) for strings, complex numbers, bools and anything else."""
    if isinstance(value, Tensor):
        real = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    elif isinstance(value, np.ndarray):
        real = value.size == 1 and value.dtype.kind in "fiu"
    else:
        real = (hasattr(type(value), "__float__") and not isinstance(value, (str, bytes, complex, np.complexfloating))
                and not checks.is_bool(value))
    if not real:
        raise ValueError(f"{refusal}, got {value!r}")
    return float(value)


def as_costs(values) -> Tensor:
    """Costs as a float64 CPU tensor: a tensor, numpy array, list or tuple (any iterable in the order of the
    points) of real numbers. ``ValueError`` for dicts and sets (their keys are not costs in order), strings,
    complex and bool values."""
    if isinstance(values, Tensor):
        if values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"fitness must be real numbers, got a tensor of dtype {values.dtype}")
        return values.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(values, np.ndarray) and values.dtype.kind != "O":
        if values.dtype.kind not in "fiu":
            raise ValueError(f"fitness must be real numbers, got a numpy array of dtype {values.dtype}")
        return torch.as_tensor(values, dtype=torch.float64)
    if isinstance(values, (Mapping, AbstractSet, str, bytes)) or not isinstance(values, Iterable):
        raise ValueError("fitness must be a 1-D sequence of numbers in the order of the points (a list, tuple, "
                         f"numpy array or tensor), got a {type(values).__name__}")
    return torch.tensor([real_number(v, "fitness values must be real numbers") for v in values], dtype=torch.float64)
