"""Gaussian targets with closed-form KL, for tests, studies and benchmarks."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .families import Gaussian


class GaussianTarget:
    """A normalized Gaussian target ``p = N(m, P^{-1})``.

    For a Gaussian ``q``, ``KL(q || p) = -ELBO(q)`` exactly (``log p`` is normalized),
    ``dL/dmu = P (mu - m)`` and ``dL/dSigma = (P - S) / 2``.
    """

    def __init__(self, mean: Tensor, precision: Tensor):
        d = mean.shape[-1] if mean.dim() == 1 else None
        finite = bool(torch.isfinite(mean).all() and torch.isfinite(precision).all())
        if d is None or precision.shape != (d, d) or not finite:
            raise ValueError(f"GaussianTarget needs a finite mean (d,) and precision (d, d), got shapes "
                             f"{tuple(mean.shape)} and {tuple(precision.shape)}")
        self.mean = mean
        self.precision = 0.5 * (precision + precision.mT)
        self.chol, info = torch.linalg.cholesky_ex(self.precision)
        if info != 0:
            raise ValueError("GaussianTarget: the precision must be symmetric positive-definite")
        self.dim = d
        self.logdet = 2 * self.chol.diagonal().log().sum()

    @classmethod
    def random(cls, dim: int, condition: float = 10.0, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float64) -> "GaussianTarget":
        """A random rotation of log-spaced eigenvalues in ``[1, condition]`` and a random mean."""
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=dtype))
        eig = torch.logspace(0, math.log10(condition), dim, dtype=dtype)
        mean = torch.randn(dim, generator=generator, dtype=dtype)
        return cls(mean, (q * eig) @ q.mT)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "GaussianTarget":
        """The same target with its tensors moved, not recomputed (a CUDA copy holds the CPU's values)."""
        moved = object.__new__(GaussianTarget)
        moved.dim = self.dim
        for name in ("mean", "precision", "chol", "logdet"):
            setattr(moved, name, getattr(self, name).to(device=device, dtype=dtype))
        return moved

    def log_prob(self, w: Tensor) -> Tensor:
        u = (w - self.mean) @ self.chol
        return -0.5 * u.pow(2).sum(-1) + 0.5 * self.logdet - 0.5 * self.dim * math.log(2 * math.pi)

    def kl(self, q: Gaussian) -> Tensor:
        """Differentiable ``KL(q || p) = (tr(P Sigma) + |L^T (mu - m)|^2 - d + log|S| - log|P|) / 2``."""
        whitened = q.group.solve(q.factor, self.chol.mT)  # rows: B^{-1} L e_i, so |.|_F^2 = tr(P Sigma)
        trace = whitened.pow(2).sum()
        maha = ((q.loc - self.mean) @ self.chol).pow(2).sum()
        return 0.5 * (trace + maha - self.dim + 2 * q.group.logdet(q.factor) - self.logdet)

    def mean_field_kl(self) -> Tensor:
        """KL of the mean-field optimum ``N(m, diag(P)^{-1})``."""
        return 0.5 * (self.precision.diagonal().log().sum() - self.logdet)
