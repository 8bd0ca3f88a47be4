"""Pattern-only linear algebra the ES needs on top of :mod:`structngd.groups`.

Every helper works on a group's compact form and costs O(nnz) per vector (O(d k) for the
block groups): no d x d matrix is formed for the low-rank structures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..groups import BlockDiagonal, BlockUpperTriangular, Dense, Diagonal, MatrixGroup
from ..groups.block_upper import DENSE
from ..groups.triangular import _Triangular


def outer_pattern(group: MatrixGroup, z: Tensor, weights: Tensor) -> Tensor:
    """Compact pattern entries of ``sum_k weights_k z_k z_k^T`` for ``z`` of shape ``(n, d)``."""
    wz = z * weights.unsqueeze(-1)
    if isinstance(group, Diagonal):
        return (wz * z).sum(0)
    if isinstance(group, Dense):
        return wz.mT @ z
    if isinstance(group, _Triangular):
        return group.restrict(wz.mT @ z)
    if isinstance(group, BlockDiagonal) and not group.padding:
        zb = z.unflatten(-1, (group.num_blocks, group.block_size))
        wzb = wz.unflatten(-1, (group.num_blocks, group.block_size))
        return torch.einsum("kni,knj->nij", wzb, zb)
    if isinstance(group, BlockUpperTriangular):
        parts = [z[:, sl] for sl, _ in group.blocks]
        wparts = [wz[:, sl] for sl, _ in group.blocks]
        diag = [
            wparts[i].mT @ parts[i] if kind == DENSE else (wparts[i] * parts[i]).sum(0)
            for i, (_, kind) in enumerate(group.blocks)
        ]
        n = len(group.blocks)
        coup = {(i, j): wparts[i].mT @ parts[j] for i in range(n) for j in range(i + 1, n)}
        return group.pack(diag, coup)
    return group.restrict(wz.mT @ z)  # any other group: dense fallback


def algebra_weights(group: MatrixGroup, dtype=torch.float64, device=None) -> Tensor:
    """Compact ``C``: 1/2 on diagonal entries and symmetric blocks, 1 on free entries, 0 off the pattern.

    For a symmetric ``X`` given by its pattern entries ``x`` (compact form),
    ``C * x`` is ``project(X)``, i.e. half of MATH.md's ``Pi_hat(X)``.
    """
    ones = torch.ones(group.shape, dtype=dtype, device=device)
    if isinstance(group, _Triangular):
        ones = group.restrict(ones)
    return group.pullback(group.identity(dtype, device), ones)


def algebra_dimension(group: MatrixGroup, weights: Tensor) -> float:
    """Number of free coordinates of the algebra (``d (d + 1) / 2`` for dense, ``d`` for diagonal)."""
    return float(weights.sum()) + group.dim / 2


def row_sq_norms(group: MatrixGroup, b: Tensor) -> Tensor:
    """Squared row norms of ``B``: the diagonal of ``B B^T``."""
    if isinstance(group, Diagonal):
        return b * b
    if isinstance(group, (Dense, _Triangular)):
        return (b * b).sum(-1)
    if isinstance(group, BlockDiagonal) and not group.padding:
        return (b * b).sum(-1).flatten(-2)
    if isinstance(group, BlockUpperTriangular):
        bd, bc = group.unpack(b)
        pieces = []
        for i, (_, kind) in enumerate(group.blocks):
            r = (bd[i] * bd[i]).sum(-1) if kind == DENSE else bd[i] * bd[i]
            for j in range(i + 1, len(group.blocks)):
                r = r + (bc[i, j] * bc[i, j]).sum(-1)
            pieces.append(r)
        return group._assemble(pieces)
    return (group.to_dense(b) ** 2).sum(-1)


def col_sq_norms(group: MatrixGroup, b: Tensor) -> Tensor:
    """Squared column norms of ``B``: the diagonal of ``B^T B``."""
    if isinstance(group, Diagonal):
        return b * b
    if isinstance(group, (Dense, _Triangular)):
        return (b * b).sum(-2)
    if isinstance(group, BlockDiagonal) and not group.padding:
        return (b * b).sum(-2).flatten(-2)
    if isinstance(group, BlockUpperTriangular):
        bd, bc = group.unpack(b)
        pieces = []
        for j, (_, kind) in enumerate(group.blocks):
            c = (bd[j] * bd[j]).sum(-2) if kind == DENSE else bd[j] * bd[j]
            for i in range(j):
                c = c + (bc[i, j] * bc[i, j]).sum(-2)
            pieces.append(c)
        return group._assemble(pieces)
    return (group.to_dense(b) ** 2).sum(-2)


def group_exp(group: MatrixGroup, m: Tensor) -> Tensor:
    """The exact matrix exponential of an algebra element, staying in compact form.

    Dense: ``torch.linalg.matrix_exp``; diagonal: ``exp``; other groups: Taylor series with
    scaling and squaring through the group's compact product (the pattern is closed under
    products), to float64 round-off.
    """
    if isinstance(group, Diagonal):
        return torch.exp(m)
    if isinstance(group, (Dense, _Triangular)) or (isinstance(group, BlockDiagonal) and not group.padding):
        out = torch.linalg.matrix_exp(m)
        return group.restrict(out) if isinstance(group, _Triangular) else out
    norm = float(m.abs().sum())  # crude bound of any induced norm on the pattern
    squarings = max(0, int(math.ceil(math.log2(norm / 0.25)))) if norm > 0.25 else 0
    x = m / (2.0**squarings)
    eye = group.identity(m.dtype, m.device)
    term, out = eye, eye
    for n in range(1, 19):
        term = group.mul(term, x) / n
        out = out + term
        if float(term.abs().max()) < 1e-18 * float(out.abs().max()):
            break
    for _ in range(squarings):
        out = group.mul(out, out)
    return out
