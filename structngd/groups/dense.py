"""GL(d): dense invertible factors; the algebra is the symmetric matrices."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MatrixGroup, apply_columns, linear_solve, log_abs_det, matrix_exp, sym


class Dense(MatrixGroup):
    """All invertible d x d matrices, stored as ``(d, d)``; ``S = B B^T`` is any SPD matrix. The local space is the
    symmetric matrices (skew directions rotate ``B``, leave ``S`` and have zero Fisher): ``project(G) = sym(G) / 2``."""

    name = "dense"

    @property
    def shape(self):
        return (self.dim, self.dim)

    def from_diagonal(self, diag: Tensor) -> Tensor:
        return torch.diag_embed(diag)

    def restrict(self, g: Tensor) -> Tensor:
        return g

    def to_dense(self, a: Tensor) -> Tensor:
        return a

    def project(self, g: Tensor) -> Tensor:
        return 0.5 * sym(g)

    def pullback(self, b: Tensor, grad: Tensor) -> Tensor:
        return 0.5 * sym(b.mT @ grad)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    def exp(self, m: Tensor) -> Tensor:
        return matrix_exp(m)

    def outer(self, z, weights=None):
        wz = z if weights is None else z * weights.unsqueeze(-1)
        return wz.mT @ z

    def row_sq_norms(self, a):
        return (a * a).sum(-1)

    def col_sq_norms(self, a):
        return (a * a).sum(-2)

    def gram(self, a):
        return a @ a.mT

    def matvec(self, a, x):
        return apply_columns(a, x, torch.matmul, self._unbatched(a))

    def tmatvec(self, a, x):
        if self._unbatched(a):  # rows: Y = X A (A's gradient keeps A's memory layout)
            return (x.reshape(-1, x.shape[-1]) @ a).reshape(x.shape[:-1] + (a.shape[-1],))
        return apply_columns(a.mT, x, torch.matmul, False)

    def solve(self, a, x):
        return apply_columns(a, x, linear_solve, self._unbatched(a))

    def tsolve(self, a, x):
        if self._unbatched(a):  # rows: Y = X A^{-1}; keeps A's gradient in A's memory layout
            return linear_solve(a, x.reshape(-1, x.shape[-1]), left=False).reshape(x.shape)
        return apply_columns(a.mT, x, linear_solve, False)

    def logdet(self, a):
        return log_abs_det(a.mT)  # det A^T = det A; A^T keeps the gradient contiguous
