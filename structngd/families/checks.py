"""Checks shared by the families."""

from __future__ import annotations

from typing import Iterable, Tuple

import torch

from ..groups.base import HALF_DTYPES


def require_finite_gradients(owner: object, named: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Raise ``ValueError`` if a named parameter's gradient is missing or non-finite."""
    kind = type(owner).__name__
    for name, p in named:
        if p.grad is None:
            raise ValueError(
                f"{kind}.{name} has no gradient: call backward() on a loss "
                f"that depends on the family (or estimate_gradients) before step()"
            )
        if not torch.isfinite(p.grad).all():
            raise ValueError(f"{kind}.{name}.grad has non-finite values")


def require_invertible(group, factor: torch.Tensor, what: str = "factor") -> None:
    """``ValueError`` if a finite proposed ``factor`` is singular (``log|det| = -inf``: ``exp(-M)`` or a product
    underflowed); a non-finite one is left to the caller's finiteness check."""
    if torch.isfinite(factor).all() and not torch.isfinite(group.logdet(factor)):
        raise ValueError(f"the step would make {what} singular (its entries underflow; lower the learning rate "
                         "or set max_step); no parameter was changed")


def factor_of_spd(group, value: torch.Tensor, what: str, symmetric_check: bool = False) -> torch.Tensor:
    """A group element ``B`` with ``B B^T = value``: ``diag(sqrt(value))`` for a positive scalar or
    vector (any group), the Cholesky factor of an SPD ``d x d`` matrix (dense and triangular groups;
    ``upper_triangular``: that of the flipped matrix, flipped back). ``symmetric_check`` rejects a
    visibly non-symmetric matrix and symmetrizes it; without it only the lower triangle is read."""
    d = group.dim
    if not torch.isfinite(value).all():
        raise ValueError(f"{what} must be finite")
    if value.dim() <= 1:
        diag = value.expand(d) if value.dim() == 0 else value
        if diag.shape != (d,) or (diag <= 0).any():
            raise ValueError(f"a diagonal {what} must be positive with shape ({d},), got {tuple(diag.shape)}")
        return group.from_diagonal(diag.sqrt())
    if value.shape != (d, d):
        raise ValueError(f"{what} must have shape ({d}, {d}), got {tuple(value.shape)}")
    if symmetric_check:
        asym = (value - value.mT).abs().max()
        if asym > 64 * torch.finfo(value.dtype).eps * value.abs().max():
            raise ValueError(f"{what} must be symmetric positive-definite (it is not symmetric)")
        value = 0.5 * (value + value.mT)
    if group.name not in ("dense", "lower_triangular", "upper_triangular"):
        raise ValueError(
            f"a dense {what} matrix can only initialize dense or triangular structures, "
            f"not {group.name!r}; pass a scalar or a vector of diagonal entries"
        )
    upper = group.name == "upper_triangular"
    wide = value.float() if value.dtype in HALF_DTYPES else value  # LAPACK has no half or bfloat16 Cholesky
    chol, info = torch.linalg.cholesky_ex(wide.flip(0, 1) if upper else wide)
    if info != 0:
        raise ValueError(f"{what} must be symmetric positive-definite")
    return (chol.flip(0, 1) if upper else chol).to(value.dtype)
