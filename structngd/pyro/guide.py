"""``AutoStructuredNormal``: a Pyro autoguide whose posterior is the layer-2 Gaussian."""

from __future__ import annotations

import weakref
from typing import Optional, Tuple

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor

from .. import groups as _groups
from ..families import estimators
from .distribution import StructuredAffine, StructuredNormal


_LIVE_GUIDES: "weakref.WeakSet[AutoStructuredNormal]" = weakref.WeakSet()  # what NGD searches


def live_guides():
    """The structured guides alive in this process (NGD finds its guides among them)."""
    return list(_LIVE_GUIDES)


class AutoStructuredNormal(AutoContinuous):
    """Gaussian guide ``N(mu, S^{-1})``, ``S = B B^T``, over the model's unconstrained latents.

    ``B`` lives in the group ``structure`` (see :func:`structngd.groups.make`), so the
    precision keeps its structure and stays positive-definite under
    :class:`~structngd.pyro.NGD`, which recognises this guide's parameters and applies
    the coupled natural-gradient step. Any other Pyro optimizer also works (it then
    moves ``loc`` and the compact ``factor`` as plain Euclidean parameters).

    Parameters (in Pyro's param store): ``loc`` (``mu``, shape ``(d,)``) and ``factor``
    (``B`` in the group's compact storage), both unconstrained.

    Usage::

        guide = AutoStructuredNormal(model, structure="block_triangular", k=4)
        svi = SVI(model, guide, NGD(lr=0.1), Trace_ELBO())

    Args:
        model: a Pyro model whose latent sites are all continuous.
        structure: a group name (``"dense"``, ``"diagonal"``, ``"lower_triangular"``,
            ``"upper_triangular"``, ``"block_diagonal"``, ``"block_triangular"``,
            ``"heisenberg"``, ``"hierarchical"``).
        init_loc_fn: per-site initialization of the mean (Pyro's init strategies).
        init_scale: initial posterior standard deviation of every unconstrained latent
            (``B = I / init_scale``).
        antithetic: draw vectorized particles in ``+-eps`` pairs (when their number is
            even). The pairs cancel the mean's share of the noise in the factor's gradient
            (useful far from the optimum), but they halve the rank of the precision
            estimate: on a 31-weight logistic regression, dense NGD with 16 antithetic
            particles settled about 1.2 nats lower than with 16 independent ones.
        **group_options: the group's options (``k``, ``k1``, ``k2``, ``block_size``).
    """

    def __init__(
        self,
        model,
        structure: str = "dense",
        init_loc_fn=init_to_median,
        init_scale: float = 0.1,
        antithetic: bool = False,
        **group_options,
    ):
        if not isinstance(init_scale, (int, float)) or isinstance(init_scale, bool) or not 0 < init_scale < float("inf"):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        if isinstance(structure, str) and structure not in _groups.GROUPS:
            raise ValueError(f"unknown structure {structure!r}; allowed: {sorted(_groups.GROUPS)}")
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._structure = structure
        self._group_options = dict(group_options)
        self._init_scale = float(init_scale)
        self.antithetic = bool(antithetic)
        self.group: Optional[_groups.MatrixGroup] = None
        self._last_call = None  # (weakref loc, weakref factor, args, kwargs) of the last forward pass
        _LIVE_GUIDES.add(self)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.group = _groups.make(self._structure, self.latent_dim, **self._group_options)
        loc = self._init_loc()
        # PyroParams (not bare nn.Parameters) so that values loaded into the param store win
        self.loc = PyroParam(loc, constraints.real_vector)
        factor = self.group.from_diagonal(torch.full_like(loc, 1.0 / self._init_scale))
        self.factor = PyroParam(factor, constraints.independent(constraints.real, factor.dim()))

    @property
    def structure(self) -> str:
        return self.group.name if self.group is not None else str(self._structure)

    # ----------------------------------------------------------- posterior
    def get_posterior(self, *args, **kwargs) -> StructuredNormal:
        loc, factor = self.loc, self.factor
        if torch.is_grad_enabled():  # a training pass: remember what NGD will be handed
            self._last_call = (weakref.ref(loc), weakref.ref(factor), args, kwargs)
        return StructuredNormal(loc, factor, self.group, antithetic=self.antithetic)

    def get_base_dist(self):
        return dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)

    def get_transform(self, *args, **kwargs):
        return StructuredAffine(self.loc, self.factor, self.group)

    def _loc_scale(self, *args, **kwargs):
        posterior = self.get_posterior(*args, **kwargs)
        return posterior.loc, posterior.variance.sqrt()

    # --------------------------------------------- hooks for the NGD optimizer
    def last_parameters(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``(loc, factor)`` tensors used by the last training pass, if still alive."""
        if self._last_call is None:
            return None
        loc, factor = self._last_call[0](), self._last_call[1]()
        return None if loc is None or factor is None else (loc, factor)

    def family(self, loc: Tensor, factor: Tensor):
        """The layer-2 family over the given parameter tensors (shared, not copied)."""
        return StructuredNormal(loc, factor, self.group).family

    def log_joint(self, z: Tensor, *args, **kwargs) -> Tensor:
        """``log p(x, z)`` at one unconstrained latent vector ``z`` (Jacobians included).

        Runs the guide with its latent site fixed to ``z`` and replays the model on that
        trace, exactly as Pyro's ELBOs do (plates' subsamples and scales included):
        ``log p(x, theta(z)) + log|d theta / d z|``.
        """
        latent_name = f"_{self._pyro_name}_latent"
        with poutine.block():
            guide = poutine.condition(self, data={latent_name: z})
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(*args, **kwargs)
        jacobians = guide_trace.log_prob_sum(lambda name, site: name != latent_name)
        return model_trace.log_prob_sum() - jacobians

    def price_gradients(self, loc: Tensor, factor: Tensor, num_pairs: int = 1) -> Tensor:
        """Set ``loc.grad`` and ``factor.grad`` to the Bonnet/Price gradients of ``-ELBO``.

        ``g_mu = -E[grad log p]`` and ``g_Sigma = (-E[hess log p] - S) / 2`` from
        ``num_pairs`` mirrored pairs ``mu +- B^{-T} eps`` at the arguments of the last
        training pass; exact for Gaussian-linear models with one pair. Costs ``d``
        backward passes per sample: meant for latent dimensions up to a few hundred.
        Returns the mean of ``-log p`` over the samples.
        """
        if self._last_call is None:
            raise RuntimeError("price_gradients needs a training pass of the guide first")
        args, kwargs = self._last_call[2], self._last_call[3]
        with torch.no_grad():
            eps = torch.randn((num_pairs, self.latent_dim), dtype=loc.dtype, device=loc.device)
            points = loc + self.group.tsolve(factor, torch.cat([eps, -eps]))
        values, grads, hessians = [], [], []
        for z in points:
            value, grad, hess = self._derivatives(z, args, kwargs)
            values.append(value)
            grads.append(grad)
            hessians.append(hess)
        value, grad, hess = torch.stack(values).mean(), torch.stack(grads).mean(0), torch.stack(hessians).mean(0)
        if not (torch.isfinite(value) and torch.isfinite(grad).all() and torch.isfinite(hess).all()):
            raise ValueError("the model's log density, its gradient or its Hessian is non-finite at the samples")
        with torch.no_grad():
            loc.grad = -grad
            g_factor = estimators.factor_gradient_from_hessian(self.group, factor, -0.5 * (hess + hess.mT), 1.0)
            factor.grad = g_factor.contiguous()  # the layout autograd accumulates into next step
        return -value

    def _derivatives(self, z: Tensor, args, kwargs):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.log_joint(z, *args, **kwargs)
            (grad,) = torch.autograd.grad(value, z, create_graph=True)
            eye = torch.eye(z.numel(), dtype=z.dtype, device=z.device)
            try:
                (hess,) = torch.autograd.grad(grad, z, grad_outputs=eye, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one backward pass per row
                hess = torch.stack([torch.autograd.grad(grad, z, row, retain_graph=True)[0] for row in eye])
        return value.detach(), grad.detach(), hess.detach()
