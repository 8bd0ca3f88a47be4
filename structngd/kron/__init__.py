"""Kronecker-factored preconditioners: they rewrite the ``.grad`` of every ``nn.Linear`` / ``nn.Conv2d``
layer with a preconditioned gradient, and any ``torch.optim`` optimizer takes the step."""

from .blocks import CurvatureBlock
from .capture import KronLayer
from .ekfac import EKFAC, EKFACBlock
from .kfac import KFAC, KFACBlock, TridiagonalKFACBlock
from .local import LocalKFAC, LocalKFACBlock
from .optimizer import KFACOptimizer
from .preconditioner import KroneckerPreconditioner
from .variational import VariationalKFAC

__all__ = [
    "KFAC", "EKFAC", "LocalKFAC", "VariationalKFAC", "KroneckerPreconditioner", "KronLayer",
    "CurvatureBlock", "KFACBlock", "EKFACBlock", "LocalKFACBlock", "TridiagonalKFACBlock", "KFACOptimizer",
]
