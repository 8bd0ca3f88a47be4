"""Block-diagonal factors: independent dense blocks of size b."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MatrixGroup, sym


class BlockDiagonal(MatrixGroup):
    """``d / b`` dense invertible ``b x b`` blocks stored as ``(d // b, b, b)``.

    Each block's algebra is symmetric: ``project(G)`` keeps ``sym(G_ii) / 2`` per block.
    """

    name = "block_diagonal"

    def __init__(self, dim: int, block_size: int):
        super().__init__(dim)
        if not isinstance(block_size, int) or block_size < 1 or dim % block_size:
            raise ValueError(
                f"block_size must be a positive integer dividing dim={dim}, got {block_size!r}"
            )
        self.block_size = block_size
        self.num_blocks = dim // block_size

    def __repr__(self):
        return f"BlockDiagonal(dim={self.dim}, block_size={self.block_size})"

    @property
    def shape(self):
        return (self.num_blocks, self.block_size, self.block_size)

    def _blocks(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_blocks, self.block_size))

    def from_diagonal(self, diag: Tensor) -> Tensor:
        return torch.diag_embed(self._blocks(diag))

    def restrict(self, g: Tensor) -> Tensor:
        grid = g.unflatten(-1, (self.num_blocks, self.block_size)).unflatten(
            -3, (self.num_blocks, self.block_size)
        )  # (..., nb, b, nb, b)
        return grid.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)

    def to_dense(self, a: Tensor) -> Tensor:
        nb, b = self.num_blocks, self.block_size
        out = a.new_zeros(a.shape[:-3] + (nb, b, nb, b))
        out.diagonal(dim1=-4, dim2=-2).copy_(a.movedim(-3, -1))
        return out.flatten(-4, -3).flatten(-2, -1)

    def project(self, g: Tensor) -> Tensor:
        return 0.5 * sym(self.restrict(g))

    def pullback(self, b: Tensor, grad: Tensor) -> Tensor:
        return 0.5 * sym(b.mT @ grad)

    def mul(self, a, b):
        return a @ b

    def _apply(self, a: Tensor, x: Tensor, fn) -> Tensor:
        if self._unbatched(a):  # one call per block for all vectors
            cols = x.reshape(-1, self.num_blocks, self.block_size).permute(1, 2, 0)
            return fn(a, cols).permute(2, 0, 1).reshape(x.shape)
        return fn(a, self._blocks(x).unsqueeze(-1)).squeeze(-1).flatten(-2)

    def matvec(self, a, x):
        return self._apply(a, x, torch.matmul)

    def tmatvec(self, a, x):
        return self._apply(a.mT, x, torch.matmul)

    def solve(self, a, x):
        return self._apply(a, x, torch.linalg.solve)

    def tsolve(self, a, x):
        return self._apply(a.mT, x, torch.linalg.solve)

    def logdet(self, a):
        return torch.linalg.slogdet(a)[1].sum(-1)

    def diagonal(self, a):
        return a.diagonal(dim1=-2, dim2=-1).flatten(-2)
