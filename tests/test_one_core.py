"""One core for all three uses: a step of each use equals the layer-3 kernel's step of its family.

Each test computes the family's step independently (the family, its estimator and
:func:`structngd.optim.natural_gradient_step` or :class:`structngd.optim.NaturalGradient`)
and compares it with what the use (``kron.LocalKFAC``, ``es.StructuredNES``, ``pyro.NGD``) did.
"""

from __future__ import annotations

import pytest
import torch

# ------------------------------------------------------------------- kron: LocalKFAC
# (LocalKFAC tests go here)

# ------------------------------------------------------------------- es: StructuredNES
# (StructuredNES tests go here)

# ------------------------------------------------------------------- pyro: NGD
# (NGD tests go here)
