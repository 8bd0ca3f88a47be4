"""Block-diagonal factors: independent dense blocks of size b."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks
from .base import MatrixGroup, linear_solve, log_abs_det, matrix_exp, sym


class BlockDiagonal(MatrixGroup):
    """``ceil(d / b)`` dense invertible ``b x b`` blocks stored as ``(ceil(d / b), b, b)``; ``project(G)`` keeps
    ``sym(G_ii) / 2`` per block. ``block_size`` must divide ``d`` unless ``ragged=True``: then the last block has
    ``r = d - (ceil(d / b) - 1) b`` rows, stored padded to ``b x b``. The padding slots are no coordinates: every
    operation writes zeros there and reads them as zeros (as the identity in the padded corner where an inverse or
    determinant needs it), whatever the stored tensor holds, and gradients vanish there.
    """

    name = "block_diagonal"

    def __init__(self, dim: int, block_size: int, ragged: bool = False):
        super().__init__(dim)
        dim, ragged = self.dim, checks.flag("ragged", ragged)
        if not checks.is_integer(block_size) or not 1 <= block_size <= dim or (dim % block_size and not ragged):
            raise ValueError(f"block_size must be a positive integer dividing dim={dim} (or at most dim with "
                             f"ragged=True, for a smaller last block), got {block_size!r}")
        self.block_size, self.ragged = int(block_size), ragged
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

    def storage_mask(self, dtype=None, device=None) -> Tensor:
        """``True`` on the stored slots that are coordinates, ``False`` on the padding (shape :attr:`shape`)."""
        keep = torch.ones(self.shape, dtype=torch.bool, device=device)
        r = self.block_size - self.padding
        keep[-1, r:, :] = False
        keep[-1, :, r:] = False
        return keep

    def _padded_identity(self, dtype=None, device=None) -> Tensor:
        """Zeros with the identity in the padded corner of the last block."""
        out = torch.zeros(self.shape, dtype=dtype, device=device)
        r = self.block_size - self.padding
        out[-1, r:, r:] = torch.eye(self.padding, dtype=dtype, device=device)
        return out

    def _clean(self, a: Tensor) -> Tensor:
        """``a`` with zeros in the padding slots, the only way any operation reads ``a``."""
        if not self.padding:
            return a
        return torch.where(self.constant("storage_mask", None, a.device), a, a.new_zeros(()))

    def _unit(self, a: Tensor) -> Tensor:
        """``a`` with the padding read as zeros and the padded corner as the identity (for inverses)."""
        if not self.padding:
            return a
        keep = self.constant("storage_mask", None, a.device)
        return torch.where(keep, a, self.constant("_padded_identity", a.dtype, a.device))

    def from_diagonal(self, diag: Tensor) -> Tensor:
        return torch.diag_embed(self._blocks(diag))

    def restrict(self, g: Tensor) -> Tensor:
        if self.padding:
            g = F.pad(g, (0, self.padding, 0, self.padding))
        grid = g.unflatten(-1, (self.num_blocks, self.block_size)).unflatten(-3, (self.num_blocks, self.block_size))
        return grid.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # grid: (..., nb, b, nb, b)

    def to_dense(self, a: Tensor) -> Tensor:  # the cut drops the padding slots
        nb, b = self.num_blocks, self.block_size
        out = a.new_zeros(a.shape[:-3] + (nb, b, nb, b))
        out.diagonal(dim1=-4, dim2=-2).copy_(a.movedim(-3, -1))
        return out.flatten(-4, -3).flatten(-2, -1)[..., : self.dim, : self.dim]

    def project(self, g: Tensor) -> Tensor:
        return 0.5 * sym(self.restrict(g))

    def pullback(self, b: Tensor, grad: Tensor) -> Tensor:
        return 0.5 * sym(self._clean(b).mT @ self._clean(grad))

    def mul(self, a, b):
        return self._clean(a) @ self._clean(b)

    def h(self, m):
        return super().h(self._clean(m))

    def exp(self, m):
        out = matrix_exp(self._clean(m))
        if self.padding:  # exp(0) = 1 would fill the padded corner: keep it off the pattern
            r = self.block_size - self.padding
            out[..., -1, r:, :] = 0
            out[..., -1, :, r:] = 0
        return out

    def outer(self, z, weights=None):
        wz = z if weights is None else z * weights.unsqueeze(-1)
        return torch.einsum("kni,knj->nij", self._blocks(wz), self._blocks(z))  # padding rows are zero

    def row_sq_norms(self, a):
        a = self._clean(a)
        return self._cut((a * a).sum(-1))

    def col_sq_norms(self, a):
        a = self._clean(a)
        return self._cut((a * a).sum(-2))

    def gram(self, a):  # block by block; the padded rows and columns stay zero
        a = self._clean(a)
        return a @ a.mT

    def _apply(self, a: Tensor, x: Tensor, fn) -> Tensor:
        if self._unbatched(a):  # one call per block for all vectors
            cols = self._blocks(x.reshape(-1, self.dim)).permute(1, 2, 0)
            return self._cut(fn(a, cols).permute(2, 0, 1)).reshape(x.shape)
        return self._cut(fn(a, self._blocks(x).unsqueeze(-1)).squeeze(-1))

    def matvec(self, a, x):
        return self._apply(self._clean(a), x, torch.matmul)

    def tmatvec(self, a, x):
        return self._apply(self._clean(a).mT, x, torch.matmul)

    def solve(self, a, x):
        return self._apply(self._unit(a), x, linear_solve)

    def tsolve(self, a, x):
        return self._apply(self._unit(a).mT, x, linear_solve)

    def logdet(self, a):
        return log_abs_det(self._unit(a)).sum(-1)

    def diagonal(self, a):
        return self._cut(a.diagonal(dim1=-2, dim2=-1))
