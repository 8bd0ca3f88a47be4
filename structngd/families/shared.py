"""What every family shares: the gradient check and the in-place retraction."""

from __future__ import annotations

import torch

from ..optim.kernel import checked_values
from .checks import require_finite_gradients


class FamilyMethods:
    """Mixin for families: the gradient check, and :meth:`retract`, which writes what ``retracted`` proposes."""

    def check_gradients(self) -> None:
        """Raise ``ValueError`` if a parameter's gradient is missing or non-finite."""
        require_finite_gradients(self, list(self.named_parameters()))

    @torch.no_grad()
    def retract(self, step: tuple, lr: float = 1.0, retraction: str = "h") -> None:
        """``tau <- phi_tau(eta0 - lr * step)`` in place; a refused step (a non-finite or misshapen new value
        included) raises ``ValueError`` and changes nothing."""
        new = self.retracted(tuple(lr * t for t in step), retraction)
        for name, value in checked_values(self, new, type(self).__name__).items():
            getattr(self, name).copy_(value)
