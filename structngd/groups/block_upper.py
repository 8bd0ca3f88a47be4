"""Block upper-triangular groups with low-rank-like structure, O(d k) storage and cost.

One engine, :class:`BlockUpperTriangular`, serves :class:`BlockTriangular`,
:class:`Heisenberg` and :class:`Hierarchical`. An element is block upper-triangular
in an *engine order* of coordinate blocks: each diagonal block is dense (a ``GL(n_i)``
factor with a symmetric algebra block) or diagonal, and every block above the diagonal
is a full, free coupling block. Each block covers a contiguous slice of coordinates,
but the engine order need not follow the coordinate order (Hierarchical uses that).
The compact form is one flat vector holding the parts one after the other.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .base import MatrixGroup, apply_columns, linear_solve, log_abs_det, sym

DENSE, DIAG = "dense", "diag"


class BlockUpperTriangular(MatrixGroup):
    """Block upper-triangular factors; ``blocks`` lists ``(start, stop, kind)`` in engine order."""

    def __init__(self, dim: int, blocks: Sequence[Tuple[int, int, str]]):
        super().__init__(dim)
        covered = sorted((start, stop) for start, stop, _ in blocks)
        if covered[0][0] != 0 or covered[-1][1] != dim or any(
            a[1] != b[0] or a[0] >= a[1] for a, b in zip(covered, covered[1:] + [(dim, dim)])
        ):
            raise ValueError(f"blocks {list(blocks)} must tile range({dim}) with non-empty slices")
        self.blocks = [(slice(start, stop), kind) for start, stop, kind in blocks]
        self._order = sorted(range(len(blocks)), key=lambda i: blocks[i][0])  # coordinate order
        # layout of the flat storage: (key, offset, shape)
        self._layout: List[Tuple[object, int, Tuple[int, ...]]] = []
        offset = 0
        for i, (sl, kind) in enumerate(self.blocks):
            n = sl.stop - sl.start
            shape = (n, n) if kind == DENSE else (n,)
            self._layout.append((i, offset, shape))
            offset += n * n if kind == DENSE else n
        # couplings ordered by column block j, then row block i: the U_ij of one j are one
        # contiguous (sum_i n_i, n_j) matrix, so A x takes one GEMM per source block x_j
        self._sources: List[Tuple[int, int, int]] = []  # (j, offset, sum_{i < j} n_i)
        for j, (slj, _) in enumerate(self.blocks):
            start, rows = offset, 0
            for i in range(j):
                sli = self.blocks[i][0]
                shape = (sli.stop - sli.start, slj.stop - slj.start)
                self._layout.append(((i, j), offset, shape))
                offset += shape[0] * shape[1]
                rows += shape[0]
            if j:
                self._sources.append((j, start, rows))
        self._numel = offset

    @property
    def shape(self):
        return (self._numel,)

    # ------------------------------------------------------------ storage
    def unpack(self, a: Tensor) -> Tuple[List[Tensor], Dict[Tuple[int, int], Tensor]]:
        """Views of the diagonal blocks (list) and coupling blocks (dict keyed ``(i, j)``)."""
        self.batch_shape(a)
        diag, coup = [], {}
        for key, offset, shape in self._layout:
            part = a.narrow(-1, offset, _prod(shape)).unflatten(-1, shape)
            if isinstance(key, tuple):
                coup[key] = part
            else:
                diag.append(part)
        return diag, coup

    def pack(self, diag: List[Tensor], coup: Dict[Tuple[int, int], Tensor]) -> Tensor:
        parts = []
        for key, _, shape in self._layout:
            part = coup[key] if isinstance(key, tuple) else diag[key]
            parts.append(part.flatten(-len(shape)) if len(shape) > 1 else part)
        batch = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
        return torch.cat([p.expand(batch + p.shape[-1:]) for p in parts], -1)

    def _pairs(self):
        n = len(self.blocks)
        return [(i, j) for i in range(n) for j in range(i + 1, n)]

    def _dense(self, i: int) -> bool:
        return self.blocks[i][1] == DENSE

    def _size(self, i: int) -> int:
        sl = self.blocks[i][0]
        return sl.stop - sl.start

    def _assemble(self, pieces: List[Tensor]) -> Tensor:
        """Concatenate per-block vectors (engine order) in coordinate order."""
        return torch.cat([pieces[i] for i in self._order], -1)

    def _split(self, x: Tensor) -> List[Tensor]:
        return [x[..., sl] for sl, _ in self.blocks]

    # ------------------------------------------------------- construction
    def from_diagonal(self, diag: Tensor) -> Tensor:
        batch = diag.shape[:-1]
        parts = [torch.diag_embed(v) if self._dense(i) else v for i, v in enumerate(self._split(diag))]
        coup = {
            (i, j): diag.new_zeros(batch + (self._size(i), self._size(j))) for i, j in self._pairs()
        }
        return self.pack(parts, coup)

    def restrict(self, g: Tensor) -> Tensor:
        parts = []
        for i, (sl, kind) in enumerate(self.blocks):
            block = g[..., sl, sl]
            parts.append(block if kind == DENSE else block.diagonal(dim1=-2, dim2=-1))
        coup = {(i, j): g[..., self.blocks[i][0], self.blocks[j][0]] for i, j in self._pairs()}
        return self.pack(parts, coup)

    def to_dense(self, a: Tensor) -> Tensor:
        diag, coup = self.unpack(a)
        out = a.new_zeros(a.shape[:-1] + (self.dim, self.dim))
        for i, (sl, kind) in enumerate(self.blocks):
            out[..., sl, sl] = diag[i] if kind == DENSE else torch.diag_embed(diag[i])
        for (i, j), c in coup.items():
            out[..., self.blocks[i][0], self.blocks[j][0]] = c
        return out

    def diagonal(self, a: Tensor) -> Tensor:
        diag, _ = self.unpack(a)
        return self._assemble(
            [d.diagonal(dim1=-2, dim2=-1) if self._dense(i) else d for i, d in enumerate(diag)]
        )

    # ----------------------------------------------------------- algebra
    def _weigh(self, x_diag: List[Tensor], x_coup: Dict) -> Tensor:
        """``C ⊙ κ``: half of the symmetric part on diagonal blocks, couplings as they are."""
        parts = [0.5 * (sym(x) if self._dense(i) else x) for i, x in enumerate(x_diag)]
        return self.pack(parts, x_coup)

    def inverse_fisher_weights(self, dtype=None, device=None):
        ones = torch.ones(self.shape, dtype=dtype or torch.get_default_dtype(), device=device)
        return self._weigh(*self.unpack(ones))

    def outer(self, z, weights=None):
        """Only the pattern's blocks of ``sum_k w_k z_k z_k^T``: O(n d k)."""
        wz = z if weights is None else z * weights.unsqueeze(-1)
        parts, wparts = self._split(z), self._split(wz)
        diag = [
            wparts[i].mT @ parts[i] if self._dense(i) else (wparts[i] * parts[i]).sum(0)
            for i in range(len(self.blocks))
        ]
        coup = {(i, j): wparts[i].mT @ parts[j] for i, j in self._pairs()}
        return self.pack(diag, coup)

    def row_sq_norms(self, a):
        """``diag(A A^T)`` block row by block row: O(nnz)."""
        ad, ac = self.unpack(a)
        pieces = []
        for i in range(len(self.blocks)):
            r = (ad[i] * ad[i]).sum(-1) if self._dense(i) else ad[i] * ad[i]
            for j in range(i + 1, len(self.blocks)):
                r = r + (ac[i, j] * ac[i, j]).sum(-1)
            pieces.append(r)
        return self._assemble(pieces)

    def col_sq_norms(self, a):
        """``diag(A^T A)`` block column by block column: O(nnz)."""
        ad, ac = self.unpack(a)
        pieces = []
        for j in range(len(self.blocks)):
            c = (ad[j] * ad[j]).sum(-2) if self._dense(j) else ad[j] * ad[j]
            for i in range(j):
                c = c + (ac[i, j] * ac[i, j]).sum(-2)
            pieces.append(c)
        return self._assemble(pieces)

    def project(self, g: Tensor) -> Tensor:
        x_diag = []
        for i, (sl, kind) in enumerate(self.blocks):
            block = g[..., sl, sl]
            x_diag.append(block if kind == DENSE else block.diagonal(dim1=-2, dim2=-1))
        coup = {(i, j): g[..., self.blocks[i][0], self.blocks[j][0]] for i, j in self._pairs()}
        return self._weigh(x_diag, coup)

    def pullback(self, b: Tensor, grad: Tensor) -> Tensor:
        """``project(B^T dL/dB)`` using only the pattern entries of ``B^T dL/dB``: O(d k^2)."""
        bd, bc = self.unpack(b)
        gd, gc = self.unpack(grad)
        x_diag = []
        for i in range(len(self.blocks)):
            if self._dense(i):
                x = bd[i].mT @ gd[i]
                for l in range(i):
                    x = x + bc[l, i].mT @ gc[l, i]
            else:
                x = bd[i] * gd[i]
                for l in range(i):
                    x = x + (bc[l, i] * gc[l, i]).sum(-2)
            x_diag.append(x)
        x_coup = {}
        for i, j in self._pairs():
            x = bd[i].mT @ gc[i, j] if self._dense(i) else bd[i].unsqueeze(-1) * gc[i, j]
            for l in range(i):
                x = x + bc[l, i].mT @ gc[l, j]
            x_coup[i, j] = x
        return self._weigh(x_diag, x_coup)

    # ------------------------------------------------------------ group
    def _lmul(self, i: int, d: Tensor, x: Tensor) -> Tensor:
        """``D_i X`` for a diagonal block ``D_i`` and a matrix ``X`` with ``n_i`` rows."""
        return d @ x if self._dense(i) else d.unsqueeze(-1) * x

    def _rmul(self, x: Tensor, j: int, d: Tensor) -> Tensor:
        """``X D_j`` for a matrix ``X`` with ``n_j`` columns."""
        return x @ d if self._dense(j) else x * d.unsqueeze(-2)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        ad, ac = self.unpack(a)
        bd, bc = self.unpack(b)
        diag = [ad[i] @ bd[i] if self._dense(i) else ad[i] * bd[i] for i in range(len(self.blocks))]
        coup = {}
        for i, j in self._pairs():
            c = self._lmul(i, ad[i], bc[i, j]) + self._rmul(ac[i, j], j, bd[j])
            for l in range(i + 1, j):
                c = c + ac[i, l] @ bc[l, j]
            coup[i, j] = c
        return self.pack(diag, coup)

    def _dmv(self, i: int, d: Tensor, x: Tensor, unbatched: bool, transpose: bool = False) -> Tensor:
        if not self._dense(i):
            return d * x
        return apply_columns(d.mT if transpose else d, x, torch.matmul, unbatched)

    def _dsolve(self, i: int, d: Tensor, x: Tensor, unbatched: bool, transpose: bool = False) -> Tensor:
        if not self._dense(i):
            return x / d
        return apply_columns(d.mT if transpose else d, x, linear_solve, unbatched)

    def _rows(self, a: Tensor, x: Tensor, transpose: bool) -> Tensor:
        """``A x`` (``A^T x``) for every vector of ``x`` against one unbatched ``A``, as rows:
        ``y_i = x_i D_i^T + sum_{j > i} x_j U_ij^T`` (``y_i = x_i D_i + sum_{j < i} x_j U_ji``).
        ``A x`` takes one GEMM per source block ``x_j`` with the stacked ``[U_ij]_{i < j}`` (one
        contiguous slice of the storage); ``A^T x`` accumulates each coupling GEMM into its
        block's result (``addmm_``); one ``cat`` joins the blocks."""
        ad, ac = self.unpack(a)
        flat = x.reshape(-1, self.dim)
        xs = [flat[:, sl] for sl, _ in self.blocks]
        ys = []
        for i in range(len(self.blocks)):
            if self._dense(i):
                ys.append(xs[i] @ (ad[i] if transpose else ad[i].mT))
            else:
                ys.append(xs[i] * ad[i])
        if transpose:
            for (i, j), u in ac.items():
                ys[j].addmm_(xs[i], u)
        else:
            for j, offset, rows in self._sources:
                stacked = a.narrow(-1, offset, rows * self._size(j)).unflatten(-1, (rows, self._size(j)))
                parts = (xs[j] @ stacked.mT).split([self._size(i) for i in range(j)], dim=-1)
                for i, part in enumerate(parts):
                    ys[i].add_(part)
        return self._assemble(ys).reshape(x.shape)

    def matvec(self, a, x):
        self._check_vector(x)
        if self._unbatched(a):
            return self._rows(a, x, transpose=False)
        ad, ac = self.unpack(a)
        xs = self._split(x)
        out = []
        for i in range(len(self.blocks)):
            y = self._dmv(i, ad[i], xs[i], False)
            for j in range(i + 1, len(self.blocks)):
                y = y + apply_columns(ac[i, j], xs[j], torch.matmul, False)
            out.append(y)
        return self._assemble(out)

    def tmatvec(self, a, x):
        self._check_vector(x)
        if self._unbatched(a):
            return self._rows(a, x, transpose=True)
        ad, ac = self.unpack(a)
        xs = self._split(x)
        out = []
        for j in range(len(self.blocks)):
            y = self._dmv(j, ad[j], xs[j], False, transpose=True)
            for i in range(j):
                y = y + apply_columns(ac[i, j].mT, xs[i], torch.matmul, False)
            out.append(y)
        return self._assemble(out)

    def solve(self, a, x):
        """Back substitution over the blocks: ``x_i = D_i^{-1} (y_i - sum_{j>i} U_ij x_j)``."""
        self._check_vector(x)
        ad, ac = self.unpack(a)
        ub, ys = self._unbatched(a), self._split(x)
        n = len(self.blocks)
        out: List[Tensor] = [None] * n  # type: ignore[list-item]
        for i in reversed(range(n)):
            r = ys[i]
            for j in range(i + 1, n):
                r = r - apply_columns(ac[i, j], out[j], torch.matmul, ub)
            out[i] = self._dsolve(i, ad[i], r, ub)
        return self._assemble(out)

    def tsolve(self, a, x):
        """Forward substitution: ``x_j = D_j^{-T} (y_j - sum_{i<j} U_ij^T x_i)``."""
        self._check_vector(x)
        ad, ac = self.unpack(a)
        ub, ys = self._unbatched(a), self._split(x)
        out: List[Tensor] = []
        for j in range(len(self.blocks)):
            r = ys[j]
            for i in range(j):
                r = r - apply_columns(ac[i, j].mT, out[i], torch.matmul, ub)
            out.append(self._dsolve(j, ad[j], r, ub, transpose=True))
        return self._assemble(out)

    def logdet(self, a):
        diag, _ = self.unpack(a)
        terms = [
            log_abs_det(d) if self._dense(i) else d.abs().log().sum(-1)
            for i, d in enumerate(diag)
        ]
        return sum(terms[1:], terms[0])


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_rank(name: str, value, dim: int, other: Tuple[str, int] = None) -> None:
    """``value`` must be a positive integer with ``value (+ other) < dim``."""
    total = value + other[1] if other and isinstance(value, int) else value
    bound = f"{name} + {other[0]}" if other else name
    if not isinstance(value, int) or value < 1 or total >= dim:
        raise ValueError(f"{name} must be a positive integer with {bound} < dim={dim}, got {name}={value!r}")


class BlockTriangular(BlockUpperTriangular):
    """The rank-k block upper-triangular group ``[[A, C], [0, D]]``.

    ``A`` is a dense ``k x k`` block, ``C`` a free ``k x (d-k)`` coupling, ``D`` diagonal:
    ``S = [[A A^T + C C^T, C D], [D C^T, D^2]]`` and the covariance is rank-k plus
    diagonal. O(d k) storage and cost.
    """

    name = "block_triangular"

    def __init__(self, dim: int, k: int):
        _check_rank("k", k, dim)
        self.k = k
        super().__init__(dim, [(0, k, DENSE), (k, dim, DIAG)])

    def __repr__(self):
        return f"BlockTriangular(dim={self.dim}, k={self.k})"


class Heisenberg(BlockUpperTriangular):
    """Three-block upper-triangular group: dense ``k``, diagonal middle, dense ``k2`` corner.

    ``B = [[A, C1, C2], [0, D, C3], [0, 0, E]]`` with ``A`` (k x k) and ``E`` (k2 x k2)
    dense, ``D`` diagonal and free couplings (the upper pattern of Lin et al. 2021's
    Heisenberg/hierarchical group). O(d (k + k2)) storage and cost.
    """

    name = "heisenberg"

    def __init__(self, dim: int, k: int, k2: int = None):
        k2 = k if k2 is None else k2
        _check_rank("k2", k2, dim)
        _check_rank("k", k, dim, other=("k2", k2))
        self.k, self.k2 = k, k2
        super().__init__(dim, [(0, k, DENSE), (k, dim - k2, DIAG), (dim - k2, dim, DENSE)])

    def __repr__(self):
        return f"Heisenberg(dim={self.dim}, k={self.k}, k2={self.k2})"


class Hierarchical(BlockUpperTriangular):
    """SINGD's hierarchical group ``[[A, B1, B2], [0, C, 0], [0, D, E]]``.

    ``A`` (k1 x k1) and ``E`` (k2 x k2) dense, ``C`` diagonal, ``B1, B2, D`` free.
    Block upper-triangular in the engine order (A, E, C). O(d (k1 + k2)).
    """

    name = "hierarchical"

    def __init__(self, dim: int, k1: int, k2: int):
        _check_rank("k2", k2, dim)
        _check_rank("k1", k1, dim, other=("k2", k2))
        self.k1, self.k2 = k1, k2
        super().__init__(dim, [(0, k1, DENSE), (dim - k2, dim, DENSE), (k1, dim - k2, DIAG)])

    def __repr__(self):
        return f"Hierarchical(dim={self.dim}, k1={self.k1}, k2={self.k2})"
