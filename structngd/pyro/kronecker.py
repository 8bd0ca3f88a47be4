"""``AutoKroneckerNormal``: a matrix-normal posterior per weight site (noisy K-FAC in local coordinates).

Each global, real, matrix-shaped latent site ``W`` (``d_out x d_in``, e.g. ``models.BNN``'s
``layers.<i>.weight``), with its bias site folded in as a last column (``W~ = [W, b]``), gets a
:class:`~structngd.families.KroneckerGaussian` ``N(M, (K K^T) ⊗ (C C^T))``; the other latents get one
structured :class:`~structngd.families.Gaussian` (diagonal by default). The blocks are independent.

Under :class:`~structngd.pyro.NGD` with ``estimator="kronecker"`` the mean takes the reparameterized
gradient ``SVI`` computed and the factors the Kronecker curvature ``A ⊗ G`` of the model's products
(:mod:`structngd.pyro.products`), by default from ``SVI``'s own pass (the empirical Fisher), with
``fisher="true"`` from one more pass with labels drawn from the model (the Fisher): for a
``N(0, lambda^{-1} I)`` prior the factors' part of ``-ELBO`` is
``tr(A K K^T) tr(G C C^T) / 2 + lambda tr(K K^T) tr(C C^T) / 2 - H(q)``, so the prior precision is the
damping and no knob is left (:func:`~structngd.families.estimators.kronecker_factor_gradients`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from pyro import poutine
import pyro.distributions as dist
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam
from torch import Tensor

from .. import checks
from .. import groups as _groups
from ..families import KroneckerGaussian, estimators
from ..families.gaussian import Gaussian
from .distribution import StructuredNormal
from .guide import LatentGuide, require_invertible_factor
from .products import ProductStatistics, TrackedWeight


class KroneckerBlock:
    """Where one weight site (and its folded bias site) lies in the packed latent vector.

    The block's flat layout is ``(vec_row(W), b)``: the weight row by row, then the bias."""

    def __init__(self, weight: str, shape, weight_pos: int, bias: Optional[str], bias_pos: Optional[int]):
        self.weight, self.bias = weight, bias
        self.d_out, self.weight_in = int(shape[0]), int(shape[1])
        self.d_in = self.weight_in + (1 if bias is not None else 0)
        size = self.d_out * self.weight_in
        parts = [torch.arange(weight_pos, weight_pos + size)]
        if bias is not None:
            parts.append(torch.arange(bias_pos, bias_pos + self.d_out))
        #: latent positions of the flat layout
        self.positions = torch.cat(parts)
        # latent position of W~[r, c] for the column-major vec(W~) (index c d_out + r)
        rows, cols = torch.meshgrid(torch.arange(self.d_out), torch.arange(self.d_in), indexing="ij")
        grid = weight_pos + rows * self.weight_in + cols
        if bias is not None:
            grid[:, -1] = bias_pos + torch.arange(self.d_out)
        self.vec_positions = grid.mT.reshape(-1)

    @property
    def dim(self) -> int:
        return self.d_out * self.d_in

    def unflatten(self, flat: Tensor) -> Tensor:
        """``(..., dim)`` in the flat layout to ``W~`` of shape ``(..., d_out, d_in)``."""
        batch = flat.shape[:-1]
        w = flat[..., : self.d_out * self.weight_in].reshape(*batch, self.d_out, self.weight_in)
        if self.bias is None:
            return w
        return torch.cat([w, flat[..., self.d_out * self.weight_in:].unsqueeze(-1)], -1)

    def flatten(self, w: Tensor) -> Tensor:
        """``W~`` of shape ``(..., d_out, d_in)`` to the flat layout."""
        batch = w.shape[:-2]
        weight = w[..., : self.weight_in].reshape(*batch, self.d_out * self.weight_in)
        if self.bias is None:
            return weight
        return torch.cat([weight, w[..., self.weight_in]], -1)


class KroneckerBlockNormal(TorchDistribution):
    """The guide's posterior over the packed latent vector: independent matrix normals (one per block) and a
    structured Gaussian over the remaining coordinates, sharing the families' tensors."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, families: Sequence[KroneckerGaussian], blocks: Sequence[KroneckerBlock],
                 rest: Optional[Gaussian], rest_index: Tensor, validate_args=None):
        self.families, self.blocks, self.rest, self.rest_index = list(families), list(blocks), rest, rest_index
        order = torch.cat([b.positions for b in blocks] + [rest_index])
        self._inverse = torch.argsort(order)
        super().__init__(torch.Size(), torch.Size([order.numel()]), validate_args=validate_args)

    def _assemble(self, pieces: List[Tensor]) -> Tensor:
        z = torch.cat(pieces, -1)
        return z[..., self._inverse.to(z.device)]

    def from_noise(self, eps: Tensor) -> Tensor:
        """The reparameterization of standard normal noise ``eps`` of shape ``(..., latent_dim)``."""
        pieces = [b.flatten(f.from_noise(b.unflatten(eps[..., b.positions]))) for f, b in zip(self.families,
                                                                                                self.blocks)]
        if self.rest is not None:
            pieces.append(self.rest.from_noise(eps[..., self.rest_index]))
        return self._assemble(pieces)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        """A draw ``z`` from standard normal noise ``eps``, both kept: ``log_prob(z)`` of that very tensor is then
        ``-|eps|^2 / 2 - H(q) + d / 2`` (the whitened ``z`` is ``eps`` identically, so no solve is needed and the
        gradient is the same)."""
        reference = self.families[0].loc
        eps = torch.randn(torch.Size(sample_shape) + self.event_shape, dtype=reference.dtype, device=reference.device)
        z = self.from_noise(eps)
        self._last_draw = (z, eps)
        return z

    def log_prob(self, value: Tensor) -> Tensor:
        last = self.__dict__.get("_last_draw")
        if last is not None and value is last[0]:
            return -0.5 * last[1].pow(2).sum(-1) - self.entropy() + 0.5 * self.event_shape[0]
        total = sum(f.log_prob(b.unflatten(value[..., b.positions])) for f, b in zip(self.families, self.blocks))
        if self.rest is not None:
            total = total + self.rest.log_prob(value[..., self.rest_index])
        return total

    def entropy(self) -> Tensor:
        return sum(f.entropy() for f in self.families) + (self.rest.entropy() if self.rest is not None else 0.0)

    @property
    def mean(self) -> Tensor:
        pieces = [b.flatten(f.mean) for f, b in zip(self.families, self.blocks)]
        if self.rest is not None:
            pieces.append(self.rest.loc)
        return self._assemble(pieces)

    @property
    def variance(self) -> Tensor:
        """Marginal variances: ``diag(C C^T)_r diag(K K^T)_c`` for ``W~[r, c]``, the rest's by solves."""
        pieces = []
        for f, b in zip(self.families, self.blocks):
            cc = f.out_group.to_dense(f.out_factor).pow(2).sum(-1)
            kk = f.in_group.to_dense(f.in_factor).pow(2).sum(-1)
            pieces.append(b.flatten(cc[:, None] * kk[None, :]))
        if self.rest is not None:
            pieces.append(StructuredNormal.from_family(self.rest).variance)
        return self._assemble(pieces)


def _is_real(support) -> bool:
    """Whether ``support`` is the reals, event dimensions aside (the unconstrained value is the value itself)."""
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return isinstance(support, type(constraints.real))


def _prior_precision(site: dict) -> Optional[float]:
    """``1 / scale^2`` of an isotropic ``Normal`` prior (through ``expand``, ``to_event``, masks), else ``None``."""
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    scale = getattr(fn, "scale", None)
    if type(fn).__name__ != "Normal" or scale is None:
        return None
    scale = torch.as_tensor(scale)
    if not bool((scale == scale.reshape(-1)[0]).all()):
        return None
    return float(scale.reshape(-1)[0]) ** -2


class AutoKroneckerNormal(LatentGuide):
    """Matrix-normal guide per weight site, a structured Gaussian over the other latents (see the module)::

        guide = AutoKroneckerNormal(models.BNN(p, hidden=(50,)), structure="dense")
        svi = SVI(model, guide, NGD(lr=0.1, estimator="kronecker"), Trace_ELBO())

    Args:
        model: a Pyro model whose latent sites are all continuous.
        structure: the group of both factors of every block (a name for :func:`structngd.groups.make`, or a
            pair ``(input side, output side)``); a factor too small for its options uses ``"dense"``.
        init_loc_fn: per-site initialization of the means (Pyro's init strategies).
        init_scale: initial posterior standard deviation of every latent.
        fold_bias: fold a site ``<prefix>.bias`` of shape ``(d_out,)`` into the block of ``<prefix>.weight``
            (the layer form ``x @ W.mT + b`` the Kronecker estimator assumes).
        sites: names of the matrix sites to give blocks (default: every global real 2-d site).
        rest_structure: the group of the Gaussian over the other latents.
        fisher: where ``G`` comes from. ``"empirical"`` (default): the output gradients of ``SVI``'s own pass (no
            extra pass); ``"true"``: one extra pass per step at a fresh posterior draw, the observed sites' values
            replaced by draws ``y_hat ~ p(y | w)`` of the model's own likelihood, backward of ``-sum log p(y_hat | w)``
            (the Fisher). Where the model fits some points badly (a learned variance far too small) ``g g^T`` far
            exceeds the Fisher and the empirical factors' steps stall; but on the UCI study the smaller true Fisher
            lets the mean steps overshoot and fits worse on 8 of 9 sets (docs/guide/pyro.md).
        **group_options: options of the named groups (``k``, ``block_size``, ...).

    The Kronecker estimator needs an isotropic ``Normal`` prior on each block's sites (its precision is the
    damping; a bias prior of another scale enters through the entries' mean precision) and reads the
    likelihood's subsampling scale from the prototype trace. Pickling keeps what ``AutoStructuredNormal`` keeps.
    """

    def __init__(
        self,
        model,
        structure="dense",
        init_loc_fn=init_to_median,
        init_scale: float = 0.1,
        fold_bias: bool = True,
        sites: Optional[Sequence[str]] = None,
        rest_structure: str = "diagonal",
        fisher: str = "empirical",
        **group_options,
    ):
        self._init_scale = checks.positive("init_scale", init_scale)
        checks.one_of("fisher", fisher, estimators.FISHERS)
        self.fisher = fisher
        self.fold_bias = checks.flag("fold_bias", fold_bias)
        for side in structure if isinstance(structure, (tuple, list)) else (structure,):
            if not isinstance(side, _groups.MatrixGroup):
                _groups.check_options(side, **group_options)
        _groups.check_options(rest_structure)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._plain_model = (model,)  # self.model is wrapped to draw initial values at every site it runs
        self._structure, self._group_options, self._rest_structure = structure, dict(group_options), rest_structure
        self._sites = None if sites is None else list(sites)
        self.blocks: List[KroneckerBlock] = []

    # -------------------------------------------------------------- layout
    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        positions, sites = {}, {}
        pos = 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            positions[name], sites[name] = pos, site
            pos += math.prod(self._unconstrained_shapes[name])
        blocks = self._find_blocks(positions, sites)
        taken = set(torch.cat([b.positions for b in blocks]).tolist()) if blocks else set()
        self.rest_index = torch.tensor([i for i in range(self.latent_dim) if i not in taken], dtype=torch.long)
        self.blocks = blocks
        latent = self._init_loc()
        fallbacks = []
        self.statistics: Dict[str, ProductStatistics] = {}
        self.prior_precisions: Dict[str, Optional[float]] = {}
        for block in blocks:
            in_group, out_group = self._block_groups(block, fallbacks)
            block.in_group, block.out_group = in_group, out_group
            root = torch.full((), math.sqrt(self._init_scale), dtype=latent.dtype, device=latent.device)
            deep_setattr(self, f"locs.{block.weight}", PyroParam(block.unflatten(latent[block.positions]),
                                                                   constraints.independent(constraints.real, 2)))
            for side, group in (("in_factors", in_group), ("out_factors", out_group)):
                factor = group.from_diagonal(root.expand(group.dim))
                deep_setattr(self, f"{side}.{block.weight}",
                             PyroParam(factor, constraints.independent(constraints.real, factor.dim())))
            self.statistics[block.weight] = ProductStatistics(block.weight, block.d_out, block.weight_in,
                                                              block.bias is not None)
            self.prior_precisions[block.weight] = self._block_prior_precision(block, sites)
        self.rest_group = None
        if self.rest_index.numel():
            self.rest_group = _groups.make(self._rest_structure, self.rest_index.numel())
            rest = latent[self.rest_index]
            self.rest_loc = PyroParam(rest, constraints.real_vector)
            factor = self.rest_group.from_diagonal(torch.full_like(rest, 1.0 / self._init_scale))
            self.rest_factor = PyroParam(factor, constraints.independent(constraints.real, factor.dim()))
        self.likelihood_scale = self._observed_scale(args, kwargs)
        if fallbacks:
            warnings.warn(f"AutoKroneckerNormal: {self._structure!r} does not fit these factors, which use 'dense': "
                          f"{', '.join(fallbacks)}", stacklevel=3)

    def _find_blocks(self, positions, sites) -> List[KroneckerBlock]:
        if self._sites is not None:
            unknown = [s for s in self._sites if s not in sites]
            if unknown:
                raise ValueError(f"sites {unknown} are not latent sites of the model; latent sites: {sorted(sites)}")
        blocks = []
        for name, site in sites.items():
            shape = self._unconstrained_shapes[name]
            is_matrix = (len(shape) == 2 and not self._cond_indep_stacks[name]
                         and _is_real(site["fn"].support))
            if self._sites is not None and name in self._sites and not is_matrix:
                raise ValueError(f"site {name!r} (shape {tuple(shape)}) is not a global real matrix site")
            if not is_matrix or (self._sites is not None and name not in self._sites):
                continue
            bias = name[: -len("weight")] + "bias" if self.fold_bias and name.endswith("weight") else None
            fits = (bias in sites and tuple(self._unconstrained_shapes[bias]) == (shape[0],)
                    and not self._cond_indep_stacks[bias]
                    and _is_real(sites[bias]["fn"].support))
            blocks.append(KroneckerBlock(name, shape, positions[name], bias if fits else None,
                                         positions[bias] if fits else None))
        if not blocks:
            raise ValueError("AutoKroneckerNormal found no global real matrix-shaped latent site (e.g. a weight "
                             f"of shape (d_out, d_in)); latent sites: {sorted(sites)}")
        return blocks

    def _block_groups(self, block: KroneckerBlock, fallbacks: list):
        structure = self._structure
        pair = structure if isinstance(structure, (tuple, list)) else (structure, structure)
        out = []
        for side, s, dim in (("K", pair[0], block.d_in), ("C", pair[1], block.d_out)):
            if isinstance(s, _groups.MatrixGroup):
                out.append(s)
                continue
            group, fell_back = _groups.make_or_dense(s, dim, **self._group_options)
            out.append(group)
            if fell_back:
                fallbacks.append(f"{block.weight}.{side} (dim {dim})")
        return tuple(out)

    def _block_prior_precision(self, block: KroneckerBlock, sites) -> Optional[float]:
        weight = _prior_precision(sites[block.weight])
        if block.bias is None or weight is None:
            return weight
        bias = _prior_precision(sites[block.bias])
        if bias is None:
            return None
        n_w = block.d_out * block.weight_in
        return (n_w * weight + block.d_out * bias) / (n_w + block.d_out)

    def _observed_scale(self, args, kwargs) -> float:
        """The likelihood's scale ``N / B`` (Pyro's subsample scale of the observed sites) in one traced run of the
        model at set-up (the prototype trace hides observed sites); the largest where sites differ."""
        with poutine.block():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        scales = [float(site["scale"]) for site in trace.nodes.values()
                  if site["type"] == "sample" and site.get("is_observed")]
        return max(scales, default=1.0)

    # ----------------------------------------------------------- posterior
    def _param(self, side: str, name: str) -> Tensor:
        return functools.reduce(getattr, [getattr(self, side)] + name.split("."))

    def get_posterior(self, *args, **kwargs) -> KroneckerBlockNormal:
        tensors = [(self._param("locs", b.weight), self._param("in_factors", b.weight),
                    self._param("out_factors", b.weight)) for b in self.blocks]
        rest = (self.rest_loc, self.rest_factor) if self.rest_group is not None else None
        wanted = [t for part in tensors + ([rest] if rest is not None else []) for t in part]
        if [id(t) for t in self.owned_tensors()] != [id(t) for t in wanted]:  # the param store handed over others
            families = [KroneckerGaussian.view(b.in_group, b.out_group, k, c, loc)
                        for b, (loc, k, c) in zip(self.blocks, tensors)]
            if rest is not None:
                families.append(Gaussian.view(self.rest_group, *rest))
            self._set_families(families)
        self._mark_training_pass(args, kwargs)
        return self._posterior()

    def _posterior(self) -> KroneckerBlockNormal:
        families = self.families
        rest = families[len(self.blocks)] if self.rest_group is not None else None
        return KroneckerBlockNormal(families[: len(self.blocks)], self.blocks, rest, self.rest_index)

    def _unpack_latent(self, latent):
        track = torch.is_grad_enabled() and latent.requires_grad and not self.__dict__.get("_retracing", False)
        for site, value in super()._unpack_latent(latent):
            stats = self.statistics.get(site["name"]) if track else None
            if stats is not None:
                stats.particles += value.shape[:-2].numel()
                value = TrackedWeight.wrap(value, stats)
            yield site, value

    def _loc_scale(self, *args, **kwargs):
        posterior = self.get_posterior(*args, **kwargs)
        return posterior.mean, posterior.variance.sqrt()

    @property
    def kronecker_families(self) -> Dict[str, KroneckerGaussian]:
        """The matrix normal of each block, by weight site name (after the first pass)."""
        return {b.weight: f for b, f in zip(self.blocks, self.families)}

    # ------------------------------------------------- what NGD's step needs
    def state_signature(self) -> str:
        parts = [f"{b.weight}: K in {b.in_group!r}, C in {b.out_group!r}" for b in self.blocks]
        if self.rest_group is not None:
            parts.append(f"rest: {self.rest_group!r}")
        return "; ".join(parts)

    def directions(self, estimator: str, num_pairs: int) -> list:
        count = len(self.families)
        if estimator == "price":
            self.price_gradients(num_pairs)
        if estimator != "kronecker":
            return [None] * count
        return self.kronecker_directions() + [None] * (count - len(self.blocks))

    def kronecker_directions(self) -> list:
        """Each block's natural gradient: the mean from ``loc.grad``, the factors from the captured ``A``, ``G``
        (with ``fisher="true"``, those of :meth:`sampled_label_pass`)."""
        if self.fisher == "true":
            self.sampled_label_pass()
        out = []
        for block, family in zip(self.blocks, self.families):
            precision = self.prior_precisions[block.weight]
            if precision is None:
                raise ValueError(f"the Kronecker estimator needs an isotropic Normal prior on {block.weight!r}"
                                 + (f" and {block.bias!r}" if block.bias else "") + "; use estimator='reparam'")
            if family.loc.grad is None:
                raise ValueError(f"no gradient for the mean of block {block.weight!r}; run a training pass first")
            a, g = self.statistics[block.weight].statistics(self.likelihood_scale)
            x_k, x_c = estimators.kronecker_factor_gradients(
                family.in_group, family.out_group, family.in_factor.detach(), family.out_factor.detach(),
                a.to(family.loc.dtype), g.to(family.loc.dtype), precision)
            out.append(family.natural_gradient(local_gradient=(family.mean_local_gradient(family.loc.grad), x_k, x_c)))
        return out

    def sampled_label_pass(self) -> None:
        """Re-capture every block's ``A``, ``G`` in one pass of the model, its latents set to a fresh draw
        ``w ~ q``, for the arguments of the last training pass: each observed site's ``p(. | w)`` (not
        ``pyro.factor`` terms) gives ``y_hat`` (no gradient), and the backward of
        ``-sum_sites scale * log p(y_hat | w)`` (masks respected) feeds the hooks; no ``.grad`` is written (if it
        raises, the statistics are as before). ``G = (1 / s) sum g g^T`` then estimates
        ``sum_n E_q E_{y ~ p(.|w)}[g_n g_n^T]``."""
        if self._last_arguments is None:
            raise ValueError("the Kronecker estimator's sampled-label pass needs a training pass first")
        args, kwargs = self._last_arguments
        saved = {name: dict(stats.__dict__) for name, stats in self.statistics.items()}
        for stats in self.statistics.values():
            stats.reset()
        try:
            self._backward_sampled_labels(args, kwargs)
        except BaseException:  # the statistics of the training pass back
            for name, stats in self.statistics.items():
                stats.__dict__.update(saved[name])
            raise

    def _backward_sampled_labels(self, args, kwargs) -> None:
        with torch.enable_grad(), poutine.block():
            with torch.no_grad():
                latent = self._posterior().rsample()
            latent.requires_grad_(True)  # the backward stops at the draw
            values = {site["name"]: biject_to(site["fn"].support)(value)
                      for site, value in self._unpack_latent(latent)}
            model = (self.__dict__.get("_plain_model") or (self.model,))[0]
            model_trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
            terms = []
            for site in model_trace.nodes.values():
                if (site["type"] != "sample" or not site.get("is_observed") or site["name"] in values
                        or isinstance(site["fn"], dist.Unit)):  # a pyro.factor term has no labels to draw
                    continue
                fn = site["fn"]
                with torch.no_grad():
                    y_hat = fn.sample()
                log_p = fn.log_prob(y_hat)
                if site.get("mask") is not None:
                    log_p = log_p * site["mask"]
                terms.append(-(log_p * site["scale"]).sum())
            if not terms:
                raise ValueError("the Kronecker estimator's sampled-label pass found no observed site with a "
                                 "distribution to draw from (pyro.factor terms have none); use fisher='empirical'")
            torch.autograd.grad(sum(terms), [latent], allow_unused=True)

    def __getstate__(self):
        # like Pyro's model, the unwrapped model is the caller's to hand back (``guide._model = (model,)``)
        return {**super().__getstate__(), "_plain_model": None}

    def check_invertible(self) -> None:
        for family in self.families[: len(self.blocks)]:
            require_invertible_factor(family.in_group, family.in_factor)
            require_invertible_factor(family.out_group, family.out_factor)
        if self.rest_group is not None:
            require_invertible_factor(self.rest_group, self.families[-1].factor)

    def after_step(self) -> None:
        for stats in self.statistics.values():
            stats.reset()

    def price_gradients(self, num_pairs: int = 1) -> Tensor:
        """Set every ``.grad`` to the Bonnet/Price gradients of ``-ELBO``; returns the mean ``-log p``.

        From ``num_pairs`` mirrored pairs of the whole posterior: ``g_M = E[grad l]`` per block, the factors' by
        :func:`~structngd.families.estimators.kronecker_price_factor_gradients` of the block's ``E[hess l]``, the
        rest as :meth:`AutoStructuredNormal.price_gradients`; exact for Gaussian-linear models. ``d`` backward
        passes per sample (small models)."""
        derivatives = self._price_derivatives()
        checks.count("num_pairs", num_pairs)
        posterior = self._posterior()
        loc = self.families[0].loc
        with torch.no_grad():
            eps = estimators.standard_normal_noise((2 * num_pairs, self.latent_dim), True, dtype=loc.dtype,
                                                   device=loc.device)
            w = posterior.from_noise(eps)
        self.__dict__["_retracing"] = True  # the re-traced passes record no Kronecker statistics
        try:
            value, g, hess = estimators.mean_loss_derivatives(*derivatives(w))
        finally:
            self.__dict__["_retracing"] = False
        for block, family in zip(self.blocks, self.families):
            family.loc.grad = block.unflatten(g[block.positions]).contiguous()
            h = hess[block.vec_positions][:, block.vec_positions]
            family.in_factor.grad, family.out_factor.grad = estimators.kronecker_price_factor_gradients(family, h)
        if self.rest_group is not None:
            rest, index = self.families[-1], self.rest_index
            rest.loc.grad = g[index]
            rest.factor.grad = estimators.factor_gradient_from_hessian(
                self.rest_group, rest.factor, hess[index][:, index], 1.0).contiguous()
        return value
