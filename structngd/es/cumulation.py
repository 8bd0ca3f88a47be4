"""CMA-style extras of ``rates="cma"`` that are not natural gradients (Hansen 2016): evolution paths of
the mean steps, cumulative step-size adaptation (CSA), the volume normalization of the shape factor and
pycma's escape from flat fitness.
"""

from __future__ import annotations

import math
from typing import Tuple

from torch import Tensor


def expected_norm(d: int) -> float:
    """``E|N(0, I_d)|`` to O(d^-3): CSA's reference length."""
    return math.sqrt(d) * (1 - 1 / (4 * d) + 1 / (21 * d * d))


def update_paths(p_sigma: Tensor, p_c: Tensor, zw: Tensor, step: Tensor, cs: float, cc: float, mueff: float,
                 chi: float, run_iteration: int, dim: int) -> Tuple[Tensor, Tensor, float]:
    """The paths ``p_sigma`` of the whitened mean steps ``zw`` and ``p_c`` of the steps ``A zw / sigma``
    (stalled while ``|p_sigma|`` is large, pycma's ``hsig``); returns them and ``|p_sigma|``."""
    p_sigma = (1 - cs) * p_sigma + math.sqrt(cs * (2 - cs) * mueff) * zw
    ps_norm = float(p_sigma.norm())
    hsig = ps_norm / math.sqrt(1 - (1 - cs) ** (2 * run_iteration)) / chi < 1.4 + 2 / (dim + 1)
    p_c = (1 - cc) * p_c + (math.sqrt(cc * (2 - cc) * mueff) if hsig else 0.0) * step
    return p_sigma, p_c, ps_norm


def csa_factor(cs: float, ds: float, ps_norm: float, chi: float) -> float:
    """CSA's factor of ``sigma``: ``exp(min(1, cs / ds (|p_sigma| / chi - 1)))``."""
    return math.exp(min(1.0, (cs / ds) * (ps_norm / chi - 1)))


def flat_fitness_factor(cs: float, ds: float) -> float:
    """pycma's factor of ``sigma`` on a plateau: ``exp(0.2 + cs / ds)``."""
    return math.exp(0.2 + cs / ds)


def volume_shrink(group, factor: Tensor, old_logdet: float) -> float:
    """The scalar that brings ``det`` of the stepped ``factor`` back to ``exp(old_logdet)``."""
    return math.exp(-(float(group.logdet(factor)) - old_logdet) / group.dim)
