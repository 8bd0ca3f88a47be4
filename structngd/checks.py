"""Argument checks shared by every layer: each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive(name: str, value) -> float:
    """A finite number ``> 0``."""
    if not (_is_number(value) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def non_negative(name: str, value) -> float:
    """A finite number ``>= 0``."""
    if not (_is_number(value) and 0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def fraction(name: str, value) -> float:
    """A number in ``[0, 1)`` (momentum, decay rates)."""
    if not (_is_number(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def count(name: str, value, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (not a bool)."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def optional_count(name: str, value, minimum: int = 1):
    """``None`` or an integer ``>= minimum``."""
    if value is not None:
        try:
            count(name, value, minimum)
        except ValueError:
            raise ValueError(f"{name} must be None or an integer >= {minimum}, got {value!r}") from None
    return value


def optional_non_negative(name: str, value):
    """``None`` or a finite number ``>= 0``."""
    if value is not None and not (_is_number(value) and 0 <= value < math.inf):
        raise ValueError(f"{name} must be None or a finite number >= 0, got {value!r}")
    return value


def one_of(name: str, value, allowed) -> None:
    """``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def optional_positive(name: str, value):
    """``None`` or a finite number ``> 0``."""
    if value is not None and not (_is_number(value) and 0 < value < math.inf):
        raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
    return value
