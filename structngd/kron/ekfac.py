"""EKFAC (George et al. 2018): KFAC's eigenbasis with a re-fitted diagonal scaling."""

from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
from torch import Tensor

from .. import checks
from .base import KroneckerPreconditioner
from .capture import KronLayer
from .distributed import all_reduce_mean


def symmetric_eigh(matrix: Tensor, name: str):
    """``torch.linalg.eigh`` of a factor (float32 / float64 statistics); where LAPACK's solver
    does not converge (ill-conditioned or clustered spectra) it is retried in float64 with a
    warning, and non-finite statistics are a clear error."""
    if not torch.isfinite(matrix).all():
        raise ValueError(f"the Kronecker factor {name} holds non-finite values (non-finite activations?)")
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError as err:
        if matrix.dtype == torch.float64:
            raise ValueError(f"the eigendecomposition of the Kronecker factor {name} failed: {err}") from None
        warnings.warn(
            f"EKFAC: eigh of {name} did not converge in {matrix.dtype}; recomputed in float64 ({err})",
            RuntimeWarning, stacklevel=4,
        )
        values, vectors = torch.linalg.eigh(matrix.double())
        return values.to(matrix.dtype), vectors.to(matrix.dtype)


class EKFAC(KroneckerPreconditioner):
    """EKFAC: ``F ≈ U diag(s) U^T`` with ``U = U_A ⊗ U_G`` the eigenbasis of KFAC's factors.

    The eigenbases are recomputed every ``update_every`` steps (amortized); the scaling
    ``s = E[(U_G^T dW_n U_A)^2]`` is re-estimated every ``scale_every`` steps (default: every
    step, and always at a basis change; George et al.'s separate, shorter period) from the
    per-example gradients
    ``dW_n = sum_t g_{n,t} a_bar_{n,t}^T`` projected into the basis (a moving average with
    ``factor_decay``; at a basis change it restarts from KFAC's eigenvalues
    ``lambda_G lambda_A^T`` blended with the batch). Preconditioned gradient
    ``U_G [(U_G^T dW U_A) / (s + lambda)] U_A^T``. In Frobenius norm ``U diag(s*) U^T`` is never
    farther from the Fisher block than KFAC's ``A ⊗ G`` (the optimal diagonal in that basis).

    The scaling needs the per-example rows (and, with ``fisher="true"``, the sampled-label
    backward pass of :meth:`sample_fisher`) at every scaling step: ``scale_every > 1`` saves
    that work on the steps in between, which reuse the last ``s``.
    """

    kind = "EKFAC"

    def __init__(self, model, *args, scale_every: int = 1, **kwargs):
        checks.count("scale_every", scale_every)
        self.scale_every = scale_every
        super().__init__(model, *args, **kwargs)
        self._rows: Dict[str, list] = {layer.name: [] for layer in self.layers}
        self._arm_capture()

    @property
    def is_scaling_step(self) -> bool:
        """Whether the coming ``step()`` re-estimates the scaling ``s``."""
        return self.is_update_step or self.steps % self.scale_every == 0

    def _arm_capture(self) -> None:
        self.capture.arm(factors=self.is_update_step, on_rows=self._on_rows if self.is_scaling_step else None)

    # per-example statistics -------------------------------------------
    def _on_rows(self, layer: KronLayer, a_rows: Tensor, g_rows: Tensor) -> None:
        state = self.state[layer.name]
        if self.capture.factors or "U_A" not in state:  # the basis changes at this step: keep the rows
            self._rows[layer.name].append((a_rows, g_rows))
            return
        self._add_scaling(layer, self._projected_squares(state, a_rows, g_rows), a_rows.shape[0])

    def _projected_squares(self, state, a_rows: Tensor, g_rows: Tensor) -> Tensor:
        """``sum_n (U_G^T dW_n U_A)^2`` for one micro-batch."""
        dtype = state["U_A"].dtype
        pa = a_rows.to(dtype) @ state["U_A"]  # (N, T, d_in)
        pg = g_rows.to(dtype) @ state["U_G"]  # (N, T, d_out)
        if pa.shape[1] == 1:
            return pg[:, 0].pow(2).mT @ pa[:, 0].pow(2)
        per_example = torch.einsum("nto,nti->noi", pg, pa)
        return per_example.pow(2).sum(0)

    def _add_scaling(self, layer: KronLayer, squares: Tensor, count: int) -> None:
        acc = self.state[layer.name]
        acc["_s_sum"] = squares if "_s_sum" not in acc else acc["_s_sum"] + squares
        acc["_s_count"] = torch.tensor(count) if "_s_count" not in acc else acc["_s_count"] + count

    def _take_scaling(self, layer: KronLayer) -> Optional[Tensor]:
        state = self.state[layer.name]
        total, count = state.pop("_s_sum", None), state.pop("_s_count", None)
        if total is None:
            return None
        return all_reduce_mean(total / count)

    # basis and scaling ---------------------------------------------------
    _broadcast_keys = {"U_A": ("A",), "U_G": ("G",), "lam_A": ("A", 0), "lam_G": ("G", 0)}

    def _refresh(self, layer: KronLayer) -> None:
        state = self.state[layer.name]
        state["lam_A"], state["U_A"] = symmetric_eigh(state["A"], f"{layer.name}.A")
        state["lam_G"], state["U_G"] = symmetric_eigh(state["G"], f"{layer.name}.G")

    def _after_refresh(self, layer: KronLayer) -> None:
        """Rescale in the new basis: the step's per-example squares, blended with KFAC's
        eigenvalues ``lambda_G lambda_A^T = diag(U^T (A ⊗ G) U)``."""
        state = self.state[layer.name]
        prior = torch.outer(state["lam_G"].clamp_min(0), state["lam_A"].clamp_min(0))
        for a_rows, g_rows in self._rows[layer.name]:
            self._add_scaling(layer, self._projected_squares(state, a_rows, g_rows), a_rows.shape[0])
        self._rows[layer.name] = []
        s_batch = self._take_scaling(layer)
        if s_batch is None:
            state["s"] = prior
        elif "s" not in state:
            state["s"] = s_batch
        else:
            state["s"] = self.factor_decay * prior + (1 - self.factor_decay) * s_batch

    def _between_updates(self) -> None:
        for layer in self.layers:
            s_batch = self._take_scaling(layer)
            if s_batch is not None:
                state = self.state[layer.name]
                state["s"].mul_(self.factor_decay).add_(s_batch, alpha=1 - self.factor_decay)

    def _precondition(self, layer: KronLayer, grad: Tensor) -> Tensor:
        state = self.state[layer.name]
        u_a, u_g = state["U_A"], state["U_G"]
        projected = u_g.mT @ grad @ u_a
        return u_g @ (projected / (state["s"] + self.damping)) @ u_a.mT

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["hyperparameters"]["scale_every"] = self.scale_every
        return out

    def fisher_block(self, name: str) -> Tensor:
        state = self.state[name]
        basis = torch.kron(state["U_A"], state["U_G"])
        return basis @ torch.diag(state["s"].mT.reshape(-1)) @ basis.mT
