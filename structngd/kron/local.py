"""LocalKFAC: the inverse-free local-parameterization update of Kronecker factors (INGD / SINGD)."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import checks
from .. import groups as _groups
from ..families import KroneckerGaussian
from ..families.estimators import kronecker_factor_gradients
from ..optim.kernel import natural_gradient_step
from .base import KroneckerPreconditioner
from .capture import KronLayer

_DENSE_STORAGE = ("dense", "lower_triangular", "upper_triangular")


class LocalKFAC(KroneckerPreconditioner):
    """Inverse-free Kronecker preconditioner ``(K K^T) ⊗ (C C^T)`` with ``K``, ``C`` in groups.

    ``K`` (input side, ``d_in x d_in``) and ``C`` (output side, ``d_out x d_out``) live in the
    group ``structure`` (:func:`structngd.groups.make`); every ``update_every`` steps they take
    a natural-gradient step of the Kronecker-Gaussian VI loss with curvature ``A ⊗ G`` and
    damping ``lambda`` (MATH §6.2, Lin et al. 2024 "SINGD"):

    ``X_K = tr(C^T G C) K^T A K + lambda tr(C^T C) K^T K - d_out I``,
    ``m_K <- momentum m_K + project(X_K) / d_out``, ``K <- K h(-lr_cov m_K)``

    (and symmetrically for ``C``), where ``project`` is the group's natural-gradient map
    (half on diagonal entries and symmetric blocks). Each layer's ``K``, ``C`` are the factors
    of a :class:`~structngd.families.KroneckerGaussian` (:meth:`family`, a view over
    ``state["K"]``, ``state["C"]``): ``X_K``, ``X_C`` come from
    :func:`~structngd.families.estimators.kronecker_factor_gradients`, the family turns them
    into its factor natural gradients and :func:`~structngd.optim.natural_gradient_step` owns
    the momentum (stored as ``state["m_K"]``, ``state["m_C"]``), the trust region and the
    retraction. Only matrix products: no inverse or
    decomposition, so it runs in bfloat16. The preconditioned gradient is
    ``(C C^T) dW (K K^T)``: for dense and triangular groups ``C C^T`` and ``K K^T`` are cached
    at each update (two matrix products per layer and step), and so are the compact ones of the
    diagonal and block-diagonal groups (``group.gram``); the low-rank-like groups apply
    ``K (K^T x)`` by their O(d k) products. Sparse groups store only O(d k) numbers per factor.
    It is the family's mean natural gradient ``C C^T g K K^T`` (``loc`` part of its step).

    The factors start at ``K = C = init_scale^{1/2} I``. The fixed point with ``lambda -> 0`` is
    ``(K K^T) ⊗ (C C^T) = (A ⊗ G)^{-1}`` for dense groups.

    Args:
        structure: the group of both factors; layers too small for the group's options
            (``k >= d``, a block size above ``d``) use ``"dense"`` for that factor (listed in
            ``self.structures``). ``"block_diagonal"`` is ragged by default (a smaller last
            block where ``block_size`` does not divide the factor's size, as in SINGD).
        lr_cov: step size ``beta_1`` of the factors (SINGD's default 1e-2).
        momentum: Riemannian momentum ``alpha_1`` in ``[0, 1)`` on ``m_K``, ``m_C``.
        max_step: trust region ``lr_cov ||m||_F <= max_step`` per factor update (the step is
            shrunk, the momentum kept; the kernel's trust region on each factor part): far from
            the fixed point ``||m||`` is large and ``h(-lr_cov m)`` would overshoot (``h(x)``
            grows again for ``x < -1``); ``None``
            turns it off (SINGD's plain update).
        factor_dtype: dtype of ``K``, ``C`` and of the products (default: the layer's
            dtype, so a bfloat16 model preconditions in bfloat16).
        **group_options, damping, update_every, ...: as for the other preconditioners.
    """

    kind = "LocalKFAC"

    def __init__(
        self,
        model,
        structure: str = "dense",
        damping: float = 1e-3,
        lr_cov: float = 1e-2,
        momentum: float = 0.5,
        update_every: int = 10,
        init_scale: float = 1.0,
        max_step: Optional[float] = 1.0,
        factor_dtype: Optional[torch.dtype] = None,
        group_options: Optional[dict] = None,
        **kwargs,
    ):
        checks.positive("lr_cov", lr_cov)
        checks.positive("init_scale", init_scale)
        checks.optional_positive("max_step", max_step)
        checks.fraction("momentum", momentum)
        _groups.check_structure(structure)
        kwargs.setdefault("factor_decay", 0.0)  # the factors themselves average over steps
        super().__init__(model, damping=damping, update_every=update_every, **kwargs)
        self.structure, self.lr_cov, self.momentum = structure, float(lr_cov), float(momentum)
        self.factor_dtype, self.max_step = factor_dtype, max_step
        self.groups = {}
        self.structures = {}
        self._families = {}
        fallbacks = []
        options = dict(group_options or {})
        if structure == "block_diagonal":  # factor sizes (bias included) rarely divide b
            options.setdefault("ragged", True)
        for layer in self.layers:
            pair = []
            for side, dim in (("K", layer.in_dim), ("C", layer.out_dim)):
                try:
                    group = _groups.make(structure, dim, **options)
                except ValueError:
                    group = _groups.make("dense", dim)
                    fallbacks.append(f"{layer.name}.{side} (dim {dim})")
                pair.append(group)
            self.groups[layer.name] = tuple(pair)
            self.structures[layer.name] = tuple(g.name for g in pair)
            dtype = self._factor_dtype(layer)
            device = layer.weight.device
            state = self.state[layer.name]
            root = math.sqrt(init_scale)
            for side, group in zip("KC", pair):
                state[side] = group.from_diagonal(torch.full((group.dim,), root, dtype=dtype, device=device))
                state["m_" + side] = torch.zeros_like(state[side])
            self._cache_products(layer)
        if fallbacks:
            warnings.warn(
                f"LocalKFAC: {structure!r} does not fit these factors, which use 'dense': {', '.join(fallbacks)}",
                stacklevel=2,
            )

    def _factor_dtype(self, layer: KronLayer) -> torch.dtype:
        return self.factor_dtype or layer.weight.dtype

    def family(self, name: str) -> KroneckerGaussian:
        """The layer's :class:`~structngd.families.KroneckerGaussian` over ``K`` and ``C``: a
        factors-only view that shares the layer's state tensors (a step writes into them)."""
        state = self.state[name]
        family = self._families.get(name)
        if family is None or family.in_factor is not state["K"] or family.out_factor is not state["C"]:
            group_k, group_c = self.groups[name]
            family = KroneckerGaussian.view(group_k, group_c, state["K"], state["C"])
            self._families[name] = family
        return family

    def _refresh(self, layer: KronLayer) -> None:
        """One natural-gradient step of ``K`` and ``C`` (no inverse, no decomposition): the
        Kronecker estimator's local gradients, the family's natural gradient and the layer-3
        kernel's step (momentum, trust region per factor, ``h`` retraction)."""
        state = self.state[layer.name]
        family = self.family(layer.name)
        x_k, x_c = kronecker_factor_gradients(
            family.in_group, family.out_group, state["K"], state["C"], state["A"], state["G"], self.damping
        )
        direction = family.natural_gradient(local_gradient=(x_k, x_c))
        buffers = natural_gradient_step(
            [family],
            [{"in_factor": state["m_K"], "out_factor": state["m_C"]}],
            lr=[self.lr_cov],
            momentum=[self.momentum],
            max_step=[self.max_step],
            retraction=["h"],
            part_lrs=[None],
            directions=[direction],
            labels=[f"{self.kind} layer {layer.name!r}"],
        )[0]
        moved = direction._asdict() if buffers is None else buffers  # without momentum m is the direction
        state["m_K"], state["m_C"] = moved["in_factor"], moved["out_factor"]
        if self.factor_decay == 0:  # nothing to average into: keep only K, C and their momenta
            del state["A"], state["G"]
        self._cache_products(layer)

    def _cache_products(self, layer: KronLayer) -> None:
        """``K K^T`` / ``C C^T`` where it costs no more storage than the factor: dense for the
        O(d^2) groups, compact for groups that hold it (``group.gram``: diagonal, block-diagonal),
        so applying it is one product per side and step. The other sparse groups apply
        ``K (K^T x)`` through their O(d k) matvecs instead."""
        state = self.state[layer.name]
        for side, group in zip("KC", self.groups[layer.name]):
            if group.name in _DENSE_STORAGE:
                f = group.to_dense(state[side])
                state[side + side + "t"] = f @ f.mT
            else:
                gram = group.gram(state[side])
                if gram is not None:
                    state[side + side + "t"] = gram

    def _apply(self, layer: KronLayer, side: str, x: Tensor) -> Tensor:
        """``F F^T x`` for the rows of ``x`` (``F`` = ``K`` or ``C``)."""
        state = self.state[layer.name]
        group = self.groups[layer.name][0 if side == "K" else 1]
        if group.name in _DENSE_STORAGE:
            return x @ state[side + side + "t"]  # symmetric
        gram = state.get(side + side + "t")
        if gram is not None:
            return group.matvec(gram, x)
        x = x.contiguous()  # the C side gets dW K K^T transposed; the block products want rows
        return group.matvec(state[side], group.tmatvec(state[side], x))

    def _precondition(self, layer: KronLayer, grad: Tensor) -> Tensor:
        right = self._apply(layer, "K", grad)  # dW K K^T
        return self._apply(layer, "C", right.mT).mT  # C C^T dW K K^T

    def preconditioner_factors(self, name: str):
        """Dense ``(K K^T, C C^T)`` of a layer (for tests and diagnostics)."""
        state = self.state[name]
        out = []
        for side, group in zip("KC", self.groups[name]):
            f = group.to_dense(state[side])
            out.append(f @ f.mT)
        return tuple(out)

    def fisher_block(self, name: str) -> Tensor:
        """The inverse of the preconditioner, ``(K K^T)^{-1} ⊗ (C C^T)^{-1}`` (for tests)."""
        kk, cc = self.preconditioner_factors(name)
        return torch.kron(torch.linalg.inv(kk.double()), torch.linalg.inv(cc.double()))

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["hyperparameters"].update(lr_cov=self.lr_cov, momentum=self.momentum, max_step=self.max_step)
        return out
