"""Argument checks shared by every layer: each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math
import numbers

import numpy as np


def is_bool(value) -> bool:
    """A Python or numpy bool."""
    return isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A real number (numpy's scalars too), not a bool."""
    return isinstance(value, numbers.Real) and not is_bool(value)


def is_integer(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not is_bool(value)


def _finite_bound(name: str, value, strict: bool, optional: bool):
    """A finite number ``> 0`` (``strict``) or ``>= 0``, or ``None`` where ``optional``."""
    if optional and value is None:
        return None
    if not (is_number(value) and (0 < value if strict else 0 <= value) and value < math.inf):
        raise ValueError(
            f"{name} must be {'None or ' if optional else ''}a finite number {'>' if strict else '>='} 0, got {value!r}"
        )
    return value if optional else float(value)


def positive(name: str, value) -> float:
    """A finite number ``> 0``."""
    return _finite_bound(name, value, strict=True, optional=False)


def non_negative(name: str, value) -> float:
    """A finite number ``>= 0``."""
    return _finite_bound(name, value, strict=False, optional=False)


def optional_positive(name: str, value):
    """``None`` or a finite number ``> 0``."""
    return _finite_bound(name, value, strict=True, optional=True)


def optional_non_negative(name: str, value):
    """``None`` or a finite number ``>= 0``."""
    return _finite_bound(name, value, strict=False, optional=True)


def fraction(name: str, value) -> float:
    """A number in ``[0, 1)`` (momentum, decay rates)."""
    if not (is_number(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def count(name: str, value, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (not a bool)."""
    if not (is_integer(value) and value >= minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def optional_count(name: str, value, minimum: int = 1):
    """``None`` or an integer ``>= minimum``."""
    if value is not None and not (is_integer(value) and value >= minimum):
        raise ValueError(f"{name} must be None or an integer >= {minimum}, got {value!r}")
    return value


def one_of(name: str, value, allowed) -> None:
    """``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def flag(name: str, value) -> bool:
    """``True`` or ``False`` (numpy's bools too), nothing else."""
    if not is_bool(value):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)
