"""The positive-diagonal group: mean-field Gaussians."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MatrixGroup


class Diagonal(MatrixGroup):
    """Diagonal factors stored as their ``(d,)`` diagonal; ``project(G) = diag(G) / 2``."""

    name = "diagonal"

    @property
    def shape(self):
        return (self.dim,)

    def from_diagonal(self, diag: Tensor) -> Tensor:
        return diag.clone()

    def restrict(self, g: Tensor) -> Tensor:
        return g.diagonal(dim1=-2, dim2=-1)

    def to_dense(self, a: Tensor) -> Tensor:
        return torch.diag_embed(a)

    def diagonal(self, a: Tensor) -> Tensor:
        return a

    def project(self, g: Tensor) -> Tensor:
        return 0.5 * g.diagonal(dim1=-2, dim2=-1)

    def pullback(self, b: Tensor, grad: Tensor) -> Tensor:
        return 0.5 * b * grad

    def mul(self, a, b):
        return a * b

    def exp(self, m):
        return torch.exp(m)

    def inverse_fisher_weights(self, dtype=None, device=None):
        return torch.full((self.dim,), 0.5, dtype=dtype or torch.get_default_dtype(), device=device)

    def outer(self, z, weights=None):
        wz = z if weights is None else z * weights.unsqueeze(-1)
        return (wz * z).sum(0)

    def congruence_terms(self, a, m):
        ma = m.diagonal(dim1=-2, dim2=-1) * a  # the diagonal of M A: all the diagonal pattern needs
        return ma, (a * ma).sum(), (a * a).sum()

    def congruence_statistic(self, z):
        return torch.diag_embed((z * z).sum(0))

    def congruence(self, a, ma, alpha, beta):
        return a * (alpha * ma + beta * a)

    def row_sq_norms(self, a):
        return a * a

    col_sq_norms = gram = row_sq_norms

    def matvec(self, a, x):
        return a * x

    tmatvec = matvec

    def solve(self, a, x):
        return x / a

    tsolve = solve

    def logdet(self, a):
        return a.abs().log().sum(-1)
