"""Checks shared by the families."""

from __future__ import annotations

from typing import Iterable, Tuple

import torch


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
