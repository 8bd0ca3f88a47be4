"""Lower- and upper-triangular groups: Cholesky-like factors of any SPD precision."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MatrixGroup, apply_columns, linear_solve, matrix_exp


class _Triangular(MatrixGroup):
    """Triangular factors stored as ``(d, d)``; every algebra entry but the diagonal is free, so
    ``project(G) = diag(G) / 2 + strict triangle of G``. Only the triangle is read: every operation (products,
    solves, ``logdet``, ``to_dense``) sees ``tril(A)`` (``triu(A)``), whatever sits in the other slots (an Adam
    or SGD step on the stored matrix, a user's write), and gradients vanish there."""

    upper: bool = False

    @property
    def shape(self):
        return (self.dim, self.dim)

    def _tri(self, g: Tensor, offset: int = 0) -> Tensor:
        return torch.triu(g, offset) if self.upper else torch.tril(g, -offset)

    def from_diagonal(self, diag: Tensor) -> Tensor:
        return torch.diag_embed(diag)

    def restrict(self, g: Tensor) -> Tensor:
        return self._tri(g)

    def to_dense(self, a: Tensor) -> Tensor:
        return self._tri(a)

    def project(self, g: Tensor) -> Tensor:
        return self._tri(g, 1) + 0.5 * torch.diag_embed(g.diagonal(dim1=-2, dim2=-1))

    def mul(self, a, b):
        return self._tri(self._tri(a) @ self._tri(b))

    def h(self, m):
        return super().h(self._tri(m))

    def exp(self, m):
        return self._tri(matrix_exp(self._tri(m)))

    def row_sq_norms(self, a):
        a = self._tri(a)
        return (a * a).sum(-1)

    def col_sq_norms(self, a):
        a = self._tri(a)
        return (a * a).sum(-2)

    def _solve(self, a: Tensor, x: Tensor, transpose: bool) -> Tensor:
        fn = lambda m, rhs: linear_solve(m, rhs, upper=self.upper != transpose)  # noqa: E731
        return apply_columns(a.mT if transpose else a, x, fn, self._unbatched(a))

    def matvec(self, a, x):
        return apply_columns(self._tri(a), x, torch.matmul, self._unbatched(a))

    def tmatvec(self, a, x):
        return apply_columns(self._tri(a).mT, x, torch.matmul, self._unbatched(a))

    def solve(self, a, x):
        return self._solve(a, x, transpose=False)

    def tsolve(self, a, x):
        return self._solve(a, x, transpose=True)

    def logdet(self, a):
        return a.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)

    def diagonal(self, a):
        return a.diagonal(dim1=-2, dim2=-1)


class LowerTriangular(_Triangular):
    """Lower-triangular ``B``: ``S = B B^T`` is the Cholesky form of the precision."""

    name = "lower_triangular"
    upper = False


class UpperTriangular(_Triangular):
    """Upper-triangular ``B``: ``S = B B^T`` is the "reverse" Cholesky form."""

    name = "upper_triangular"
    upper = True
