"""Structured natural-gradient variational inference in Pyro.

``AutoStructuredNormal`` is an autoguide whose Gaussian posterior has a structured
precision factor, ``AutoKroneckerNormal`` one with a matrix normal per weight site; ``NGD`` is the ``PyroOptim`` that ``SVI`` uses to move it by the
local-parameterization natural gradient.
"""

from .distribution import StructuredAffine, StructuredNormal
from .guide import AutoStructuredNormal
from .kronecker import AutoKroneckerNormal
from .optim import NGD

__all__ = ["AutoStructuredNormal", "AutoKroneckerNormal", "NGD", "StructuredNormal", "StructuredAffine"]
