"""Layer 3: ``NaturalGradient``, the ``torch.optim.Optimizer`` around :func:`natural_gradient_step`."""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim import Optimizer

from .kernel import check_hyperparameters, is_family, natural_gradient_step


class NaturalGradient(Optimizer):
    """Structured natural-gradient descent on families (``Gaussian``, ``Wishart``, ...).

    Each parameter group holds one family (key ``"family"``) and its parameters. ``step()`` forms
    each family's natural gradient in local coordinates from its Euclidean gradients and
    retracts ``tau <- phi_tau(eta0 - lr * m)`` (:func:`~structngd.optim.kernel.natural_gradient_step`)::

        q = Gaussian(d, structure="lower_triangular")
        opt = NaturalGradient(q, lr=0.1)
        for _ in range(100):
            opt.zero_grad()
            q.estimate_gradients(target.log_prob, num_samples=8)
            opt.step()

    Args:
        families: a family, an iterable of families, or dicts ``{"family": f, "lr": ...}``.
        lr: learning rate ``beta`` (``1``: the full natural-gradient step).
        momentum: Riemannian momentum ``m <- momentum m + nat`` in ``[0, 1)``.
        max_step: optional trust region: a step with ``lr ||M||_F > max_step`` shrinks to that size
            (``max_step <= 1`` keeps ``h`` monotone, which overshoots far from the optimum).
        retraction: ``"h"`` (``h(M) = I + M + M^2/2``, inverse-free) or ``"exp"`` (as xNES).
        part_lrs: learning-rate multipliers per named part (``{"loc": 1.0, "factor": 0.1}``).
    """

    def __init__(
        self,
        families: Union[nn.Module, Iterable],
        lr: float = 0.1,
        momentum: float = 0.0,
        max_step: Optional[float] = None,
        retraction: str = "h",
        part_lrs: Optional[Mapping[str, float]] = None,
    ):
        check_hyperparameters(lr, momentum, max_step, retraction, part_lrs)
        if is_family(families):
            families = [families]
        groups = []
        for entry in families:
            entry = dict(entry) if isinstance(entry, dict) else {"family": entry}
            groups.append(self._as_param_group(entry))
        if not groups:
            raise ValueError("NaturalGradient got an empty list of families")
        defaults = dict(lr=lr, momentum=momentum, max_step=max_step, retraction=retraction, part_lrs=part_lrs)
        super().__init__(groups, defaults)

    @staticmethod
    def _as_param_group(entry: dict) -> dict:
        family = entry.get("family")
        if not is_family(family):
            raise TypeError("NaturalGradient optimizes families (nn.Modules with natural_gradient() and retracted()), "
                            f"got {type(family).__name__}")
        if "params" in entry and list(entry["params"]) != list(family.parameters()):
            raise ValueError("a family's param group must hold exactly family.parameters()")
        entry["params"] = list(family.parameters())
        return entry

    def add_param_group(self, param_group: dict) -> None:
        if "family" in param_group:
            param_group = self._as_param_group(dict(param_group))
        full = {**self.defaults, **param_group}  # validate before the group is added
        _check_group(full)
        super().add_param_group(param_group)

    # -------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None, directions: Optional[Sequence] = None):
        """One natural-gradient step of every family, all or nothing (``ValueError``); returns the closure's loss.

        ``directions``: one per param group, a family's natural gradient formed elsewhere (e.g. from Kronecker
        statistics by ``natural_gradient(local_gradient=...)``) or ``None`` (from the parameters' ``.grad``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        for index, group in enumerate(groups):
            try:
                _check_group(group)
            except ValueError as err:
                raise ValueError(f"NaturalGradient param group {index}: {err}") from None
        families = [group["family"] for group in groups]
        if directions is not None and len(directions) != len(groups):
            raise ValueError(f"NaturalGradient.step got {len(directions)} directions for {len(groups)} param groups")
        buffers = [self._buffers(group) for group in groups]
        try:
            keys = ("lr", "momentum", "max_step", "retraction", "part_lrs")
            new_buffers = natural_gradient_step(
                families, buffers, **{k: [g[k] for g in groups] for k in keys}, directions=directions,
                labels=[f"NaturalGradient param group {i}" for i in range(len(groups))],
            )
        except ValueError as err:
            raise ValueError(str(err)) from None
        for group, new in zip(groups, new_buffers):
            if new is not None:
                for (name, p) in group["family"].named_parameters():
                    self.state[p]["momentum_buffer"] = new[name]
        return loss

    def _buffers(self, group: dict):
        """The group's momentum buffers keyed by part (parameter) name, ``None`` before the first."""
        named = list(group["family"].named_parameters())
        if not named or "momentum_buffer" not in self.state.get(named[0][1], {}):
            return None
        return {name: self.state[p]["momentum_buffer"] for name, p in named}

    # -------------------------------------------------------- state dicts
    def state_dict(self):
        """Like ``torch.optim.Optimizer.state_dict``, each family replaced by its description
        (``"family_description"``: kind, structure, parameter shapes), which :meth:`load_state_dict` checks."""
        state = super().state_dict()
        for group in state["param_groups"]:
            group[DESCRIPTION] = describe(group.pop("family"))
        return state

    def load_state_dict(self, state_dict) -> None:
        """Like ``torch.optim.Optimizer.load_state_dict``, after checking everything (``ValueError`` naming what
        differs, nothing changed): the number of families, each family's description (where saved), each
        momentum buffer's shape and finiteness, and the hyperparameters."""
        families = [group["family"] for group in self.param_groups]
        _check_state(state_dict, families, self.defaults)
        groups = [{k: v for k, v in group.items() if k != DESCRIPTION} for group in state_dict["param_groups"]]
        super().load_state_dict({**state_dict, "param_groups": groups})
        for group, family in zip(self.param_groups, families):
            group["family"] = family


#: the key of a family's description in a state dict's param group
DESCRIPTION = "family_description"


def describe(family: nn.Module) -> dict:
    """What a family's optimizer state depends on: its kind, structure and parameter shapes (as strings)."""
    out = {"kind": type(family).__name__}
    for name in ("group", "in_group", "out_group", "parameterization", "transpose", "df_coordinate"):
        if hasattr(family, name):
            out[name] = repr(getattr(family, name))
    out["parameters"] = ", ".join(f"{k} {tuple(p.shape)}" for k, p in family.named_parameters())
    return out


def _check_state(state_dict, families, defaults: dict) -> None:
    """``ValueError`` unless ``state_dict`` fits the optimizer over ``families`` (see ``load_state_dict``)."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("NaturalGradient.load_state_dict expects the dict of NaturalGradient.state_dict()")
    groups = state_dict["param_groups"]
    if len(groups) != len(families):
        raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer has {len(families)} families")
    for index, (group, family) in enumerate(zip(groups, families)):
        where = f"NaturalGradient.load_state_dict, param group {index}"
        saved, here = group.get(DESCRIPTION), describe(family)
        if isinstance(saved, Mapping) and dict(saved) != here:
            diff = "; ".join(f"{k}: saved {saved.get(k)}, this family {here.get(k)}"
                             for k in list(here) + [k for k in saved if k not in here] if saved.get(k) != here.get(k))
            raise ValueError(f"{where}: the state of another family cannot be loaded ({diff}); nothing was changed")
        params = list(family.parameters())
        if len(group["params"]) != len(params):
            raise ValueError(f"{where}: {len(group['params'])} saved parameters, the family has {len(params)}")
        for key, p in zip(group["params"], params):
            _check_buffer(state_dict["state"].get(key, {}).get("momentum_buffer"), p, where)
        try:
            _check_group({**defaults, **group})
        except ValueError as err:
            raise ValueError(f"{where}: {err}; nothing was changed") from None


def _check_buffer(buffer, param: torch.Tensor, where: str) -> None:
    """``ValueError`` unless ``buffer`` is ``None`` or a finite tensor of ``param``'s shape."""
    if buffer is None:
        return
    if not isinstance(buffer, torch.Tensor) or tuple(buffer.shape) != tuple(param.shape):
        got = f"shape {tuple(buffer.shape)}" if isinstance(buffer, torch.Tensor) else type(buffer).__name__
        raise ValueError(f"{where}: a momentum buffer of {got} for a parameter of shape {tuple(param.shape)}; "
                         "nothing was changed")
    if not bool(torch.isfinite(buffer).all()):
        raise ValueError(f"{where}: a momentum buffer is non-finite; nothing was changed")


def _check_group(group: dict) -> None:
    check_hyperparameters(group["lr"], group["momentum"], group["max_step"], group.get("retraction", "h"),
                          group.get("part_lrs"))
