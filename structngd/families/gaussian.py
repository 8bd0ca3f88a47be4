"""Layer 2: the Gaussian with a structured factor of its precision ``S = B B^T`` (the default)
or of its covariance ``Sigma = sigma^2 A A^T`` (evolution strategies)."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Dict, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .. import checks
from .. import groups as _groups
from ..groups.base import HALF_DTYPES, linear_solve
from . import estimators
from .checks import factor_of_spd, require_invertible
from .shared import FamilyMethods

ESTIMATORS = ("reparam", "price", "delta")
PARAMETERIZATIONS = ("precision", "covariance")


class GaussianStep(NamedTuple):
    """A Gaussian's local-coordinate direction: ``loc`` (``delta``) and ``factor`` (compact ``M``)."""

    loc: Tensor
    factor: Tensor


class ScaledGaussianStep(NamedTuple):
    """The direction of a covariance Gaussian with a global scale: ``loc`` (``delta``), ``factor``
    (compact, trace-free ``M``) and ``scale`` (``s``, a 0-dim tensor)."""

    loc: Tensor
    factor: Tensor
    scale: Tensor


class Gaussian(FamilyMethods, nn.Module):
    """Gaussian ``N(mu, S^{-1})``, ``S = B B^T``; parameters ``loc`` (``mu``) and ``factor`` (``B`` in
    the group's compact form). Local coordinates around ``(mu_t, B_t)``: ``mu = mu_t + B_t^{-T} delta``,
    ``B = B_t h(M)``; their Fisher at ``eta0`` is ``I`` for ``delta`` and has weights 2 on diagonal /
    symmetric-block entries and 1 on free entries of ``M``.

    ``parameterization="covariance"``: ``N(mu, sigma^2 A A^T)`` with ``A`` in the group (``A = B^T``
    with ``transpose``), ``sigma = 1`` unless ``scale`` is given; ``mu = mu_t + sigma_t A_t delta``,
    ``A = A_t h(M)`` and, with a scale part, ``sigma = sigma_t exp(s)`` with ``M`` trace-free (Fisher
    weight ``2 d`` for ``s``). No solve is needed to sample or to step.

    Args:
        structure: a group name for :func:`structngd.groups.make` or a group instance.
        loc: initial mean (default zeros).
        precision: a positive scalar or ``(d,)`` vector (diagonal) or an SPD ``(d, d)`` matrix (dense, triangular).
        estimator: default estimator of :meth:`estimate_gradients`.
        covariance: initial covariance (forms as ``precision``; with ``scale``: of ``A`` alone); default ``I``.
        scale: initial ``sigma > 0``: adds the parameter ``scale`` (``None``: no scale part).
        transpose: ``A = B^T`` (``block_triangular(k)`` then gives a rank-k plus diagonal covariance).
        **group_options: options of the group (``k``, ``block_size``, ...).
    """

    def __init__(
        self,
        dim: int,
        structure: Union[str, _groups.MatrixGroup] = "dense",
        loc: Optional[Tensor] = None,
        precision: Union[None, float, Tensor] = None,
        estimator: str = "reparam",
        dtype: Optional[torch.dtype] = None,
        device=None,
        parameterization: str = "precision",
        covariance: Union[None, float, Tensor] = None,
        scale: Optional[float] = None,
        transpose: bool = False,
        **group_options,
    ):
        super().__init__()
        self.group, self.dim = _groups.make(structure, dim, **group_options), dim
        checks.one_of("estimator", estimator, ESTIMATORS)
        checks.one_of("parameterization", parameterization, PARAMETERIZATIONS)
        self.estimator, self.parameterization = estimator, parameterization
        covariant = parameterization == "covariance"
        if not covariant and (covariance is not None or scale is not None or transpose):
            raise ValueError('covariance, scale and transpose need parameterization="covariance"')
        if covariant and precision is not None:
            raise ValueError('parameterization="covariance" takes covariance=..., not precision=...')
        self.transpose = checks.flag("transpose", transpose)
        dtype = dtype or (loc.dtype if isinstance(loc, Tensor) else torch.get_default_dtype())
        loc = torch.zeros(dim, dtype=dtype, device=device) if loc is None else loc
        loc = torch.as_tensor(loc, dtype=dtype, device=device).detach().clone()
        if loc.shape != (dim,) or not torch.isfinite(loc).all():
            raise ValueError(f"loc must be a finite tensor of shape ({dim},), got {tuple(loc.shape)}")
        self.loc = nn.Parameter(loc)
        if covariant and transpose and covariance is not None and torch.as_tensor(covariance).dim() > 1:
            raise ValueError("with transpose the initial covariance must be a scalar or a diagonal vector")
        what, value = ("covariance", covariance) if covariant else ("precision", precision)
        if value is None:
            self.factor = nn.Parameter(self.group.identity(loc.dtype, loc.device))
        else:
            value = torch.as_tensor(value, dtype=loc.dtype, device=loc.device)
            self.factor = nn.Parameter(factor_of_spd(self.group, value, what))
        if scale is not None:
            scale = checks.positive("scale", float(scale) if isinstance(scale, Tensor) else scale)
            self.scale = nn.Parameter(torch.tensor(scale, dtype=dtype, device=loc.device))

    @classmethod
    def view(cls, group: _groups.MatrixGroup, loc: Tensor, factor: Tensor, estimator: str = "reparam") -> "Gaussian":
        """A family over existing leaf tensors (e.g. a Pyro guide's parameters), shared with their
        ``.grad`` rather than copied, so :class:`~structngd.optim.NaturalGradient` moves the owner's tensors."""
        if not torch.jit.is_tracing() and (loc.shape != (group.dim,) or factor.shape != group.shape):
            raise ValueError(
                f"loc and factor must have shapes ({group.dim},) and {tuple(group.shape)}, "
                f"got {tuple(loc.shape)} and {tuple(factor.shape)}"
            )
        checks.one_of("estimator", estimator, ESTIMATORS)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.group, self.dim, self.estimator = group, group.dim, estimator
        self.parameterization, self.transpose = "precision", False
        self._parameters["loc"] = loc  # not re-wrapped: the view must share .grad
        self._parameters["factor"] = factor
        return self

    @property
    def covariant(self) -> bool:
        """Whether the factor is a covariance factor (``parameterization="covariance"``)."""
        return self.parameterization == "covariance"

    @property
    def has_scale(self) -> bool:
        """Whether the family has the global-scale part ``scale``."""
        return "scale" in self._parameters

    def sigma(self) -> Tensor:
        """The global scale (a 0-dim tensor; one without a scale part)."""
        return self.scale if self.has_scale else torch.ones((), dtype=self.loc.dtype, device=self.loc.device)

    def compact_constants(self) -> tuple:
        """``(C, I)``: the group's cached inverse Fisher weights and identity in compact form."""
        key = (self.factor.dtype, self.factor.device)
        return self.group.constant("inverse_fisher_weights", *key), self.group.constant("identity", *key)

    def factor_matvec(self, x: Tensor) -> Tensor:
        """``A x`` for the covariance factor (``B^T x`` with ``transpose``), ``x`` of shape ``(..., d)``."""
        return self.group.tmatvec(self.factor, x) if self.transpose else self.group.matvec(self.factor, x)

    def factor_tmatvec(self, x: Tensor) -> Tensor:
        """``A^T x`` for the covariance factor."""
        return self.group.matvec(self.factor, x) if self.transpose else self.group.tmatvec(self.factor, x)

    def _dense_covariance_factor(self) -> Tensor:
        a = self.group.to_dense(self.factor)
        return self.sigma() * (a.mT if self.transpose else a)

    @property
    def structure(self) -> str:
        return self.group.name

    def extra_repr(self) -> str:
        return f"{self.group!r}"

    @property
    def mean(self) -> Tensor:
        return self.loc

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """Reparameterized samples ``z = mu + B^{-T} eps`` (``mu + sigma A eps``), ``eps ~ N(0, I)``."""
        eps = torch.randn(tuple(sample_shape) + (self.dim,), dtype=self.loc.dtype, device=self.loc.device)
        return self.from_noise(eps)

    def from_noise(self, eps: Tensor) -> Tensor:
        """The reparameterization ``z = mu + B^{-T} eps`` (``mu + sigma A eps``) of given noise."""
        if self.covariant:
            return self.loc + self.sigma() * self.factor_matvec(eps)
        return self.loc + self.group.tsolve(self.factor, eps)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return self.rsample(sample_shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; mu, S^{-1}) = -|B^T (z - mu)|^2 / 2 + log|det B| - d/2 log(2 pi)``
        (covariance: ``-|A^{-1} (z - mu)|^2 / (2 sigma^2) - log|det A| - d log sigma - ...``)."""
        group, x, const = self.group, z - self.loc, 0.5 * self.dim * math.log(2 * math.pi)
        if self.covariant:
            sigma = self.sigma()
            u = (group.tsolve(self.factor, x) if self.transpose else group.solve(self.factor, x)) / sigma
            return -0.5 * u.pow(2).sum(-1) - group.logdet(self.factor) - self.dim * sigma.log() - const
        return -0.5 * group.tmatvec(self.factor, x).pow(2).sum(-1) + group.logdet(self.factor) - const

    def entropy(self) -> Tensor:
        """``H = d/2 (1 + log 2 pi) - log|det B|`` (``+ log|det A| + d log sigma``)."""
        const = 0.5 * self.dim * (1.0 + math.log(2 * math.pi))
        if self.covariant:
            return const + self.group.logdet(self.factor) + self.dim * self.sigma().log()
        return const - self.group.logdet(self.factor)

    def precision(self) -> Tensor:
        """The dense precision ``S = B B^T`` (``(sigma^2 A A^T)^{-1}``)."""
        if self.covariant:
            a = self._dense_covariance_factor()
            r = linear_solve(a, torch.eye(self.dim, dtype=a.dtype, device=a.device))
            return r.mT @ r
        b = self.group.to_dense(self.factor)
        return b @ b.mT

    def covariance(self) -> Tensor:
        """The dense covariance ``S^{-1} = B^{-T} B^{-1}`` by solves (``sigma^2 A A^T``)."""
        if self.covariant:
            a = self._dense_covariance_factor()
            return a @ a.mT
        eye = torch.eye(self.dim, dtype=self.loc.dtype, device=self.loc.device)
        r = self.group.solve(self.factor, eye)  # rows: B^{-1} e_i, i.e. R = B^{-T}
        return r @ r.mT

    def to_torch(self) -> torch.distributions.MultivariateNormal:
        """The same distribution as a ``torch.distributions.MultivariateNormal`` (float32 or float64: it factorizes
        the matrix by Cholesky, which half and bfloat16 lack; ``ValueError`` there)."""
        if self.loc.dtype in HALF_DTYPES:
            raise ValueError(f"Gaussian.to_torch needs float32 or float64, got {self.loc.dtype} (call .float() first)")
        if self.covariant:
            return torch.distributions.MultivariateNormal(self.loc, covariance_matrix=self.covariance())
        return torch.distributions.MultivariateNormal(self.loc, precision_matrix=self.precision())

    def estimate_gradients(
        self,
        log_density: Callable[[Tensor], Tensor],
        num_samples: int = 1,
        estimator: Optional[str] = None,
        gamma: float = 1.0,
    ) -> Tensor:
        """Accumulate into ``.grad`` the gradient of ``L = E_q[-log p(w)] - gamma H(q)``; returns the
        loss estimate (detached). ``log_density`` maps a batch ``(n, d)`` to ``(n,)``. ``"reparam"``
        differentiates the Monte Carlo loss through ``w = mu + B^{-T} eps``; ``"price"``: Bonnet/Price,
        ``g_mu = E[grad l]``, ``g_Sigma = (E[hess l] - gamma S)/2`` on mirrored samples (exact for
        quadratic ``l`` with one pair); ``"delta"``: both at the mean."""
        estimator = estimator or self.estimator
        checks.one_of("estimator", estimator, ESTIMATORS)
        checks.count("num_samples", num_samples)
        if estimator == "reparam":
            loss = -log_density(self.rsample((num_samples,))).mean() - gamma * self.entropy()
            loss.backward()
            return loss.detach()
        if self.covariant:
            raise ValueError(f'estimator {estimator!r} needs parameterization="precision"; use "reparam"')
        args = (self.group, self.loc, self.factor, partial(estimators.loss_derivatives, log_density))
        if estimator == "delta":
            value, g_mu, g_factor = estimators.delta_gradients(*args, gamma)
        else:
            value, g_mu, g_factor = estimators.price_gradients(*args, max(1, num_samples // 2), gamma)
        with torch.no_grad():
            for param, grad in ((self.loc, g_mu), (self.factor, g_factor)):
                if param.grad is None:
                    param.grad = grad.detach().clone(memory_format=torch.contiguous_format)
                else:
                    param.grad.add_(grad)
            return value - gamma * self.entropy()

    #: the parts whose step moves a group factor (the optimizer's trust region acts on them)
    factor_parts = ("factor",)

    @torch.no_grad()
    def natural_gradient(self, local_gradient: Optional[tuple] = None):
        """Natural gradient in local coordinates at ``eta0`` from the parameters' ``.grad``: precision
        ``delta = B^{-1} g_mu``, ``M = C ⊙ κ(B^T g_B)`` (compact); covariance ``delta = sigma A^T g_mu``,
        ``M = C ⊙ κ(A^T g_A)`` and, with a scale part, ``M`` trace-free and ``s = sigma g_sigma / (2 d)``.

        ``local_gradient``: ``(g_delta, g_M)`` or, with a scale part, ``(g_delta, g_M, g_s)`` computed
        elsewhere (e.g. :func:`~structngd.families.estimators.score_function_gradients`), ``g_M`` the
        compact pattern entries of the symmetric ``dL/dM`` and ``g_s = tr(dL/dM)``. Returns
        ``(g_delta, C ⊙ g_M)`` or ``(g_delta, C ⊙ (g_M - g_s / d I), g_s / (2 d))``: O(nnz).
        """
        if local_gradient is not None:
            local = tuple(local_gradient)
            n_parts = 3 if self.has_scale else 2
            if len(local) != n_parts:
                raise ValueError(
                    f"local_gradient must have {n_parts} parts "
                    f"({', '.join(name for name, _ in self.named_parameters())}), got {len(local)}"
                )
            weights, eye = self.compact_constants()
            if not self.has_scale:
                return GaussianStep(local[0], weights * local[1])
            g_delta, g_m, g_s = local
            g_s = torch.as_tensor(g_s, dtype=self.loc.dtype, device=self.loc.device)
            return ScaledGaussianStep(g_delta, weights * (g_m - (g_s / self.dim) * eye), g_s / (2 * self.dim))
        self.check_gradients()
        if not self.covariant:
            delta = self.group.solve(self.factor, self.loc.grad)
            return GaussianStep(delta, self.group.pullback(self.factor, self.factor.grad))
        sigma = self.sigma()
        delta = sigma * self.factor_tmatvec(self.loc.grad)
        if self.transpose:  # B = h(N) B_t with N = M^T in the group: dL/dN = g_B B_t^T
            m = self.group.project(self.group.to_dense(self.factor.grad) @ self.group.to_dense(self.factor).mT)
        else:
            m = self.group.pullback(self.factor, self.factor.grad)
        if not self.has_scale:
            return GaussianStep(delta, m)
        weights, eye = self.compact_constants()
        trace = (self.group.to_dense(self.factor) * self.group.to_dense(self.factor.grad)).sum()
        m = m - (trace / self.dim) * (weights * eye)
        return ScaledGaussianStep(delta, m, sigma * self.scale.grad / (2 * self.dim))

    @torch.no_grad()
    def retracted(self, step: tuple, retraction: str = "h") -> Dict[str, Tensor]:
        """New parameter values at ``phi_tau(eta0 - step)``, without writing them: ``mu - B^{-T} delta``
        and ``B h(-M)`` (``B exp(-M)`` with ``retraction="exp"``); covariance: ``mu - sigma A delta``,
        ``A h(-M)`` and ``sigma exp(-s)`` (the scalar scale always takes the exact exponential). ``ValueError``
        where the factor would be singular or the scale 0 (underflow)."""
        delta, m = step[0], step[1]
        local_map = self.group.exp if retraction == "exp" else self.group.h
        if not self.covariant:
            loc, factor = self.loc - self.group.tsolve(self.factor, delta), self.group.mul(self.factor, local_map(-m))
            require_invertible(self.group, factor)
            return {"loc": loc, "factor": factor}
        sigma, moved = self.sigma(), local_map(-m)
        factor = self.group.mul(moved, self.factor) if self.transpose else self.group.mul(self.factor, moved)
        require_invertible(self.group, factor)
        out = {"loc": self.loc - sigma * self.factor_matvec(delta), "factor": factor}
        if self.has_scale:
            out["scale"] = sigma * torch.exp(-step[2])
            if not bool(out["scale"] > 0):
                raise ValueError(f"the step would move scale from {float(sigma)!r} to {float(out['scale'])!r} "
                                 "(it must stay > 0; lower the learning rate); no parameter was changed")
        return out
