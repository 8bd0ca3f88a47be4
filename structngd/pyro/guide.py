"""``AutoStructuredNormal``: a Pyro autoguide whose posterior is the layer-2 Gaussian."""

from __future__ import annotations

import weakref
from functools import partial
from typing import List, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .. import checks
from .. import groups as _groups
from ..families import estimators
from ..families.gaussian import Gaussian
from .distribution import StructuredAffine, StructuredNormal

#: the attribute (an :class:`OwnerLink`) a training pass sets on the guide's parameter tensors
OWNER_ATTRIBUTE = "structngd_owner"


class OwnerLink:
    """A weak reference from a parameter tensor to its guide (``link()``) and part (``link.part``).

    Like Pyro's ``unconstrained`` weak reference it keeps nothing alive and does not travel: a
    pickled or copied tensor carries an empty link, so the param store stays picklable.
    """

    __slots__ = ("_guide", "part")

    def __init__(self, guide=None, part: str = ""):
        self._guide = None if guide is None else weakref.ref(guide)
        self.part = part

    def __call__(self):
        return None if self._guide is None else self._guide()

    def __reduce__(self):
        return (OwnerLink, ())

    def __deepcopy__(self, memo):
        return OwnerLink()

    def __repr__(self) -> str:
        guide = self()
        return f"OwnerLink({type(guide).__name__ if guide is not None else None}, {self.part!r})"


def owner_of(tensor: Tensor) -> Tuple[Optional["LatentGuide"], str]:
    """``(guide, part)`` of a tensor a live guide marked and still uses, else ``(None, "")``."""
    link = getattr(tensor, OWNER_ATTRIBUTE, None)
    guide = link() if isinstance(link, OwnerLink) else None
    if guide is None:
        return None, ""
    if not any(t is tensor for t in guide.owned_tensors()):
        return None, ""  # a mark left on tensors the guide no longer uses
    return guide, link.part


class LatentGuide(AutoContinuous):
    """What the natural-gradient guides share: their :attr:`families` over param-store tensors, the owner links
    by which :class:`~structngd.pyro.NGD` finds them, the last training pass's arguments, the re-traced log joint
    of the Price estimator, and pickling without views or data.

    A subclass sets :meth:`_set_families` in ``get_posterior`` and implements :meth:`directions`,
    :meth:`check_invertible` and :meth:`state_signature` (what NGD's step and states need)."""

    def __init__(self, model, init_loc_fn=init_to_median):
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._set_families(())
        self._last_arguments = None  # (args, kwargs) of the last training pass

    def __getstate__(self):
        # Pyro's AutoGuide.__getstate__ drops the model and master from the guide itself: keep them here
        kept = {k: self.__dict__[k] for k in ("_model", "master")}
        try:  # without the views and the data of the last pass
            state = {**super().__getstate__(), "_families": (), "_last_arguments": None}
        finally:
            self.__dict__.update(kept)
        return state

    # -------------------------------------------------------------- families
    @property
    def families(self) -> tuple:
        """The families over the parameter tensors of the last pass (empty before the first)."""
        return self.__dict__.get("_families", ())

    def _set_families(self, families) -> None:
        # not submodules: parameters() and state_dict() hold each tensor once, under its Pyro name
        object.__setattr__(self, "_families", tuple(families))

    def owned_tensors(self) -> List[Tensor]:
        """The parameter tensors of :attr:`families`, in order."""
        return [p for family in self.families for p in family.parameters()]

    def _mark_training_pass(self, args, kwargs) -> None:
        """In a training pass (gradients on): mark what ``SVI`` will hand the optimizer, keep the arguments."""
        if not torch.is_grad_enabled():
            return
        for family in self.families:
            for part, tensor in family.named_parameters():
                link = getattr(tensor, OWNER_ATTRIBUTE, None)
                if not (isinstance(link, OwnerLink) and link() is self and link.part == part):
                    setattr(tensor, OWNER_ATTRIBUTE, OwnerLink(self, part))
        self._last_arguments = (args, kwargs)

    # ------------------------------------------------- what NGD's step needs
    def state_signature(self) -> str:
        """What an optimizer state of this guide depends on (checked when a state is loaded)."""
        raise NotImplementedError

    def directions(self, estimator: str, num_pairs: int) -> list:
        """One natural-gradient direction per family (``None``: from the parameters' ``.grad``) for ``estimator``;
        ``"price"`` writes the ``.grad`` it estimates."""
        raise NotImplementedError

    def check_invertible(self) -> None:
        """``ValueError`` naming a factor the last step made singular."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called by NGD once a step is written (per-pass statistics are cleared here)."""

    # ----------------------------------------- what the Price estimator needs
    def log_joint(self, z: Tensor, *args, **kwargs) -> Tensor:
        """``log p(x, theta(z)) + log|d theta / d z|`` at an unconstrained ``z``, replayed as Pyro's ELBOs do."""
        latent_name = f"_{self._pyro_name}_latent"
        with poutine.block():
            guide = poutine.condition(self, data={latent_name: z})
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(*args, **kwargs)
        unguided = [name for name, site in model_trace.nodes.items() if site["type"] == "sample"
                    and not site["is_observed"] and not site_is_subsample(site) and name not in guide_trace.nodes]
        if unguided:
            raise ValueError(f"the Price estimator would draw the model's sites {unguided} from their prior (sites "
                             "this guide does not cover, e.g. discrete or enumerated ones); use estimator='reparam'")
        jacobians = guide_trace.log_prob_sum(lambda name, site: name != latent_name)
        return model_trace.log_prob_sum() - jacobians

    def loss_derivatives(self, w: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-sample ``l = -log p(x, z)``, its gradient and Hessian at the rows ``z`` of ``w``, by autograd
        through one Pyro trace per sample (``d`` backward passes, batched where the ops allow)."""
        values, grads, hessians = [], [], []
        for z in w:
            z = z.detach().requires_grad_(True)
            with torch.enable_grad():
                value = -self.log_joint(z, *args, **kwargs)
                (grad,) = torch.autograd.grad(value, z, create_graph=True)
                eye = torch.eye(z.numel(), dtype=z.dtype, device=z.device)
                try:
                    (hess,) = torch.autograd.grad(grad, z, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
                except RuntimeError:  # an op without a batching rule: one backward pass per row
                    hess = torch.stack([torch.autograd.grad(grad, z, row, retain_graph=True)[0] for row in eye])
            values.append(value.detach())
            grads.append(grad.detach())
            hessians.append(hess.detach())
        return torch.stack(values), torch.stack(grads), torch.stack(hessians)

    def _price_derivatives(self):
        """``w -> loss_derivatives(w, *last pass arguments)``, after checking that the Price estimator applies."""
        if not self.families or self._last_arguments is None:
            raise RuntimeError("price_gradients needs a training pass of the guide first")
        if self._model is None or self.model is None:  # Pyro drops the model when it pickles a guide
            raise RuntimeError("price_gradients needs the guide's model, which a pickled guide does not keep; "
                               "build the guide from the model and load the param store")
        if self.master is not None:
            raise ValueError("the Price estimator cannot be used for a guide inside an AutoGuideList: it re-traces "
                             "this guide's model alone, without the other guides' values; use estimator='reparam'")
        if _is_blocked(self.model):
            raise ValueError("the Price estimator cannot be used for a guide over a poutine.block-ed model: it "
                             "re-traces that model, whose hidden sites (likelihood, discrete or other latents) it "
                             "would miss or draw from their prior; use estimator='reparam'")
        args, kwargs = self._last_arguments
        return lambda w: self.loss_derivatives(w, *args, **kwargs)


class AutoStructuredNormal(LatentGuide):
    """Gaussian guide ``N(mu, S^{-1})``, ``S = B B^T``, over the model's unconstrained latents.

    ``B`` lives in the group ``structure`` (:func:`structngd.groups.make`), so under
    :class:`~structngd.pyro.NGD` the precision keeps its structure and stays positive-definite;
    any other Pyro optimizer moves ``loc`` and the compact ``factor`` as plain parameters.
    Both are ``PyroParam``\\ s of the param store. The posterior :attr:`family` is a
    :class:`~structngd.families.Gaussian` over these very tensors (not a submodule; rebuilt
    when the param store hands over other tensors). Each training pass marks them with an
    :class:`OwnerLink`, by which ``NGD`` finds the guide::

        guide = AutoStructuredNormal(model, structure="block_triangular", k=4)
        svi = SVI(model, guide, NGD(lr=0.1), Trace_ELBO())

    Args:
        model: a Pyro model whose latent sites are all continuous.
        structure: a group name (``"dense"``, ``"diagonal"``, ``"block_triangular"``, ...).
        init_loc_fn: per-site initialization of the mean (Pyro's init strategies).
        init_scale: initial posterior standard deviation of every latent (``B = I / init_scale``).
        antithetic: draw vectorized particles in ``+-eps`` pairs: less noise far from the optimum,
            but half the rank of the precision estimate.
        **group_options: the group's options (``k``, ``k1``, ``k2``, ``block_size``).

    A pickled guide (``pickle``, ``torch.save``, ``copy.deepcopy``) keeps its prototype and group, not
    its model (as Pyro's autoguides) nor its family; pickling leaves the guide itself as it was.
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
        init_scale = checks.positive("init_scale", init_scale)
        antithetic = checks.flag("antithetic", antithetic)
        if isinstance(structure, _groups.MatrixGroup):
            _groups.check_structure(structure)
        else:
            _groups.check_options(structure, **group_options)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._structure = structure
        self._group_options = dict(group_options)
        self._init_scale = init_scale
        self.antithetic = antithetic
        self.group: Optional[_groups.MatrixGroup] = None

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

    @property
    def family(self) -> Optional[Gaussian]:
        """The Gaussian over the parameter tensors of the last pass (``None`` before the first)."""
        return self.families[0] if self.families else None

    def _bind(self, loc: Tensor, factor: Tensor) -> Gaussian:
        """The family over ``loc`` and ``factor``: the current one if it already shares them."""
        family = self.family
        if family is None or family.loc is not loc or family.factor is not factor:
            family = Gaussian.view(self.group, loc, factor)
            self._set_families((family,))
        return family

    # ----------------------------------------------------------- posterior
    def get_posterior(self, *args, **kwargs) -> StructuredNormal:
        loc, factor = self.loc, self.factor  # pyro.param statements: the param store's tensors
        family = self._bind(loc, factor)
        self._mark_training_pass(args, kwargs)
        return StructuredNormal.from_family(family, antithetic=self.antithetic)

    def get_base_dist(self):
        return dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)

    def get_transform(self, *args, **kwargs):
        return StructuredAffine(self.loc, self.factor, self.group)

    def _loc_scale(self, *args, **kwargs):
        posterior = self.get_posterior(*args, **kwargs)
        return posterior.loc, posterior.variance.sqrt()

    # ------------------------------------------------- what NGD's step needs
    def state_signature(self) -> str:
        return repr(self.group)

    def directions(self, estimator: str, num_pairs: int) -> list:
        if estimator == "kronecker":
            raise ValueError("estimator='kronecker' needs an AutoKroneckerNormal guide; an AutoStructuredNormal "
                             "takes 'reparam' or 'price'")
        if estimator == "price":
            self.price_gradients(num_pairs)
        return [None]

    def check_invertible(self) -> None:
        require_invertible_factor(self.group, self.family.factor)

    def price_gradients(self, num_pairs: int = 1) -> Tensor:
        """Set ``loc.grad``, ``factor.grad`` to the Bonnet/Price gradients of ``-ELBO``; returns mean ``-log p``.

        ``g_mu = E[grad l]``, ``g_Sigma = (E[hess l] - S) / 2`` from ``num_pairs`` mirrored pairs at the
        last training pass's arguments (exact for Gaussian-linear models); ``d`` backward passes per sample.
        """
        derivatives = self._price_derivatives()
        family = self.family
        value, g_mu, g_factor = estimators.price_gradients(self.group, family.loc, family.factor, derivatives,
                                                           num_pairs)
        family.loc.grad = g_mu
        family.factor.grad = g_factor.contiguous()  # the layout autograd accumulates into next step
        return value


def invertible(group, factor: Tensor) -> bool:
    """Whether ``log|det B|`` and ``B^{-T} 1`` (what the next draw solves) are finite."""
    probe = torch.ones(group.dim, dtype=factor.dtype, device=factor.device)
    try:
        values = (group.logdet(factor), group.tsolve(factor, probe))
    except RuntimeError:  # torch.linalg.LinAlgError: a pivot is zero
        return False
    return all(bool(torch.isfinite(v).all()) for v in values)


def require_invertible_factor(group, factor: Tensor) -> None:
    """``ValueError`` naming ``factor`` where a step left it singular (:func:`invertible` is false)."""
    if not invertible(group, factor.detach()):
        raise ValueError(f"the step would make the factor {param_names([factor])} singular "
                         "(lower lr, or see NGD's assumptions); no parameter was changed")


def param_names(params: List[Tensor]) -> str:
    """The param-store names of ``params`` (their shapes where unnamed), for messages."""
    store = pyro.get_param_store()
    return ", ".join(str(store.param_name(p) or tuple(p.shape)) for p in params)


def _is_blocked(fn) -> bool:
    """Whether ``fn`` is wrapped by ``poutine.block`` (handlers wrap as ``partial(_context_wrap, messenger, fn)``)."""
    while isinstance(fn, partial) and len(fn.args) == 2 and isinstance(fn.args[0], Messenger):
        if isinstance(fn.args[0], BlockMessenger):
            return True
        fn = fn.args[1]
    return False
