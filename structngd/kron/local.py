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
from .blocks import CurvatureBlock
from .capture import KronLayer
from .preconditioner import KroneckerPreconditioner

_DENSE_STORAGE = ("dense", "lower_triangular", "upper_triangular")


class LocalKFACBlock(CurvatureBlock):
    """A layer's factors ``K``, ``C``, their momenta and cached ``K K^T``, ``C C^T``; a refresh is one
    natural-gradient step of its family."""

    def __init__(self, layer: KronLayer, in_group, out_group, dtype: torch.dtype, init_scale: float):
        super().__init__(layer, dtype)
        self.in_group, self.out_group = in_group, out_group
        root = math.sqrt(init_scale)
        for side, group in (("K", in_group), ("C", out_group)):
            diagonal = torch.full((group.dim,), root, dtype=dtype, device=layer.weight.device)
            self.state[side] = group.from_diagonal(diagonal)
            self.state["m_" + side] = torch.zeros_like(self.state[side])
        self._family = None
        self._cache_products()

    def sides(self):
        return (("K", self.in_group), ("C", self.out_group))

    def signature(self) -> str:
        return f"{super().signature()}, K in {self.in_group!r}, C in {self.out_group!r}"

    @property
    def family(self) -> KroneckerGaussian:
        """The factors-only :class:`~structngd.families.KroneckerGaussian` view of ``K``, ``C`` (shares the tensors)."""
        state, family = self.state, self._family
        if family is None or family.in_factor is not state["K"] or family.out_factor is not state["C"]:
            family = self._family = KroneckerGaussian.view(self.in_group, self.out_group, state["K"], state["C"])
        return family

    def snapshot(self, refreshing: bool) -> dict:
        """The kernel writes ``K`` and ``C`` in place: a refresh keeps copies of them."""
        saved = dict(self.state)
        if refreshing:
            saved["K"], saved["C"] = saved["K"].clone(), saved["C"].clone()
        return saved

    def refresh(self, hp: dict) -> None:
        """One natural-gradient step of ``K`` and ``C``: the Kronecker estimator, the family's natural
        gradient and the kernel's step (momentum, trust region per factor, ``h``)."""
        state, family = self.state, self.family
        x_k, x_c = kronecker_factor_gradients(
            self.in_group, self.out_group, state["K"], state["C"], state["A"], state["G"], hp["damping"]
        )
        direction = family.natural_gradient(local_gradient=(x_k, x_c))
        buffers = natural_gradient_step(
            [family], [{"in_factor": state["m_K"], "out_factor": state["m_C"]}], lr=[hp["lr_cov"]],
            momentum=[hp["momentum"]], max_step=[hp["max_step"]], retraction=["h"], part_lrs=[None],
            directions=[direction], labels=[f"LocalKFAC layer {self.layer.name!r}"],
        )[0]
        moved = direction._asdict() if buffers is None else buffers  # without momentum m is the direction
        state["m_K"], state["m_C"] = moved["in_factor"], moved["out_factor"]
        if hp["factor_decay"] == 0:  # nothing to average into: keep only K, C and their momenta
            del state["A"], state["G"]
        self._cache_products()

    def _cache_products(self) -> None:
        """Cache ``K K^T`` / ``C C^T`` where it needs no more storage than the factor (dense groups, and
        ``group.gram``'s compact form); other sparse groups apply ``K (K^T x)`` by O(d k) matvecs."""
        state = self.state
        for side, group in self.sides():
            if group.name in _DENSE_STORAGE:
                f = group.to_dense(state[side])
                state[side + side + "t"] = f @ f.mT
            else:
                gram = group.gram(state[side])
                if gram is not None:
                    state[side + side + "t"] = gram

    def _apply(self, side: str, group, x: Tensor) -> Tensor:
        """``F F^T x`` for the rows of ``x`` (``F`` = ``K`` or ``C``)."""
        state = self.state
        if group.name in _DENSE_STORAGE:
            return x @ state[side + side + "t"]  # symmetric
        gram = state.get(side + side + "t")
        if gram is not None:
            return group.matvec(gram, x)
        x = x.contiguous()  # the C side gets dW K K^T transposed; the block products want rows
        return group.matvec(state[side], group.tmatvec(state[side], x))

    def precondition(self, grad: Tensor, hp: dict) -> Tensor:
        right = self._apply("K", self.in_group, grad)  # dW K K^T
        return self._apply("C", self.out_group, right.mT).mT  # C C^T dW K K^T

    def preconditioner_factors(self):
        """Dense ``(K K^T, C C^T)`` (for tests and diagnostics)."""
        out = []
        for side, group in self.sides():
            f = group.to_dense(self.state[side])
            out.append(f @ f.mT)
        return tuple(out)

    def fisher(self) -> Tensor:
        """The inverse of the preconditioner, ``(K K^T)^{-1} ⊗ (C C^T)^{-1}`` (for tests)."""
        kk, cc = self.preconditioner_factors()
        return torch.kron(torch.linalg.inv(kk.double()), torch.linalg.inv(cc.double()))


class LocalKFAC(KroneckerPreconditioner):
    """Inverse-free Kronecker preconditioner ``(K K^T) ⊗ (C C^T)`` with ``K``, ``C`` in groups.

    ``K`` (input side) and ``C`` (output side) live in the group ``structure`` and are the factors
    of the layer's :class:`~structngd.families.KroneckerGaussian` (:meth:`family`). Every
    ``update_every`` steps they take a natural-gradient step of its VI loss with curvature
    ``A ⊗ G`` and damping ``lambda`` (Lin et al. 2024, SINGD):

    ``X_K = tr(C^T G C) K^T A K + lambda tr(C^T C) K^T K - d_out I``,
    ``m_K <- momentum m_K + project(X_K) / d_out``, ``K <- K h(-lr_cov m_K)``

    and symmetrically for ``C``; the kernel owns momentum (``state["m_K"]``, ``state["m_C"]``),
    trust region and retraction. Only matrix products, so it runs in bfloat16. The
    preconditioned gradient ``(C C^T) dW (K K^T)`` is the family's mean natural gradient; the
    factors start at ``init_scale^{1/2} I`` and, as ``lambda -> 0``, reach
    ``(K K^T) ⊗ (C C^T) = (A ⊗ G)^{-1}`` for dense groups. ``state["A"]`` holds the part of ``A`` that
    ``X_K`` reads (``MatrixGroup.congruence_statistic``): its diagonal for diagonal ``K``, O(n d_in) to capture.

    Args:
        structure: the group of both factors (:func:`structngd.groups.make`); a factor too small
            for its options uses ``"dense"`` (see ``self.structures``); ``"block_diagonal"`` is ragged.
        lr_cov: step size ``beta_1`` of the factors.
        momentum: Riemannian momentum ``alpha_1`` in ``[0, 1)`` on ``m_K``, ``m_C``.
        max_step: trust region ``lr_cov ||m||_F <= max_step`` per factor (the step shrinks, the
            momentum stays): ``h(-lr_cov m)`` overshoots far from the fixed point; ``None``: off.
        factor_dtype: dtype of ``K``, ``C`` and the products (default: the layer's).
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
        self.lr_cov, self.init_scale = checks.positive("lr_cov", lr_cov), checks.positive("init_scale", init_scale)
        self.max_step = checks.optional_positive("max_step", max_step)
        self.momentum = checks.fraction("momentum", momentum)
        self.structure, self.factor_dtype = structure, factor_dtype
        self._group_options = dict(group_options or {})
        _groups.check_options(structure, **self._group_options)
        if structure == "block_diagonal":  # factor sizes (bias included) rarely divide b
            self._group_options.setdefault("ragged", True)
        self._fallbacks = []
        kwargs.setdefault("factor_decay", 0.0)  # the factors themselves average over steps
        super().__init__(model, damping=damping, update_every=update_every, **kwargs)
        # the factors' local gradients read only part of A (its diagonal, for diagonal K): capture just that
        self.capture.input_statistics = {name: block.in_group.congruence_statistic
                                         for name, block in self.blocks.items()}
        if self._fallbacks:
            warnings.warn(f"LocalKFAC: {structure!r} does not fit these factors, which use 'dense': "
                          f"{', '.join(self._fallbacks)}", stacklevel=2)

    def _make_block(self, layer: KronLayer) -> LocalKFACBlock:
        pair = []
        for side, dim in (("K", layer.in_dim), ("C", layer.out_dim)):
            group, fell_back = _groups.make_or_dense(self.structure, dim, **self._group_options)
            pair.append(group)
            if fell_back:
                self._fallbacks.append(f"{layer.name}.{side} (dim {dim})")
        return LocalKFACBlock(layer, *pair, self.block_dtype(layer), self.init_scale)

    def block_dtype(self, layer: KronLayer) -> torch.dtype:
        return self.factor_dtype or layer.weight.dtype

    @property
    def groups(self):
        """The ``(K, C)`` groups of every layer, by layer name."""
        return {name: (block.in_group, block.out_group) for name, block in self.blocks.items()}

    @property
    def structures(self):
        """The ``(K, C)`` group names of every layer (``"dense"`` where the structure does not fit)."""
        return {name: (block.in_group.name, block.out_group.name) for name, block in self.blocks.items()}

    def family(self, name: str) -> KroneckerGaussian:
        """The layer's :class:`~structngd.families.KroneckerGaussian` over ``K`` and ``C`` (a view)."""
        return self.blocks[name].family

    def preconditioner_factors(self, name: str):
        """Dense ``(K K^T, C C^T)`` of a layer (for tests and diagnostics)."""
        return self.blocks[name].preconditioner_factors()

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), **{k: getattr(self, k) for k in ("lr_cov", "momentum", "max_step")}}
