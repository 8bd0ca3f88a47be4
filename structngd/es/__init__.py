"""Layer 4c: evolution strategies with structured search distributions (DESIGN.md, MATH.md §5).

:class:`StructuredNES` is an ask-and-tell natural evolution strategy whose covariance
factor lives in a :mod:`structngd.groups` group: ``rates="xnes"`` with ``"dense"`` is exactly
xNES, with ``"diagonal"`` SNES; the default rates add CMA-ES-like cumulation. 
:func:`minimize` runs the loop (point-wise, batched or through an executor);
:mod:`structngd.es.bbob` holds BBOB test functions.
"""

from .minimize import minimize
from .nes import StructuredNES
from .result import ESHistory, ESResult
from .utilities import default_popsize, rank_order, recombination_weights, utilities

__all__ = [
    "StructuredNES",
    "minimize",
    "ESResult",
    "ESHistory",
    "utilities",
    "recombination_weights",
    "default_popsize",
    "rank_order",
]
