"""Layer 2: distributions whose parameters move through layer-1 groups."""

from .gaussian import ESTIMATORS, Gaussian
from .wishart import Wishart

__all__ = ["Gaussian", "Wishart", "ESTIMATORS"]
