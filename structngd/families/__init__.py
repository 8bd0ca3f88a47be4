"""Layer 2: distributions whose parameters move through layer-1 groups."""

from .gaussian import ESTIMATORS, Gaussian

__all__ = ["Gaussian", "ESTIMATORS"]
