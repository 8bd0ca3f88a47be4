"""Bayesian linear and logistic regression as Pyro models (``model(x, y=None)``)."""

from __future__ import annotations

from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor


def _check_data(x: Tensor, y: Optional[Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must have shape (n, p), got {tuple(x.shape)}")
    if y is not None and y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")


class BayesianLinearRegression:
    """``w ~ N(0, prior_scale^2 I)``, ``y | x, w ~ N(x w, noise_scale^2)`` (known noise).

    Conjugate: the posterior is Gaussian, given in closed form by :meth:`posterior`.
    ``subsample_size`` subsamples the data plate (Pyro rescales the likelihood).
    """

    def __init__(self, prior_scale: float = 1.0, noise_scale: float = 1.0, subsample_size: Optional[int] = None):
        if not (prior_scale > 0 and noise_scale > 0):
            raise ValueError("prior_scale and noise_scale must be > 0")
        self.prior_scale, self.noise_scale, self.subsample_size = prior_scale, noise_scale, subsample_size

    def __call__(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        _check_data(x, y)
        p = x.shape[1]
        w = pyro.sample("w", dist.Normal(x.new_zeros(p), self.prior_scale).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=self.subsample_size) as idx:
            mean = (x[idx] * w).sum(-1)  # broadcasts over particle dims: w is (..., 1, p)
            pyro.sample("y", dist.Normal(mean, self.noise_scale), obs=None if y is None else y[idx])
        return mean

    def posterior(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """Closed-form posterior ``(mean, covariance)``:
        ``P = I / s0^2 + X^T X / s^2``, ``mean = P^{-1} X^T y / s^2``."""
        _check_data(x, y)
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        precision = eye / self.prior_scale**2 + x.mT @ x / self.noise_scale**2
        chol = torch.linalg.cholesky(precision)
        mean = torch.cholesky_solve((x.mT @ y / self.noise_scale**2).unsqueeze(-1), chol).squeeze(-1)
        return mean, torch.cholesky_inverse(chol)

    def log_evidence(self, x: Tensor, y: Tensor) -> Tensor:
        """``log p(y | x) = log N(y; 0, s0^2 X X^T + s^2 I)``: the optimal ELBO."""
        _check_data(x, y)
        cov = self.prior_scale**2 * x @ x.mT + self.noise_scale**2 * torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
        return dist.MultivariateNormal(torch.zeros_like(y), covariance_matrix=cov).log_prob(y)


class BayesianLogisticRegression:
    """``w ~ N(0, prior_scale^2 I)``, ``b ~ N(0, prior_scale^2)``, ``y ~ Bernoulli(sigmoid(x w + b))``."""

    def __init__(self, prior_scale: float = 1.0, subsample_size: Optional[int] = None):
        if not prior_scale > 0:
            raise ValueError("prior_scale must be > 0")
        self.prior_scale, self.subsample_size = prior_scale, subsample_size

    def __call__(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        _check_data(x, y)
        p = x.shape[1]
        w = pyro.sample("w", dist.Normal(x.new_zeros(p), self.prior_scale).to_event(1))
        b = pyro.sample("b", dist.Normal(x.new_zeros(()), self.prior_scale))
        with pyro.plate("data", x.shape[0], subsample_size=self.subsample_size) as idx:
            logits = (x[idx] * w).sum(-1) + b  # w is (..., 1, p) and b (..., 1) under particle plates
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=None if y is None else y[idx])
        return logits
