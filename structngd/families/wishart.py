"""Layer 2: the Wishart ``W(n, V)`` with a structured factor of its mean ``E[W] = n V = B B^T``.

In the coordinates ``(n, Psi = B B^T)`` the Fisher is block-diagonal. Local coordinates::

    n = d - 1 + (n_t - d + 1) exp(delta)      (log coordinate: keeps n > d - 1)
    B = B_t h(M),  h(M) = I + M + M^2 / 2

with Fisher at ``eta0``: ``c_t^2 F_nn(n_t)`` for ``delta`` (``c_t = n_t - d + 1``,
``F_nn(n) = psi_d'(n/2)/4 - d/(2n)``), ``n_t * w`` for ``M`` (``w`` the Gaussian's Fisher weights), no cross term.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .. import checks
from .. import groups as _groups
from ..groups.base import HALF_DTYPES
from .checks import factor_of_spd, require_invertible
from .shared import FamilyMethods

DF_COORDINATES = ("log", "linear")


class WishartStep(NamedTuple):
    """A Wishart's local-coordinate direction: ``df`` (``delta``) and ``factor`` (compact ``M``)."""

    df: Tensor
    factor: Tensor


# Bernoulli numbers B_2, B_4, ..., B_10 for the asymptotic series of the trigamma function
_BERNOULLI = (1.0 / 6, -1.0 / 30, 1.0 / 42, -1.0 / 30, 5.0 / 66)
_ASYMPTOTIC_FROM = 30.0


def _trigamma_minus_reciprocal(a: Tensor) -> Tensor:
    """``psi'(a) - 1/a`` to float64 precision, without cancellation for large ``a``: the recurrence
    ``psi'(a) = sum_{j<k} 1/(a+j)^2 + psi'(a+k)`` (``k`` shifts bring ``a`` to ``>= 30``), then the
    asymptotic series ``psi'(x) - 1/x = 1/(2x^2) + sum B_2k / x^(2k+1)`` (error below 1e-16 relative
    for ``x >= 30``), with ``1/(a+k) - 1/a = -k / (a (a+k))``."""
    j = torch.arange(int(_ASYMPTOTIC_FROM), dtype=a.dtype, device=a.device)
    shifted = a.unsqueeze(-1) + j
    take = shifted < _ASYMPTOTIC_FROM
    k = take.sum(-1).to(a.dtype)
    head = torch.where(take, 1.0 / shifted.clamp_min(1e-300) ** 2, torch.zeros_like(shifted)).sum(-1)
    x = a + k
    series = 0.5 / x**2
    for i, b in enumerate(_BERNOULLI, start=1):
        series = series + b / x ** (2 * i + 1)
    return head - k / (a * x) + series


def _df_fisher(n: Tensor, d: int) -> Tensor:
    """``F_nn(n)`` as ``4 F_nn = sum_i [psi'(a_i) - 1/a_i] + sum_i (a_1 - a_i) / (a_i a_1)`` with
    ``a_i = (n + 1 - i)/2``: both sums are positive, so no cancellation for large ``n``."""
    shift = 0.5 * torch.arange(d, dtype=n.dtype, device=n.device)
    a1 = 0.5 * n
    a = a1 - shift
    return 0.25 * (_trigamma_minus_reciprocal(a).sum(-1) + (shift / (a * a1)).sum(-1))


def trigamma(a: Tensor) -> Tensor:
    """``psi'(a)`` to float64 precision (``torch.polygamma(1, a)`` has ~1e-9 relative error for small ``a``)."""
    return _trigamma_minus_reciprocal(a) + 1.0 / a


class _MultivariateDigamma(torch.autograd.Function):
    """``psi_d(x)``; its derivative ``psi_d'(x)`` uses the accurate :func:`trigamma`."""

    @staticmethod
    def forward(ctx, x: Tensor, d: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.d = d
        shift = 0.5 * torch.arange(d, dtype=x.dtype, device=x.device)
        return torch.digamma(x.unsqueeze(-1) - shift).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        shift = 0.5 * torch.arange(ctx.d, dtype=x.dtype, device=x.device)
        return grad * trigamma(x.unsqueeze(-1) - shift).sum(-1), None


def multivariate_digamma(x: Tensor, d: int) -> Tensor:
    """``psi_d(x) = sum_{i=1..d} psi(x + (1 - i)/2)``, differentiable (first derivative to float64 precision)."""
    return _MultivariateDigamma.apply(x, d)


def _check_dtype(dtype: torch.dtype) -> None:
    """``ValueError`` for half and bfloat16: the Bartlett sampler's gamma draws, the Cholesky factor of
    ``log_prob`` and the trigamma series of the Fisher have no kernel or no accuracy there."""
    if dtype in HALF_DTYPES:
        raise ValueError(f"Wishart needs float32 or float64, got {dtype} (its gamma sampling, Cholesky and "
                         "trigamma series have no half-precision form)")


class Wishart(FamilyMethods, nn.Module):
    """Wishart ``W(n, V)`` over ``d x d`` SPD matrices with mean ``Psi = n V = B B^T``, ``B`` in a group.

    Density ``|W|^{(n-d-1)/2} exp(-tr(V^{-1} W)/2) / (2^{nd/2} |V|^{n/2} Gamma_d(n/2))``, ``n > d - 1``.
    The structure of ``B`` restricts the mean (a diagonal ``B`` gives a diagonal ``E[W]``), never the
    support. Parameters: ``df`` (``n``, 0-d) and ``factor`` (``B``, compact); autograd gives
    ``dL/dn`` *at fixed mean* and ``dL/dB``. The optimizer's step, ``g_n = df.grad``, ``g_B = factor.grad``::

        n <- d - 1 + c exp(-lr g_n / (c F_nn(n))),  c = n - d + 1     (df_coordinate="log")
        n <- n - lr g_n / F_nn(n)                                      (df_coordinate="linear")
        B <- B h(-lr M),  M = C ⊙ κ(B^T g_B) / n

    Args:
        structure: a group name for :func:`structngd.groups.make` or a group instance.
        mean: initial ``Psi``: a positive scalar or ``(d,)`` vector (diagonal) or SPD ``(d, d)`` (dense, triangular).
        scale: initial scale ``V`` instead (``Psi = n V``), same forms. Default: ``V = I``.
        df_coordinate: ``"log"`` (default: every step keeps ``n > d - 1``) or ``"linear"``
            (``n = n_t + delta``: one step at ``lr = 1`` with exact gradients solves the ``n`` part
            of a conjugate problem, but a large step can leave ``n > d - 1``, which :meth:`retract` refuses).
        **group_options: options of the group (``k``, ``block_size``, ...).
    """

    def __init__(
        self,
        dim: int,
        df: Union[float, Tensor],
        structure: Union[str, _groups.MatrixGroup] = "dense",
        mean: Union[None, float, Tensor] = None,
        scale: Union[None, float, Tensor] = None,
        df_coordinate: str = "log",
        dtype: Optional[torch.dtype] = None,
        device=None,
        **group_options,
    ):
        super().__init__()
        self.group, self.dim = _groups.make(structure, dim, **group_options), dim
        checks.one_of("df_coordinate", df_coordinate, DF_COORDINATES)
        self.df_coordinate = df_coordinate
        if mean is not None and scale is not None:
            raise ValueError("pass at most one of mean and scale")
        if dtype is None:
            given = next((x for x in (df, mean, scale) if isinstance(x, Tensor) and x.is_floating_point()), None)
            dtype = torch.get_default_dtype() if given is None else given.dtype
        _check_dtype(dtype)
        if not (checks.is_number(df) or isinstance(df, Tensor)):
            raise ValueError(f"df must be a real number > dim - 1 = {dim - 1}, got {df!r}")
        df = torch.as_tensor(df, dtype=dtype, device=device).detach().clone()
        if df.numel() != 1:
            raise ValueError(f"df must be a scalar, got shape {tuple(df.shape)}")
        df = df.reshape(())
        if not torch.isfinite(df) or df.item() <= dim - 1:
            raise ValueError(f"df must be a finite number > dim - 1 = {dim - 1}, got {df.item()!r}")
        self.df = nn.Parameter(df)
        what, given = ("mean", mean) if mean is not None else ("scale", 1.0 if scale is None else scale)
        value = torch.as_tensor(given, dtype=df.dtype, device=df.device)
        if not torch.isfinite(value).all():
            raise ValueError(f"{what} must be finite")
        if mean is None:
            value = value * df
        self.factor = nn.Parameter(factor_of_spd(self.group, value, what, symmetric_check=True))

    @property
    def structure(self) -> str:
        return self.group.name

    def extra_repr(self) -> str:
        return f"{self.group!r}, df_coordinate={self.df_coordinate!r}"

    @property
    def mean(self) -> Tensor:
        """``E[W] = Psi = B B^T`` (dense)."""
        b = self.group.to_dense(self.factor)
        return b @ b.mT

    def scale(self) -> Tensor:
        """The scale matrix ``V = Psi / n`` (dense)."""
        return self.mean / self.df

    def mean_inverse(self) -> Tensor:
        """``Psi^{-1} = B^{-T} B^{-1}`` (dense, by solves)."""
        eye = torch.eye(self.dim, dtype=self.factor.dtype, device=self.factor.device)
        r = self.group.solve(self.factor, eye)  # rows B^{-1} e_i: r = B^{-T}
        return r @ r.mT

    def variance(self) -> Tensor:
        """Entrywise ``Var W_ij = n (V_ij^2 + V_ii V_jj)``."""
        v = self.scale()
        diag = v.diagonal(dim1=-2, dim2=-1)
        return self.df * (v**2 + diag.unsqueeze(-1) * diag.unsqueeze(-2))

    def log_det_scale(self) -> Tensor:
        """``log |V| = 2 log|det B| - d log n``."""
        return 2 * self.group.logdet(self.factor) - self.dim * torch.log(self.df)

    def expected_logdet(self) -> Tensor:
        """``E[log |W|] = psi_d(n/2) + d log 2 + log |V|``."""
        return multivariate_digamma(0.5 * self.df, self.dim) + self.dim * math.log(2.0) + self.log_det_scale()

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """Reparameterized samples by the Bartlett decomposition, differentiable in ``n`` and ``B``:
        ``W = (B A)(B A)^T / n`` with ``A`` lower triangular, ``A_ii^2 ~ chi2(n - i + 1)`` (implicitly
        reparameterized gamma), ``A_ij ~ N(0, 1)`` below the diagonal."""
        d, shape = self.dim, tuple(sample_shape)
        dtype, device = self.factor.dtype, self.factor.device
        _check_dtype(dtype)
        diag = torch.distributions.Chi2(self.df - torch.arange(d, dtype=dtype, device=device)).rsample(shape).sqrt()
        a = torch.randn(shape + (d, d), dtype=dtype, device=device).tril(-1) + torch.diag_embed(diag)
        ba = self.group.matvec(self.factor, a.mT).mT  # columns B a_j
        w = ba @ ba.mT / self.df
        return 0.5 * (w + w.mT)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return self.rsample(sample_shape)

    def log_prob(self, w: Tensor) -> Tensor:
        """``log W(W; n, V)`` for SPD ``W`` of shape ``(..., d, d)``; returns shape ``(...)``."""
        d, n = self.dim, self.df
        _check_dtype(self.factor.dtype)
        if w.dim() < 2 or w.shape[-2:] != (d, d):
            raise ValueError(f"Wishart.log_prob expects matrices of shape (..., {d}, {d}), got {tuple(w.shape)}")
        chol, info = torch.linalg.cholesky_ex(w)
        if (info != 0).any():
            raise ValueError("Wishart.log_prob expects symmetric positive-definite matrices")
        logdet_w = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        whitened = self.group.solve(self.factor, chol.mT).mT  # B^{-1} L_W, so |.|_F^2 = tr(Psi^{-1} W)
        trace = n * whitened.pow(2).sum((-2, -1))  # tr(V^{-1} W)
        out = 0.5 * (n - d - 1) * logdet_w - 0.5 * trace - 0.5 * n * d * math.log(2.0)
        return out - 0.5 * n * self.log_det_scale() - torch.mvlgamma(0.5 * n, d)

    def entropy(self) -> Tensor:
        """``H = (d+1)/2 log|V| + d(d+1)/2 log 2 + log Gamma_d(n/2) - (n-d-1)/2 psi_d(n/2) + nd/2``."""
        d, n = self.dim, self.df
        h = 0.5 * (d + 1) * self.log_det_scale() + 0.5 * d * (d + 1) * math.log(2.0) + torch.mvlgamma(0.5 * n, d)
        return h - 0.5 * (n - d - 1) * multivariate_digamma(0.5 * n, d) + 0.5 * n * d

    def to_torch(self) -> torch.distributions.Wishart:
        """The same distribution as a ``torch.distributions.Wishart``."""
        v = self.scale()
        return torch.distributions.Wishart(df=self.df, covariance_matrix=0.5 * (v + v.mT))

    def estimate_gradients(
        self, log_density: Callable[[Tensor], Tensor], num_samples: int = 1, gamma: float = 1.0
    ) -> Tensor:
        """Accumulate into ``.grad`` the reparameterization gradient of ``E_q[-log p(W)] - gamma H(q)``;
        ``log_density`` maps a batch ``(s, d, d)`` to ``(s,)``. Returns the loss estimate (detached)."""
        checks.count("num_samples", num_samples)
        loss = -log_density(self.rsample((num_samples,))).mean() - gamma * self.entropy()
        loss.backward()
        return loss.detach()

    def df_fisher(self) -> Tensor:
        """``F_nn(n) = psi_d'(n/2)/4 - d/(2n)``: the Fisher of ``n`` at fixed mean ``Psi``."""
        return _df_fisher(self.df.detach(), self.dim)

    #: the parts whose step moves a group factor (the optimizer's trust region acts on them)
    factor_parts = ("factor",)

    @torch.no_grad()
    def natural_gradient(self) -> WishartStep:
        """Natural gradient in local coordinates from ``df.grad`` and ``factor.grad``: ``delta = g_n / (c F_nn)``
        (log coordinate, ``c = n - d + 1``) or ``g_n / F_nn`` (linear), ``M = C ⊙ κ(B^T g_B) / n``."""
        _check_dtype(self.factor.dtype)
        self.check_gradients()
        n = self.df.detach()
        delta = self.df.grad / self.df_fisher()
        if self.df_coordinate == "log":
            delta = delta / (n - self.dim + 1)
        m = self.group.pullback(self.factor, self.factor.grad) / n
        return WishartStep(delta.reshape(self.df.shape), m)

    @torch.no_grad()
    def retracted(self, step: WishartStep, retraction: str = "h") -> Dict[str, Tensor]:
        """New ``(df, factor)`` at ``phi_tau(eta0 - step)``, without writing them: ``n`` by its
        coordinate map, ``B h(-M)`` (``B exp(-M)`` with ``retraction="exp"``). ``ValueError`` if the
        new ``n`` would not be a finite number ``> d - 1`` (a too large linear step, or an overflow) or the new
        factor would be singular (underflow)."""
        delta, m = step
        n = self.df.detach()
        new_df = (self.dim - 1) + (n - self.dim + 1) * torch.exp(-delta) if self.df_coordinate == "log" else n - delta
        if not torch.isfinite(new_df) or new_df.item() <= self.dim - 1:
            raise ValueError(
                f"Wishart step would move df from {n.item()!r} to {new_df.item()!r}, outside "
                f"(dim - 1, inf) = ({self.dim - 1}, inf); lower the learning rate"
                + (" or use df_coordinate='log'" if self.df_coordinate == "linear" else "")
                + "; no parameter was changed"
            )
        local_map = self.group.exp if retraction == "exp" else self.group.h
        factor = self.group.mul(self.factor, local_map(-m))
        require_invertible(self.group, factor)
        return {"df": new_df.reshape(self.df.shape), "factor": factor}
