"""Layer 3: the functional natural-gradient kernel every use steps through.

A *family* (layer 2) is an ``nn.Module`` with

* ``natural_gradient()``: its natural gradient in local coordinates at ``eta0``, a NamedTuple
  whose fields are the names of the family's parameters (one part per parameter, in the
  order of ``family.parameters()``);
* ``factor_parts``: the names of the parts that move a group factor (the trust region's parts);
* ``retracted(step, retraction)``: the new parameter values ``phi_tau(eta0 - step)`` for a
  step already scaled by its learning rates, as a dict keyed like the step, without writing.

:func:`natural_gradient_step` alone owns what happens between the two: Riemannian momentum,
learning rates per named part, the trust region, the retraction (``"h"`` or the exact
``"exp"``) and the guarantee that a step moves every family or none and never writes a
non-finite value. :class:`~structngd.optim.NaturalGradient` is the ``torch.optim.Optimizer``
around it, as ``torch.optim.Adam`` is around ``torch.optim.adam.adam``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import checks

RETRACTIONS = ("h", "exp")


def is_family(obj) -> bool:
    """Whether ``obj`` implements the family protocol above."""
    return isinstance(obj, nn.Module) and all(
        callable(getattr(obj, name, None)) for name in ("natural_gradient", "retracted")
    )


def check_hyperparameters(lr, momentum, max_step=None, retraction="h", part_lrs=None) -> None:
    """``ValueError`` naming the first bad hyperparameter of a natural-gradient step."""
    checks.non_negative("lr", lr)
    checks.fraction("momentum", momentum)
    checks.optional_positive("max_step", max_step)
    checks.one_of("retraction", retraction, RETRACTIONS)
    for name, value in (part_lrs or {}).items():
        checks.non_negative(f"the learning-rate multiplier of part {name!r}", value)


def natural_gradient_step(
    families: Sequence[nn.Module],
    momentum_buffers: Sequence[Optional[Dict[str, Tensor]]],
    *,
    lr: Sequence[float],
    momentum: Sequence[float],
    max_step: Sequence[Optional[float]],
    retraction: Sequence[str],
    part_lrs: Sequence[Optional[Mapping[str, float]]],
    directions: Optional[Sequence[Optional[NamedTuple]]] = None,
    labels: Optional[Sequence[str]] = None,
) -> List[Optional[Dict[str, Tensor]]]:
    """One natural-gradient step of several families, all or nothing.

    For family ``i`` with natural gradient ``n`` (``directions[i]`` where given, else
    ``families[i].natural_gradient()``):

    * momentum: ``m <- momentum m + n`` (``m = n`` on the first step; Riemannian momentum
      in the re-centred local coordinates, as in SINGD);
    * learning rates: part ``p`` moves by ``beta_p = lr * part_lrs[p]`` (multiplier 1 where
      unnamed);
    * trust region: a factor part with ``beta_p ||m_p||_F > max_step`` is shrunk to that size
      (``||M||_F`` bounds the spectral norm, so ``max_step <= 1`` keeps ``h`` monotone); the
      other parts shrink by the smallest factor part's scale (so the mean and the factor of a
      Gaussian move along the same direction);
    * retraction: ``tau <- phi_tau(eta0 - beta m)`` by ``h`` or the exact exponential.

    Every natural gradient, momentum and new parameter value is formed and checked before
    anything is written: a ``ValueError`` (missing or non-finite gradient, a non-finite step,
    a retraction a family refuses) leaves every family and buffer exactly as it was.
    Returns the new momentum buffers (``None`` for families without momentum), to be stored
    by the caller. ``labels`` name the families in error messages (default ``family i``).
    """
    n = len(families)
    directions = list(directions) if directions is not None else [None] * n
    proposals, new_buffers = [], []
    for i, family in enumerate(families):
        who = labels[i] if labels is not None else f"family {i} ({type(family).__name__})"
        check_hyperparameters(lr[i], momentum[i], max_step[i], retraction[i], part_lrs[i])
        try:
            nat = directions[i] if directions[i] is not None else family.natural_gradient()
        except ValueError as err:
            raise ValueError(f"{who}: {err}; no parameter was changed") from None
        parts = nat._asdict()
        if not all(bool(torch.isfinite(t).all()) for t in parts.values()):
            raise ValueError(
                f"{who}: the natural gradient is non-finite "
                f"(singular factor?); no parameter was changed"
            )
        if momentum[i] > 0:
            old = momentum_buffers[i]
            parts = {k: v.clone() if old is None else old[k] * momentum[i] + v for k, v in parts.items()}
            new_buffers.append(parts)
        else:
            new_buffers.append(None)
        rates = {k: lr[i] * float((part_lrs[i] or {}).get(k, 1.0)) for k in parts}
        shrink = _trust_region(parts, rates, getattr(family, "factor_parts", ()), max_step[i])
        step = type(nat)(**{k: v * (rates[k] * shrink[k]) for k, v in parts.items()})
        try:
            new = family.retracted(step, retraction[i])
        except ValueError as err:
            raise ValueError(f"{who}: {err}") from None
        bad = [k for k, v in new.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(
                f"{who}: the step would write non-finite values into "
                f"{', '.join(bad)} (lower the learning rate or set max_step); no parameter was changed"
            )
        proposals.append(new)
    with torch.no_grad():
        for family, new in zip(families, proposals):
            params = dict(family.named_parameters())
            for name, value in new.items():
                params[name].copy_(value)
    return new_buffers


def _trust_region(
    parts: Mapping[str, Tensor], rates: Mapping[str, float], factor_parts: Sequence[str], max_step: Optional[float]
) -> Dict[str, float]:
    """Per-part scale ``<= 1`` with ``beta_p ||m_p|| <= max_step`` on factor parts."""
    scale = {k: 1.0 for k in parts}
    if max_step is None:
        return scale
    for k in factor_parts:
        part = parts[k] if parts[k].dtype in (torch.float32, torch.float64) else parts[k].float()
        size = rates[k] * float(torch.linalg.vector_norm(part))
        if not math.isfinite(size):
            raise ValueError(f"the step of part {k!r} has a non-finite size; no parameter was changed")
        if size > max_step:
            scale[k] = max_step / size
    smallest = min((scale[k] for k in factor_parts), default=1.0)
    for k in parts:
        if k not in factor_parts:
            scale[k] = smallest
    return scale
