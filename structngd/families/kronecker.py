"""Layer 2: the matrix-normal (Kronecker-factored Gaussian) over a ``d_out x d_in`` matrix.

``W ~ N(M, (K K^T) ⊗ (C C^T))`` on the column-major ``vec(W)``, i.e. ``W = M + C E K^T`` with ``E``
standard normal; ``K`` (the ``d_in`` side) and ``C`` (the ``d_out`` side) are covariance factors in
layer-1 groups. A Bayesian layer's posterior and, read as a preconditioner, LocalKFAC's (INGD / SINGD).

Local coordinates around ``(M_t, K_t, C_t)``: ``M = M_t + C_t Delta K_t^T``,
``K = K_t h(M_K)``, ``C = C_t h(M_C)``, ``h(X) = I + X + X^2 / 2``. Their Fisher at ``eta0``: ``I``
for ``Delta`` (no cross term with the factors), ``d_out w`` for ``M_K`` and ``d_in w`` for ``M_C``
(``w`` the group's weights), and ``1/2 tr(dM_K + dM_K^T) tr(dM_C + dM_C^T)`` between them: the scale
redundancy ``(a K, C / a)`` of the Kronecker product makes the joint Fisher singular along
``(t I, -t I)``. As in INGD / SINGD the step uses the block-diagonal part (each factor's natural
gradient with the other fixed):
``Delta = C^T g_M K``, ``N_K = C ⊙ κ(K^T g_K) / d_out``, ``N_C = C ⊙ κ(C^T g_C) / d_in`` (``C ⊙ κ``
is the group's ``project``; ``g_M, g_K, g_C`` the Euclidean gradients). The step ``eta0 - beta N``
maps back to ``M - beta C Delta K^T``, ``K h(-beta N_K)``, ``C h(-beta N_C)``: the mean moves by the
preconditioned gradient ``C C^T g_M K K^T`` and both factors stay in their groups.
"""

from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import groups as _groups
from .shared import FamilyMethods

Structure = Union[str, _groups.MatrixGroup]


class KroneckerGaussianStep(NamedTuple):
    """A :class:`KroneckerGaussian` direction: ``loc`` (``Delta``, ``d_out x d_in``),
    ``in_factor`` (compact ``M_K``) and ``out_factor`` (compact ``M_C``)."""

    loc: Tensor
    in_factor: Tensor
    out_factor: Tensor


class KroneckerFactorStep(NamedTuple):
    """The direction of a :class:`KroneckerGaussian` view without a mean parameter."""

    in_factor: Tensor
    out_factor: Tensor


class KroneckerGaussian(FamilyMethods, nn.Module):
    """Matrix-normal ``N(M, (K K^T) ⊗ (C C^T))`` over ``W`` in ``R^{d_out x d_in}`` (see the module).

    Parameters, in this order: ``loc`` (``M``), ``in_factor`` (``K``) and ``out_factor`` (``C``),
    the factors in compact form.

    Args:
        structure: a group name for :func:`structngd.groups.make` or a group instance, used for
            both factors, or a pair ``(input side, output side)``.
        loc: initial mean (default zeros).
        in_factor, out_factor: initial compact factors (default the identity).
        **group_options: options of the named groups (``k``, ``block_size``, ...).
    """

    #: the parts whose step moves a group factor (the optimizer's trust region acts on them)
    factor_parts = ("in_factor", "out_factor")

    def __init__(
        self,
        d_out: int,
        d_in: int,
        structure: Union[Structure, Sequence[Structure]] = "dense",
        loc: Optional[Tensor] = None,
        in_factor: Optional[Tensor] = None,
        out_factor: Optional[Tensor] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        **group_options,
    ):
        super().__init__()
        if not isinstance(structure, (tuple, list)):
            structure = structure, structure
        elif len(structure) != 2:
            raise ValueError(f"structure must be one value or a pair (input side, output side), got {structure!r}")
        # the options go to the named sides (a group instance beside a name takes none; two instances refuse them)
        named = not all(isinstance(s, _groups.MatrixGroup) for s in structure)
        self.in_group, self.out_group = (
            _groups.make(s, d, **({} if named and isinstance(s, _groups.MatrixGroup) else group_options))
            for s, d in zip(structure, (d_in, d_out))
        )
        self.d_out, self.d_in = d_out, d_in
        if dtype is None:
            given = next((t for t in (loc, in_factor, out_factor) if isinstance(t, Tensor)), None)
            dtype = given.dtype if given is not None else torch.get_default_dtype()
        loc = torch.zeros(d_out, d_in, dtype=dtype, device=device) if loc is None else loc
        loc = torch.as_tensor(loc, dtype=dtype, device=device).detach().clone()
        if loc.shape != (d_out, d_in) or not torch.isfinite(loc).all():
            raise ValueError(f"loc must be a finite tensor of shape ({d_out}, {d_in}), got {tuple(loc.shape)}")
        self.loc = nn.Parameter(loc)
        self.in_factor = nn.Parameter(self._initial(self.in_group, in_factor, "in_factor", loc))
        self.out_factor = nn.Parameter(self._initial(self.out_group, out_factor, "out_factor", loc))

    @staticmethod
    def _initial(group, value, what: str, like: Tensor) -> Tensor:
        if value is None:
            return group.identity(like.dtype, like.device)
        value = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach().clone()
        if value.shape != tuple(group.shape) or not torch.isfinite(value).all():
            raise ValueError(
                f"{what} must be a finite compact element of {group!r}, shape {tuple(group.shape)}, "
                f"got {tuple(value.shape)}"
            )
        return value

    @classmethod
    def view(
        cls,
        in_group: _groups.MatrixGroup,
        out_group: _groups.MatrixGroup,
        in_factor: Tensor,
        out_factor: Tensor,
        loc: Optional[Tensor] = None,
    ) -> "KroneckerGaussian":
        """A family over existing tensors, shared rather than copied (a step writes into them); without
        ``loc`` only ``K``, ``C`` are parameters (the mean reads as zero), steps :class:`KroneckerFactorStep`."""
        if in_factor.shape != tuple(in_group.shape) or out_factor.shape != tuple(out_group.shape):
            raise ValueError(
                f"in_factor and out_factor must have shapes {tuple(in_group.shape)} and {tuple(out_group.shape)}, "
                f"got {tuple(in_factor.shape)} and {tuple(out_factor.shape)}"
            )
        if loc is not None and loc.shape != (out_group.dim, in_group.dim):
            raise ValueError(f"loc must have shape ({out_group.dim}, {in_group.dim}), got {tuple(loc.shape)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_group, self.out_group = in_group, out_group
        self.d_out, self.d_in = out_group.dim, in_group.dim
        if loc is not None:
            self._parameters["loc"] = loc  # not re-wrapped: the view must share .grad
        self._parameters["in_factor"] = in_factor
        self._parameters["out_factor"] = out_factor
        return self

    @property
    def has_loc(self) -> bool:
        """Whether the mean is a parameter (``False`` for a factors-only :meth:`view`)."""
        return "loc" in self._parameters

    @property
    def structure(self) -> Tuple[str, str]:
        """The group names ``(input side, output side)``."""
        return self.in_group.name, self.out_group.name

    def extra_repr(self) -> str:
        return f"d_out={self.d_out}, d_in={self.d_in}, in_group={self.in_group!r}, out_group={self.out_group!r}"

    @property
    def dim(self) -> int:
        """The number of entries ``d_out d_in`` of ``W``."""
        return self.d_out * self.d_in

    def left(self, x: Tensor) -> Tensor:
        """``C X`` for ``X`` of shape ``(..., d_out, d_in)`` (products only)."""
        return self.out_group.matvec(self.out_factor, x.mT).mT

    def right_t(self, x: Tensor) -> Tensor:
        """``X K^T`` for ``X`` of shape ``(..., d_out, d_in)``."""
        return self.in_group.matvec(self.in_factor, x)

    def whiten(self, x: Tensor) -> Tensor:
        """``C^{-1} X K^{-T}`` (two structured solves)."""
        return self.in_group.solve(self.in_factor, self.out_group.solve(self.out_factor, x.mT).mT)

    def mean_local_gradient(self, g: Tensor) -> Tensor:
        """``C^T G K``: the local gradient ``g_Delta`` of a Euclidean mean gradient ``G`` (``dL/dM``)."""
        return self.in_group.tmatvec(self.in_factor, self.out_group.tmatvec(self.out_factor, g.mT).mT)

    def precondition(self, g: Tensor) -> Tensor:
        """``C C^T G K K^T`` for ``G`` of shape ``(..., d_out, d_in)``: ``Sigma vec(G)`` unvectorized."""
        return self.right_t(self.left(self.mean_local_gradient(g)))

    def compact_constants(self) -> tuple:
        """``(C_in, C_out)``: both groups' cached inverse Fisher weights."""
        key = (self.in_factor.dtype, self.in_factor.device)
        return tuple(group.constant("inverse_fisher_weights", *key) for group in (self.in_group, self.out_group))

    @property
    def mean(self) -> Tensor:
        if self.has_loc:
            return self.loc
        return torch.zeros(self.d_out, self.d_in, dtype=self.in_factor.dtype, device=self.in_factor.device)

    def row_covariance(self) -> Tensor:
        """The dense ``C C^T`` (``d_out x d_out``)."""
        c = self.out_group.to_dense(self.out_factor)
        return c @ c.mT

    def column_covariance(self) -> Tensor:
        """The dense ``K K^T`` (``d_in x d_in``)."""
        k = self.in_group.to_dense(self.in_factor)
        return k @ k.mT

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """Reparameterized samples ``W = M + C E K^T``, ``E`` standard normal: products only."""
        shape = tuple(sample_shape) + (self.d_out, self.d_in)
        return self.from_noise(torch.randn(shape, dtype=self.in_factor.dtype, device=self.in_factor.device))

    def from_noise(self, eps: Tensor) -> Tensor:
        """The reparameterization ``M + C E K^T`` of given noise ``E`` (shape ``(..., d_out, d_in)``)."""
        return self.mean + self.right_t(self.left(eps))

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return self.rsample(sample_shape)

    def log_prob(self, w: Tensor) -> Tensor:
        """``-||C^{-1} (W - M) K^{-T}||_F^2 / 2 - d_out log|det K| - d_in log|det C| - d_out d_in log(2 pi) / 2``."""
        u = self.whiten(w - self.mean)
        return -0.5 * u.pow(2).sum((-2, -1)) - self._half_logdet() - 0.5 * self.dim * math.log(2 * math.pi)

    def _half_logdet(self) -> Tensor:
        return self.d_out * self.in_group.logdet(self.in_factor) + self.d_in * self.out_group.logdet(self.out_factor)

    def entropy(self) -> Tensor:
        """``H = d_out d_in (1 + log 2 pi) / 2 + d_out log|det K| + d_in log|det C|``."""
        return 0.5 * self.dim * (1.0 + math.log(2 * math.pi)) + self._half_logdet()

    def covariance(self) -> Tensor:
        """The dense ``(K K^T) ⊗ (C C^T)`` over the column-major ``vec(W)`` (small sizes only)."""
        return torch.kron(self.column_covariance(), self.row_covariance())

    def to_torch(self) -> torch.distributions.MultivariateNormal:
        """The same distribution over the column-major ``vec(W)`` (``W.mT.reshape(-1)``)."""
        return torch.distributions.MultivariateNormal(self.mean.mT.reshape(-1), covariance_matrix=self.covariance())

    @torch.no_grad()
    def natural_gradient(self, local_gradient: Optional[tuple] = None):
        """Natural gradient in local coordinates at ``eta0`` (block-diagonal Fisher, see the module),
        from the parameters' ``.grad`` (``Delta``, ``N_K``, ``N_C`` by the groups' ``pullback``).

        ``local_gradient``: ``(g_Delta, X_K, X_C)`` (``(X_K, X_C)`` for a view without a mean), e.g. from
        :func:`~structngd.families.estimators.kronecker_factor_gradients`; ``X_K = K^T dL/dK`` (the
        symmetric ``dL/dM_K``) dense ``d_in x d_in`` or compact, likewise ``X_C``. Returns ``g_Delta``,
        ``project(X_K) / d_out`` and ``project(X_C) / d_in`` (``C ⊙ X`` for compact entries: O(nnz))."""
        step = KroneckerGaussianStep if self.has_loc else KroneckerFactorStep
        if local_gradient is not None:
            local = tuple(local_gradient)
            if len(local) != len(step._fields):
                raise ValueError(
                    f"local_gradient must have {len(step._fields)} parts ({', '.join(step._fields)}), got {len(local)}"
                )
            sides = zip((self.in_group, self.out_group), self.compact_constants(), local[-2:], (self.d_out, self.d_in))
            factors = tuple(self._from_local(group, weights, x) / n for group, weights, x, n in sides)
            return step(*(local[:-2] + factors))
        self.check_gradients()
        sides = ((self.in_group, self.in_factor, self.d_out), (self.out_group, self.out_factor, self.d_in))
        factors = tuple(group.pullback(f, f.grad) / n for group, f, n in sides)
        if not self.has_loc:
            return KroneckerFactorStep(*factors)
        return KroneckerGaussianStep(self.mean_local_gradient(self.loc.grad), *factors)

    @staticmethod
    def _from_local(group, weights: Tensor, x: Tensor) -> Tensor:
        dense = (group.dim, group.dim)
        if tuple(x.shape) == dense:  # a dense local gradient (for (d, d) storage: the same rule)
            return group.project(x)
        if tuple(x.shape) != tuple(group.shape):
            raise ValueError(
                f"a local factor gradient for {group!r} must have shape {dense} or {tuple(group.shape)}, "
                f"got {tuple(x.shape)}"
            )
        return weights * x

    @torch.no_grad()
    def retracted(self, step: tuple, retraction: str = "h") -> Dict[str, Tensor]:
        """New parameter values at ``phi_tau(eta0 - step)``, without writing them: ``M - C Delta K^T``,
        ``K h(-N_K)`` and ``C h(-N_C)`` (``exp`` in place of ``h`` with ``retraction="exp"``)."""
        out = {"loc": self.loc - self.right_t(self.left(step[0]))} if self.has_loc else {}
        for name, group, n in (("in_factor", self.in_group, step[-2]), ("out_factor", self.out_group, step[-1])):
            out[name] = group.mul(getattr(self, name), (group.exp if retraction == "exp" else group.h)(-n))
        return out
