"""Block-diagonal factors: independent dense blocks of size b."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MatrixGroup, linear_solve, log_abs_det, sym


class BlockDiagonal(MatrixGroup):
    """``ceil(d / b)`` dense invertible ``b x b`` blocks stored as ``(ceil(d / b), b, b)``; ``project(G)`` keeps
    ``sym(G_ii) / 2`` per block. ``block_size`` must divide ``d`` unless ``ragged=True``: then the last block has
    ``r = d - (ceil(d / b) - 1) b`` rows, stored padded to ``b x b``. The padding slots are no coordinates: every
    operation keeps them at zero and reads the padded corner as the identity where an inverse or determinant needs it.
    """

    name = "block_diagonal"

    def __init__(self, dim: int, block_size: int, ragged: bool = False):
        super().__init__(dim)
        if not isinstance(block_size, int) or block_size < 1 or block_size > dim or (dim % block_size and not ragged):
            raise ValueError(f"block_size must be a positive integer dividing dim={dim} (or at most dim with "
                             f"ragged=True, for a smaller last block), got {block_size!r}")
        self.block_size, self.ragged = block_size, bool(ragged)
        self.num_blocks = -(-dim // block_size)
        self.padding = self.num_blocks * block_size - dim

    def __repr__(self):
        return f"BlockDiagonal(dim={self.dim}, block_size={self.block_size}{', ragged=True' if self.ragged else ''})"

    @property
    def shape(self):
        return (self.num_blocks, self.block_size, self.block_size)

    def _blocks(self, x: Tensor) -> Tensor:
        """``(..., d)`` vectors as ``(..., num_blocks, b)`` (zero-padded)."""
        if self.padding:
            x = F.pad(x, (0, self.padding))
        return x.unflatten(-1, (self.num_blocks, self.block_size))

    def _cut(self, x: Tensor) -> Tensor:
        """``(..., num_blocks, b)`` back to ``(..., d)``."""
        return x.flatten(-2)[..., : self.dim]

    def _unit(self, a: Tensor) -> Tensor:
        """``a`` with the padded corner of the last block set to the identity (for inverses)."""
        if not self.padding:
            return a
        r = self.block_size - self.padding
        a = a.clone()
        a[..., -1, r:, r:] = torch.eye(self.padding, dtype=a.dtype, device=a.device)
        return a

    def from_diagonal(self, diag: Tensor) -> Tensor:
        return torch.diag_embed(self._blocks(diag))

    def restrict(self, g: Tensor) -> Tensor:
        if self.padding:
            g = F.pad(g, (0, self.padding, 0, self.padding))
        grid = g.unflatten(-1, (self.num_blocks, self.block_size)).unflatten(-3, (self.num_blocks, self.block_size))
        return grid.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # grid: (..., nb, b, nb, b)

    def to_dense(self, a: Tensor) -> Tensor:
        nb, b = self.num_blocks, self.block_size
        out = a.new_zeros(a.shape[:-3] + (nb, b, nb, b))
        out.diagonal(dim1=-4, dim2=-2).copy_(a.movedim(-3, -1))
        return out.flatten(-4, -3).flatten(-2, -1)[..., : self.dim, : self.dim]

    def project(self, g: Tensor) -> Tensor:
        return 0.5 * sym(self.restrict(g))

    def pullback(self, b: Tensor, grad: Tensor) -> Tensor:
        return 0.5 * sym(b.mT @ grad)

    def mul(self, a, b):
        return a @ b

    def exp(self, m):
        out = torch.linalg.matrix_exp(m)
        if self.padding:  # exp(0) = 1 would fill the padded corner: keep it off the pattern
            r = self.block_size - self.padding
            out[..., -1, r:, :] = 0
            out[..., -1, :, r:] = 0
        return out

    def outer(self, z, weights=None):
        wz = z if weights is None else z * weights.unsqueeze(-1)
        return torch.einsum("kni,knj->nij", self._blocks(wz), self._blocks(z))  # padding rows are zero

    def row_sq_norms(self, a):
        return self._cut((a * a).sum(-1))

    def col_sq_norms(self, a):
        return self._cut((a * a).sum(-2))

    def gram(self, a):  # block by block; the padded rows and columns stay zero
        return a @ a.mT

    def _apply(self, a: Tensor, x: Tensor, fn) -> Tensor:
        if self._unbatched(a):  # one call per block for all vectors
            cols = self._blocks(x.reshape(-1, self.dim)).permute(1, 2, 0)
            return self._cut(fn(a, cols).permute(2, 0, 1)).reshape(x.shape)
        return self._cut(fn(a, self._blocks(x).unsqueeze(-1)).squeeze(-1))

    def matvec(self, a, x):
        return self._apply(a, x, torch.matmul)

    def tmatvec(self, a, x):
        return self._apply(a.mT, x, torch.matmul)

    def solve(self, a, x):
        return self._apply(self._unit(a), x, linear_solve)

    def tsolve(self, a, x):
        return self._apply(self._unit(a).mT, x, linear_solve)

    def logdet(self, a):
        return log_abs_det(self._unit(a)).sum(-1)

    def diagonal(self, a):
        return self._cut(a.diagonal(dim1=-2, dim2=-1))
