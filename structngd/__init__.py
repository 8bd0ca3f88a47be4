"""structngd: structured natural-gradient descent with local parameterizations."""

from . import groups

__version__ = "0.1.0"

__all__ = ["groups", "__version__"]
