"""Layer 3: the shared natural-gradient optimizer."""

from .natural_gradient import NaturalGradient

__all__ = ["NaturalGradient"]
