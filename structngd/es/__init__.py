"""Evolution strategies with structured search distributions.

:class:`StructuredNES` is an ask-and-tell natural evolution strategy whose covariance factor lives in a
:mod:`structngd.groups` group: ``rates="xnes"`` is exactly xNES with ``"dense"`` and SNES with ``"diagonal"``;
``rates="cma"`` (the default) adds CMA-ES-like cumulation (:mod:`.cumulation`); :mod:`.stopping` holds pycma's
stopping rules. :func:`minimize` runs the loop (point-wise, batched or through an executor); the BBOB test
functions are in ``experiments.bbob``.
"""

from .minimize import minimize
from .nes import StructuredNES
from .result import ESHistory, ESResult
from .utilities import default_popsize, rank_order, recombination_weights, utilities

__all__ = ["StructuredNES", "minimize", "ESResult", "ESHistory", "utilities", "recombination_weights",
           "default_popsize", "rank_order"]
