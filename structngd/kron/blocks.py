"""A layer's curvature block: the tensors a preconditioner keeps for one layer, and what it does with them.

The preconditioner passes its hyperparameters (a dict) at every call, so a change takes effect at once.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from .capture import KronLayer


class CurvatureBlock:
    """One layer's curvature approximation; its tensors live in ``state`` (saved by ``state_dict``)."""

    #: cache entries a rank broadcasts after refreshing its layers, each with the state entry
    #: whose shape it has (a 1-tuple: same shape; a 2-tuple: the shape of one row of it)
    broadcast_keys: Dict[str, tuple] = {}

    def __init__(self, layer: KronLayer, dtype: torch.dtype):
        self.layer, self.dtype, self.device = layer, dtype, layer.weight.device
        self.state: Dict[str, Tensor] = {}

    def move(self, dtype: torch.dtype, device: torch.device) -> None:
        """Follow the layer to another dtype and device."""
        self.dtype, self.device = dtype, device
        self.state = {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in self.state.items()}

    def signature(self) -> str:
        """What a saved state must match to load into this block."""
        return f"{type(self.layer.module).__name__} {self.layer.in_dim} -> {self.layer.out_dim}"

    def update_statistics(self, a_batch: Tensor, g_batch: Tensor, decay: float) -> None:
        """``X <- decay X + (1 - decay) X_batch`` for ``X = A, G`` (the first batch initializes them)."""
        state = self.state
        a_batch, g_batch = a_batch.to(self.dtype), g_batch.to(self.dtype)
        if "A" not in state:
            state["A"], state["G"] = a_batch.clone(), g_batch.clone()
        else:  # new tensors, so that snapshot() stays valid
            state["A"] = torch.add(state["A"] * decay, a_batch, alpha=1 - decay)
            state["G"] = torch.add(state["G"] * decay, g_batch, alpha=1 - decay)

    def snapshot(self, refreshing: bool):
        """What :meth:`restore` needs to undo the coming step (``refreshing``: a statistics step); a
        shallow copy, since blocks replace their tensors rather than write into them."""
        return dict(self.state)

    def restore(self, snapshot) -> None:
        """Put back the state of :meth:`snapshot` (a step that raised)."""
        self.state.clear()
        self.state.update(snapshot)

    def refresh(self, hp: dict) -> None:
        """Recompute what the block caches from ``state["A"]``, ``state["G"]`` (a statistics step)."""
        raise NotImplementedError

    def after_refresh(self, hp: dict) -> None:
        """Work every rank does once all blocks are refreshed (collectives allowed)."""

    def between_updates(self, hp: dict) -> None:
        """Work of a step without new statistics."""

    def discard_batch(self) -> None:
        """Forget what the block took from the current batch's hooks (the batch is dropped)."""

    def precondition(self, grad: Tensor, hp: dict) -> Tensor:
        """The preconditioned ``(d_out, d_in)`` gradient."""
        raise NotImplementedError

    def fisher(self) -> Tensor:
        """The undamped Fisher approximation, dense over column-major ``vec(W)`` (small layers)."""
        raise NotImplementedError
