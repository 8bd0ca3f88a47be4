"""Block upper-triangular groups with low-rank-like structure, O(d k) storage and cost.

One engine, :class:`BlockUpperTriangular`, serves :class:`BlockTriangular`, :class:`Heisenberg` and
:class:`Hierarchical`: block upper-triangular in an *engine order* of contiguous coordinate blocks (not necessarily
the coordinate order, as in Hierarchical), each diagonal block dense (``GL(n_i)``, a symmetric algebra block) or
diagonal, every block above it a free coupling. The compact form is one flat vector of the parts one after another.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .. import checks
from .base import MatrixGroup, apply_columns, linear_solve, log_abs_det, sym

DENSE, DIAG = "dense", "diag"


class BlockUpperTriangular(MatrixGroup):
    """Block upper-triangular factors; ``blocks`` lists ``(start, stop, kind)`` in engine order."""

    def __init__(self, dim: int, blocks: Sequence[Tuple[int, int, str]]):
        super().__init__(dim)
        covered = sorted((start, stop) for start, stop, _ in blocks)
        if covered[0][0] != 0 or any(a[1] != b[0] or a[0] >= a[1] for a, b in zip(covered, covered[1:] + [(dim, dim)])):
            raise ValueError(f"blocks {list(blocks)} must tile range({dim}) with non-empty slices")
        self.blocks = [(slice(start, stop), kind) for start, stop, kind in blocks]
        self._order = sorted(range(len(blocks)), key=lambda i: blocks[i][0])  # coordinate order
        sizes = self._sizes = [stop - start for start, stop, _ in blocks]
        self._dense = [kind == DENSE for _, _, kind in blocks]
        self._pairs = [(i, j) for i in range(len(blocks)) for j in range(i + 1, len(blocks))]  # the couplings
        # flat storage layout (key, offset, shape): the diagonal blocks, then the couplings by column block j, then
        # row block i: the U_ij of one j are one contiguous (sum_i n_i, n_j) matrix, so A x takes one GEMM per x_j
        self._layout: List[Tuple[object, int, Tuple[int, ...]]] = []
        self._sources: List[Tuple[int, int, int]] = []  # (j, offset, sum_{i < j} n_i)
        offset = 0
        for i, n in enumerate(sizes):
            self._layout.append((i, offset, (n, n) if self._dense[i] else (n,)))
            offset += n * n if self._dense[i] else n
        for j in range(1, len(sizes)):
            self._sources.append((j, offset, sum(sizes[:j])))
            for i in range(j):
                self._layout.append(((i, j), offset, (sizes[i], sizes[j])))
                offset += sizes[i] * sizes[j]
        self._numel = offset

    @property
    def shape(self):
        return (self._numel,)

    def unpack(self, a: Tensor) -> Tuple[List[Tensor], Dict[Tuple[int, int], Tensor]]:
        """Views of the diagonal blocks (list) and coupling blocks (dict keyed ``(i, j)``)."""
        self.batch_shape(a)
        parts = [a.narrow(-1, offset, math.prod(shape)).unflatten(-1, shape) for _, offset, shape in self._layout]
        n = len(self.blocks)  # the diagonal blocks lead the layout
        return parts[:n], {key: part for (key, _, _), part in zip(self._layout[n:], parts[n:])}

    def pack(self, diag: List[Tensor], coup: Dict[Tuple[int, int], Tensor]) -> Tensor:
        parts = [(coup[k] if isinstance(k, tuple) else diag[k]).flatten(-len(shape)) for k, _, shape in self._layout]
        batch = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
        return torch.cat([p.expand(batch + p.shape[-1:]) for p in parts], -1)

    def _assemble(self, pieces: List[Tensor]) -> Tensor:
        """Concatenate per-block vectors (engine order) in coordinate order."""
        return torch.cat([pieces[i] for i in self._order], -1)

    def _split(self, x: Tensor) -> List[Tensor]:
        return [x[..., sl] for sl, _ in self.blocks]

    def from_diagonal(self, diag: Tensor) -> Tensor:
        parts = [torch.diag_embed(v) if dense else v for v, dense in zip(self._split(diag), self._dense)]
        batch, n = diag.shape[:-1], self._sizes
        return self.pack(parts, {(i, j): diag.new_zeros(batch + (n[i], n[j])) for i, j in self._pairs})

    def _pattern(self, g: Tensor) -> Tuple[List[Tensor], Dict[Tuple[int, int], Tensor]]:
        """Diagonal blocks and couplings of a dense ``(..., d, d)`` matrix on the pattern."""
        diag = [g[..., sl, sl] if dense else g[..., sl, sl].diagonal(dim1=-2, dim2=-1)
                for (sl, _), dense in zip(self.blocks, self._dense)]
        return diag, {(i, j): g[..., self.blocks[i][0], self.blocks[j][0]] for i, j in self._pairs}

    def restrict(self, g: Tensor) -> Tensor:
        return self.pack(*self._pattern(g))

    def to_dense(self, a: Tensor) -> Tensor:
        diag, coup = self.unpack(a)
        out = a.new_zeros(a.shape[:-1] + (self.dim, self.dim))
        for i, (sl, kind) in enumerate(self.blocks):
            out[..., sl, sl] = diag[i] if kind == DENSE else torch.diag_embed(diag[i])
        for (i, j), c in coup.items():
            out[..., self.blocks[i][0], self.blocks[j][0]] = c
        return out

    def diagonal(self, a: Tensor) -> Tensor:
        diag = self.unpack(a)[0]
        return self._assemble([d.diagonal(dim1=-2, dim2=-1) if dense else d for d, dense in zip(diag, self._dense)])

    def _weigh(self, x_diag: List[Tensor], x_coup: Dict) -> Tensor:
        """``C ⊙ κ``: half of the symmetric part on diagonal blocks, couplings as they are."""
        return self.pack([0.5 * (sym(x) if dense else x) for x, dense in zip(x_diag, self._dense)], x_coup)

    def inverse_fisher_weights(self, dtype=None, device=None):
        ones = torch.ones(self.shape, dtype=dtype or torch.get_default_dtype(), device=device)
        return self._weigh(*self.unpack(ones))

    def outer(self, z, weights=None):
        """Only the pattern's blocks of ``sum_k w_k z_k z_k^T``: O(n d k)."""
        wz = z if weights is None else z * weights.unsqueeze(-1)
        parts, wparts = self._split(z), self._split(wz)
        diag = [w.mT @ p if dense else (w * p).sum(0) for w, p, dense in zip(wparts, parts, self._dense)]
        return self.pack(diag, {(i, j): wparts[i].mT @ parts[j] for i, j in self._pairs})

    def _sq_norms(self, a: Tensor, dim: int) -> Tensor:
        """``diag(A A^T)`` (``dim=-1``) or ``diag(A^T A)`` (``dim=-2``) block by block: O(nnz)."""
        ad, ac = self.unpack(a)
        n, pieces = len(self.blocks), []
        for i in range(n):
            r = (ad[i] * ad[i]).sum(dim) if self._dense[i] else ad[i] * ad[i]
            for key in [(j, i) for j in range(i)] if dim == -2 else [(i, j) for j in range(i + 1, n)]:
                r = r + (ac[key] * ac[key]).sum(dim)
            pieces.append(r)
        return self._assemble(pieces)

    def row_sq_norms(self, a):
        return self._sq_norms(a, -1)

    def col_sq_norms(self, a):
        return self._sq_norms(a, -2)

    def project(self, g: Tensor) -> Tensor:
        return self._weigh(*self._pattern(g))

    def pullback(self, b: Tensor, grad: Tensor) -> Tensor:
        """``project(B^T dL/dB)`` using only the pattern entries of ``B^T dL/dB``: O(d k^2)."""
        bd, bc = self.unpack(b)
        gd, gc = self.unpack(grad)
        x_diag = []
        for i in range(len(self.blocks)):
            x = bd[i].mT @ gd[i] if self._dense[i] else bd[i] * gd[i]
            for l in range(i):
                x = x + (bc[l, i].mT @ gc[l, i] if self._dense[i] else (bc[l, i] * gc[l, i]).sum(-2))
            x_diag.append(x)
        x_coup = {}
        for i, j in self._pairs:
            x = bd[i].mT @ gc[i, j] if self._dense[i] else bd[i].unsqueeze(-1) * gc[i, j]
            for l in range(i):
                x = x + bc[l, i].mT @ gc[l, j]
            x_coup[i, j] = x
        return self._weigh(x_diag, x_coup)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        ad, ac = self.unpack(a)
        bd, bc = self.unpack(b)
        diag = [x @ y if dense else x * y for x, y, dense in zip(ad, bd, self._dense)]
        coup = {}
        for i, j in self._pairs:
            c = ad[i] @ bc[i, j] if self._dense[i] else ad[i].unsqueeze(-1) * bc[i, j]
            c = c + (ac[i, j] @ bd[j] if self._dense[j] else ac[i, j] * bd[j].unsqueeze(-2))
            for l in range(i + 1, j):
                c = c + ac[i, l] @ bc[l, j]
            coup[i, j] = c
        return self.pack(diag, coup)

    def _couplings(self, ac: Dict, i: int, transpose: bool) -> List[Tuple[Tensor, int]]:
        """``(U, j)`` for block row ``i`` of ``A`` (``U_ij``, ``j > i``) or of ``A^T`` (``U_ji^T``, ``j < i``)."""
        if transpose:
            return [(ac[j, i].mT, j) for j in range(i)]
        return [(ac[i, j], j) for j in range(i + 1, len(self.blocks))]

    def _rows(self, a: Tensor, x: Tensor, transpose: bool) -> Tensor:
        """``A x`` (``A^T x``) for every vector of ``x`` against one unbatched ``A``, as rows:
        ``y_i = x_i D_i^T + sum_{j > i} x_j U_ij^T`` (``y_i = x_i D_i + sum_{j < i} x_j U_ji``). ``A x`` takes one
        GEMM per source block with the stacked ``[U_ij]_{i < j}``; ``A^T x`` accumulates in place (``addmm_``)."""
        ad, ac = self.unpack(a)
        flat = x.reshape(-1, self.dim)
        xs = [flat[:, sl] for sl, _ in self.blocks]
        ys = [v @ (d if transpose else d.mT) if dense else v * d for v, d, dense in zip(xs, ad, self._dense)]
        if transpose:
            for (i, j), u in ac.items():
                ys[j].addmm_(xs[i], u)
        else:
            for j, offset, rows in self._sources:
                stacked = a.narrow(-1, offset, rows * self._sizes[j]).unflatten(-1, (rows, self._sizes[j]))
                for i, part in enumerate((xs[j] @ stacked.mT).split(self._sizes[:j], dim=-1)):
                    ys[i].add_(part)
        return self._assemble(ys).reshape(x.shape)

    def _mv(self, a: Tensor, x: Tensor, transpose: bool) -> Tensor:
        self._check_vector(x)
        if self._unbatched(a):
            return self._rows(a, x, transpose)
        ad, ac = self.unpack(a)
        xs, out = self._split(x), []
        for i, d in enumerate(ad):
            y = apply_columns(d.mT if transpose else d, xs[i], torch.matmul, False) if self._dense[i] else d * xs[i]
            for u, j in self._couplings(ac, i, transpose):
                y = y + apply_columns(u, xs[j], torch.matmul, False)
            out.append(y)
        return self._assemble(out)

    def matvec(self, a, x):
        return self._mv(a, x, False)

    def tmatvec(self, a, x):
        return self._mv(a, x, True)

    def _substitute(self, a: Tensor, x: Tensor, transpose: bool) -> Tensor:
        self._check_vector(x)
        ad, ac = self.unpack(a)
        ub, ys, n = self._unbatched(a), self._split(x), len(self.blocks)
        out: List[Tensor] = [None] * n  # type: ignore[list-item]
        for i in range(n) if transpose else reversed(range(n)):
            r = ys[i]
            for u, j in self._couplings(ac, i, transpose):
                r = r - apply_columns(u, out[j], torch.matmul, ub)
            d = ad[i]
            out[i] = apply_columns(d.mT if transpose else d, r, linear_solve, ub) if self._dense[i] else r / d
        return self._assemble(out)

    def solve(self, a, x):
        """Back substitution over the blocks: ``x_i = D_i^{-1} (y_i - sum_{j>i} U_ij x_j)``."""
        return self._substitute(a, x, False)

    def tsolve(self, a, x):
        """Forward substitution: ``x_j = D_j^{-T} (y_j - sum_{i<j} U_ij^T x_i)``."""
        return self._substitute(a, x, True)

    def logdet(self, a):
        diag = self.unpack(a)[0]
        terms = [log_abs_det(d) if dense else d.abs().log().sum(-1) for d, dense in zip(diag, self._dense)]
        return sum(terms[1:], terms[0])


def _check_rank(name: str, value, dim: int, other: Tuple[str, int] = None) -> int:
    """``value`` (numpy's integers too) as an ``int``; a positive integer with ``value (+ other) < dim``."""
    integer = checks.is_integer(value)
    total = value + other[1] if other and integer else value
    bound = f"{name} + {other[0]}" if other else name
    if not integer or value < 1 or total >= dim:
        raise ValueError(f"{name} must be a positive integer with {bound} < dim={dim}, got {name}={value!r}")
    return int(value)


class BlockTriangular(BlockUpperTriangular):
    """The rank-k group ``[[A, C], [0, D]]``: ``A`` dense ``k x k``, ``C`` a free ``k x (d-k)`` coupling, ``D``
    diagonal, so ``S = [[A A^T + C C^T, C D], [D C^T, D^2]]`` and the covariance is rank-k plus diagonal."""

    name = "block_triangular"

    def __init__(self, dim: int, k: int):
        self.k = k = _check_rank("k", k, dim)
        super().__init__(dim, [(0, k, DENSE), (k, dim, DIAG)])

    def __repr__(self):
        return f"BlockTriangular(dim={self.dim}, k={self.k})"


class Heisenberg(BlockUpperTriangular):
    """``B = [[A, C1, C2], [0, D, C3], [0, 0, E]]``: ``A`` (k x k) and ``E`` (k2 x k2) dense, ``D`` diagonal, free
    couplings (the upper pattern of Lin et al. 2021's Heisenberg/hierarchical group). O(d (k + k2))."""

    name = "heisenberg"

    def __init__(self, dim: int, k: int, k2: int = None):
        k2 = _check_rank("k2", k if k2 is None else k2, dim)
        k = _check_rank("k", k, dim, other=("k2", k2))
        self.k, self.k2 = k, k2
        super().__init__(dim, [(0, k, DENSE), (k, dim - k2, DIAG), (dim - k2, dim, DENSE)])

    def __repr__(self):
        return f"Heisenberg(dim={self.dim}, k={self.k}, k2={self.k2})"


class Hierarchical(BlockUpperTriangular):
    """SINGD's hierarchical group ``[[A, B1, B2], [0, C, 0], [0, D, E]]``: ``A`` (k1 x k1) and ``E`` (k2 x k2) dense,
    ``C`` diagonal, ``B1, B2, D`` free; block upper-triangular in the engine order (A, E, C). O(d (k1 + k2))."""

    name = "hierarchical"

    def __init__(self, dim: int, k1: int, k2: int):
        k2 = _check_rank("k2", k2, dim)
        k1 = _check_rank("k1", k1, dim, other=("k2", k2))
        self.k1, self.k2 = k1, k2
        super().__init__(dim, [(0, k1, DENSE), (dim - k2, dim, DENSE), (k1, dim - k2, DIAG)])

    def __repr__(self):
        return f"Hierarchical(dim={self.dim}, k1={self.k1}, k2={self.k2})"
