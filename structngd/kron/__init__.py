"""Layer 4b: Kronecker-factored preconditioners for ``torch.nn`` models.

They rewrite the ``.grad`` of every ``nn.Linear`` / ``nn.Conv2d`` layer with a preconditioned
gradient; any ``torch.optim`` optimizer then takes the step.
"""

from .base import KroneckerPreconditioner
from .capture import KronLayer
from .ekfac import EKFAC
from .kfac import KFAC
from .local import LocalKFAC

__all__ = ["KFAC", "EKFAC", "LocalKFAC", "KroneckerPreconditioner", "KronLayer"]
