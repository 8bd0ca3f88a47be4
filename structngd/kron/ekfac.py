"""EKFAC (George et al. 2018): KFAC's eigenbasis with a re-fitted diagonal scaling."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import checks
from .blocks import CurvatureBlock
from .capture import KronLayer
from .distributed import all_reduce_mean
from .preconditioner import KroneckerPreconditioner


def symmetric_eigh(matrix: Tensor, name: str):
    """``torch.linalg.eigh`` of a statistic, retried in float64 (with a warning) where LAPACK does not converge."""
    if not torch.isfinite(matrix).all():
        raise ValueError(f"the Kronecker factor {name} holds non-finite values (non-finite activations?)")
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError as err:
        if matrix.dtype == torch.float64:
            raise ValueError(f"the eigendecomposition of the Kronecker factor {name} failed: {err}") from None
        warnings.warn(f"EKFAC: eigh of {name} did not converge in {matrix.dtype}; recomputed in float64 ({err})",
                      RuntimeWarning, stacklevel=4)
        values, vectors = torch.linalg.eigh(matrix.double())
        return values.to(matrix.dtype), vectors.to(matrix.dtype)


class EKFACBlock(CurvatureBlock):
    """KFAC's eigenbasis ``U_A``, ``U_G`` (refreshed with the statistics) and the scaling ``s``
    re-fitted from per-example gradients (:meth:`add_rows`)."""

    broadcast_keys = {"U_A": ("A",), "U_G": ("G",), "lam_A": ("A", 0), "lam_G": ("G", 0)}

    def __init__(self, layer: KronLayer, dtype: torch.dtype):
        super().__init__(layer, dtype)
        self.rows: list = []  # the rows of a step whose basis is still to come
        self.scaling: Optional[tuple] = None  # (sum of squares, examples) of the current batch

    def add_rows(self, a_rows: Tensor, g_rows: Tensor, basis_changes: bool) -> None:
        """Take one micro-batch's rows into the scaling (kept until the new basis exists at a basis change)."""
        if basis_changes or "U_A" not in self.state:
            self.rows.append((a_rows, g_rows))
        else:
            self._add_scaling(a_rows, g_rows)

    def _add_scaling(self, a_rows: Tensor, g_rows: Tensor) -> None:
        """Accumulate ``sum_n (U_G^T dW_n U_A)^2`` of one micro-batch and its example count."""
        state = self.state
        pa = a_rows.to(self.dtype) @ state["U_A"]  # (N, T, d_in)
        pg = g_rows.to(self.dtype) @ state["U_G"]  # (N, T, d_out)
        if pa.shape[1] == 1:
            squares = pg[:, 0].pow(2).mT @ pa[:, 0].pow(2)
        else:
            squares = torch.einsum("nto,nti->noi", pg, pa).pow(2).sum(0)
        total, count = self.scaling or (0, 0)
        self.scaling = (squares + total, count + a_rows.shape[0])

    def _take_scaling(self) -> Optional[Tensor]:
        scaling, self.scaling = self.scaling, None
        if scaling is None:
            return None
        if not torch.isfinite(scaling[0].sum()):
            raise ValueError(f"EKFAC: the scaling of layer {self.layer.name!r} is non-finite (activations or output "
                             f"gradients overflow {self.dtype}); nothing was changed")
        return all_reduce_mean(scaling[0] / scaling[1])

    def discard_batch(self) -> None:
        self.rows, self.scaling = [], None

    def snapshot(self, refreshing: bool) -> tuple:
        return super().snapshot(refreshing), list(self.rows), self.scaling

    def restore(self, snapshot: tuple) -> None:
        state, self.rows, self.scaling = snapshot
        super().restore(state)

    def refresh(self, hp: dict) -> None:
        state, name = self.state, self.layer.name
        state["lam_A"], state["U_A"] = symmetric_eigh(state["A"], f"{name}.A")
        state["lam_G"], state["U_G"] = symmetric_eigh(state["G"], f"{name}.G")

    def after_refresh(self, hp: dict) -> None:
        """Rescale in the new basis: the step's per-example squares, blended with KFAC's
        eigenvalues ``lambda_G lambda_A^T = diag(U^T (A ⊗ G) U)``."""
        state = self.state
        prior = torch.outer(state["lam_G"].clamp_min(0), state["lam_A"].clamp_min(0))
        for a_rows, g_rows in self.rows:
            self._add_scaling(a_rows, g_rows)
        self.rows = []
        s_batch = self._take_scaling()
        if s_batch is None:
            state["s"] = prior
        elif "s" not in state:
            state["s"] = s_batch
        else:
            state["s"] = hp["factor_decay"] * prior + (1 - hp["factor_decay"]) * s_batch

    def between_updates(self, hp: dict) -> None:
        s_batch = self._take_scaling()
        if s_batch is not None:
            self.state["s"] = torch.add(self.state["s"] * hp["factor_decay"], s_batch, alpha=1 - hp["factor_decay"])

    def precondition(self, grad: Tensor, hp: dict) -> Tensor:
        u_a, u_g = self.state["U_A"], self.state["U_G"]
        projected = u_g.mT @ grad @ u_a
        return u_g @ (projected / (self.state["s"] + hp["damping"])) @ u_a.mT

    def fisher(self) -> Tensor:
        basis = torch.kron(self.state["U_A"], self.state["U_G"])
        return basis @ torch.diag(self.state["s"].mT.reshape(-1)) @ basis.mT


class EKFAC(KroneckerPreconditioner):
    """EKFAC: ``F ≈ U diag(s) U^T`` with ``U = U_A ⊗ U_G`` the eigenbasis of KFAC's statistics.

    The eigenbases are recomputed every ``update_every`` steps; the scaling
    ``s = E[(U_G^T dW_n U_A)^2]`` of the per-example gradients ``dW_n = sum_t g_{n,t} a_bar_{n,t}^T``
    every ``scale_every`` steps and at each basis change (a moving average with ``factor_decay``,
    restarted at a basis change from KFAC's eigenvalues ``lambda_G lambda_A^T``). Preconditioned
    gradient ``U_G [(U_G^T dW U_A) / (s + lambda)] U_A^T``. Steps between scaling steps need no
    per-example rows (nor, with ``fisher="true"``, :meth:`sample_fisher`).
    """

    kind = "EKFAC"

    def __init__(self, model, *args, scale_every: int = 1, **kwargs):
        self.scale_every = checks.count("scale_every", scale_every)
        super().__init__(model, *args, **kwargs)

    def _make_block(self, layer: KronLayer) -> EKFACBlock:
        return EKFACBlock(layer, self.block_dtype(layer))

    @property
    def is_scaling_step(self) -> bool:
        """Whether the coming ``step()`` re-estimates the scaling ``s``."""
        return self.is_update_step or self.steps % self.scale_every == 0

    def _row_consumer(self):
        return self._on_rows if self.is_scaling_step else None

    def _on_rows(self, layer: KronLayer, a_rows: Tensor, g_rows: Tensor) -> None:
        self.blocks[layer.name].add_rows(a_rows, g_rows, basis_changes=self.capture.statistics)

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "scale_every": self.scale_every}
