"""Layer 1: structured matrix groups and their local maps ``B <- B h(M)``."""

from __future__ import annotations

import inspect
from typing import Tuple

from .base import MatrixGroup, sym
from .block_diagonal import BlockDiagonal
from .block_upper import BlockTriangular, BlockUpperTriangular, Heisenberg, Hierarchical
from .dense import Dense
from .diagonal import Diagonal
from .triangular import LowerTriangular, UpperTriangular

GROUPS = {cls.name: cls for cls in (Dense, Diagonal, LowerTriangular, UpperTriangular, BlockDiagonal, BlockTriangular,
                                    Heisenberg, Hierarchical)}


def _signature(cls) -> str:
    params = list(inspect.signature(cls.__init__).parameters)[2:]
    return f"{cls.name}({', '.join(params)})" if params else cls.name


def check_structure(name) -> None:
    """``ValueError`` listing the allowed names unless ``name`` is a group or a group's name."""
    if not isinstance(name, MatrixGroup) and name not in GROUPS:
        raise ValueError(f"unknown structure {name!r}; allowed: {', '.join(_signature(c) for c in GROUPS.values())}")


def make(name: str, dim: int, **options) -> MatrixGroup:
    """Build a group from its snake_case name, e.g. ``make("block_triangular", 100, k=5)``. Unknown names, missing
    or unexpected options (options beside a group instance too) and impossible values (``k >= d``, a block size not
    dividing ``d``) raise ``ValueError``."""
    if isinstance(name, MatrixGroup):
        if options:
            raise ValueError(f"group options {options} apply to a structure name, not to the group {name!r}")
        if name.dim != dim:
            raise ValueError(f"group {name!r} has dim {name.dim}, expected {dim}")
        return name
    check_options(name, **options)
    return GROUPS[name](dim, **options)


def make_or_dense(name: str, dim: int, **options) -> Tuple[MatrixGroup, bool]:
    """``(make(name, dim, **options), False)``, or ``(Dense(dim), True)`` where those options do not fit ``dim``
    (a factor smaller than ``k`` or than a block): the Kronecker factors of small layers."""
    try:
        return make(name, dim, **options), False
    except ValueError:
        return make("dense", dim), True


def check_options(name: str, **options) -> None:
    """``ValueError`` for an unknown group name or options that are not the group's (unknown, missing)."""
    check_structure(name)
    cls = GROUPS[name]
    try:
        inspect.signature(cls.__init__).bind(None, 1, **options)
    except TypeError as err:
        raise ValueError(f"bad options {options} for {_signature(cls)}: {err}") from None


__all__ = [
    "MatrixGroup", "Dense", "Diagonal", "LowerTriangular", "UpperTriangular", "BlockDiagonal", "BlockTriangular",
    "BlockUpperTriangular", "Heisenberg", "Hierarchical", "GROUPS", "make", "make_or_dense", "check_structure", "check_options", "sym",
]
