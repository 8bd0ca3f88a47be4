"""The methods of the UCI study behind one interface.

``fit(method, train, valid, hyper, steps, seed, options)`` trains one method on ``train`` (a
:class:`Data`, standardized units) for ``steps`` steps of a cosine-decayed learning rate whose
horizon is ``options.horizon`` (a run stopped early is the first part of the same schedule), and
returns a :class:`Fit`: the :class:`Predictor`, the validation log-likelihood at each of
``checkpoints`` (when ``valid`` is given) and the seconds per step. Every predictor is an equally
weighted mixture of ``S`` Gaussians per input, ``p(y | x) = (1/S) sum_s N(y | m_s(x), v_s(x))``:
``S = 1`` for MAP, posterior draws for the variational methods and IVON, forward passes for MC
dropout, members for the ensemble.

Methods: ``map`` (Adam on a MAP objective, learned homoscedastic noise), ``adam_normal`` and
``lowrank`` (Pyro ``AutoNormal`` / ``AutoLowRankMultivariateNormal`` with Adam on ``models.BNN``),
``ngd_diag`` (``AutoStructuredNormal(structure="diagonal")`` + ``NGD``), ``ivon`` (``ivon.IVON``),
``mc_dropout``, ``ensemble`` (heteroscedastic members, the Gaussian mixture), ``kron_ngd``
(``AutoKroneckerNormal`` + ``NGD(estimator="kronecker")``) and ``vkfac``
(``structngd.kron.VariationalKFAC``). :func:`unavailable` says why a method cannot run (an import
that fails), so a study can skip it.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal, init_to_median
from torch import Tensor

from models import BNN, RegressionMLP

from . import common

METHODS = ("map", "adam_normal", "lowrank", "ngd_diag", "ivon", "mc_dropout", "ensemble", "kron_ngd", "vkfac")
#: the structured natural-gradient methods of the library
STRUCTURED = ("kron_ngd", "vkfac", "ngd_diag")
#: the Pyro methods (``models.BNN`` with a guide); the rest train ``models.RegressionMLP``
PYRO_METHODS = ("adam_normal", "lowrank", "ngd_diag", "kron_ngd")
#: methods whose noise model is fixed: MAP's is homoscedastic, the ensemble's heteroscedastic
FIXED_LIKELIHOOD = {"map": "homoscedastic", "ensemble": "heteroscedastic"}
#: what each method needs beyond the core dependencies: (module, attribute)
REQUIREMENTS = {"ivon": ("ivon", "IVON"), "kron_ngd": ("structngd.pyro", "AutoKroneckerNormal"),
                "vkfac": ("structngd.kron", "VariationalKFAC")}


def unavailable(method: str) -> Optional[str]:
    """Why ``method`` cannot run (an import it needs fails), or ``None``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    if method not in REQUIREMENTS:
        return None
    module, name = REQUIREMENTS[method]
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        return f"{module}.{name} does not import ({type(err).__name__}: {err})"
    return None


# ------------------------------------------------------------------ data and predictions
@dataclass
class Data:
    """Inputs ``x`` ``(n, p)`` and targets ``y`` ``(n,)``, standardized."""

    x: Tensor
    y: Tensor

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def subset(self, index: Tensor) -> "Data":
        return Data(self.x[index], self.y[index])


def mixture_log_likelihood(means: Tensor, stds: Tensor, y: Tensor) -> Tensor:
    """``log (1/S) sum_s N(y | means_s, stds_s^2)`` per point for ``means``, ``stds`` of shape ``(S, n)``."""
    log_probs = torch.distributions.Normal(means, stds).log_prob(y)
    return torch.logsumexp(log_probs, 0) - math.log(means.shape[0])


def original_units(log_likelihood: float, rmse: float, y_std: float) -> Tuple[float, float]:
    """Mean log-likelihood and RMSE in standardized units -> original units (``y = y_mean + y_std y~``)."""
    return log_likelihood - math.log(y_std), rmse * y_std


class Predictor:
    """The predictive mixture of a fitted method: ``moments(x)`` gives its ``(means, stds)``, each
    ``(S, n)``, drawn with a fixed noise stream (``seed``) that leaves the global one untouched."""

    def __init__(self, moments: Callable[[Tensor], Tuple[Tensor, Tensor]], seed: int = 12345):
        self._moments, self.seed = moments, seed

    @torch.no_grad()
    def moments(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        with common.fork_rng(x.device):
            torch.manual_seed(self.seed)
            pyro.set_rng_seed(self.seed)
            means, stds = self._moments(x)
        return means.reshape(-1, x.shape[0]), stds.expand_as(means).reshape(-1, x.shape[0])

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-point log predictive density (standardized units), shape ``(n,)``."""
        return mixture_log_likelihood(*self.moments(x), y)

    def mean(self, x: Tensor) -> Tensor:
        """The predictive mean, shape ``(n,)``."""
        return self.moments(x)[0].mean(0)

    def evaluate(self, data: Data) -> Tuple[float, float]:
        """Mean log-likelihood and RMSE on ``data`` (standardized units), from one set of draws."""
        means, stds = self.moments(data.x)
        rmse = float((means.mean(0) - data.y).square().mean().sqrt())
        return float(mixture_log_likelihood(means, stds, data.y).mean()), rmse


# ------------------------------------------------------------------ options
@dataclass(frozen=True)
class Options:
    """The fixed (untuned) choices of every method, from the study's settings."""

    hidden: int = 50
    horizon: int = 2000  # steps of the cosine schedule
    batch_size: Optional[int] = None  # None: full batch
    particles: int = 8  # SVI particles per step
    predictive_samples: int = 100  # posterior draws / MC dropout passes of a prediction
    ensemble_size: int = 5
    lowrank_rank: int = 10
    ivon_beta2: float = 0.99999
    init_scale: float = 0.1  # the variational guides' initial standard deviation
    kron_fisher: str = "empirical"  # AutoKroneckerNormal's G: observed labels' gradients or sampled labels'


def cosine(step: int, horizon: int) -> float:
    """The learning-rate factor after ``step`` of ``horizon`` steps: ``(1 + cos(pi t / T)) / 2``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, horizon) / horizon))


def batches(size: int, batch_size: Optional[int], seed: int) -> Iterator[Optional[Tensor]]:
    """Minibatch indices, a fresh permutation per epoch from ``seed`` (``None`` forever: full batch)."""
    if batch_size is None or batch_size >= size:
        while True:
            yield None
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(size, generator=generator)
        for start in range(0, size - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def _likelihood(method: str, hyper: dict) -> str:
    return FIXED_LIKELIHOOD.get(method, hyper.get("likelihood", "homoscedastic"))


def _prior_penalty(modules: Sequence[torch.nn.Module], prior_scale: float, size: int) -> Tensor:
    """``||w||^2 / (2 prior_scale^2 N)`` over the weights and biases of ``modules``' linear layers."""
    squares = [p.square().sum() for m in modules for layer in m.modules() if isinstance(layer, torch.nn.Linear)
               for p in layer.parameters()]
    return sum(squares) / (2 * prior_scale**2 * size)


def _set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of a torch optimizer (every group) or of an object with an ``lr``."""
    if hasattr(optimizer, "param_groups"):
        for group in optimizer.param_groups:
            group["lr"] = lr
    else:
        optimizer.lr = lr


# ------------------------------------------------------------------ trainers
class Trainer:
    """One method being trained: ``step(batch, size, lr)`` and ``moments(x)``."""

    def __init__(self, method: str, data: Data, hyper: dict, options: Options):
        self.method, self.hyper, self.options = method, dict(hyper), options
        self.likelihood, self.reference = _likelihood(method, hyper), data.x

    def net(self, dropout: float = 0.0) -> RegressionMLP:
        """A fresh net of the method's noise model in the data's dtype and on its device."""
        net = RegressionMLP(self.features, self.options.hidden, self.likelihood, dropout)
        return net.to(dtype=self.reference.dtype, device=self.reference.device)


class AdamNets(Trainer):
    """``map``, ``mc_dropout``, ``ensemble``: Adam on ``-mean log-lik + ||w||^2 / (2 s^2 N)`` of each net."""

    def __init__(self, method: str, data: Data, hyper: dict, options: Options, seed: int):
        super().__init__(method, data, hyper, options)
        self.features, count = data.x.shape[1], options.ensemble_size if method == "ensemble" else 1
        self.nets = []
        for member in range(count):
            torch.manual_seed(seed * 1000 + member)  # each member its own initialization
            self.nets.append(self.net(hyper.get("dropout", 0.0) if method == "mc_dropout" else 0.0))
        self.optimizer = torch.optim.Adam([p for net in self.nets for p in net.parameters()], lr=hyper["lr"])

    def step(self, batch: Data, size: int, lr: float) -> float:
        _set_lr(self.optimizer, lr)
        self.optimizer.zero_grad()
        loss = sum(-net.log_likelihood(batch.x, batch.y).mean() for net in self.nets)
        loss = loss + _prior_penalty(self.nets, self.hyper["prior_scale"], size)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def moments(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        for net in self.nets:
            net.eval()
        if self.method == "mc_dropout":
            with self.nets[0].mc_dropout():
                draws = [self.nets[0](x) for _ in range(self.options.predictive_samples)]
        else:
            draws = [net(x) for net in self.nets]
        for net in self.nets:
            net.train()
        return torch.stack([m for m, _ in draws]), torch.stack([v for _, v in draws]).sqrt()


class IvonNet(Trainer):
    """``ivon``: ``ivon.IVON`` (``ess = N``, ``weight_decay = 1 / (s^2 N)``: the prior ``N(0, s^2)``) on
    ``-mean log-lik``, one posterior draw per step; predictions average ``S`` draws."""

    def __init__(self, method: str, data: Data, hyper: dict, options: Options, seed: int):
        import ivon

        super().__init__(method, data, hyper, options)
        self.features = data.x.shape[1]
        torch.manual_seed(seed)
        self.model = self.net()
        self.optimizer = ivon.IVON(self.model.parameters(), lr=hyper["lr"], ess=data.size,
                                   hess_init=hyper["hess_init"], beta2=options.ivon_beta2,
                                   weight_decay=1.0 / (hyper["prior_scale"] ** 2 * data.size))

    def step(self, batch: Data, size: int, lr: float) -> float:
        _set_lr(self.optimizer, lr)
        with self.optimizer.sampled_params(train=True):
            self.optimizer.zero_grad()
            loss = -self.model.log_likelihood(batch.x, batch.y).mean()
            loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def moments(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        draws = []
        for _ in range(self.options.predictive_samples):
            with self.optimizer.sampled_params(train=False):
                draws.append(self.model(x))
        return torch.stack([m for m, _ in draws]), torch.stack([v for _, v in draws]).sqrt()


class VariationalKfacNet(IvonNet):
    """``vkfac``: ``structngd.kron.VariationalKFAC`` on the plain net (``ess = N``, prior precision
    ``1 / s^2``), with ``sampled_params`` as IVON's."""

    def __init__(self, method: str, data: Data, hyper: dict, options: Options, seed: int):
        from structngd.kron import VariationalKFAC

        Trainer.__init__(self, method, data, hyper, options)
        self.features = data.x.shape[1]
        torch.manual_seed(seed)
        self.model = self.net()
        self.optimizer = VariationalKFAC(self.model, lr=hyper["lr"], ess=data.size,
                                         prior_precision=1.0 / hyper["prior_scale"] ** 2, structure="dense")


class PyroBNN(Trainer):
    """``adam_normal``, ``lowrank``, ``ngd_diag``, ``kron_ngd``: SVI (``Trace_ELBO``, vectorized
    particles) on ``models.BNN`` with ReLU units and ``N(0, s^2)`` priors; minibatches scale the
    likelihood by ``N / B`` (``BNN(..., data_size=N)``)."""

    def __init__(self, method: str, data: Data, hyper: dict, options: Options, seed: int):
        super().__init__(method, data, hyper, options)
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        heteroscedastic = self.likelihood == "heteroscedastic"
        self.model = BNN(data.x.shape[1], 2 if heteroscedastic else 1, hidden=(options.hidden,), activation="relu",
                         likelihood="heteroscedastic" if heteroscedastic else "gaussian",
                         prior_scale=hyper["prior_scale"])
        self.guide, self.optimizer = self._guide_and_optimizer(method, hyper["lr"])
        loss = Trace_ELBO(num_particles=options.particles, vectorize_particles=True, max_plate_nesting=1)
        self.svi = SVI(self.model, self.guide, self.optimizer, loss)
        batch = options.batch_size if options.batch_size is not None and options.batch_size < data.size else None
        with torch.no_grad():  # initialize the guide on a batch as training sees it (its likelihood scale too)
            self.guide(data.x[:batch], data.y[:batch], **({} if batch is None else {"data_size": data.size}))
        self.sites = [name for name, site in poutine.trace(self.model).get_trace(data.x[:2]).nodes.items()
                      if site["type"] == "sample" and not site["is_observed"] and name != "y"]

    def _guide_and_optimizer(self, method: str, lr: float):
        scale, options = self.options.init_scale, self.options
        if method in ("adam_normal", "lowrank"):
            adam = pyro.optim.Adam({"lr": lr})  # each step sets the scheduled lr of its optimizers
            if method == "adam_normal":
                return AutoNormal(self.model, init_loc_fn=init_to_median, init_scale=scale), adam
            rank = options.lowrank_rank
            return AutoLowRankMultivariateNormal(self.model, init_loc_fn=init_to_median, init_scale=scale,
                                                 rank=rank), adam
        from structngd.pyro import NGD

        if method == "ngd_diag":
            from structngd.pyro import AutoStructuredNormal

            guide = AutoStructuredNormal(self.model, structure="diagonal", init_loc_fn=init_to_median,
                                         init_scale=scale)
            return guide, NGD(lr=lr, estimator="reparam", max_step=1.0, fallback=False)
        from structngd.pyro import AutoKroneckerNormal

        guide = AutoKroneckerNormal(self.model, structure="dense", init_scale=scale, fisher=options.kron_fisher)
        return guide, NGD(lr=lr, estimator="kronecker")

    def step(self, batch: Data, size: int, lr: float) -> float:
        if self.method in ("adam_normal", "lowrank"):
            for optimizer in self.optimizer.optim_objs.values():
                _set_lr(optimizer, lr)
        else:
            self.optimizer.lr = lr
        kwargs = {} if batch.size == size else {"data_size": size}
        return self.svi.step(batch.x, batch.y, **kwargs) / size

    def moments(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        samples = self.options.predictive_samples
        draws = Predictive(self.model, guide=self.guide, num_samples=samples, parallel=True,
                           return_sites=self.sites)(x)
        with pyro.plate("particles", samples, dim=-2):
            trace = poutine.trace(poutine.condition(self.model, data=draws)).get_trace(x)
        fn = trace.nodes["y"]["fn"]
        return fn.loc, fn.scale


TRAINERS = {"map": AdamNets, "mc_dropout": AdamNets, "ensemble": AdamNets, "ivon": IvonNet,
            "vkfac": VariationalKfacNet, **{m: PyroBNN for m in PYRO_METHODS}}


# ------------------------------------------------------------------ fitting
@dataclass
class Fit:
    """A fitted method: its predictor, the validation mean log-likelihood per checkpoint and its pace."""

    predictor: Predictor
    valid_ll: Dict[int, float] = field(default_factory=dict)
    seconds_per_step: float = math.nan


def fit(method: str, train: Data, valid: Optional[Data], hyper: dict, steps: int, seed: int,
        options: Options, checkpoints: Sequence[int] = (),
        progress: Optional[Callable[[int, float], None]] = None) -> Fit:
    """Train ``method`` with ``hyper`` on ``train`` for ``steps`` steps (lr ``hyper["lr"]`` times
    :func:`cosine` over ``options.horizon``); with ``valid``, the validation mean log-likelihood
    (standardized units) at each checkpoint ``<= steps``, passed to ``progress(step, value)`` too.
    The minibatch order depends on ``seed`` and the data size only (the same for every method).
    A non-finite training loss raises ``FloatingPointError``."""
    if method not in TRAINERS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    reason = unavailable(method)
    if reason:
        raise ImportError(reason)
    torch.manual_seed(seed)
    trainer = TRAINERS[method](method, train, hyper, options, seed)
    order, clock, result = batches(train.size, options.batch_size, seed), common.Stopwatch(train.x.device), {}
    predictor = Predictor(trainer.moments)
    for step in range(1, steps + 1):
        index = next(order)
        batch = train if index is None else train.subset(index)
        with clock:
            loss = trainer.step(batch, train.size, hyper["lr"] * cosine(step - 1, options.horizon))
        if not math.isfinite(loss):
            raise FloatingPointError(f"{method}: training loss is {loss} at step {step}")
        if valid is not None and step in checkpoints:
            result[step] = predictor.evaluate(valid)[0]
            if progress is not None:
                progress(step, result[step])
    return Fit(predictor, result, clock.seconds / max(steps, 1))
