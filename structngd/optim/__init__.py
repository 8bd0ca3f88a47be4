"""Layer 3: the functional natural-gradient kernel and the optimizer around it."""

from .kernel import RETRACTIONS, check_hyperparameters, is_family, natural_gradient_step
from .natural_gradient import NaturalGradient

__all__ = ["NaturalGradient", "natural_gradient_step", "check_hyperparameters", "is_family", "RETRACTIONS"]
