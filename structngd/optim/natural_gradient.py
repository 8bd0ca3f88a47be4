"""Layer 3: the optimizer that applies any family's local-parameterization step."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer


def _is_family(obj) -> bool:
    return isinstance(obj, nn.Module) and callable(getattr(obj, "natural_gradient", None)) and callable(
        getattr(obj, "retract", None)
    )


class NaturalGradient(Optimizer):
    """Structured natural-gradient descent on families (``Gaussian``, ``Wishart``, ...).

    Each parameter group holds one family: its parameters and, under the key
    ``"family"``, the family itself. ``step()`` reads the families' Euclidean
    gradients, forms each natural gradient in local coordinates (Fisher = identity up
    to constant weights) and retracts ``tau <- phi_tau(eta0 - lr * step)``.

    With ``momentum > 0`` the local natural gradients are averaged,
    ``m <- momentum * m + nat``, and the step uses ``m`` (Riemannian momentum in the
    re-centred coordinates, as in SINGD).

    Args:
        families: a family, an iterable of families, or dicts ``{"family": f, "lr": ...}``.
        lr: learning rate ``beta`` (``beta = 1`` is the full natural-gradient step).
        momentum: momentum factor in ``[0, 1)``.
        max_step: optional trust region in the local coordinates: a step with
            ``lr * ||M||_F > max_step`` is shrunk (``delta`` and ``M`` alike) to that size.
            ``||M||_F`` bounds the spectral norm, so ``max_step <= 1`` keeps every
            eigenvalue of ``lr * M`` where ``h`` is monotone. Off by default (the exact
            method); useful far from the optimum, where ``h(-lr M)`` overshoots
            (``h(m) >= 1/2`` grows again for ``m < -1``).

    Example::

        q = Gaussian(d, structure="lower_triangular")
        opt = NaturalGradient(q, lr=0.1)
        for _ in range(100):
            opt.zero_grad()
            q.estimate_gradients(target.log_prob, num_samples=8)
            opt.step()
    """

    def __init__(
        self,
        families: Union[nn.Module, Iterable],
        lr: float = 0.1,
        momentum: float = 0.0,
        max_step: Optional[float] = None,
    ):
        check_hyperparameters(lr, momentum, max_step)
        if _is_family(families):
            families = [families]
        groups = []
        for entry in families:
            entry = dict(entry) if isinstance(entry, dict) else {"family": entry}
            groups.append(self._as_param_group(entry))
        if not groups:
            raise ValueError("NaturalGradient got an empty list of families")
        super().__init__(groups, dict(lr=lr, momentum=momentum, max_step=max_step))

    @staticmethod
    def _as_param_group(entry: dict) -> dict:
        family = entry.get("family")
        if not _is_family(family):
            raise TypeError(
                f"NaturalGradient optimizes families (nn.Modules with natural_gradient() and retract()), "
                f"got {type(family).__name__}"
            )
        if "params" in entry and list(entry["params"]) != list(family.parameters()):
            raise ValueError("a family's param group must hold exactly family.parameters()")
        entry["params"] = list(family.parameters())
        return entry

    def add_param_group(self, param_group: dict) -> None:
        if "family" in param_group:
            param_group = self._as_param_group(dict(param_group))
        full = {**self.defaults, **param_group}  # validate before the group is added
        check_hyperparameters(full["lr"], full["momentum"], full["max_step"])
        super().add_param_group(param_group)

    # -------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """One natural-gradient step for every family; returns the closure's loss.

        All natural gradients are formed before any parameter moves, so a family with
        missing or non-finite gradients raises ``ValueError`` and nothing changes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps = []
        for index, group in enumerate(self.param_groups):
            check_hyperparameters(group["lr"], group["momentum"], group["max_step"])
            try:
                nat = group["family"].natural_gradient()
            except ValueError as err:
                raise ValueError(f"NaturalGradient param group {index}: {err}") from None
            if not all(torch.isfinite(t).all() for t in nat):
                raise ValueError(
                    f"NaturalGradient param group {index}: the natural gradient is non-finite "
                    f"(singular factor?); no parameter was changed"
                )
            steps.append(nat)
        for group, nat in zip(self.param_groups, steps):
            if group["momentum"] > 0:
                nat = self._momentum(group, nat)
            group["family"].retract(nat, group["lr"] * _trust_region_scale(group, nat[-1]))
        return loss

    def _momentum(self, group: dict, nat):
        out = []
        for p, direction in zip(group["params"], nat):
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = direction.clone()
            else:
                buf.mul_(group["momentum"]).add_(direction)
            out.append(buf)
        return tuple(out)

    # -------------------------------------------------------- state dicts
    def state_dict(self):
        """Like ``torch.optim.Optimizer.state_dict`` without the family objects."""
        state = super().state_dict()
        for group in state["param_groups"]:
            group.pop("family", None)
        return state

    def load_state_dict(self, state_dict) -> None:
        families = [group["family"] for group in self.param_groups]
        if len(state_dict["param_groups"]) != len(families):
            raise ValueError(
                f"state_dict has {len(state_dict['param_groups'])} param groups, "
                f"this optimizer has {len(families)} families"
            )
        super().load_state_dict(state_dict)
        for group, family in zip(self.param_groups, families):
            group["family"] = family


def _trust_region_scale(group: dict, m: torch.Tensor) -> float:
    """Factor ``<= 1`` that keeps ``lr * ||M||_F <= max_step``."""
    if group["max_step"] is None or group["lr"] == 0:
        return 1.0
    size = group["lr"] * float(torch.linalg.vector_norm(m))
    return min(1.0, group["max_step"] / size) if size > 0 else 1.0


def check_hyperparameters(lr, momentum, max_step=None) -> None:
    if not (isinstance(lr, (int, float)) and lr >= 0 and lr == lr and lr != float("inf")):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if max_step is not None and not (isinstance(max_step, (int, float)) and 0 < max_step < float("inf")):
        raise ValueError(f"max_step must be None or a finite number > 0, got {max_step!r}")
