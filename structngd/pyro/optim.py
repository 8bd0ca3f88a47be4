"""``NGD``: the structured natural-gradient step as a Pyro optimizer for ``SVI``."""

from __future__ import annotations

from typing import Dict, List, Optional, Union

import pyro
import pyro.optim
import torch
from pyro.optim import PyroOptim
from torch import Tensor

from ..optim import NaturalGradient, check_hyperparameters
from .guide import live_guides

ESTIMATORS = ("reparam", "price")


class NGD(PyroOptim):
    """Structured natural-gradient descent for ``pyro.infer.SVI``.

    ``SVI`` hands the optimizer the parameters of the step's traces. ``NGD`` finds the
    :class:`~structngd.pyro.AutoStructuredNormal` guides that own some of them and
    applies the coupled local-parameterization step to each (``mu`` and ``B``
    together, :class:`~structngd.optim.NaturalGradient`); every other parameter goes to
    ``fallback``. All gradients are checked before anything moves.

    Usage::

        guide = AutoStructuredNormal(model, structure="dense")
        svi = SVI(model, guide, NGD(lr=0.1), Trace_ELBO())

    Args:
        lr: natural-gradient step size ``beta`` (``1`` is a full Newton-like step).
            Reassign ``ngd.lr`` (or ``momentum``, ``max_step``) to schedule it.
        estimator: ``"reparam"`` uses the gradient ``SVI`` computed (reparameterization);
            ``"price"`` replaces the guide's gradients by Bonnet/Price estimates from the
            model's gradient and Hessian at ``num_pairs`` mirrored pairs (exact for
            conjugate Gaussian models; ``d`` backward passes per sample).
        num_pairs: mirrored sample pairs of the ``"price"`` estimator.
        momentum: Riemannian momentum in ``[0, 1)``.
        max_step: optional trust region ``lr * ||M||_F <= max_step`` in local coordinates.
        fallback: a ``PyroOptim`` for parameters no structured guide owns; ``None``
            gives ``pyro.optim.Adam({"lr": 1e-3})``, ``False`` none (such parameters
            are then an error).
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
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(num_pairs, int) or isinstance(num_pairs, bool) or num_pairs < 1:
            raise ValueError(f"num_pairs must be a positive integer, got {num_pairs!r}")
        if fallback is None:
            fallback = pyro.optim.Adam({"lr": 1e-3})
        elif fallback is True or not (fallback is False or isinstance(fallback, PyroOptim)):
            raise TypeError(f"fallback must be a pyro.optim.PyroOptim, None or False, got {fallback!r}")
        super().__init__(NaturalGradient, {"lr": lr, "momentum": momentum, "max_step": max_step})
        self.lr, self.momentum, self.max_step = lr, momentum, max_step
        self.estimator, self.num_pairs = estimator, num_pairs
        self.fallback: Union[bool, PyroOptim] = fallback

    # -------------------------------------------------------------- step
    def __call__(self, params, *args, **kwargs) -> None:
        """One step: natural gradient for structured guides, ``fallback`` for the rest."""
        check_hyperparameters(self.lr, self.momentum, self.max_step)
        params = list(params)
        owned = self._owned(params)
        owned_ids = {id(t) for _, pair in owned for t in pair}
        rest = [p for p in params if id(p) not in owned_ids]
        if rest and self.fallback is False:
            raise ValueError(
                f"NGD(fallback=False) got parameters that no AutoStructuredNormal guide owns: "
                f"{_names(rest)}; pass fallback=pyro.optim.Adam(...) to optimize them"
            )
        if self.estimator == "price":
            for guide, (loc, factor) in owned:
                guide.price_gradients(loc, factor, self.num_pairs)
        for p in params:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise ValueError(f"non-finite gradient for parameter {_names([p])}; no parameter was changed")
        for guide, (loc, factor) in owned:
            self._optimizer(guide, loc, factor).step()
        if rest:
            self.fallback(rest, *args, **kwargs)

    def _owned(self, params: List[Tensor]):
        ids = {id(p) for p in params}
        owned, seen = [], set()
        for guide in live_guides():
            pair = guide.last_parameters()
            if pair is None or id(pair[0]) in seen:
                continue
            hits = [id(t) in ids for t in pair]
            if all(hits):
                owned.append((guide, pair))
                seen.add(id(pair[0]))
            elif any(hits):
                raise ValueError(
                    f"SVI handed NGD only one of the parameters (loc, factor) of {type(guide).__name__} "
                    f"{guide._pyro_name!r}; the natural-gradient step needs both"
                )
        return owned

    def _optimizer(self, guide, loc: Tensor, factor: Tensor) -> NaturalGradient:
        entry = self.optim_objs.get(loc)
        if entry is None or entry[0] is not factor:
            optimizer = NaturalGradient(guide.family(loc, factor), lr=self.lr, momentum=self.momentum, max_step=self.max_step)
            state = self._state_waiting_to_be_consumed.pop(_param_name(loc), None)
            if state is not None:
                optimizer.load_state_dict(state)
            entry = self.optim_objs[loc] = (factor, optimizer)
        optimizer = entry[1]
        for group in optimizer.param_groups:
            group.update(lr=self.lr, momentum=self.momentum, max_step=self.max_step)
        return optimizer

    # ------------------------------------------------------------- state
    def get_state(self) -> Dict:
        """``{"natural_gradient": {loc name: state}, "fallback": fallback state}``."""
        names = {loc: _param_name(loc) for loc in self.optim_objs}
        state = {names[loc]: entry[1].state_dict() for loc, entry in self.optim_objs.items() if names[loc]}
        fallback = self.fallback.get_state() if self.fallback is not False else {}
        return {"natural_gradient": state, "fallback": fallback}

    def set_state(self, state_dict: Dict) -> None:
        """Restore a :meth:`get_state` result (applied when each parameter is next seen)."""
        if set(state_dict) != {"natural_gradient", "fallback"}:
            raise ValueError("NGD.set_state expects the dict of NGD.get_state()")
        self._state_waiting_to_be_consumed.update(state_dict["natural_gradient"])
        for loc, (factor, optimizer) in list(self.optim_objs.items()):
            state = self._state_waiting_to_be_consumed.pop(_param_name(loc), None)
            if state is not None:
                optimizer.load_state_dict(state)
        if self.fallback is not False:
            self.fallback.set_state(state_dict["fallback"])


def _param_name(p: Tensor) -> Optional[str]:
    return pyro.get_param_store().param_name(p)


def _names(params: List[Tensor]) -> str:
    return ", ".join(str(_param_name(p) or tuple(p.shape)) for p in params)
