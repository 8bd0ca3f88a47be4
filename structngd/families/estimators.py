"""Every gradient estimator of the families, each written once: noise (independent or mirrored),
Bonnet/Price (``dL/dmu = E[grad l]``, ``dL/dSigma = E[hess l] / 2 - gamma S / 2`` for
``L = E_q[l] - gamma H(q)``, ``l = -log p``) and its delta method, Kronecker curvature (LocalKFAC)
and the score function with fitness-shaped utilities (ES)."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import checks
from ..groups import MatrixGroup


def standard_normal_noise(
    shape: Sequence[int],
    mirrored: bool = False,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> Tensor:
    """``eps ~ N(0, I)`` of shape ``(*shape, d)``; with ``mirrored`` the draws over the flattened
    sample dimensions come in pairs (second half = negated first half), which cancels the odd
    moments of the noise. ``mirrored`` needs an even number of draws (``ValueError`` otherwise).
    """
    shape = tuple(shape)
    options = dict(generator=generator, dtype=dtype, device=device)
    if not mirrored:
        return torch.randn(shape, **options)
    count = math.prod(shape[:-1])
    if count % 2:
        raise ValueError(f"mirrored noise needs an even number of draws, got {count}")
    half = torch.randn((count // 2, shape[-1]), **options)
    return torch.cat([half, -half]).reshape(shape)


def loss_derivatives(log_density: Callable[[Tensor], Tensor], w: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``l(w)``, ``grad l(w)``, ``hess l(w)`` (shapes ``(n,)``, ``(n, d)``, ``(n, d, d)``)
    for ``l = -log_density`` and ``w`` of shape ``(n, d)``, by ``torch.func`` (``vmap`` over
    ``grad`` and ``hessian``, so ``log_density`` must be transformable)."""

    def loss(x: Tensor) -> Tensor:
        return -log_density(x.unsqueeze(0)).squeeze(0)

    w = w.detach()
    values = -log_density(w).detach()
    return values, torch.func.vmap(torch.func.grad(loss))(w), torch.func.vmap(torch.func.hessian(loss))(w)


def mean_loss_derivatives(values: Tensor, grads: Tensor, hessians: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Sample means ``(E[l], E[grad l], (H + H^T) / 2)`` with ``H = E[hess l]``; ``ValueError`` if
    a value, a gradient or ``H`` is non-finite."""
    hess = hessians.mean(0)
    if not (torch.isfinite(values).all() and torch.isfinite(grads).all() and torch.isfinite(hess).all()):
        raise ValueError("the log-density, its gradient or its Hessian is non-finite at the samples")
    return values.mean(), grads.mean(0), 0.5 * (hess + hess.mT)


def factor_gradient_from_hessian(group: MatrixGroup, b: Tensor, hess: Tensor, gamma: float) -> Tensor:
    """Compact ``dL/dB = 2 g_S B = -B^{-T} (B^{-1} E[hess l] B^{-T} - gamma I)`` by Price's theorem,
    restricted to the storage pattern (``B`` times the algebra stays in the pattern)."""
    b = b.detach()
    whitened = group.solve(b, group.solve(b, hess.mT).mT)  # B^{-1} H B^{-T}
    eye = torch.eye(group.dim, dtype=hess.dtype, device=hess.device)
    return group.restrict(-group.tsolve(b, (whitened - gamma * eye).mT).mT)


def price_gradients(
    group: MatrixGroup,
    loc: Tensor,
    factor: Tensor,
    derivatives: Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]],
    num_pairs: int = 1,
    gamma: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Bonnet/Price gradients of ``L = E_q[l] - gamma H(q)``, ``q = N(mu, (B B^T)^{-1})``.

    Draws ``num_pairs`` mirrored pairs ``w = mu +- B^{-T} eps``, evaluates the per-sample
    ``derivatives(w) = (l, grad l, hess l)`` (e.g. :func:`loss_derivatives`); exact for quadratic ``l``
    with one pair. Returns detached ``(E[l], dL/dmu, dL/dB)`` (no entropy term; ``dL/dB`` compact);
    nothing is written into ``.grad``.
    """
    checks.count("num_pairs", num_pairs)
    with torch.no_grad():
        loc, factor = loc.detach(), factor.detach()
        eps = standard_normal_noise(
            (2 * num_pairs, group.dim), True, generator=generator, dtype=loc.dtype, device=loc.device
        )
        w = loc + group.tsolve(factor, eps)
    return _gradients_at(group, factor, derivatives, w, gamma)


def delta_gradients(
    group: MatrixGroup,
    loc: Tensor,
    factor: Tensor,
    derivatives: Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]],
    gamma: float = 1.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`price_gradients` with ``l``'s derivatives at the mean alone (Newton-like, deterministic)."""
    return _gradients_at(group, factor.detach(), derivatives, loc.detach().unsqueeze(0), gamma)


def _gradients_at(group: MatrixGroup, factor: Tensor, derivatives, w: Tensor, gamma: float):
    value, g_mu, hess = mean_loss_derivatives(*derivatives(w))
    with torch.no_grad():
        return value, g_mu, factor_gradient_from_hessian(group, factor, hess, gamma)


#: where the output-gradient statistic ``G`` of a Kronecker curvature comes from: the gradients of the
#: observed labels (``"empirical"``) or of labels drawn from the model's own likelihood (``"true"``, the Fisher)
FISHERS = ("empirical", "true")


def kronecker_factor_gradients(
    in_group: MatrixGroup,
    out_group: MatrixGroup,
    in_factor: Tensor,
    out_factor: Tensor,
    a: Tensor,
    g: Tensor,
    damping: float,
) -> Tuple[Tensor, Tensor]:
    """Local gradients ``(X_K, X_C)`` of a Kronecker Gaussian's factors from the curvature ``A ⊗ G``.

    With ``A`` (``d_in x d_in`` layer-input statistics), ``G`` (``d_out x d_out`` output-gradient
    statistics) and damping ``lambda``, the factors' part of ``L = E_q[l] - H(q)`` is
    ``tr(A K K^T) tr(G C C^T) / 2 + lambda tr(K K^T) tr(C C^T) / 2 - (d_out log|K K^T| + d_in log|C C^T|) / 2``.
    Returns the pattern entries (as the groups store them) of the symmetric local gradients at ``eta0`` (for
    ``KroneckerGaussian.natural_gradient``): ``X_K = K^T dL/dK = tr(C^T G C) K^T A K + lambda tr(C^T C) K^T K - d_out I``,
    ``X_C = C^T dL/dC = tr(K^T A K) C^T G C + lambda tr(K^T K) C^T C - d_in I``.
    Products with the compact factors only (O(d) for diagonal ones), no inverse or decomposition (so it runs in
    bfloat16).
    """
    ak, tr_ktak, tr_ktk = in_group.congruence_terms(in_factor, a)
    gc, tr_ctgc, tr_ctc = out_group.congruence_terms(out_factor, g)
    x_k = in_group.congruence(in_factor, ak, tr_ctgc, damping * tr_ctc) - out_group.dim * in_group.identity(
        a.dtype, a.device)
    x_c = out_group.congruence(out_factor, gc, tr_ktak, damping * tr_ktk) - in_group.dim * out_group.identity(
        g.dtype, g.device)
    return x_k, x_c


def kronecker_price_factor_gradients(family, hess: Tensor) -> Tuple[Tensor, Tensor]:
    """Compact ``(dL/dK, dL/dC)`` of ``L = tr(H Sigma) / 2 - H(q)`` for a Kronecker Gaussian ``family``, ``Sigma =
    (K K^T) ⊗ (C C^T)`` and a dense ``E[hess l] = H`` over the column-major ``vec(W)`` (Price's theorem for the
    factors; ``d^2`` memory, small blocks), by autograd through the dense covariance."""
    k = family.in_factor.detach().clone().requires_grad_(True)
    c = family.out_factor.detach().clone().requires_grad_(True)
    view = type(family).view(family.in_group, family.out_group, k, c)
    with torch.enable_grad():
        loss = 0.5 * (hess * view.covariance()).sum() - view.entropy()
        grad_k, grad_c = torch.autograd.grad(loss, (k, c))
    return grad_k, grad_c


def score_function_gradients(
    group: MatrixGroup,
    z: Tensor,
    utilities: Tensor,
    shape_z: Optional[Tensor] = None,
    shape_utilities: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Local gradients of ``L = E[l]`` at ``eta0`` of a covariance Gaussian from fitness-shaped
    utilities: samples ``x_k = mu + sigma A z_k`` whose costs are replaced by ``-u_k``
    (higher utility = better, so these are *loss* gradients). Returns ``(g_delta, g_M, g_s)``, the
    input of :meth:`~structngd.families.Gaussian.natural_gradient` ``(local_gradient=...)``:
    ``g_delta = -sum_k u_k z_k``, the compact pattern entries of ``g_M = -sum_k u_k (z_k z_k^T - I)``
    and its trace ``g_s = -sum_k u_k (|z_k|^2 - d)``; O(n nnz). ``shape_z`` / ``shape_utilities``
    (default ``z`` / ``utilities``) give the shape parts other samples or weights than the mean part
    (e.g. recombination weights for the mean)."""
    shape_z = z if shape_z is None else shape_z
    shape_u = utilities if shape_utilities is None else shape_utilities
    g_delta = -(utilities @ z)
    eye = group.constant("identity", shape_z.dtype, shape_z.device)
    g_m = group.outer(shape_z, shape_u) - shape_u.sum() * eye
    g_s = (shape_u * (shape_z * shape_z).sum(-1)).sum() - group.dim * shape_u.sum()
    return g_delta, -g_m, -g_s
