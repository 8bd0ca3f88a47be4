"""``StructuredNormal``: the layer-2 Gaussian as a Pyro distribution and as an affine transform."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions.transforms import Transform

from .. import checks
from ..families.estimators import standard_normal_noise
from ..families.gaussian import Gaussian
from ..groups import MatrixGroup


class StructuredNormal(TorchDistribution):
    """``N(mu, S^{-1})`` with ``S = B B^T``, ``B`` in ``group``: a Pyro adapter sharing ``loc`` and ``factor``
    with a :class:`structngd.families.Gaussian` (a new view, or an existing one by :meth:`from_family`)."""

    arg_constraints = {"loc": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, factor: Tensor, group: MatrixGroup, antithetic: bool = False, validate_args=None):
        self._adapt(Gaussian.view(group, loc, factor), antithetic, validate_args)

    @classmethod
    def from_family(cls, family: Gaussian, antithetic: bool = False, validate_args=None) -> "StructuredNormal":
        """The distribution of an existing precision-parameterized ``Gaussian`` family (shared)."""
        if family.covariant:
            raise ValueError('StructuredNormal needs a family with parameterization="precision"')
        self = cls.__new__(cls)
        self._adapt(family, antithetic, validate_args)
        return self

    def _adapt(self, family: Gaussian, antithetic: bool, validate_args) -> None:
        self.family = family
        self.loc, self.factor, self.group = family.loc, family.factor, family.group
        self.antithetic = checks.flag("antithetic", antithetic)
        super().__init__(torch.Size(), torch.Size([family.group.dim]), validate_args=validate_args)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        """``z = mu + B^{-T} eps``; ``antithetic`` with an even number of draws takes ``+-eps`` pairs."""
        sample_shape = torch.Size(sample_shape)
        mirrored = self.antithetic and sample_shape.numel() % 2 == 0  # pairs over the flattened sample dims
        loc = self.loc
        eps = standard_normal_noise(sample_shape + self.event_shape, mirrored, dtype=loc.dtype, device=loc.device)
        return self.family.from_noise(eps)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self.family.log_prob(value)

    def entropy(self) -> Tensor:
        return self.family.entropy()

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def covariance_matrix(self) -> Tensor:
        return self.family.covariance()

    @property
    def precision_matrix(self) -> Tensor:
        return self.family.precision()

    @property
    def variance(self) -> Tensor:
        """``diag(S^{-1})_i = |B^{-1} e_i|^2``, by solves."""
        eye = torch.eye(self.group.dim, dtype=self.loc.dtype, device=self.loc.device)
        return self.group.solve(self.factor, eye).pow(2).sum(-1)


class StructuredAffine(Transform):
    """``z = mu + B^{-T} eps``: maps standard normal noise to ``StructuredNormal``."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: Tensor, factor: Tensor, group: MatrixGroup, cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        self.loc, self.factor, self.group = loc, factor, group

    def _call(self, x: Tensor) -> Tensor:
        return self.loc + self.group.tsolve(self.factor, x)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.group.tmatvec(self.factor, y - self.loc)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """``log|det B^{-T}| = -log|det B|``, broadcast over the batch of ``x``."""
        return (-self.group.logdet(self.factor)).expand(x.shape[:-1])

    def with_cache(self, cache_size: int = 1):
        if self._cache_size == cache_size:
            return self
        return StructuredAffine(self.loc, self.factor, self.group, cache_size=cache_size)
