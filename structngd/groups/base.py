"""The interface of the structured matrix groups, and shared helpers.

An element ``B`` (an invertible d x d factor) is stored in *compact form*: a ``(*batch, *group.shape)`` tensor of
the entries the structure allows. Algebra elements ``M`` use the same (linear) compact form."""

from __future__ import annotations

import abc
import math
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .. import checks

HALF_DTYPES = (torch.float16, torch.bfloat16)


def linear_solve(a: Tensor, b: Tensor, left: bool = True, upper: Optional[bool] = None) -> Tensor:
    """``A^{-1} B`` (``B A^{-1}`` with ``left=False``); triangular ``A`` when ``upper`` is given. Half and bfloat16
    (which LAPACK lacks) run in float32, the result cast back."""
    if a.dtype in HALF_DTYPES:
        return linear_solve(a.float(), b.float(), left, upper).to(a.dtype)
    if upper is None:
        return torch.linalg.solve(a, b, left=left)
    return torch.linalg.solve_triangular(a, b, upper=upper, left=left)


def log_abs_det(x: Tensor) -> Tensor:
    """``log |det X|`` by ``slogdet``; half and bfloat16 in float32, the result cast back."""
    if x.dtype in HALF_DTYPES:
        return torch.linalg.slogdet(x.float())[1].to(x.dtype)
    return torch.linalg.slogdet(x)[1]


def matrix_exp(x: Tensor) -> Tensor:
    """``exp(X)`` by ``torch.linalg.matrix_exp``; half and bfloat16 (where it returns NaN or inf) in float32, the
    result cast back."""
    if x.dtype in HALF_DTYPES:
        return torch.linalg.matrix_exp(x.float()).to(x.dtype)
    return torch.linalg.matrix_exp(x)


def sym(x: Tensor) -> Tensor:
    """``sym(X) = (X + X^T) / 2`` over the last two dimensions."""
    return 0.5 * (x + x.mT)


def apply_columns(a: Tensor, x: Tensor, fn: Callable[[Tensor, Tensor], Tensor], unbatched: bool) -> Tensor:
    """``fn(A, X)`` for every vector of ``x`` (``(..., n)``): one matrix call for an unbatched ``A``, else
    ``A`` and ``x`` broadcast as batches of matrix-vector problems."""
    if unbatched:
        flat = x.reshape(-1, x.shape[-1])
        if fn is torch.matmul:  # rows times A^T: a contiguous result (a transposed one made sums slow)
            return (flat @ a.mT).reshape(x.shape[:-1] + (a.shape[-2],))
        return fn(a, flat.mT).mT.reshape(x.shape[:-1] + (a.shape[-2],))
    return fn(a, x.unsqueeze(-1)).squeeze(-1)


class MatrixGroup(abc.ABC):
    """A matrix Lie group of structured invertible d x d factors (layer 1 of structngd). Subclasses define the compact
    storage (:attr:`shape`) and the operations, and override the generic fallbacks below with O(nnz) code."""

    #: snake_case name used by :func:`structngd.groups.make`
    name: str = ""

    def __init__(self, dim: int):
        self.dim = checks.count("dim", dim)

    @property
    @abc.abstractmethod
    def shape(self) -> Tuple[int, ...]:
        """Shape of one compact element (no batch dimensions)."""

    def batch_shape(self, a: Tensor) -> torch.Size:
        """Leading batch dimensions of a compact element ``a``."""
        n = len(self.shape)
        if tuple(a.shape[a.dim() - n :]) != tuple(self.shape):
            shape = ", ".join(map(str, self.shape))
            raise ValueError(f"{self!r} expects compact elements of shape (..., {shape}), got {tuple(a.shape)}")
        return a.shape[: a.dim() - n]

    def _unbatched(self, a: Tensor) -> bool:
        return a.dim() == len(self.shape)

    def numel(self) -> int:
        """Number of stored entries of one element."""
        return math.prod(self.shape)

    def identity(self, dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
        """The unit element ``I`` in compact form."""
        return self.from_diagonal(torch.ones(self.dim, dtype=dtype, device=device))

    @abc.abstractmethod
    def from_diagonal(self, diag: Tensor) -> Tensor:
        """The element ``diag(v)`` (every group here contains the positive diagonal group)."""

    @abc.abstractmethod
    def restrict(self, g: Tensor) -> Tensor:
        """Entries of a dense ``(..., d, d)`` matrix on the storage pattern (no weights)."""

    @abc.abstractmethod
    def to_dense(self, a: Tensor) -> Tensor:
        """The dense ``(..., d, d)`` matrix of a compact element."""

    def mask(self, dtype=torch.float64, device=None) -> Tensor:
        """The 0/1 dense pattern of the storage."""
        return self.to_dense(self.restrict(torch.ones(self.dim, self.dim, dtype=dtype, device=device)))

    def random(self, generator: Optional[torch.Generator] = None, dtype: Optional[torch.dtype] = None, device=None,
               batch_shape: Tuple[int, ...] = (), scale: float = 0.3) -> Tensor:
        """A random, generic (every stored entry non-zero), well-conditioned element ``h(M)`` for tests; ``M`` is
        standard normal times ``scale / sqrt(d)`` on the pattern, plus ``scale`` times normal on the diagonal."""
        dtype = dtype or torch.get_default_dtype()
        noise = torch.randn(tuple(batch_shape) + tuple(self.shape), generator=generator, dtype=dtype, device=device)
        noise = self.restrict(self.to_dense(noise))  # zero any storage slot off the pattern
        diag = torch.randn(tuple(batch_shape) + (self.dim,), generator=generator, dtype=dtype, device=device)
        return self.h(noise * (scale / self.dim**0.5) + self.from_diagonal(diag * scale))

    @abc.abstractmethod
    def project(self, g: Tensor) -> Tensor:
        """Natural gradient ``C ⊙ κ(G)`` (compact) from a dense local gradient ``G = B^T dL/dB``: ``sym(G)/2`` on
        diagonal entries and dense diagonal blocks, ``G`` on free (triangular, coupling) entries."""

    def pullback(self, b: Tensor, grad: Tensor) -> Tensor:
        """``project(B^T dL/dB)`` from a compact factor ``B`` and its compact gradient."""
        return self.project(self.to_dense(b).mT @ self.to_dense(grad))

    def h(self, m: Tensor) -> Tensor:
        """The local map ``h(M) = I + M + M^2 / 2`` (``exp`` to second order); invertible for every ``M``: its
        eigenvalues are ``h(m) >= 1/2`` on the symmetric blocks, with a unit-free triangular part elsewhere."""
        return self.identity(m.dtype, m.device) + m + 0.5 * self.mul(m, m)

    def expm(self, m: Tensor) -> Tensor:
        """Deprecated alias of :meth:`h` (``h`` is not the matrix exponential; see :meth:`exp`)."""
        warnings.warn("MatrixGroup.expm is deprecated: it is the local map h(M) = I + M + M^2/2, now "
                      "MatrixGroup.h; the exact exponential is MatrixGroup.exp", DeprecationWarning, stacklevel=2)
        return self.h(m)

    def exp(self, m: Tensor) -> Tensor:
        """The exact ``exp(M)`` in compact form: Taylor series with scaling and squaring through the compact
        product (the pattern is closed under products), to float64 round-off."""
        norm = float(m.abs().sum())  # bounds any induced norm of M on the pattern
        if not math.isfinite(norm / 0.25):  # an overflowing or non-finite M: a non-finite result, for callers to refuse
            return torch.full_like(m, math.nan)
        squarings = max(0, int(math.ceil(math.log2(norm / 0.25)))) if norm > 0.25 else 0
        x = m / (2.0**squarings)
        term = out = self.identity(m.dtype, m.device)
        for n in range(1, 19):
            term = self.mul(term, x) / n
            out = out + term
            if float(term.abs().max()) <= 1e-18 * float(out.abs().max()):
                break
        for _ in range(squarings):
            out = self.mul(out, out)
        return out

    def inverse_fisher_weights(self, dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
        """The weights ``C`` of ``project(G) = C ⊙ κ(G)`` at ``eta0``: ``1/2`` on diagonal entries and dense diagonal
        blocks, ``1`` on free entries, ``0`` off the pattern; ``C * restrict(X) = project(X)`` for symmetric ``X``."""
        return self.project(torch.ones(self.dim, self.dim, dtype=dtype or torch.get_default_dtype(), device=device))

    @property
    def algebra_dim(self) -> int:
        """Number of free coordinates of the algebra: ``d (d + 1) / 2`` for dense, ``d`` for diagonal.
        (Twice the weights' sum counts free entries twice and each symmetric pair once; ``+ d`` adds the diagonal.)"""
        return int(round(float(self.inverse_fisher_weights(torch.float64).sum()) + self.dim / 2))

    def outer(self, z: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        """Pattern entries of ``sum_k w_k z_k z_k^T`` for ``z`` ``(n, d)``; ``weights`` ``(n,)`` default to ones."""
        wz = z if weights is None else z * weights.unsqueeze(-1)
        return self.restrict(wz.mT @ z)

    def congruence_terms(self, a: Tensor, m: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(M A, tr(A^T M A), tr(A^T A))`` for a dense symmetric ``(d, d)`` ``M``; ``M A`` in whatever form
        :meth:`congruence` reads (dense by default; its diagonal for diagonal factors)."""
        dense = self.to_dense(a)
        ma = self.tmatvec(a, m)  # row i: A^T M[i] = (M A)[i]
        return ma, (dense * ma).sum(), (dense * dense).sum()

    def congruence_statistic(self, z: Tensor) -> Tensor:
        """The part of ``sum_k z_k z_k^T`` (``z`` of shape ``(n, d)``; a dense ``(d, d)`` result) that
        :meth:`congruence_terms` reads: all of it by default, the diagonal for diagonal factors (O(n d))."""
        return z.mT @ z

    def congruence(self, a: Tensor, ma: Tensor, alpha, beta) -> Tensor:
        """Pattern entries of the symmetric ``A^T (alpha M A + beta A) = A^T (alpha M + beta I) A`` from the
        ``M A`` of :meth:`congruence_terms` (a Kronecker factor's local gradient, O(nnz) where the pattern allows)."""
        return self.restrict(self.tmatvec(a, (alpha * ma + beta * self.to_dense(a)).mT).mT)

    def row_sq_norms(self, a: Tensor) -> Tensor:
        """Squared row norms of ``A``: the diagonal of ``A A^T``, shape ``(..., d)``."""
        return self.to_dense(a).pow(2).sum(-1)

    def col_sq_norms(self, a: Tensor) -> Tensor:
        """Squared column norms of ``A``: the diagonal of ``A^T A``, shape ``(..., d)``."""
        return self.to_dense(a).pow(2).sum(-2)

    @abc.abstractmethod
    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        """The product ``A B`` in compact form."""

    @abc.abstractmethod
    def matvec(self, a: Tensor, x: Tensor) -> Tensor:
        """``A x`` for ``x`` of shape ``(..., d)``."""

    @abc.abstractmethod
    def tmatvec(self, a: Tensor, x: Tensor) -> Tensor:
        """``A^T x`` for ``x`` of shape ``(..., d)``."""

    @abc.abstractmethod
    def solve(self, a: Tensor, x: Tensor) -> Tensor:
        """``A^{-1} x`` for ``x`` of shape ``(..., d)``."""

    @abc.abstractmethod
    def tsolve(self, a: Tensor, x: Tensor) -> Tensor:
        """``A^{-T} x`` for ``x`` of shape ``(..., d)``."""

    @abc.abstractmethod
    def logdet(self, a: Tensor) -> Tensor:
        """``log |det A|``."""

    def diagonal(self, a: Tensor) -> Tensor:
        """The diagonal of ``A`` as a ``(..., d)`` tensor."""
        return self.to_dense(a).diagonal(dim1=-2, dim2=-1)

    def gram(self, a: Tensor) -> Optional[Tensor]:
        """``A A^T`` in compact form where the pattern holds it (diagonal, block-diagonal, dense), else ``None``."""
        return None

    def _check_vector(self, x: Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self!r} acts on vectors of size {self.dim}, got shape {tuple(x.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"

    def constant(self, name: str, dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
        """``getattr(self, name)(dtype, device)`` (``"identity"``, ``"inverse_fisher_weights"``), formed once per dtype
        and device and then shared: read it, do not write into it."""
        cache = self.__dict__.setdefault("_constants", {})
        key = (name, dtype, None if device is None else torch.device(device))
        if key not in cache:
            cache[key] = getattr(self, name)(dtype, device)
        return cache[key]

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))
