"""The KL clip of a preconditioned step (Ba et al. 2017): one formula for every Kronecker optimizer."""

from __future__ import annotations

import math
from typing import Optional


def kl_clip_scale(kl_clip: Optional[float], lr: float, inner: float) -> float:
    """``nu = min(1, sqrt(kl_clip / (lr^2 <p, g>)))`` for a step ``-lr p`` with ``<p, g> = inner`` the
    preconditioned gradient's inner product with the gradient (``g^T P g``, the quadratic model's ``2 KL``
    of the step at ``lr = 1``); 1 without ``kl_clip`` or where ``lr^2 <p, g>`` is not positive."""
    if kl_clip is None:
        return 1.0
    size = lr * lr * inner
    return min(1.0, math.sqrt(kl_clip / size)) if size > 0 else 1.0
