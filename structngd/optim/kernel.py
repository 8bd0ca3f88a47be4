"""The functional natural-gradient kernel every use steps through.

A *family* is an ``nn.Module`` with ``natural_gradient()`` (a NamedTuple in local coordinates at
``eta0``, one field per parameter name), ``factor_parts`` (the parts that move a group factor)
and ``retracted(step, retraction)`` (the new values ``phi_tau(eta0 - step)`` as a dict, unwritten).
:func:`natural_gradient_step` owns what lies between: momentum, per-part learning rates, the
trust region, the retraction and the all-or-nothing, finite-only write.
:class:`~structngd.optim.NaturalGradient` wraps it as ``torch.optim.Adam`` wraps ``adam()``.
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
    methods = ("natural_gradient", "retracted")
    return isinstance(obj, nn.Module) and all(callable(getattr(obj, name, None)) for name in methods)


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

    For family ``i`` with natural gradient ``n`` (``directions[i]``, else ``natural_gradient()``):
    momentum ``m <- momentum m + n`` (``m = n`` at first; Riemannian, as in SINGD); part ``p`` moves
    by ``beta_p = lr * part_lrs[p]`` (default multiplier 1); a factor part with
    ``beta_p ||m_p||_F > max_step`` shrinks to that size (``max_step <= 1`` keeps ``h`` monotone)
    and the other parts by the smallest factor scale; then ``tau <- phi_tau(eta0 - beta m)``.

    Everything is formed and checked before anything is written (each new value finite in its
    parameter's dtype, each new buffer finite): a raise leaves every family and buffer as it was.
    Returns the new momentum buffers (``None`` without momentum) for the caller to store; ``labels``
    name the families in errors.
    """
    n = len(families)
    directions = list(directions) if directions is not None else [None] * n
    proposals, new_buffers = [], []
    for i, family in enumerate(families):
        who = labels[i] if labels is not None else f"family {i} ({type(family).__name__})"
        check_hyperparameters(lr[i], momentum[i], max_step[i], retraction[i], part_lrs[i])
        try:
            nat = directions[i] if directions[i] is not None else family.natural_gradient()
        except (ValueError, torch.linalg.LinAlgError) as err:
            raise _refusal(who, err, "; no parameter was changed") from None
        parts = nat._asdict()
        if _non_finite(parts):
            raise ValueError(f"{who}: the natural gradient is non-finite (singular factor?); no parameter was changed")
        if momentum[i] > 0:
            parts = _momentum(parts, momentum_buffers[i], momentum[i], who)
            new_buffers.append(parts)
        else:
            new_buffers.append(None)
        rates = {k: lr[i] * float((part_lrs[i] or {}).get(k, 1.0)) for k in parts}
        try:
            shrink = _trust_region(parts, rates, getattr(family, "factor_parts", ()), max_step[i])
            step = type(nat)(**{k: v * (rates[k] * shrink[k]) for k, v in parts.items()})
            new = family.retracted(step, retraction[i])
        except (ValueError, torch.linalg.LinAlgError) as err:
            raise _refusal(who, err) from None
        proposals.append(checked_values(family, new, who))
    with torch.no_grad():
        for family, new in zip(families, proposals):
            params = dict(family.named_parameters())
            for name, value in new.items():
                params[name].copy_(value)
    return new_buffers


def _refusal(who: str, err: Exception, tail: str = "") -> ValueError:
    """The ``ValueError`` naming the family; a failed factorization (``LinAlgError``) reads as a singular factor."""
    if isinstance(err, torch.linalg.LinAlgError):
        return ValueError(f"{who}: a factor is singular to working precision ({err}); no parameter was changed")
    return ValueError(f"{who}: {err}{tail}")


def _momentum(parts: Dict[str, Tensor], old: Optional[Mapping[str, Tensor]], momentum: float, who: str):
    """``m <- momentum m + n`` (``m = n`` at first); the old buffers follow the parts' dtype and device (a family
    moved by ``.to()``). ``ValueError`` for a buffer of another shape or a non-finite new one."""
    if old is None:
        return {k: v.clone() for k, v in parts.items()}
    new = {}
    for k, v in parts.items():
        if k not in old or tuple(old[k].shape) != tuple(v.shape):
            got = "none" if k not in old else f"shape {tuple(old[k].shape)}"
            raise ValueError(f"{who}: the momentum buffer of part {k!r} must have shape {tuple(v.shape)}, got {got} "
                             "(a state dict of another family?); no parameter was changed")
        new[k] = old[k].to(dtype=v.dtype, device=v.device) * momentum + v
    bad = _non_finite(new)
    if bad:
        raise ValueError(f"{who}: the momentum buffer of {', '.join(bad)} would be non-finite; "
                         "no parameter was changed")
    return new


def checked_values(family: nn.Module, new: Mapping[str, Tensor], who: str = "the family") -> Dict[str, Tensor]:
    """The proposed values as the parameters will hold them (their dtype and device); ``ValueError`` for a shape
    that is not the parameter's or a value that is non-finite once cast (float32 overflows where float64 did not)."""
    params = dict(family.named_parameters())
    out = {}
    for name, value in new.items():
        param = params[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{who}: the step proposes shape {tuple(value.shape)} for {name}, which has shape "
                             f"{tuple(param.shape)}; no parameter was changed")
        out[name] = value.to(dtype=param.dtype, device=param.device)
    bad = _non_finite(out)
    if bad:
        raise ValueError(f"{who}: the step would write non-finite values into {', '.join(bad)} "
                         "(lower the learning rate or set max_step); no parameter was changed")
    return out


def _non_finite(tensors: Mapping[str, Tensor]) -> List[str]:
    """The names of the tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]


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
