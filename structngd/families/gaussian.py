"""Layer 2: the Gaussian ``N(mu, S^{-1})`` with structured precision factor ``S = B B^T``."""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .. import groups as _groups
from .checks import factor_of_spd, require_finite_gradients
from . import estimators

ESTIMATORS = ("reparam", "price", "delta")


class GaussianStep(NamedTuple):
    """A Gaussian's local-coordinate direction: ``loc`` (``delta``) and ``factor`` (compact ``M``)."""

    loc: Tensor
    factor: Tensor


class Gaussian(nn.Module):
    """Gaussian ``N(mu, S^{-1})``, ``S = B B^T`` with ``B`` in a matrix group.

    Parameters are ``loc`` (``mu``) and ``factor`` (``B`` in the group's compact form).
    Local coordinates around ``(mu_t, B_t)``: ``mu = mu_t + B_t^{-T} delta``,
    ``B = B_t h(M)``; their Fisher at ``eta0`` is the identity for ``delta`` and has
    weights 2 on diagonal / symmetric-block entries and 1 on free entries of ``M``.

    Args:
        dim: dimension ``d``.
        structure: a group name for :func:`structngd.groups.make` or a group instance.
        loc: initial mean (default zeros).
        precision: initial precision: a positive scalar or ``(d,)`` vector (a diagonal
            precision, valid for every structure) or an SPD ``(d, d)`` matrix (dense and
            triangular structures only).
        estimator: default gradient estimator of :meth:`estimate_gradients`.
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
        **group_options,
    ):
        super().__init__()
        self.group = _groups.make(structure, dim, **group_options)
        self.dim = dim
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        dtype = dtype or (loc.dtype if isinstance(loc, Tensor) else torch.get_default_dtype())
        if loc is None:
            loc = torch.zeros(dim, dtype=dtype, device=device)
        loc = torch.as_tensor(loc, dtype=dtype, device=device).detach().clone()
        if loc.shape != (dim,) or not torch.isfinite(loc).all():
            raise ValueError(f"loc must be a finite tensor of shape ({dim},), got {tuple(loc.shape)}")
        self.loc = nn.Parameter(loc)
        self.factor = nn.Parameter(self._initial_factor(precision, loc))

    @classmethod
    def view(cls, group: _groups.MatrixGroup, loc: Tensor, factor: Tensor, estimator: str = "reparam") -> "Gaussian":
        """A family over existing leaf tensors (e.g. a Pyro guide's parameters).

        The view shares ``loc`` and ``factor`` (and their ``.grad``) instead of copying
        them, so :class:`~structngd.optim.NaturalGradient` steps move the owner's tensors.
        """
        if not torch.jit.is_tracing() and (loc.shape != (group.dim,) or factor.shape != group.shape):
            raise ValueError(
                f"loc and factor must have shapes ({group.dim},) and {tuple(group.shape)}, "
                f"got {tuple(loc.shape)} and {tuple(factor.shape)}"
            )
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.group, self.dim, self.estimator = group, group.dim, estimator
        self._parameters["loc"] = loc  # not re-wrapped: the view must share .grad
        self._parameters["factor"] = factor
        return self

    # ------------------------------------------------------------ set-up
    def _initial_factor(self, precision, loc: Tensor) -> Tensor:
        if precision is None:
            return self.group.identity(loc.dtype, loc.device)
        precision = torch.as_tensor(precision, dtype=loc.dtype, device=loc.device)
        return factor_of_spd(self.group, precision, "precision")

    @property
    def structure(self) -> str:
        return self.group.name

    def extra_repr(self) -> str:
        return f"{self.group!r}"

    # ------------------------------------------------------ distribution
    @property
    def mean(self) -> Tensor:
        return self.loc

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """Reparameterized samples ``z = mu + B^{-T} eps``, ``eps ~ N(0, I)``."""
        eps = torch.randn(
            tuple(sample_shape) + (self.dim,), dtype=self.loc.dtype, device=self.loc.device
        )
        return self.from_noise(eps)

    def from_noise(self, eps: Tensor) -> Tensor:
        """The reparameterization ``z = mu + B^{-T} eps`` of given standard-normal noise."""
        return self.loc + self.group.tsolve(self.factor, eps)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return self.rsample(sample_shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; mu, S^{-1}) = -|B^T (z - mu)|^2 / 2 + log|det B| - d/2 log(2 pi)``."""
        u = self.group.tmatvec(self.factor, z - self.loc)
        return -0.5 * u.pow(2).sum(-1) + self.group.logdet(self.factor) - 0.5 * self.dim * math.log(2 * math.pi)

    def entropy(self) -> Tensor:
        """``H = d/2 (1 + log 2 pi) - log|det B|``."""
        return 0.5 * self.dim * (1.0 + math.log(2 * math.pi)) - self.group.logdet(self.factor)

    def precision(self) -> Tensor:
        """The dense precision ``S = B B^T``."""
        b = self.group.to_dense(self.factor)
        return b @ b.mT

    def covariance(self) -> Tensor:
        """The dense covariance ``S^{-1} = B^{-T} B^{-1}`` (by solves, no inverse of ``S``)."""
        eye = torch.eye(self.dim, dtype=self.loc.dtype, device=self.loc.device)
        r = self.group.solve(self.factor, eye)  # rows: B^{-1} e_i, i.e. R = B^{-T}
        return r @ r.mT

    def to_torch(self) -> torch.distributions.MultivariateNormal:
        """The same distribution as a ``torch.distributions.MultivariateNormal``."""
        return torch.distributions.MultivariateNormal(self.loc, precision_matrix=self.precision())

    # ------------------------------------------------ gradient estimation
    def estimate_gradients(
        self,
        log_density: Callable[[Tensor], Tensor],
        num_samples: int = 1,
        estimator: Optional[str] = None,
        gamma: float = 1.0,
    ) -> Tensor:
        """Accumulate into ``.grad`` the gradient of ``L = E_q[-log p(w)] - gamma H(q)``.

        ``log_density`` maps a batch ``(n, d)`` to ``(n,)`` log-densities.
        ``"reparam"`` differentiates the Monte Carlo loss through ``w = mu + B^{-T} eps``;
        ``"price"`` uses Bonnet/Price, ``g_mu = E[grad l]``, ``g_Sigma = (E[hess l] - gamma S)/2``
        on mirrored samples (exact for quadratic ``l`` with one pair); ``"delta"`` evaluates
        both at the mean (Newton-like). Returns the loss estimate (detached).
        """
        estimator = estimator or self.estimator
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if estimator == "reparam":
            loss = -log_density(self.rsample((num_samples,))).mean() - gamma * self.entropy()
            loss.backward()
            return loss.detach()
        with torch.no_grad():
            if estimator == "delta":
                w = self.loc.detach().unsqueeze(0)
            else:
                eps = estimators.standard_normal_noise(
                    (2 * max(1, num_samples // 2), self.dim), True, dtype=self.loc.dtype, device=self.loc.device
                )
                w = self.from_noise(eps)
        value, g_mu, hess = estimators.expected_gradient_and_hessian(log_density, w)
        with torch.no_grad():
            g_factor = estimators.factor_gradient_from_hessian(self.group, self.factor, hess, gamma)
            _accumulate(self.loc, g_mu)
            _accumulate(self.factor, g_factor)
            return value - gamma * self.entropy()

    # ------------------------------------------- natural-gradient interface
    def check_gradients(self) -> None:
        """Raise ``ValueError`` if a parameter's gradient is missing or non-finite."""
        require_finite_gradients(self, (("loc", self.loc), ("factor", self.factor)))

    #: the parts whose step moves a group factor (the optimizer's trust region acts on them)
    factor_parts = ("factor",)

    @torch.no_grad()
    def natural_gradient(self) -> GaussianStep:
        """Natural gradient in local coordinates from ``loc.grad`` and ``factor.grad``.

        ``delta = B^{-1} g_mu`` (Fisher ``I``) and ``M = C ⊙ κ(B^T g_B)`` in compact form.
        """
        self.check_gradients()
        delta = self.group.solve(self.factor, self.loc.grad)
        m = self.group.pullback(self.factor, self.factor.grad)
        return GaussianStep(delta, m)

    @torch.no_grad()
    def retracted(self, step: GaussianStep, retraction: str = "h") -> Dict[str, Tensor]:
        """New ``(loc, factor)`` at ``phi_tau(eta0 - step)``, without writing them:
        ``mu - B^{-T} delta`` and ``B h(-M)`` (``B exp(-M)`` with ``retraction="exp"``)."""
        delta, m = step
        local_map = self.group.exp if retraction == "exp" else self.group.h
        return {
            "loc": self.loc - self.group.tsolve(self.factor, delta),
            "factor": self.group.mul(self.factor, local_map(-m)),
        }

    @torch.no_grad()
    def retract(self, step: GaussianStep, lr: float = 1.0, retraction: str = "h") -> None:
        """``tau <- phi_tau(eta0 - lr * step)`` in place (see :meth:`retracted`)."""
        for name, value in self.retracted(GaussianStep(*(lr * t for t in step)), retraction).items():
            getattr(self, name).copy_(value)


def _accumulate(param: nn.Parameter, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().clone(memory_format=torch.contiguous_format)
    else:
        param.grad.add_(grad)
