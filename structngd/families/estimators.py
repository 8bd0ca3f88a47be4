"""Every gradient estimator of the families, each written once.

* noise: :func:`standard_normal_noise` (independent or mirrored ``+-eps`` pairs);
* reparameterization: autograd through a family's ``rsample`` (``w = mu + B^{-T} eps``,
  ``W = M + K E C^T``), with the noise from :func:`standard_normal_noise`;
* Bonnet/Price: ``dL/dmu = E[grad l]`` and ``dL/dSigma = E[hess l] / 2 - gamma S / 2`` for
  ``L = E_q[l] - gamma H(q)``, ``l = -log p`` (:func:`price_gradients`, from per-sample
  derivatives such as :func:`loss_derivatives`; its parts :func:`mean_loss_derivatives`,
  :func:`factor_gradient_from_hessian`);
* delta: the same with the derivatives at the mean (:func:`delta_gradients`);
* Kronecker curvature: the local factor gradients of a Kronecker-Gaussian with curvature
  ``A ⊗ G`` and damping (:func:`kronecker_factor_gradients`, what LocalKFAC feeds its factors);
* score function with fitness-shaped utilities (:func:`score_function_gradients`, ES).
"""

from __future__ import annotations

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


def loss_derivatives(log_density: Callable[[Tensor], Tensor], w: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``l(w)``, ``grad l(w)`` and ``hess l(w)`` for ``l = -log_density``, by ``torch.func``.

    ``w`` has shape ``(n, d)``; ``log_density`` maps ``(n, d) -> (n,)`` and must be a function
    ``torch.func`` can transform (``vmap`` over ``grad`` and ``hessian``). Returns tensors of
    shapes ``(n,)``, ``(n, d)`` and ``(n, d, d)``: the ``derivatives`` of :func:`price_gradients`.
    """

    def loss(x: Tensor) -> Tensor:
        return -log_density(x.unsqueeze(0)).squeeze(0)

    w = w.detach()
    values = -log_density(w).detach()
    grads = torch.func.vmap(torch.func.grad(loss))(w)
    hessians = torch.func.vmap(torch.func.hessian(loss))(w)
    return values, grads, hessians


def mean_loss_derivatives(values: Tensor, grads: Tensor, hessians: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Sample means ``(E[l], E[grad l], sym E[hess l])`` of per-sample derivatives, checked.

    ``ValueError`` if a value, a gradient or the mean Hessian is non-finite; the mean
    Hessian is symmetrized, ``(H + H^T) / 2``.
    """
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


def price_gradients(
    group: MatrixGroup,
    loc: Tensor,
    factor: Tensor,
    derivatives: Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]],
    num_pairs: int = 1,
    gamma: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The Bonnet/Price estimate of the gradients of ``L = E_q[l] - gamma H(q)``, ``q = N(mu, (B B^T)^{-1})``.

    Draws ``num_pairs`` mirrored pairs ``w = mu +- B^{-T} eps`` (:func:`standard_normal_noise`,
    so the same seed gives the same points), evaluates ``derivatives(w)`` (the per-sample
    ``(l, grad l, hess l)`` of shapes ``(n,)``, ``(n, d)``, ``(n, d, d)``: :func:`loss_derivatives`
    for functions ``torch.func`` can transform, or any other way of differentiating ``l``),
    averages and checks them (:func:`mean_loss_derivatives`) and turns ``E[hess l]`` into the
    factor's gradient (:func:`factor_gradient_from_hessian`). Exact for quadratic ``l`` with
    one pair.

    Returns ``(E[l], dL/dmu, dL/dB)``: the sample mean of ``l`` (without the entropy term), the
    mean's gradient ``E[grad l]`` and the compact factor gradient, all detached; nothing is
    written into ``.grad``.
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
    """The delta method: :func:`price_gradients` with ``l``'s derivatives taken at the mean
    alone (``E[grad l] ~ grad l(mu)``, ``E[hess l] ~ hess l(mu)``; Newton-like, deterministic)."""
    return _gradients_at(group, factor.detach(), derivatives, loc.detach().unsqueeze(0), gamma)


def _gradients_at(group: MatrixGroup, factor: Tensor, derivatives, w: Tensor, gamma: float):
    value, g_mu, hess = mean_loss_derivatives(*derivatives(w))
    with torch.no_grad():
        return value, g_mu, factor_gradient_from_hessian(group, factor, hess, gamma)


# ------------------------------------------------------- Kronecker curvature (LocalKFAC)
def _kronecker_curvature(group: MatrixGroup, f: Tensor, m: Tensor):
    """``(F_dense, M F, tr(F^T M F), tr(F^T F))`` for symmetric ``M``: one product by the
    group's matvecs (O(d^2 k) for sparse groups), the traces as elementwise sums."""
    dense = group.to_dense(f)
    mf = group.tmatvec(f, m)  # row i: F^T M[i] = (M F)[i]
    return dense, mf, (dense * mf).sum(), (dense * dense).sum()


def _kronecker_left(group: MatrixGroup, f: Tensor, y: Tensor) -> Tensor:
    """``F^T Y`` for a dense ``Y`` by the group's products."""
    return group.tmatvec(f, y.mT).mT


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

    For ``q = N(M, (K K^T) ⊗ (C C^T))`` over a layer's ``d_out x d_in`` weight and the
    Gauss-Newton model of the loss with Kronecker curvature ``A ⊗ G`` (``A``: ``d_in x d_in``
    layer-input statistics, ``G``: ``d_out x d_out`` output-gradient statistics) plus damping
    ``lambda I``, the factors' part of ``L = E_q[l] - H(q)`` is (MATH §6.2)

    ``L(K, C) = tr(A K K^T) tr(G C C^T) / 2 + lambda tr(K K^T) tr(C C^T) / 2
    - (d_out log|K K^T| + d_in log|C C^T|) / 2``.

    Returns the full-matrix gradients in the local coordinates ``K = K_t h(M_K)``,
    ``C = C_t h(M_C)`` at ``eta0`` as dense symmetric matrices:

    ``X_K = K^T dL/dK = tr(C^T G C) K^T A K + lambda tr(C^T C) K^T K - d_out I``,
    ``X_C = C^T dL/dC = tr(K^T A K) C^T G C + lambda tr(K^T K) C^T C - d_in I``,

    so that the factors' natural gradients are ``project(X_K) / d_out`` and ``project(X_C) / d_in``
    (:meth:`KroneckerGaussian.natural_gradient` with ``local_gradient``). Only products with the
    compact factors: two per side, no inverse or decomposition (so it runs in bfloat16).
    """
    d_in, d_out = in_group.dim, out_group.dim
    eye_k = torch.eye(d_in, dtype=a.dtype, device=a.device)
    eye_c = torch.eye(d_out, dtype=g.dtype, device=g.device)
    # X_K = K^T (tr(C^T G C) A + lambda tr(C^T C) I) K - d_out I: two products per side
    k_dense, ak, tr_ktak, tr_ktk = _kronecker_curvature(in_group, in_factor, a)
    c_dense, gc, tr_ctgc, tr_ctc = _kronecker_curvature(out_group, out_factor, g)
    x_k = _kronecker_left(in_group, in_factor, tr_ctgc * ak + damping * tr_ctc * k_dense) - d_out * eye_k
    x_c = _kronecker_left(out_group, out_factor, tr_ktak * gc + damping * tr_ktk * c_dense) - d_in * eye_c
    return x_k, x_c


# --------------------------------------------------------------- score function (ES)
def score_function_gradients(
    group: MatrixGroup,
    z: Tensor,
    utilities: Tensor,
    shape_z: Optional[Tensor] = None,
    shape_utilities: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Local gradients of ``L = E[l]`` at ``eta0`` of a covariance Gaussian from fitness-shaped
    utilities (MATH.md §5): samples ``x_k = mu + sigma A z_k`` whose costs ``l(x_k)`` are replaced
    by ``-u_k`` (higher utility = better point, so these are *loss* gradients and the
    layer-3 kernel's descent step moves towards the good samples).

    Returns ``(g_delta, g_M, g_s)``: ``g_delta = -sum_k u_k z_k``, the pattern entries (compact
    form, via ``group.outer``) of ``g_M = -sum_k u_k (z_k z_k^T - I)`` and its trace
    ``g_s = -sum_k u_k (|z_k|^2 - d)``, the input of
    :meth:`~structngd.families.Gaussian.natural_gradient` ``(local_gradient=...)``. O(n nnz).
    ``shape_z`` / ``shape_utilities`` (default ``z`` / ``utilities``) give the shape parts other
    samples or weights than the mean part (e.g. recombination weights for the mean).
    """
    shape_z = z if shape_z is None else shape_z
    shape_u = utilities if shape_utilities is None else shape_utilities
    g_delta = -(utilities @ z)
    eye = group.constant("identity", shape_z.dtype, shape_z.device)
    g_m = group.outer(shape_z, shape_u) - shape_u.sum() * eye
    g_s = (shape_u * (shape_z * shape_z).sum(-1)).sum() - group.dim * shape_u.sum()
    return g_delta, -g_m, -g_s
