"""KFAC (Martens & Grosse 2015; KFC for Conv2d, Grosse & Martens 2016)."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import checks
from . import tridiagonal
from .blocks import CurvatureBlock
from .capture import KronLayer
from .distributed import all_reduce_statistics
from .preconditioner import KroneckerPreconditioner

INVERSES = ("block_diagonal", "block_tridiagonal")


class KFACBlock(CurvatureBlock):
    """``F ≈ A ⊗ G`` with the damped inverses ``A_d^{-1}``, ``G_d^{-1}`` cached at each refresh."""

    broadcast_keys = {"A_inv": ("A",), "G_inv": ("G",)}

    def refresh(self, hp: dict) -> None:
        state = self.state
        damping_a, damping_g = factor_dampings(state["A"], state["G"], hp["damping"])
        state["A_inv"] = damped_inverse(state["A"], damping_a)
        state["G_inv"] = damped_inverse(state["G"], damping_g)

    def precondition(self, grad: Tensor, hp: dict) -> Tensor:
        return self.state["G_inv"] @ grad @ self.state["A_inv"]

    def fisher(self) -> Tensor:
        return torch.kron(self.state["A"], self.state["G"])


class TridiagonalKFACBlock(KFACBlock):
    """A layer ``i`` of KFAC's block-tridiagonal chain (:mod:`structngd.kron.tridiagonal`).

    Besides :class:`KFACBlock`'s ``A``, ``G`` and damped inverses (the next link's ``A_{i+1}^{-1}``,
    ``G_{i+1}^{-1}``; ``Sigma_L^{-1}`` for the last layer), a layer with a ``following`` one keeps the
    cross-moments ``A_next = A_{i,i+1}``, ``G_next = G_{i,i+1}`` and its link's factors. The chain couples
    the layers, so :class:`KFAC` applies it; :meth:`precondition` alone passes the gradient through.
    """

    def __init__(self, layer: KronLayer, dtype: torch.dtype, following: Optional[KronLayer]):
        super().__init__(layer, dtype)
        self.following = following

    def signature(self) -> str:
        nxt = self.following
        link = "last" if nxt is None else f"linked to {nxt.name!r} ({nxt.in_dim} -> {nxt.out_dim})"
        return f"{super().signature()}, block-tridiagonal, {link}"

    def update_cross(self, a_batch: Tensor, g_batch: Tensor, decay: float) -> None:
        """``A_next``, ``G_next`` into their moving averages, as ``A``, ``G`` (the first batch initializes them)."""
        for key, batch in (("A_next", a_batch), ("G_next", g_batch)):
            batch = batch.to(self.dtype)
            old = self.state.get(key)
            self.state[key] = batch.clone() if old is None else torch.add(old * decay, batch, alpha=1 - decay)

    def refresh_link(self, following: "TridiagonalKFACBlock", hp: dict) -> None:
        """The link to ``following`` (already refreshed) from the damped ``A_i``, ``G_i`` (as :class:`KFACBlock`'s)."""
        state, nxt = self.state, following.state
        damping_a, damping_g = factor_dampings(state["A"], state["G"], hp["damping"])
        link = tridiagonal.link(damped(state["A"], damping_a), damped(state["G"], damping_g), state["A_next"],
                                state["G_next"], nxt["A_inv"].to(state["A"]), nxt["G_inv"].to(state["G"]))
        state.update(link._asdict())

    def link(self) -> tridiagonal.Link:
        return tridiagonal.Link(*(self.state[key] for key in tridiagonal.Link._fields))

    def precondition(self, grad: Tensor, hp: dict) -> Tensor:
        return grad


class KFAC(KroneckerPreconditioner):
    """KFAC: ``F ≈ A ⊗ G`` per layer, preconditioned gradient ``G_d^{-1} dW A_d^{-1}``.

    Factored Tikhonov damping: ``A_d = A + pi sqrt(lambda) I``, ``G_d = G + sqrt(lambda) / pi I``
    with ``pi = sqrt((tr A / d_in) / (tr G / d_out))``; the inverses are cached every ``update_every``
    steps. Arguments: :class:`~structngd.kron.preconditioner.KroneckerPreconditioner`, and

    Args:
        inverse: ``"block_diagonal"`` (the default, above) or ``"block_tridiagonal"``: the supported
            layers in model order form a chain, and the preconditioner is the paper's block-tridiagonal
            ``F_hat^{-1} = Xi^T Lambda Xi`` (:mod:`structngd.kron.tridiagonal`) built from ``A_d``, ``G_d`` and
            the cross-moments ``A_{i,i+1}``, ``G_{i,i+1}`` of consecutive layers (moving averages like ``A``,
            ``G``). Consecutive layers must see the same rows per call (examples, and positions or output
            locations per example), else the first step raises ``ValueError``.
    """

    kind = "KFAC"

    def __init__(self, model, *args, inverse: str = "block_diagonal", **kwargs):
        checks.one_of("inverse", inverse, INVERSES)
        self.inverse = inverse
        self._rows: Dict[str, list] = {}
        super().__init__(model, *args, **kwargs)

    @property
    def _tridiagonal(self) -> bool:
        return self.inverse == "block_tridiagonal"

    def _make_block(self, layer: KronLayer) -> KFACBlock:
        if not self._tridiagonal:
            return KFACBlock(layer, self.block_dtype(layer))
        index = next(i for i, other in enumerate(self.layers) if other is layer)
        following = self.layers[index + 1] if index + 1 < len(self.layers) else None
        return TridiagonalKFACBlock(layer, self.block_dtype(layer), following)

    # ------------------------------------------------------ block-tridiagonal
    def _row_consumer(self):
        return self._on_rows if self._tridiagonal and self.is_update_step else None

    def _on_rows(self, layer: KronLayer, a_rows: Tensor, g_rows: Tensor) -> None:
        self._rows.setdefault(layer.name, []).append((a_rows, g_rows))

    def _discard_batch(self) -> None:
        super()._discard_batch()
        self._rows = {}

    def _cross_batch(self) -> Dict[str, Tuple[Tensor, Tensor]]:
        """This step's ``(A_{i,i+1}, G_{i,i+1})`` by layer ``i``'s name, the k-th call of each layer paired with
        the k-th call of the next: ``E_n[sum_t a_i a_{i+1}^T]``, ``E_n[(1/T) sum_t g_i g_{i+1}^T]``."""
        batch = {}
        for first, second in zip(self.layers, self.layers[1:]):
            calls = self._rows.get(first.name, []), self._rows.get(second.name, [])
            shapes = [[tuple(a.shape[:2]) for a, _ in layer_calls] for layer_calls in calls]
            if not all(shapes):
                raise RuntimeError(f"no statistics were captured for layer {(second if shapes[0] else first).name!r} "
                                   "in this step: run the forward and backward passes in training mode first")
            if shapes[0] != shapes[1]:
                raise ValueError(f"KFAC(inverse='block_tridiagonal') needs consecutive layers with the same rows per "
                                 f"call: layer {first.name!r} had (examples, rows per example) {shapes[0]}, layer "
                                 f"{second.name!r} {shapes[1]}; nothing was changed")
            pairs = list(zip(*calls))
            a = sum(torch.einsum("nti,ntj->ij", a1, a2.to(a1)) for (a1, _), (a2, _) in pairs)
            g = sum(torch.einsum("nti,ntj->ij", g1, g2.to(g1)) / g1.shape[1] for (_, g1), (_, g2) in pairs)
            examples = sum(n for n, _ in shapes[0])
            batch[first.name] = (a / examples, g / examples)
        batch = all_reduce_statistics(batch)
        for name, (a, g) in batch.items():
            if not torch.isfinite(a.sum() + g.sum()):
                raise ValueError(f"KFAC: the cross-moments of layer {name!r} and the next are non-finite; nothing "
                                 "was changed")
        return batch

    def _update_and_precondition(self, grads: Dict[str, Tensor], hp: dict) -> Dict[str, Tensor]:
        """Block-diagonal: the blocks' own work. Block-tridiagonal: the cross-moments and links join the
        statistics update and refresh, and the chain ``Xi^T Lambda Xi`` preconditions all layers at once."""
        if not self._tridiagonal:
            return super()._update_and_precondition(grads, hp)
        statistics, blocks = self.capture.statistics, list(self.blocks.values())
        if statistics:
            for name, (a, g) in self._cross_batch().items():
                self.blocks[name].update_cross(a, g, hp["factor_decay"])
        passed = super()._update_and_precondition(grads, hp)  # the blocks pass the gradients through
        if statistics:
            for block, following in zip(blocks, blocks[1:]):
                block.refresh_link(following, hp)
        last = blocks[-1].state
        out = tridiagonal.inverse_apply([block.link() for block in blocks[:-1]], last["A_inv"], last["G_inv"],
                                        [passed[name] for name in self.blocks])
        preconditioned = dict(zip(self.blocks, out))
        for name, p in preconditioned.items():
            if not torch.isfinite(p.sum()):
                raise ValueError(f"KFAC: the block-tridiagonal preconditioned gradient of layer {name!r} is "
                                 "non-finite (overflowing statistics, or damping too small); nothing was changed")
        return preconditioned


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


def damped(matrix: Tensor, damping: float) -> Tensor:
    """``X + damping I`` (a new tensor)."""
    out = matrix.clone()
    out.diagonal().add_(damping)
    return out


def pi_split(a: Tensor, g: Tensor) -> float:
    """Martens & Grosse's ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (1 if degenerate)."""
    ta, tg = float(a.diagonal().mean()), float(g.diagonal().mean())
    return math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0


def factor_dampings(a: Tensor, g: Tensor, damping: float) -> Tuple[float, float]:
    """The factored Tikhonov terms ``(pi sqrt(lambda), sqrt(lambda) / pi)`` added to ``A`` and ``G``."""
    pi, root = pi_split(a, g), math.sqrt(damping)
    return pi * root, root / pi
