"""The in-place retraction every family shares."""

from __future__ import annotations

import torch


class RetractInPlace:
    """Mixin for families: :meth:`retract` writes the values that ``retracted(step, retraction)`` proposes."""

    @torch.no_grad()
    def retract(self, step: tuple, lr: float = 1.0, retraction: str = "h") -> None:
        """``tau <- phi_tau(eta0 - lr * step)`` in place; a refused step raises ``ValueError`` and changes nothing."""
        for name, value in self.retracted(tuple(lr * t for t in step), retraction).items():
            getattr(self, name).copy_(value)
