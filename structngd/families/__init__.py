"""Layer 2: distributions whose parameters move through layer-1 groups."""

from .gaussian import ESTIMATORS, Gaussian
from .kronecker import KroneckerFactorStep, KroneckerGaussian, KroneckerGaussianStep
from .wishart import Wishart

__all__ = ["Gaussian", "Wishart", "ESTIMATORS", "KroneckerGaussian", "KroneckerGaussianStep", "KroneckerFactorStep"]
