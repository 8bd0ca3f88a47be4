"""structngd: structured natural-gradient descent with local parameterizations.

Layers: :mod:`structngd.groups` (structured matrix groups and their local maps),
:mod:`structngd.families` (distributions whose factors live in those groups, with their
closed-form Fisher in local coordinates), :mod:`structngd.optim` (the one natural-gradient
kernel and the ``NaturalGradient`` optimizer), and the three uses :mod:`structngd.pyro`
(Pyro guides and ``NGD``), :mod:`structngd.kron` (Kronecker preconditioners for ``torch.nn``)
and :mod:`structngd.es` (evolution strategies). The uses are imported on first access.
"""

import importlib

from . import families, groups, optim

__version__ = "0.1.0"

_USES = ("pyro", "kron", "es")


def __getattr__(name):
    if name in _USES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'structngd' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_USES))


__all__ = ["groups", "families", "optim", *_USES, "__version__"]
