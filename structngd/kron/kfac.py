"""KFAC (Martens & Grosse 2015; KFC for Conv2d, Grosse & Martens 2016)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import KroneckerPreconditioner, damped_inverse, pi_split
from .capture import KronLayer


class KFAC(KroneckerPreconditioner):
    """KFAC: ``F ≈ A ⊗ G`` per layer, preconditioned gradient ``G_d^{-1} dW A_d^{-1}``.

    Factored Tikhonov damping: ``A_d = A + pi sqrt(lambda) I``, ``G_d = G + sqrt(lambda) / pi I``
    with ``pi = sqrt((tr A / d_in) / (tr G / d_out))``. The two inverses are recomputed every
    ``update_every`` steps and cached, so applying the preconditioner costs two matrix
    products per layer. See :class:`~structngd.kron.base.KroneckerPreconditioner` for the
    shared arguments.
    """

    kind = "KFAC"
    _broadcast_keys = {"A_inv": ("A",), "G_inv": ("G",)}

    def _refresh(self, layer: KronLayer) -> None:
        state = self.state[layer.name]
        pi = pi_split(state["A"], state["G"])
        root = math.sqrt(self.damping)
        state["A_inv"] = damped_inverse(state["A"], pi * root)
        state["G_inv"] = damped_inverse(state["G"], root / pi)

    def _precondition(self, layer: KronLayer, grad: Tensor) -> Tensor:
        state = self.state[layer.name]
        return state["G_inv"] @ grad @ state["A_inv"]

    def fisher_block(self, name: str) -> Tensor:
        state = self.state[name]
        return torch.kron(state["A"], state["G"])
