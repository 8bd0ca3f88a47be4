"""KFAC's block-tridiagonal inverse (Martens & Grosse 2015, section 4.3 and appendix B), in factored form.

Layers ``1..L`` form a chain; layer ``i`` has the input statistic ``A_i``, the output-gradient statistic
``G_i`` and, with the next layer, the cross-moments ``A_{i,i+1} = E[a_i a_{i+1}^T]`` and
``G_{i,i+1} = E[g_i g_{i+1}^T]``. The blocks ``F_ii = A_i ⊗ G_i`` and ``F_{i,i+1} = A_{i,i+1} ⊗ G_{i,i+1}``
(column-major ``vec`` of the ``(d_out, d_in)`` gradient matrices: ``(B ⊗ C) vec(V) = vec(C V B^T)``)
define a directed Gaussian graphical model ``vec(DW_i) | vec(DW_{i+1}) ~ N(Psi_{i,i+1} vec(DW_{i+1}),
Sigma_{i|i+1})``, ``vec(DW_L) ~ N(0, Sigma_L)`` with

* ``Psi_{i,i+1} = F_{i,i+1} F_{i+1,i+1}^{-1} = (A_{i,i+1} A_{i+1}^{-1}) ⊗ (G_{i,i+1} G_{i+1}^{-1})``,
* ``Sigma_{i|i+1} = A_i ⊗ G_i - Psi_{i,i+1} (A_{i+1} ⊗ G_{i+1}) Psi_{i,i+1}^T = A_i ⊗ G_i - B_i ⊗ C_i``
  with ``B_i = A_{i,i+1} A_{i+1}^{-1} A_{i+1,i}``, ``C_i = G_{i,i+1} G_{i+1}^{-1} G_{i+1,i}``,
* ``Sigma_L = A_L ⊗ G_L``.

Its covariance ``F_hat`` agrees with ``F`` on the diagonal and first off-diagonal blocks, and
``F_hat^{-1} = Xi^T Lambda Xi`` is block-tridiagonal: ``Xi`` has identity diagonal blocks and ``-Psi_{i,i+1}``
above them, ``Lambda = diag(Sigma_{1|2}^{-1}, ..., Sigma_{L-1|L}^{-1}, Sigma_L^{-1})``. No Kronecker product is
formed: ``Psi`` acts by two matrix products and ``Sigma_{i|i+1}^{-1}`` by a diagonal scaling in a Kronecker
eigenbasis (appendix B). The functions take the factors as given; damping is the caller's (see
:class:`~structngd.kron.KFAC`).
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor


class Link(NamedTuple):
    """The factors of one link ``i -> i+1`` of the chain.

    ``Psi_{i,i+1} = psi_A ⊗ psi_G`` and ``Sigma_{i|i+1}^{-1} = (K_A ⊗ K_G) diag(1 / vec(scale)) (K_A ⊗ K_G)^T``
    with ``scale = 1 - s_G s_A^T`` of shape ``(d_out, d_in)``.
    """

    psi_A: Tensor
    psi_G: Tensor
    K_A: Tensor
    K_G: Tensor
    scale: Tensor


def generalized_eigh(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """``(K, s)`` with ``K^T a K = I`` and ``K^T b K = diag(s)`` (``a`` SPD, ``b`` symmetric).

    Symmetric whitening by the Cholesky factor ``a = L L^T``: ``L^{-1} b L^{-T} = E diag(s) E^T``,
    ``K = L^{-T} E``."""
    chol, info = torch.linalg.cholesky_ex(a)
    if info != 0:
        raise ValueError("a damped Kronecker factor is not positive-definite (non-finite statistics?)")
    half = torch.linalg.solve_triangular(chol, b, upper=False)  # L^{-1} b
    whitened = torch.linalg.solve_triangular(chol, half.mT, upper=False)  # L^{-1} b L^{-T}
    s, e = torch.linalg.eigh((whitened + whitened.mT) / 2)
    return torch.linalg.solve_triangular(chol.mT, e, upper=True), s


def link(a: Tensor, g: Tensor, a_cross: Tensor, g_cross: Tensor, a_next_inv: Tensor, g_next_inv: Tensor) -> Link:
    """The link ``i -> i+1`` from ``A_i``, ``G_i``, ``A_{i,i+1}``, ``G_{i,i+1}``, ``A_{i+1}^{-1}``, ``G_{i+1}^{-1}``
    (the diagonal-block factors as the caller damps them, the cross-moments as they are).

    ``Psi = (A_{i,i+1} A_{i+1}^{-1}) ⊗ (G_{i,i+1} G_{i+1}^{-1})``; with ``K_A^T A_i K_A = I``,
    ``K_A^T B_i K_A = diag(s_A)`` (likewise ``K_G``, ``s_G`` for ``G_i``, ``C_i``),
    ``Sigma_{i|i+1} = A_i ⊗ G_i - B_i ⊗ C_i = (K_A ⊗ K_G)^{-T} (I - diag(s_A ⊗ s_G)) (K_A ⊗ K_G)^{-1}``.
    A valid joint covariance puts ``s`` in ``[0, 1]``; ``scale`` is clamped at the dtype's epsilon."""
    psi_a, psi_g = a_cross @ a_next_inv, g_cross @ g_next_inv
    k_a, s_a = generalized_eigh(a, psi_a @ a_cross.mT)
    k_g, s_g = generalized_eigh(g, psi_g @ g_cross.mT)
    scale = (1 - torch.outer(s_g, s_a)).clamp_min(torch.finfo(a.dtype).eps)
    return Link(psi_a, psi_g, k_a, k_g, scale)


def apply_psi(lk: Link, v_next: Tensor) -> Tensor:
    """``Psi_{i,i+1} vec(V_{i+1}) = vec(psi_G V_{i+1} psi_A^T)``, a ``(d_out_i, d_in_i)`` matrix."""
    return lk.psi_G @ v_next.to(lk.psi_G) @ lk.psi_A.mT


def apply_psi_t(lk: Link, w: Tensor) -> Tensor:
    """``Psi_{i,i+1}^T vec(W_i) = vec(psi_G^T W_i psi_A)``, a ``(d_out_{i+1}, d_in_{i+1})`` matrix."""
    return lk.psi_G.mT @ w @ lk.psi_A


def solve_conditional(lk: Link, v: Tensor) -> Tensor:
    """``Sigma_{i|i+1}^{-1} vec(V) = vec(K_G [(K_G^T V K_A) / scale] K_A^T)``."""
    return lk.K_G @ ((lk.K_G.mT @ v @ lk.K_A) / lk.scale) @ lk.K_A.mT


def inverse_apply(links: Sequence[Link], a_last_inv: Tensor, g_last_inv: Tensor, grads: Sequence[Tensor]) -> List[Tensor]:
    """``F_hat^{-1} v = Xi^T Lambda Xi v`` on the ``(d_out_i, d_in_i)`` matrices ``grads`` of layers ``1..L``.

    ``u_i = v_i - Psi_{i,i+1} v_{i+1}`` (``u_L = v_L``), ``w_i = Sigma_{i|i+1}^{-1} u_i``
    (``w_L = G_L^{-1} u_L A_L^{-1}``), result ``w_i - Psi_{i-1,i}^T w_{i-1}`` (``w_1`` for ``i = 1``)."""
    if len(links) != len(grads) - 1:
        raise ValueError(f"a chain of {len(grads)} layers has {len(grads) - 1} links, got {len(links)}")
    w = [solve_conditional(lk, v - apply_psi(lk, v_next)) for lk, v, v_next in zip(links, grads, grads[1:])]
    w.append(g_last_inv @ grads[-1] @ a_last_inv)
    return [w[0]] + [w_i - apply_psi_t(lk, w_prev).to(w_i) for lk, w_prev, w_i in zip(links, w, w[1:])]
