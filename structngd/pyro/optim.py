"""``NGD``: the structured natural-gradient step as a Pyro optimizer for ``SVI``."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import pyro
import pyro.optim
import torch
from pyro.optim import PyroOptim
from torch import Tensor

from .. import checks
from ..families.gaussian import Gaussian
from ..optim import NaturalGradient, check_hyperparameters
from .guide import AutoStructuredNormal, owner_of

ESTIMATORS = ("reparam", "price")


class NGD(PyroOptim):
    """Structured natural-gradient descent for ``pyro.infer.SVI``.

    Of the parameters ``SVI`` hands it, those of an :class:`~structngd.pyro.AutoStructuredNormal`
    (found by the owner links its training passes set, so each ``NGD`` sees only its own
    ``SVI``'s guides) take the coupled local-parameterization step of the guide's
    :attr:`~structngd.pyro.AutoStructuredNormal.family` (:class:`~structngd.optim.NaturalGradient`);
    every other parameter goes to ``fallback``. All gradients are checked before anything moves::

        svi = SVI(model, AutoStructuredNormal(model), NGD(lr=0.1), Trace_ELBO())

    Args:
        lr: natural-gradient step size ``beta`` (``1``: a Newton-like step). Reassign ``ngd.lr``
            (or ``momentum``, ``max_step``) to schedule it.
        estimator: ``"reparam"`` (the gradient ``SVI`` computed) or ``"price"`` (Bonnet/Price
            estimates from the model's gradient and Hessian; exact for conjugate Gaussian models).
        num_pairs: mirrored sample pairs of the ``"price"`` estimator.
        momentum: Riemannian momentum in ``[0, 1)``.
        max_step: optional trust region ``lr * ||M||_F <= max_step`` in local coordinates.
        fallback: a ``PyroOptim`` for the other parameters; ``None``: ``pyro.optim.Adam({"lr": 1e-3})``,
            ``False``: none (such parameters are an error).
    """

    def __init__(
        self,
        lr: float = 0.1,
        estimator: str = "reparam",
        num_pairs: int = 1,
        momentum: float = 0.0,
        max_step: Optional[float] = None,
        fallback: Union[None, bool, PyroOptim] = None,
    ):
        check_hyperparameters(lr, momentum, max_step)
        checks.one_of("estimator", estimator, ESTIMATORS)
        checks.count("num_pairs", num_pairs)
        if fallback is None:
            fallback = pyro.optim.Adam({"lr": 1e-3})
        elif fallback is True or not (fallback is False or isinstance(fallback, PyroOptim)):
            raise TypeError(f"fallback must be a pyro.optim.PyroOptim, None or False, got {fallback!r}")
        super().__init__(NaturalGradient, {"lr": lr, "momentum": momentum, "max_step": max_step})
        self.lr, self.momentum, self.max_step = lr, momentum, max_step
        self.estimator, self.num_pairs = estimator, num_pairs
        self.fallback: Union[bool, PyroOptim] = fallback
        # guide -> (its family when last stepped, the NaturalGradient over that family)
        self._optimizers: Dict[AutoStructuredNormal, Tuple[Gaussian, NaturalGradient]] = {}
        self._pending: Dict[str, Dict] = {}  # set_state results for guides not seen since

    # -------------------------------------------------------------- step
    def __call__(self, params, *args, **kwargs) -> None:
        """One step: natural gradient for structured guides, ``fallback`` for the rest."""
        check_hyperparameters(self.lr, self.momentum, self.max_step)
        params = list(params)
        owned = self._owned(params)
        owned_ids = {id(t) for guide in owned for t in (guide.family.loc, guide.family.factor)}
        rest = [p for p in params if id(p) not in owned_ids]
        if rest and self.fallback is False:
            raise ValueError(f"NGD(fallback=False) got parameters that no AutoStructuredNormal guide owns: "
                             f"{_names(rest)}; pass fallback=pyro.optim.Adam(...) to optimize them")
        if self.estimator == "price":
            for guide in owned:
                guide.price_gradients(self.num_pairs)
        for p in params:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise ValueError(f"non-finite gradient for parameter {_names([p])}; no parameter was changed")
        for guide in owned:
            self._optimizer(guide).step()
        if rest:
            self.fallback(rest, *args, **kwargs)

    def _owned(self, params: List[Tensor]) -> List[AutoStructuredNormal]:
        """The guides whose family owns some of ``params`` (read from the tensors' owner links)."""
        ids = {id(p) for p in params}
        owned = []
        for p in params:
            guide, _ = owner_of(p)
            if guide is None or any(guide is g for g in owned):
                continue
            if not (id(guide.family.loc) in ids and id(guide.family.factor) in ids):
                raise ValueError(f"SVI handed NGD only one of the parameters (loc, factor) of a "
                                 f"{type(guide).__name__} ({_names([p])}); the natural-gradient step needs both")
            owned.append(guide)
        return owned

    def _optimizer(self, guide: AutoStructuredNormal) -> NaturalGradient:
        """The ``NaturalGradient`` over the guide's current family (new, with pending state, if it changed)."""
        family = guide.family
        entry = self._optimizers.get(guide)
        if entry is None or entry[0] is not family:
            optimizer = NaturalGradient(family, lr=self.lr, momentum=self.momentum, max_step=self.max_step)
            state = self._pending.pop(_param_name(family.loc), None)
            if state is not None:
                optimizer.load_state_dict(state)
            entry = self._optimizers[guide] = (family, optimizer)
        optimizer = entry[1]
        for group in optimizer.param_groups:
            group.update(lr=self.lr, momentum=self.momentum, max_step=self.max_step)
        return optimizer

    # ------------------------------------------------------------- state
    def get_state(self) -> Dict:
        """``{"natural_gradient": {loc name: state}, "fallback": fallback state}``."""
        state = {}
        for family, optimizer in self._optimizers.values():
            name = _param_name(family.loc)
            if name:
                state[name] = optimizer.state_dict()
        fallback = self.fallback.get_state() if self.fallback is not False else {}
        return {"natural_gradient": state, "fallback": fallback}

    def set_state(self, state_dict: Dict) -> None:
        """Restore a :meth:`get_state` result (applied when each guide's parameters are next seen)."""
        if set(state_dict) != {"natural_gradient", "fallback"}:
            raise ValueError("NGD.set_state expects the dict of NGD.get_state()")
        self._pending.update(state_dict["natural_gradient"])
        for family, optimizer in self._optimizers.values():
            state = self._pending.pop(_param_name(family.loc), None)
            if state is not None:
                optimizer.load_state_dict(state)
        if self.fallback is not False:
            self.fallback.set_state(state_dict["fallback"])


def _param_name(p: Tensor) -> Optional[str]:
    return pyro.get_param_store().param_name(p)


def _names(params: List[Tensor]) -> str:
    return ", ".join(str(_param_name(p) or tuple(p.shape)) for p in params)
