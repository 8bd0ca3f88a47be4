"""VariationalKFAC: a matrix-normal variational posterior per layer of a plain ``torch.nn`` model.

Per supported layer (bias folded as the capture does, ``W`` of shape ``(d_out, d_in)``) the posterior is
``q(W) = N(M, Sigma)``, ``Sigma = ess^{-1} (K K^T) ⊗ (C C^T)``: ``M`` is the layer's weight, ``K``, ``C``
are the factors of a composed :class:`~structngd.kron.LocalKFAC`. With the prior ``N(0, lambda_p^{-1} I)`` the
VI loss is ``E_q[ess * mean_nll(W)] + lambda_p / 2 E_q ||W||^2 - H(q)``; its local-parameterization
natural-gradient step is LocalKFAC's factor refresh with the curvature ``A ⊗ G`` captured at sampled weights and
damping ``lambda_p / ess`` (fixed point ``Sigma ≈ (ess A ⊗ G + lambda_p I)^{-1}``), and the mean step
``M <- M - lr nu (K K^T) ⊗ (C C^T) (g + (lambda_p / ess) M)`` with heavy-ball momentum, ``nu <= 1`` a KL clip.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from .. import checks
from ..families import KroneckerGaussian
from .capture import KronLayer, find_layers
from .local import LocalKFAC
from .trust_region import kl_clip_scale

#: the per-step hyperparameters of ``param_groups[0]`` (reassignable between steps)
GROUP_KEYS = ("lr", "momentum", "ess", "prior_precision", "kl_clip")


def _check_group(group: dict) -> None:
    checks.non_negative("lr", group["lr"])
    checks.fraction("momentum", group["momentum"])
    checks.positive("ess", group["ess"])
    checks.non_negative("prior_precision", group["prior_precision"])
    if group["kl_clip"] is not None:
        checks.positive("kl_clip", group["kl_clip"])


class VariationalKFAC(torch.optim.Optimizer):
    """Variational inference with ``q(W) = N(M, ess^{-1} (K K^T) ⊗ (C C^T))`` per ``Linear`` / ``Conv2d`` layer.

    Per step: ``mc_samples`` forward/backward passes, each inside :meth:`sampled_params` (weights
    ``W = M + ess^{-1/2} C E K^T``, ``E`` standard normal, written into the layer; ``M`` back on exit), then
    :meth:`step`: LocalKFAC's refresh of ``K``, ``C`` with the ``A``, ``G`` of those passes and damping
    ``lambda_p / ess + damping``, then ``b <- momentum b + nu (K K^T) ⊗ (C C^T) (g + (lambda_p / ess) M)``
    (``nu <= 1`` the KL clip), ``M <- M - lr b`` with ``g`` the mean over the samples of the batch-mean loss's
    gradient. All or nothing: a step that raises leaves weights, factors, statistics and momenta as they were.

    Args:
        model: its supported layers get the posterior. Other trained parameters are a ``ValueError``
            unless ``fallback`` (``params -> torch.optim.Optimizer``) is given, which steps them as point
            estimates with the sample-averaged gradient.
        lr, momentum: the mean's step size and heavy-ball momentum (``param_groups[0]``, reassignable).
        kl_clip: the mean step's trust region (``param_groups[0]``, reassignable; ``None``: off): the direction
            ``d = P(u)``, ``u = g + (lambda_p / ess) M``, is scaled by ``nu = min(1, sqrt(kl_clip / (lr^2 <d, u>)))``
            before the momentum, as KFAC's KL clip (Ba et al. 2017). The default ``1e-3`` keeps minibatch runs bounded
            where a batch's empirical Fisher vanishes (a memorized batch: ``P`` grows to about ``1 / damping``) and the
            next sampled weights' gradients would move the mean by ~100x their size.
        ess: effective sample size ``N > 0`` (the training-set size); ``prior_precision``: ``lambda_p >= 0``.
        mc_samples: the samples per step :meth:`step` draws with a closure (and loops should use).
        mirrored: the train samples of a step come in pairs ``E, -E`` (odd moments of the noise cancel).
        damping: extra damping ``>= 0`` of the factors only (on the mean-loss scale). The default ``1e-3``
            keeps minibatch runs finite where ``lambda_p / ess`` alone (about 1e-4 on UCI kin8nm) lets the
            preconditioner grow as a batch's empirical Fisher vanishes; ``0`` gives the exact posterior fixed point.
        structure, group_options, lr_cov, max_step, update_every, init_scale, factor_dtype, fisher, skip:
            LocalKFAC's options (``cov_momentum`` is its ``momentum``); ``fisher="true"``: call
            :meth:`sample_fisher` on the output inside each :meth:`sampled_params` before ``backward``.
    """

    def __init__(
        self,
        model: nn.Module,
        ess: float,
        lr: float = 0.01,
        prior_precision: float = 1.0,
        kl_clip: Optional[float] = 1e-3,
        structure: str = "dense",
        mc_samples: int = 1,
        momentum: float = 0.9,
        mirrored: bool = False,
        damping: float = 1e-3,
        lr_cov: float = 0.05,
        cov_momentum: float = 0.5,
        max_step: Optional[float] = 1.0,
        update_every: int = 1,
        init_scale: float = 1.0,
        factor_dtype: Optional[torch.dtype] = None,
        fisher: str = "empirical",
        group_options: Optional[dict] = None,
        skip=(),
        fallback: Optional[Callable[[List[nn.Parameter]], torch.optim.Optimizer]] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        group = dict(lr=lr, momentum=momentum, ess=ess, prior_precision=prior_precision, kl_clip=kl_clip)
        _check_group(group)
        self.mc_samples = checks.count("mc_samples", mc_samples)
        self.mirrored = checks.flag("mirrored", mirrored)
        self.damping = checks.non_negative("damping", damping)
        if prior_precision / ess + self.damping <= 0:
            raise ValueError("prior_precision and damping are both 0: the factors need damping > 0")
        if fallback is not None and not callable(fallback):
            raise TypeError(f"fallback must be a callable params -> torch.optim.Optimizer, got {type(fallback).__name__}")
        skip = (skip,) if isinstance(skip, str) else tuple(skip)
        layers, _ = find_layers(model, skip)
        others = self._uncovered(model, layers)
        if others and fallback is None:
            raise ValueError(f"VariationalKFAC has no posterior for the parameters {[n for n, _ in others]} (not in a "
                             "supported nn.Linear / nn.Conv2d): pass fallback=lambda ps: torch.optim.Adam(ps, ...) "
                             "to step them as point estimates, or freeze them")
        with warnings.catch_warnings():  # the skipped modules are the fallback's: LocalKFAC's warning does not apply
            warnings.filterwarnings("ignore", message="LocalKFAC leaves these modules")
            self.preconditioner = LocalKFAC(
                model, structure=structure, damping=self._total_damping(group), lr_cov=lr_cov, momentum=cov_momentum,
                update_every=update_every, init_scale=init_scale, max_step=max_step, factor_dtype=factor_dtype,
                group_options=group_options, fisher=fisher, skip=skip,
            )
        self.layers = self.preconditioner.layers
        super().__init__([p for layer in self.layers for p in layer.parameters], group)
        self.fallback = None
        if others:
            self.fallback = fallback([p for _, p in others])
            if not isinstance(self.fallback, torch.optim.Optimizer):
                raise TypeError(f"fallback must return a torch.optim.Optimizer, got {type(self.fallback).__name__}")
        self.steps = 0
        self.momenta: Dict[str, Tensor] = {}
        self._samples, self._sampling, self._pending = 0, False, {}

    @staticmethod
    def _uncovered(model: nn.Module, layers: List[KronLayer]):
        covered = {id(p) for layer in layers for p in layer.parameters}
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]

    def _total_damping(self, group: dict) -> float:
        return group["prior_precision"] / group["ess"] + self.damping

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "preconditioner", None) is not None and self.param_groups:
            raise TypeError("VariationalKFAC keeps one parameter group (its model's supported layers)")
        super().add_param_group(param_group)

    @property
    def blocks(self):
        """LocalKFAC's blocks (``K``, ``C`` and their momenta) by layer name."""
        return self.preconditioner.blocks

    # ----------------------------------------------------------- sampling
    @torch.no_grad()
    def _draw(self, layer: KronLayer, scale: float, mirror: Optional[Dict[str, Tensor]]) -> Tensor:
        """``W = M + scale C E K^T`` by the factors-only family's ``from_noise`` (products only); with ``mirror``
        every second draw of a layer is ``-E`` of the one before."""
        block = self.blocks[layer.name]
        if mirror is not None and layer.name in mirror:
            eps = -mirror.pop(layer.name)
        else:
            eps = torch.randn(layer.out_dim, layer.in_dim, dtype=block.dtype, device=block.device)
            if mirror is not None:
                mirror[layer.name] = eps
        return layer.weight_matrix() + block.family.from_noise(eps * scale).to(layer.weight.dtype)

    @contextlib.contextmanager
    def sampled_params(self, train: bool = True):
        """Weights ``W ~ q`` inside (``M`` back on exit). ``train=True``: run the forward and ``backward``
        inside, their gradient and statistics feed the next :meth:`step`; ``train=False``: a sample only."""
        if self._sampling:
            raise RuntimeError("VariationalKFAC.sampled_params contexts do not nest")
        pre, group = self.preconditioner, self.param_groups[0]
        _check_group(group)
        pre._follow_layers()
        mirror = self._pending if self.mirrored and train else None
        means = {layer.name: [p.detach().clone() for p in layer.parameters] for layer in self.layers}
        try:
            with torch.no_grad():
                for layer in self.layers:
                    layer.set_weight_matrix(self._draw(layer, group["ess"] ** -0.5, mirror))
        except BaseException:
            self._restore(means)
            raise
        self._sampling = True
        if not train:
            pre.capture.arm(statistics=False)
        try:
            yield
            if train:
                self._samples += 1
        finally:
            self._restore(means)
            self._sampling = False
            if not train:
                pre._arm_capture()

    @torch.no_grad()
    def _restore(self, means: Dict[str, List[Tensor]]) -> None:
        for layer in self.layers:
            for p, m in zip(layer.parameters, means[layer.name]):
                p.copy_(m)

    def sample_weights(self, num_samples: int) -> Iterator[int]:
        """Yield ``0 .. num_samples - 1`` with the model holding a fresh posterior sample each time
        (``sampled_params(train=False)``), e.g. for the predictive ``mean_s softmax(f(x; W_s))``."""
        checks.count("num_samples", num_samples)
        for index in range(num_samples):
            with self.sampled_params(train=False):
                yield index

    def sample_fisher(self, output: Tensor, likelihood: str = "categorical") -> None:
        """For ``fisher="true"``: LocalKFAC's sampled-label pass, inside :meth:`sampled_params` before ``backward``."""
        self.preconditioner.sample_fisher(output, likelihood)

    @torch.no_grad()
    def posterior(self, name: str) -> KroneckerGaussian:
        """The layer's ``q(W) = N(M, ess^{-1} (K K^T) ⊗ (C C^T))`` as a :class:`KroneckerGaussian` view over
        copies: ``loc = M`` (bias last column), ``in_factor = ess^{-1/2} K``, ``out_factor = C`` (a snapshot)."""
        if name not in self.blocks:
            raise ValueError(f"no layer {name!r}; the layers are {sorted(self.blocks)}")
        block, layer = self.blocks[name], next(la for la in self.layers if la.name == name)
        scale = self.param_groups[0]["ess"] ** -0.5
        return KroneckerGaussian.view(block.in_group, block.out_group, block.state["K"] * scale,
                                      block.state["C"].clone(), loc=layer.weight_matrix().to(block.dtype).clone())

    # --------------------------------------------------------------- step
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One step of the posterior. With ``closure`` (computes the loss and calls ``backward``), it runs
        ``mc_samples`` times inside :meth:`sampled_params` first; returns their mean loss."""
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with self.sampled_params(train=True), torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / len(losses)
        self._step()
        return loss

    @torch.no_grad()
    def _step(self) -> None:
        if self._sampling:
            raise RuntimeError("VariationalKFAC.step() inside sampled_params: step after the context")
        if self._samples == 0:
            raise RuntimeError("VariationalKFAC.step() found no sampled backward pass: run the forward and backward "
                               "passes inside opt.sampled_params(train=True) first")
        group, pre = self.param_groups[0], self.preconditioner
        _check_group(group)
        self._check_fallback_gradients()
        for layer in self.layers:
            if any(p.grad is None for p in layer.parameters):
                raise RuntimeError(f"layer {layer.name!r} has no gradient; nothing was changed")
        gradients = {layer.name: layer.grad_matrix().clone() for layer in self.layers}
        saved = {name: block.snapshot(pre.is_update_step) for name, block in self.blocks.items()}
        saved_steps, saved_damping = pre.steps, pre.damping
        pre.damping = self._total_damping(group)
        decay = group["prior_precision"] / group["ess"]
        # n u = g_sum + n (lambda_p / ess) M: preconditioned once, not g and M apart
        sums = gradients
        if decay > 0:
            sums = {layer.name: gradients[layer.name] + (self._samples * decay) * layer.weight_matrix()
                    for layer in self.layers}
            for layer in self.layers:
                layer.set_grad_matrix(sums[layer.name])
        try:
            pre.step()  # refreshes K, C (update steps) and writes (K K^T) ⊗ (C C^T) n u into .grad
        except BaseException:
            pre.damping = saved_damping
            for layer in self.layers:
                layer.set_grad_matrix(gradients[layer.name])
            raise
        try:
            means, momenta = self._mean_step(group, sums)
        except BaseException:
            for name, block in self.blocks.items():
                block.restore(saved[name])
            pre.steps, pre.damping = saved_steps, saved_damping
            pre._arm_capture()
            for layer in self.layers:
                layer.set_grad_matrix(gradients[layer.name])
            self._samples = 0  # the batch's statistics are spent: sample again
            raise
        for layer in self.layers:
            layer.set_weight_matrix(means[layer.name])
        if group["momentum"] > 0:
            self.momenta = momenta
        if self.fallback is not None:
            self._fallback_step()
        self.steps += 1
        self._samples, self._pending = 0, {}

    def _mean_step(self, group: dict, sums: Dict[str, Tensor]):
        """New means ``M - lr b`` and momenta ``b = momentum b + nu P(u)`` (unwritten, finite), ``u = g + (lambda_p /
        ess) M`` (``sums``: ``n u`` over the ``n`` samples), ``nu`` the KL clip of ``P(u)`` over all layers."""
        n = self._samples
        directions, inner = {}, 0.0
        for layer in self.layers:
            direction = layer.grad_matrix() / n  # P(u): LocalKFAC wrote the preconditioned gradient
            if group["kl_clip"] is not None:
                inner += float((direction * sums[layer.name].to(direction.dtype)).sum()) / n
            directions[layer.name] = direction
        nu = kl_clip_scale(group["kl_clip"], group["lr"], inner)
        means, momenta = {}, {}
        for layer in self.layers:
            mean, direction = layer.weight_matrix(), directions[layer.name]
            if nu < 1.0:
                direction = direction * nu
            old = self.momenta.get(layer.name)
            if group["momentum"] > 0 and old is not None:
                direction = old.to(mean.dtype, copy=False) * group["momentum"] + direction
            new = mean - group["lr"] * direction
            if not (torch.isfinite(direction).all() and torch.isfinite(new).all()):
                raise ValueError(f"VariationalKFAC: the mean step of layer {layer.name!r} is non-finite (lower lr); "
                                 "nothing was changed")
            means[layer.name], momenta[layer.name] = new, direction
        return means, momenta

    def _fallback_params(self) -> List[nn.Parameter]:
        return [p for g in self.fallback.param_groups for p in g["params"]] if self.fallback is not None else []

    def _check_fallback_gradients(self) -> None:
        for p in self._fallback_params():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                raise ValueError("a parameter stepped by the fallback optimizer has non-finite gradients; "
                                 "nothing was changed")

    def _fallback_step(self) -> None:
        if self._samples > 1:
            for p in self._fallback_params():
                if p.grad is not None:
                    p.grad.div_(self._samples)
        self.fallback.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.fallback is not None:
            self.fallback.zero_grad(set_to_none)

    # -------------------------------------------------------- state dicts
    def state_dict(self) -> dict:
        """Everything but the means (the model's own ``state_dict``): factors, statistics, momenta, hyperparameters."""
        group = self.param_groups[0]
        return {
            "kind": "VariationalKFAC",
            "steps": self.steps,
            "preconditioner": self.preconditioner.state_dict(),
            "momenta": {name: buf.clone() for name, buf in self.momenta.items()},
            "hyperparameters": {**{k: group[k] for k in GROUP_KEYS}, "damping": self.damping,
                                "mc_samples": self.mc_samples, "mirrored": self.mirrored},
            "fallback": None if self.fallback is None else self.fallback.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` between steps; ``ValueError`` (nothing changed) where layers or shapes differ."""
        if state_dict.get("kind") != "VariationalKFAC":
            raise ValueError(f"a {state_dict.get('kind')!r} state_dict cannot be loaded into a VariationalKFAC")
        if (state_dict["fallback"] is None) != (self.fallback is None):
            raise ValueError("the state_dict and this VariationalKFAC differ in having a fallback optimizer")
        shapes = {layer.name: (layer.out_dim, layer.in_dim) for layer in self.layers}
        for name, buf in state_dict["momenta"].items():
            if tuple(buf.shape) != shapes.get(name):
                raise ValueError(f"the state_dict's momentum of layer {name!r} has shape {tuple(buf.shape)}, this "
                                 f"VariationalKFAC needs {shapes.get(name)}")
        hp = {"kl_clip": None, **state_dict["hyperparameters"]}  # saved before the KL clip existed: none
        _check_group(hp)
        self.preconditioner.load_state_dict(state_dict["preconditioner"])
        if self.fallback is not None:
            self.fallback.load_state_dict(state_dict["fallback"])
        weights = {layer.name: layer.weight for layer in self.layers}
        self.momenta = {name: buf.to(weights[name].device, weights[name].dtype).clone()
                        for name, buf in state_dict["momenta"].items()}
        self.param_groups[0].update({k: hp[k] for k in GROUP_KEYS})
        self.damping, self.mc_samples, self.mirrored = hp["damping"], hp["mc_samples"], hp["mirrored"]
        self.steps = int(state_dict["steps"])
        self._samples, self._pending = 0, {}

    def remove_hooks(self) -> None:
        """Detach from the model (another preconditioner may attach)."""
        self.preconditioner.remove_hooks()

    @property
    def ess(self) -> float:
        return self.param_groups[0]["ess"]

    @property
    def prior_precision(self) -> float:
        return self.param_groups[0]["prior_precision"]

    def __repr__(self) -> str:
        group = self.param_groups[0]
        return (f"VariationalKFAC(layers={len(self.layers)}, structure={self.preconditioner.structure!r}, "
                + ", ".join(f"{k}={group[k]!r}" for k in GROUP_KEYS) + f", mc_samples={self.mc_samples})")


__all__ = ["VariationalKFAC"]
