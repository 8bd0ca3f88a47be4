"""Bonnet/Price gradient estimators: expected gradient and Hessian of a log-density.

``dL/dmu = E[grad l]`` and ``dL/dSigma = E[hess l] / 2 - gamma S / 2`` for
``L = E_q[l] - gamma H(q)``, ``l = -log p``.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

from ..groups import MatrixGroup


def expected_gradient_and_hessian(
    log_density: Callable[[Tensor], Tensor], w: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sample means of ``l(w)``, ``grad l(w)`` and ``hess l(w)`` for ``l = -log_density``.

    ``w`` has shape ``(n, d)``; ``log_density`` maps ``(n, d) -> (n,)``. Per-sample
    derivatives come from ``torch.func`` (``vmap`` over ``grad`` and ``hessian``).
    """

    def loss(x: Tensor) -> Tensor:
        return -log_density(x.unsqueeze(0)).squeeze(0)

    w = w.detach()
    values = -log_density(w).detach()
    grads = torch.func.vmap(torch.func.grad(loss))(w)
    hessians = torch.func.vmap(torch.func.hessian(loss))(w)
    hess = hessians.mean(0)
    bad = not (torch.isfinite(values).all() and torch.isfinite(grads).all() and torch.isfinite(hess).all())
    if bad:
        raise ValueError("the log-density, its gradient or its Hessian is non-finite at the samples")
    return values.mean(), grads.mean(0), 0.5 * (hess + hess.mT)


def factor_gradient_from_hessian(group: MatrixGroup, b: Tensor, hess: Tensor, gamma: float) -> Tensor:
    """Euclidean gradient ``dL/dB`` (compact) from ``E[hess l]`` by Price's theorem.

    ``dL/dB = 2 g_S B = -B^{-T} (B^{-1} E[hess l] B^{-T} - gamma I)`` restricted to the
    storage pattern (valid because ``B`` times the algebra stays in the pattern).
    """
    b = b.detach()
    whitened = group.solve(b, group.solve(b, hess.mT).mT)  # B^{-1} H B^{-T}
    eye = torch.eye(group.dim, dtype=hess.dtype, device=hess.device)
    dense = -group.tsolve(b, (whitened - gamma * eye).mT).mT
    return group.restrict(dense)
