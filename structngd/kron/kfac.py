"""KFAC (Martens & Grosse 2015; KFC for Conv2d, Grosse & Martens 2016)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .blocks import CurvatureBlock
from .capture import KronLayer
from .preconditioner import KroneckerPreconditioner


class KFACBlock(CurvatureBlock):
    """``F ≈ A ⊗ G`` with the damped inverses ``A_d^{-1}``, ``G_d^{-1}`` cached at each refresh."""

    broadcast_keys = {"A_inv": ("A",), "G_inv": ("G",)}

    def refresh(self, hp: dict) -> None:
        state = self.state
        pi = pi_split(state["A"], state["G"])
        root = math.sqrt(hp["damping"])
        state["A_inv"] = damped_inverse(state["A"], pi * root)
        state["G_inv"] = damped_inverse(state["G"], root / pi)

    def precondition(self, grad: Tensor, hp: dict) -> Tensor:
        return self.state["G_inv"] @ grad @ self.state["A_inv"]

    def fisher(self) -> Tensor:
        return torch.kron(self.state["A"], self.state["G"])


class KFAC(KroneckerPreconditioner):
    """KFAC: ``F ≈ A ⊗ G`` per layer, preconditioned gradient ``G_d^{-1} dW A_d^{-1}``.

    Factored Tikhonov damping: ``A_d = A + pi sqrt(lambda) I``, ``G_d = G + sqrt(lambda) / pi I``
    with ``pi = sqrt((tr A / d_in) / (tr G / d_out))``; the inverses are cached every ``update_every``
    steps. Arguments: :class:`~structngd.kron.preconditioner.KroneckerPreconditioner`.
    """

    kind = "KFAC"

    def _make_block(self, layer: KronLayer) -> KFACBlock:
        return KFACBlock(layer, self.block_dtype(layer))


def damped_inverse(matrix: Tensor, damping: float) -> Tensor:
    """``(X + damping I)^{-1}`` of an SPD matrix by Cholesky; on the CPU sizes that are multiples of 128
    are padded to ``diag(X + damping I, 1)``, avoiding LAPACK's cache aliasing (up to 2x faster)."""
    d = matrix.shape[-1]
    pad = matrix.device.type == "cpu" and d % 128 == 0
    if pad:
        work = matrix.new_zeros(d + 1, d + 1)
        work[:d, :d] = matrix
        work[d, d] = 1.0
    else:
        work = matrix.clone()
    work.diagonal()[:d].add_(damping)
    chol, info = torch.linalg.cholesky_ex(work)
    if info != 0:
        raise ValueError("a damped Kronecker factor is not positive-definite (non-finite statistics?)")
    inverse = torch.cholesky_inverse(chol)
    return inverse[:d, :d].contiguous() if pad else inverse


def pi_split(a: Tensor, g: Tensor) -> float:
    """Martens & Grosse's ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (1 if degenerate)."""
    ta, tg = float(a.diagonal().mean()), float(g.diagonal().mean())
    return math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
