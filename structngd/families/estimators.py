"""Every gradient estimator of the families, each written once.

* noise: :func:`standard_normal_noise` (independent or mirrored ``+-eps`` pairs);
* Bonnet/Price: ``dL/dmu = E[grad l]`` and ``dL/dSigma = E[hess l] / 2 - gamma S / 2`` for
  ``L = E_q[l] - gamma H(q)``, ``l = -log p`` (:func:`expected_gradient_and_hessian`,
  :func:`factor_gradient_from_hessian`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..groups import MatrixGroup


def standard_normal_noise(
    shape: Sequence[int],
    mirrored: bool = False,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> Tensor:
    """``eps ~ N(0, I)`` of shape ``(*shape, d)``; with ``mirrored`` the draws over the flattened
    sample dimensions come in pairs: the second half is the negated first half.

    Each draw is still exactly standard normal; the pairs cancel the odd moments of the noise
    (the mean's share of a factor-gradient estimate, the mean's share of an ES shape update).
    ``mirrored`` needs an even number of draws (``ValueError`` otherwise).
    """
    shape = tuple(shape)
    options = dict(generator=generator, dtype=dtype, device=device)
    if not mirrored:
        return torch.randn(shape, **options)
    count = 1
    for s in shape[:-1]:
        count *= s
    if count % 2:
        raise ValueError(f"mirrored noise needs an even number of draws, got {count}")
    half = torch.randn((count // 2, shape[-1]), **options)
    return torch.cat([half, -half]).reshape(shape)


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
