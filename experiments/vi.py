"""Variational inference in Pyro: structured NGD guides against Pyro's autoguides with Adam.

Methods (``METHODS``), each fitted by ``pyro.infer.SVI`` to every problem of
``experiments/vi_data.py`` (logistic regression on breast cancer; BNNs on wine, digits,
diabetes, a generated 1-D regression with a gap in its inputs, and the UCI regression
benchmark ``uci_<name>`` with the literature protocol: one hidden layer of 50 ReLU units,
standard splits, the seed is the split index):

* ``AutoStructuredNormal`` + ``NGD`` (structured natural gradient) with the structures
  ``dense``, ``lower_triangular``, ``block_triangular(k)``, ``hierarchical(k, k)``, ``diagonal``;
* Pyro's ``AutoNormal``, ``AutoLowRankMultivariateNormal(rank=k)`` and
  ``AutoMultivariateNormal`` with ``pyro.optim.Adam``;

with ``k = clamp(round(sqrt(d) / 2), 2, 10)`` for latent dimension ``d``. Every guide starts
from the same point (``init_to_median``, ``init_scale=0.1``, the same seed). Each method runs
over a small learning-rate grid (``NGD_SETTINGS`` holds every NGD choice: lr grids,
``max_step``, estimator and particles, in one place); the best learning rate per method is the
one with the highest seed-averaged final ELBO. Methods whose cost grows like ``d^2`` memory /
``d^3`` time (dense, triangular, multivariate normal) are skipped above ``--max-dense-dim``
latents (recorded as skipped).

Metrics, per method and problem (seed-averaged):

* the ELBO at a schedule of steps, each a fixed large-particle estimate (``--eval-particles``
  vectorized particles, the same random numbers at every evaluation of a run), outside the
  timed region: seconds count only ``svi.step``;
* the steps and seconds to get within 1 nat (``--tol``) of the best ELBO any method reached
  on that problem and seed (curves of the gap ``best - ELBO`` averaged over seeds);
* final ELBO; test log-likelihood of the Monte Carlo posterior predictive
  (``log mean_s p(y | x, theta_s)`` per test point, averaged); accuracy and expected
  calibration error (10 bins) for classification; RMSE and 90%-interval coverage of the
  predictive distribution for regression.

UCI problems: test RMSE and log-likelihood in the target's original units, mean ± standard
error over the splits (= seeds), next to the published numbers of PBP, MC dropout and
mean-field VI (``LITERATURE``). Their O(d^2) guides are skipped above ``--uci-max-dense-dim``
(default 300: all of them; d = 302 to 1102), and they may have their own step budgets
(``--uci-ngd-steps``, ``--uci-adam-steps``; the full preset gives NGD 1000 steps there).

Outputs in ``--out`` (default ``results/vi``): ``results.json`` (settings, every run with its
curve and metrics, the selection), ``summary.csv`` and ``table.md`` (the best setting per
method and problem; also printed), ``elbo_vs_steps.png`` and ``elbo_vs_seconds.png`` (gap to
the best ELBO, one panel per problem) and ``gap1d_bands.png`` (predictive mean and 90% band
of each method on the gap regression, training points shown).

Modes (2 CPU cores, one torch thread): ``--tiny`` (seconds, smoke test), ``--quick`` (breast
cancer, wine, gap1d with small BNNs, 2 seeds; about 3 minutes; the default) and ``--full``
(the five small problems and the UCI sets boston, concrete, energy, yacht and wine, 5 seeds =
splits 0-4, longer runs; about 1-2 hours for the small problems, dominated by the dense
methods on digits, plus roughly 3 hours for the UCI sets, mostly Adam's 2000-step runs).
Any UCI set runs with any preset via ``--problems uci_<name>`` (``--seeds 0 ... 19`` for the
literature's 20 splits). Timings are wall-clock on a shared machine: compare methods within
one run.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_median,
)

from structngd.pyro import NGD, AutoStructuredNormal

from . import common, vi_data
from .common import Curve, Line, fmt
from .vi_data import Problem


# ------------------------------------------------------- NGD configuration
@dataclass(frozen=True)
class NGDSettings:
    """Every choice about the NGD runs, in one place (the study and the benchmark read it).

    ``estimator="auto"`` uses ``price`` (Bonnet/Price: the model's Hessian, ``d`` backward
    passes per sample) up to ``price_max_dim`` latents and ``reparam`` (SVI's own gradient from
    ``particles`` vectorized particles) above.
    """

    estimator: str = "auto"
    price_max_dim: int = 160
    price_lrs: Tuple[float, ...] = (0.1, 0.3, 1.0)  # non-dense structures need lr < 2 / lambda_max(S^-1 P)
    reparam_lrs: Tuple[float, ...] = (0.05, 0.1, 0.2)
    max_step: Optional[float] = 1.0
    num_pairs: int = 1
    particles: int = 16
    momentum: float = 0.0

    def estimator_for(self, dim: int) -> str:
        if self.estimator != "auto":
            return self.estimator
        return "price" if dim <= self.price_max_dim else "reparam"

    def lrs(self, estimator: str) -> Tuple[float, ...]:
        return self.price_lrs if estimator == "price" else self.reparam_lrs

    def particles_for(self, estimator: str) -> int:
        """Particles of SVI's own pass (price does not use its gradient: one is enough)."""
        return 1 if estimator == "price" else self.particles


NGD_SETTINGS = NGDSettings()


# ------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """A guide and the optimizer family that moves it."""

    key: str
    optimizer: str  # "ngd" or "adam"
    guide: str  # "structured" or a Pyro autoguide class name
    structure: Optional[str] = None
    quadratic: bool = False  # O(d^2) memory, O(d^3) time: skipped above max_dense_dim
    estimator: Optional[str] = None  # NGD: force this estimator (None: NGDSettings.estimator_for)

    def options(self, dim: int) -> Dict[str, int]:
        k = low_rank(dim)
        if self.structure == "block_triangular":
            return {"k": k}
        if self.structure == "hierarchical":
            return {"k1": k, "k2": k}
        if self.guide == "AutoLowRankMultivariateNormal":
            return {"rank": k}
        return {}

    def label(self, dim: Optional[int] = None) -> str:
        if self.optimizer == "ngd":
            name = f"NGD {self.structure}" + (f" {self.estimator}" if self.estimator else "")
        else:
            name = f"Adam {self.guide.replace('MultivariateNormal', 'MVN')}"
        if dim is not None and self.options(dim):
            name += "(" + ",".join(str(v) for v in self.options(dim).values()) + ")"
        return name

    def build_guide(self, model, dim: int):
        common_args = dict(init_loc_fn=init_to_median, init_scale=0.1)
        if self.guide == "structured":
            return AutoStructuredNormal(model, structure=self.structure, **common_args, **self.options(dim))
        cls = {"AutoNormal": AutoNormal, "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal,
               "AutoMultivariateNormal": AutoMultivariateNormal}[self.guide]
        return cls(model, **common_args, **self.options(dim))


def low_rank(dim: int) -> int:
    """Rank / block parameter of the low-rank structures: ``clamp(round(sqrt(d)/2), 2, 10)``."""
    return max(1, min(10, max(2, round(math.sqrt(dim) / 2)), dim // 2 - 1))


METHODS = {
    m.key: m
    for m in (
        Method("ngd_dense", "ngd", "structured", "dense", quadratic=True),
        Method("ngd_dense_reparam", "ngd", "structured", "dense", quadratic=True, estimator="reparam"),
        Method("ngd_lower_triangular", "ngd", "structured", "lower_triangular", quadratic=True),
        Method("ngd_block_triangular", "ngd", "structured", "block_triangular"),
        Method("ngd_hierarchical", "ngd", "structured", "hierarchical"),
        Method("ngd_diagonal", "ngd", "structured", "diagonal"),
        Method("adam_mvn", "adam", "AutoMultivariateNormal", quadratic=True),
        Method("adam_lowrank", "adam", "AutoLowRankMultivariateNormal"),
        Method("adam_normal", "adam", "AutoNormal"),
    )
}


@dataclass(frozen=True)
class RunConfig:
    """One optimizer setting of a method on a problem of latent dimension ``dim``."""

    method: str
    lr: float
    estimator: Optional[str] = None  # NGD only
    max_step: Optional[float] = None
    particles: int = 16

    @property
    def label(self) -> str:
        if self.estimator is None:
            return f"lr {self.lr:g}"
        tr = "" if self.max_step is None else f", tr {self.max_step:g}"
        return f"{self.estimator} lr {self.lr:g}{tr}"

    def build_optimizer(self, ngd: NGDSettings):
        if METHODS[self.method].optimizer == "ngd":
            return NGD(lr=self.lr, estimator=self.estimator, num_pairs=ngd.num_pairs, momentum=ngd.momentum,
                       max_step=self.max_step, fallback=False)
        return pyro.optim.Adam({"lr": self.lr})


# ---------------------------------------------------------------- literature
#: Published test RMSE and test log-likelihood (original units; mean ± the published error
#: over the 20 standard splits, 5 for protein; one hidden layer of 50 units, 100 for protein)
#: as tabulated in Gal & Ghahramani (2016), Table 1: "VI" is mean-field VI (Graves, 2011) and
#: "PBP" probabilistic backpropagation, both as run by Hernandez-Lobato & Adams (2015);
#: "MC dropout" Gal & Ghahramani's own (the paper's numbers, not the later 10x-epoch ones).
#: ``None``: not included (a value not known with confidence).
LITERATURE_SOURCES = {
    "PBP": "Hernández-Lobato & Adams, Probabilistic backpropagation for scalable learning of Bayesian "
           "neural networks, ICML 2015",
    "MC dropout": "Gal & Ghahramani, Dropout as a Bayesian approximation: representing model uncertainty "
                  "in deep learning, ICML 2016 (Table 1)",
    "VI": "mean-field VI (Graves, Practical variational inference for neural networks, NIPS 2011) as run "
          "by Hernández-Lobato & Adams 2015 and tabulated by Gal & Ghahramani 2016",
}
_Pub = Tuple[Optional[float], Optional[float], Optional[float], Optional[float]]  # rmse, se, ll, se
LITERATURE: Dict[str, Dict[str, _Pub]] = {
    "uci_boston": {"PBP": (3.01, 0.18, -2.57, 0.09), "MC dropout": (2.97, 0.85, -2.46, 0.25),
                   "VI": (4.32, 0.29, -2.90, 0.07)},
    "uci_concrete": {"PBP": (5.67, 0.09, -3.16, 0.02), "MC dropout": (5.23, 0.53, -3.04, 0.09),
                     "VI": (None, None, -3.39, 0.02)},
    "uci_energy": {"PBP": (1.80, 0.05, -2.04, 0.02), "MC dropout": (1.66, 0.19, -1.99, 0.09),
                   "VI": (2.65, 0.08, -2.39, 0.03)},
    "uci_kin8nm": {"PBP": (0.10, 0.00, 0.90, 0.01), "MC dropout": (0.10, 0.00, 0.95, 0.03),
                   "VI": (0.10, 0.00, 0.90, 0.01)},
    "uci_naval": {"PBP": (0.01, 0.00, 3.73, 0.01), "MC dropout": (0.01, 0.00, 3.80, 0.05),
                  "VI": (0.01, 0.00, 3.73, 0.12)},
    "uci_power": {"PBP": (4.12, 0.03, -2.84, 0.01), "MC dropout": (4.02, 0.18, -2.80, 0.05),
                  "VI": (4.33, 0.04, -2.89, 0.01)},
    "uci_protein": {"PBP": (4.73, 0.01, -2.97, 0.00), "MC dropout": (4.36, 0.04, -2.89, 0.01),
                    "VI": (4.84, 0.03, -2.99, 0.01)},
    "uci_wine": {"PBP": (0.64, 0.01, -0.97, 0.01), "MC dropout": (0.62, 0.04, -0.93, 0.06),
                 "VI": (0.65, 0.01, -0.98, 0.01)},
    "uci_yacht": {"PBP": (1.02, 0.05, -1.63, 0.02), "MC dropout": (1.11, 0.38, -1.55, 0.12),
                  "VI": (6.89, 0.67, -3.43, 0.16)},
}


def _pm(mean: Optional[float], err: Optional[float], digits: int = 2) -> str:
    if mean is None or mean != mean:
        return "–"
    return f"{mean:.{digits}f}" if err is None or err != err else f"{mean:.{digits}f} ± {err:.{digits}f}"


def literature_line(problem: str) -> Optional[str]:
    """A Markdown line with the published RMSE / LL of ``problem`` (``None`` if none known)."""
    entries = LITERATURE.get(problem)
    if not entries:
        return None
    protein = problem == "uci_protein"
    parts = [f"{name} {_pm(r, rs)} / {_pm(l, ls)}" for name, (r, rs, l, ls) in entries.items()]
    return (f"Literature (test RMSE / test LL, original units, {5 if protein else 20} splits, "
            f"1 x {100 if protein else 50} units; ± as published; sources below): " + "; ".join(parts) + ".")


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines one study; built from a preset and the command line."""

    size: str
    seeds: Tuple[int, ...]
    problems: Tuple[str, ...]
    methods: Tuple[str, ...] = tuple(METHODS)
    ngd_steps: int = 300
    adam_steps: int = 1500
    adam_lrs: Tuple[float, ...] = (0.003, 0.01, 0.03)
    adam_particles: int = 16
    ngd: NGDSettings = NGD_SETTINGS
    eval_particles: int = 256
    eval_points: int = 25
    predictive_samples: int = 400
    max_dense_dim: int = 2000
    tol: float = 1.0
    threads: Optional[int] = 1
    uci_ngd_steps: Optional[int] = None  # UCI problems: own step budgets (None: ngd_steps / adam_steps)
    uci_adam_steps: Optional[int] = None
    uci_max_dense_dim: int = 300  # UCI problems: O(d^2) guides also skipped above this
    uci_root: Optional[str] = None  # UCI data in the original folder layout (None: vendored npz)
    device: str = "cpu"  # of the data, the models' priors and the guides (the splits are made on the CPU)

    def steps(self, method: str, problem: Optional[str] = None) -> int:
        ngd = METHODS[method].optimizer == "ngd"
        if problem is not None and vi_data.is_uci(problem):
            own = self.uci_ngd_steps if ngd else self.uci_adam_steps
            if own is not None:
                return own
        return self.ngd_steps if ngd else self.adam_steps

    def configs(self, method: str, dim: int) -> List[RunConfig]:
        """The learning-rate grid of ``method`` at latent dimension ``dim``."""
        if METHODS[method].optimizer == "ngd":
            est = METHODS[method].estimator or self.ngd.estimator_for(dim)
            return [RunConfig(method, lr, est, self.ngd.max_step, self.ngd.particles_for(est))
                    for lr in self.ngd.lrs(est)]
        return [RunConfig(method, lr, particles=self.adam_particles) for lr in self.adam_lrs]


PRESETS = {
    "tiny": Settings(
        size="tiny", seeds=(0,), problems=("breast_cancer", "gap1d"),
        methods=("ngd_dense", "ngd_diagonal", "adam_mvn", "adam_normal"),
        ngd_steps=20, adam_steps=40, adam_lrs=(0.03,), ngd=replace(NGD_SETTINGS, price_lrs=(1.0,), reparam_lrs=(0.1,)),
        eval_particles=64, eval_points=5, predictive_samples=100,
    ),
    "quick": Settings(
        size="quick", seeds=(0, 1), problems=("breast_cancer", "wine", "gap1d"),
        ngd_steps=100, adam_steps=400, adam_lrs=(0.01, 0.03), adam_particles=8,
        ngd=replace(NGD_SETTINGS, price_lrs=(0.1, 1.0), reparam_lrs=(0.1, 0.2), particles=8),
        eval_particles=128, eval_points=10, predictive_samples=200,
    ),
    "full": Settings(
        size="full", seeds=(0, 1, 2, 3, 4),
        problems=("breast_cancer", "wine", "digits", "diabetes", "gap1d",
                  "uci_boston", "uci_concrete", "uci_energy", "uci_yacht", "uci_wine"),
        ngd_steps=300, adam_steps=2000, uci_ngd_steps=1000,
    ),
}


# ---------------------------------------------------------------- evaluation
def elbo_estimate(problem: Problem, guide, particles: int, seed: int) -> float:
    """ELBO from ``particles`` vectorized particles with a fixed noise stream (``seed``)."""
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad(), common.fork_rng(problem.x_train.device):
        torch.manual_seed(seed)
        value = -loss.loss(problem.model, guide, problem.x_train, problem.y_train)
    if not math.isfinite(value):
        raise FloatingPointError(f"ELBO estimate is {value}")
    return value


# ---------------------------------------------------------------------- runs
@dataclass
class Run:
    """One SVI run: its ELBO curve, status and final test metrics."""

    problem: str
    seed: int
    config: RunConfig
    curve: Curve
    status: str
    metrics: Dict[str, float] = field(default_factory=dict)
    band: Optional[Dict[str, List[float]]] = None
    gap: Optional[Curve] = None

    @property
    def method(self) -> str:
        return self.config.method


def run_one(problem: Problem, config: RunConfig, seed: int, steps: int, settings: Settings,
            dim: int, eval_seed: int = 12345, band: bool = False) -> Tuple[Run, object]:
    """Fit one guide by SVI; a failing step or evaluation (non-finite value, singular factor)
    ends the run with status ``diverged at step ...`` and ``nan`` for the rest of the curve."""
    method = METHODS[config.method]
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = method.build_guide(problem.model, dim)
    with torch.no_grad():
        guide(problem.x_train, problem.y_train)  # initialize (same init for every method)
    loss = Trace_ELBO(num_particles=config.particles, vectorize_particles=config.particles > 1, max_plate_nesting=1)
    svi = SVI(problem.model, guide, config.build_optimizer(settings.ngd), loss)
    points = common.eval_points(steps, settings.eval_points)
    clock, status = common.Stopwatch(problem.x_train.device), "ok"
    curve = Curve([], [], [])
    it = 0
    try:
        curve.values.append(elbo_estimate(problem, guide, settings.eval_particles, eval_seed))
        curve.iterations.append(0)
        curve.seconds.append(0.0)
        for it in range(1, steps + 1):
            with clock:
                value = svi.step(problem.x_train, problem.y_train)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value}")
            if it == points[len(curve.iterations)]:
                curve.values.append(elbo_estimate(problem, guide, settings.eval_particles, eval_seed))
                curve.iterations.append(it)
                curve.seconds.append(clock.seconds)
    except (ValueError, RuntimeError, FloatingPointError, AssertionError) as err:
        status = f"diverged at step {it}: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    missing = points[len(curve.iterations):]
    curve.iterations += missing
    curve.seconds += [math.nan] * len(missing)
    curve.values += [math.nan] * len(missing)
    run = Run(problem.name, seed, config, curve, status)
    if status == "ok":
        try:
            run.metrics = vi_data.test_metrics(problem, guide, settings.predictive_samples, eval_seed)
            if band and problem.x_grid is not None:
                run.band = vi_data.predictive_band(problem, guide, settings.predictive_samples, eval_seed)
        except (ValueError, RuntimeError) as err:
            run.status = f"predictive failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return run, guide


def warm_up(plan, settings: Settings) -> None:
    """Two untimed steps of each method's first setting: one-time costs (e.g. torch's first
    batched-gradient call behind the price estimator, about a second) stay out of the timings."""
    seen = set()
    for problem, config, seed, dim in plan:
        if config.method not in seen:
            seen.add(config.method)
            run_one(problem, config, seed, 2, replace(settings, eval_points=1, eval_particles=2), dim)


def skip_reason(method: Method, dim: int, settings: Settings, problem: Optional[str] = None) -> Optional[str]:
    """Why ``method`` does not run at latent dimension ``dim`` on ``problem`` (``None``: it runs)."""
    if method.quadratic and dim > settings.max_dense_dim:
        return f"latent dim {dim} > {settings.max_dense_dim}"
    if method.quadratic and problem is not None and vi_data.is_uci(problem) and dim > settings.uci_max_dense_dim:
        return f"latent dim {dim} > {settings.uci_max_dense_dim} (--uci-max-dense-dim)"
    if method.estimator is not None and method.estimator == settings.ngd.estimator_for(dim):
        twin = next((m for m in METHODS.values() if m.structure == method.structure and m.estimator is None), None)
        if twin is not None and twin.key in settings.methods:
            return f"same runs as {twin.label()} (its estimator is {method.estimator} at d = {dim})"
    return None


def run_all(settings: Settings) -> Tuple[List[Run], Dict[str, dict], List[dict]]:
    """Every run; per problem its description; and the skipped (problem, method) pairs."""
    specs = vi_data.problem_specs(settings.size)
    plan, info, skipped = [], {}, []
    for name in settings.problems:
        spec = specs[name]
        if vi_data.is_uci(name) and settings.uci_root is not None:
            spec = replace(spec, uci_root=str(settings.uci_root))
        for seed in settings.seeds:
            problem = vi_data.load(spec, seed, settings.device)
            dim = vi_data.latent_dim(spec, problem)
            info.setdefault(name, {
                "label": spec.label, "task": spec.task, "latent_dim": dim, "hidden": spec.hidden,
                "num_train": problem.x_train.shape[0], "num_test": problem.x_test.shape[0],
                "features": problem.x_train.shape[1], "k": low_rank(dim),
                "original_units": "y_std" in problem.extra,
            })
            for key in settings.methods:
                reason = skip_reason(METHODS[key], dim, settings, name)
                if reason:
                    if seed == settings.seeds[0]:
                        skipped.append({"problem": name, "method": key, "reason": reason})
                    continue
                for config in settings.configs(key, dim):
                    plan.append((problem, config, seed, dim))
    warm_up(plan, settings)
    bar = common.progress(len(plan), "vi")
    runs = []
    for problem, config, seed, dim in plan:
        bar.set_postfix_str(f"{problem.name} {METHODS[config.method].label()} {config.label} seed {seed}")
        run, _ = run_one(problem, config, seed, settings.steps(config.method, problem.name), settings, dim,
                         band=seed == settings.seeds[0])
        runs.append(run)
        bar.update()
    bar.close()
    return runs, info, skipped


# ------------------------------------------------------------------ summary
def attach_gaps(runs: List[Run]) -> Dict[Tuple[str, int], float]:
    """Best ELBO per (problem, seed) over every run and evaluation; each run's gap curve."""
    best: Dict[Tuple[str, int], float] = defaultdict(lambda: -math.inf)
    for run in runs:
        for v in run.curve.values:
            if v == v:
                best[(run.problem, run.seed)] = max(best[(run.problem, run.seed)], v)
    for run in runs:
        b = best[(run.problem, run.seed)]
        run.gap = replace(run.curve, values=[b - v for v in run.curve.values])
    return dict(best)


@dataclass
class Selected:
    """The best learning rate of a method on a problem, seed-averaged."""

    problem: str
    method: str
    config: RunConfig
    runs: List[Run]
    curve: Curve  # mean ELBO
    gap: Curve  # mean gap to the per-seed best ELBO
    reached: Tuple[Optional[int], Optional[float]]
    grid: List[dict]  # every lr of the grid: label and mean final ELBO

    def metric(self, name: str) -> float:
        values = [r.metrics.get(name, math.nan) for r in self.runs]
        return sum(values) / len(values) if values else math.nan

    def metric_se(self, name: str) -> float:
        """Standard error of the seed mean of ``name`` (``std / sqrt(seeds)``; nan with one seed)."""
        values = [r.metrics.get(name, math.nan) for r in self.runs]
        if len(values) < 2:
            return math.nan
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))

    @property
    def finals(self) -> List[float]:
        return [r.curve.final for r in self.runs]

    @property
    def diverged(self) -> int:
        return sum(r.status != "ok" for r in self.runs)


def _mean_final(curve: Curve) -> float:
    return curve.final if curve.final == curve.final else -math.inf


def select(runs: List[Run], tol: float) -> Dict[Tuple[str, str], Selected]:
    """Per (problem, method): the learning rate with the highest seed-averaged final ELBO."""
    grouped = defaultdict(list)
    for run in runs:
        grouped[(run.problem, run.method, run.config)].append(run)
    candidates = defaultdict(list)
    for (problem, method, config), members in grouped.items():
        curve = common.mean_curve([r.curve for r in members])
        gap = common.mean_curve([r.gap for r in members])
        candidates[(problem, method)].append(
            Selected(problem, method, config, members, curve, gap, gap.first_below(tol), [])
        )
    out = {}
    for key, options in candidates.items():
        best = max(options, key=lambda s: _mean_final(s.curve))
        best.grid = [{"setting": s.config.label, "final_elbo": s.curve.final, "diverged": s.diverged} for s in options]
        out[key] = best
    return out


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    vals = [v for v in values if v == v]
    if len(vals) != len(values) or not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def summary_rows(selected: Dict[Tuple[str, str], Selected], info: Dict[str, dict], best: Dict[Tuple[str, int], float],
                 skipped: List[dict], settings: Settings) -> List[dict]:
    """One row per (problem, method): best setting, ELBO, times to ``tol``, test metrics."""
    rows = []
    for problem in settings.problems:
        dim = info[problem]["latent_dim"]
        best_mean = _mean_std([best[(problem, s)] for s in settings.seeds])[0]
        for key in settings.methods:
            row = {"problem": problem, "latent_dim": dim, "best_elbo": best_mean, "method": METHODS[key].label(dim)}
            skip = next((s for s in skipped if s["problem"] == problem and s["method"] == key), None)
            sel = selected.get((problem, key))
            if skip or sel is None:
                row.update({"setting": "skipped" if skip else "–", "status": skip["reason"] if skip else "no runs"})
                rows.append(row)
                continue
            mean, std = _mean_std(sel.finals)
            total_s = max((s for s in sel.curve.seconds if s == s), default=math.nan)
            row.update({
                "setting": sel.config.label, "status": "ok" if not sel.diverged else f"{sel.diverged} diverged",
                "final_elbo": mean, "final_elbo_std": std,
                "steps_to_tol": sel.reached[0], "seconds_to_tol": sel.reached[1],
                "steps": settings.steps(key, problem), "total_seconds": total_s,
                "ms_per_step": 1000 * total_s / settings.steps(key, problem) if total_s == total_s else math.nan,
            })
            for name in ("test_loglik", "accuracy", "ece", "rmse", "coverage90"):
                if any(name in r.metrics for r in sel.runs):
                    row[name] = sel.metric(name)
                    row[name + "_se"] = sel.metric_se(name)
            rows.append(row)
    return rows


def _reach(value, digits=2) -> str:
    if value is None:
        return "not reached"
    return str(value) if isinstance(value, int) else fmt(value, digits)


def markdown_report(rows: List[dict], info: Dict[str, dict], settings: Settings, runtime: float,
                    notes: List[str]) -> str:
    ngd = settings.ngd
    grid = lambda values: "{" + ", ".join(f"{v:g}" for v in values) + "}"
    lines = [
        "# Variational inference: structured NGD vs Pyro autoguides with Adam",
        "",
        f"ELBO: {settings.eval_particles}-particle estimate (fixed noise per run) at {settings.eval_points}-ish "
        f"scheduled steps, seed-averaged over seeds {list(settings.seeds)}; `best` = best ELBO of any run "
        f"and evaluation on the problem (per seed, then averaged). `steps`/`s` to {settings.tol:g} nat = first "
        f"evaluated step (and seconds of `svi.step` work) where the seed-averaged gap to `best` is below "
        f"{settings.tol:g}. Best setting per method: highest mean final ELBO over its grid. Test metrics: Monte "
        f"Carlo posterior predictive ({settings.predictive_samples} draws) on the held-out split; `LL` = mean "
        f"log predictive density per test point; ECE with 10 bins; `cov90` = coverage of the 90% predictive "
        f"interval; regression targets standardized (UCI problems: RMSE and LL in the target's original "
        f"units, mean ± standard error over the splits = seeds).",
        "",
        f"Settings: NGD {settings.ngd_steps} steps, estimator `{ngd.estimator}` (price up to d = "
        f"{ngd.price_max_dim}, {ngd.num_pairs} pair; reparam with {ngd.particles} particles above), lr "
        f"price {grid(ngd.price_lrs)} / reparam {grid(ngd.reparam_lrs)}, max_step {ngd.max_step}; "
        f"Adam {settings.adam_steps} steps, lr {grid(settings.adam_lrs)}, {settings.adam_particles} particles; "
        f"init_to_median, init_scale 0.1; float64 on {settings.device}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), {platform.machine()}; study runtime {runtime:.0f} s.",
    ]
    header = ["method", "setting", "final ELBO", "steps to 1 nat", "s to 1 nat", "ms/step", "test LL"]
    for problem in settings.problems:
        meta = info[problem]
        members = [r for r in rows if r["problem"] == problem]
        classification = meta["task"] != "regression"
        extra = ["acc", "ECE"] if classification else ["RMSE", "cov90"]
        body = []
        for r in members:
            if "final_elbo" not in r:
                body.append([r["method"], r["setting"], r["status"]] + ["–"] * (len(header) + len(extra) - 3))
                continue
            elbo = "diverged" if r["final_elbo"] != r["final_elbo"] else f"{r['final_elbo']:.2f} ± {r['final_elbo_std']:.2f}"
            if r["status"] != "ok":
                elbo += f" ({r['status']})"
            if meta.get("original_units"):
                digits = _digits(r.get("rmse"))
                metrics = [_pm(r.get("test_loglik"), r.get("test_loglik_se"), 2),
                           _pm(r.get("rmse"), r.get("rmse_se"), digits), fmt(r.get("coverage90"), 3)]
            else:
                metrics = [fmt(r.get("test_loglik"), 3)] + [
                    fmt(r.get(k), 3) for k in (("accuracy", "ece") if classification else ("rmse", "coverage90"))]
            body.append([
                r["method"], r["setting"], elbo, _reach(r["steps_to_tol"]), _reach(r["seconds_to_tol"]),
                fmt(r["ms_per_step"], 2),
            ] + metrics)
        best = members[0]["best_elbo"] if members else math.nan
        steps = ""
        if vi_data.is_uci(problem):
            steps = (f", NGD {settings.steps('ngd_diagonal', problem)} / Adam {settings.steps('adam_normal', problem)} "
                     f"steps, splits {list(settings.seeds)}")
        lines += [
            "", f"## {meta['label']}: d = {meta['latent_dim']}, n = {meta['num_train']} train / {meta['num_test']} test, "
            f"k = {meta['k']}, best ELBO {best:.2f}{steps}", "",
            common.markdown_table(header + extra, body),
        ]
        literature = literature_line(problem)
        if literature:
            lines += ["", literature]
    if any(p in LITERATURE for p in settings.problems):
        lines += ["", "Literature sources:", ""] + [f"- {k}: {v}." for k, v in LITERATURE_SOURCES.items()]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _digits(value: Optional[float]) -> int:
    """Decimals that show about three significant digits of an RMSE."""
    if value is None or not value == value or value <= 0:
        return 2
    return max(2, 2 - math.floor(math.log10(value)))


def notes_for(runs: List[Run], selected: Dict[Tuple[str, str], Selected]) -> List[str]:
    out = []
    failed = [r for r in runs if r.status != "ok"]
    by_method = defaultdict(list)
    for r in failed:
        by_method[r.method].append(r)
    for key, bad in by_method.items():
        total = sum(r.method == key for r in runs)
        ex = bad[0]
        out.append(f"{METHODS[key].label()}: {len(bad)} of {total} runs failed, e.g. {ex.problem} seed {ex.seed} "
                   f"{ex.config.label}: {ex.status} (all in results.json)")
    for (problem, key), sel in selected.items():
        lost = [g for g in sel.grid if g["diverged"]]
        if lost and not sel.diverged:
            out.append(f"{problem} {METHODS[key].label()}: settings {[g['setting'] for g in lost]} diverged in some seeds")
    return out


# -------------------------------------------------------------------- plots
def _colors():
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {key: cmap(i % 10) for i, key in enumerate(METHODS)}


def plot_curves(selected: Dict[Tuple[str, str], Selected], info: Dict[str, dict], settings: Settings,
                out: Path) -> List[Path]:
    color = _colors()
    paths = []
    for axis in ("steps", "seconds"):
        panels: Dict[str, List[Line]] = {}
        for problem in settings.problems:
            title = f"{info[problem]['label']}, d={info[problem]['latent_dim']}"
            lines = []
            for key in settings.methods:
                sel = selected.get((problem, key))
                if sel is None:
                    continue
                x = sel.gap.iterations if axis == "steps" else sel.gap.seconds
                lines.append(Line(x, sel.gap.values, color[key], "-" if METHODS[key].optimizer == "ngd" else "--"))
            xmax = max((max((v for v in l.x if v == v), default=0) for l in lines), default=1)
            lines.append(Line([0, xmax], [settings.tol, settings.tol], "gray", ":"))
            panels[title] = lines
        legend = [(METHODS[k].label(), color[k], "-" if METHODS[k].optimizer == "ngd" else "--") for k in settings.methods]
        legend.append((f"{settings.tol:g} nat", "gray", ":"))
        path = out / f"elbo_vs_{axis}.png"
        common.plot_panels(
            path, panels, xlabel=axis if axis == "steps" else "seconds (svi.step only)",
            ylabel="best ELBO - ELBO (nats)", title="VI: gap to the best ELBO (best lr per method, seed mean)",
            legend=legend, floor=1e-2,
        )
        paths.append(path)
    return paths


def plot_bands(selected: Dict[Tuple[str, str], Selected], problem: str, settings: Settings, out: Path) -> Optional[Path]:
    """Predictive mean and 90% band of each method (best lr, first seed) with the training data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [(key, selected[(problem, key)]) for key in settings.methods if (problem, key) in selected]
    entries = [(key, sel, next((r for r in sel.runs if r.band is not None), None)) for key, sel in entries]
    entries = [e for e in entries if e[2] is not None]
    if not entries:
        return None
    spec = vi_data.problem_specs(settings.size)[problem]
    data = vi_data.load(spec, entries[0][2].seed)
    ncols = min(4, len(entries))
    nrows = math.ceil(len(entries) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False, sharex=True, sharey=True)
    truth = torch.linspace(-2.5, 2.5, 201)
    for ax, (key, sel, run) in zip(axes.flat, entries):
        band = run.band
        ax.fill_between(band["x"], band["lo"], band["hi"], color="tab:blue", alpha=0.25, linewidth=0)
        ax.plot(band["x"], band["mean"], color="tab:blue", linewidth=1.4)
        ax.plot(truth, torch.sin(3 * truth), color="black", linewidth=0.8, linestyle=":")
        ax.scatter(data.x_train.squeeze(-1), data.y_train, s=6, color="black", zorder=3)
        ax.set_title(f"{METHODS[key].label()}\n{sel.config.label}, ELBO {run.curve.final:.1f}", fontsize=9)
        ax.set_ylim(-3, 3)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(entries):]:
        ax.set_visible(False)
    fig.suptitle(f"{problem}: posterior predictive mean and 90% band (seed {entries[0][2].seed}); dotted: sin(3x)",
                 fontsize=10)
    fig.tight_layout()
    path = out / f"{problem}_bands.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ outputs
def run_records(runs: List[Run]) -> List[dict]:
    return [
        {
            "problem": r.problem, "seed": r.seed, "method": r.method, "method_label": METHODS[r.method].label(),
            **asdict(r.config), "status": r.status, "iterations": r.curve.iterations,
            "seconds": [float(f"{s:.4g}") for s in r.curve.seconds],
            "elbo": [float(f"{v:.8g}") for v in r.curve.values], "metrics": r.metrics,
            **({"band": r.band} if r.band else {}),
        }
        for r in runs
    ]


def write_outputs(out: Path, settings: Settings, runs, info, skipped, best, selected, rows, report) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(report)
    common.write_csv(out / "summary.csv", rows_for_csv(rows))
    selection = [
        {"problem": p, "method": m, "setting": s.config.label, "grid": s.grid, "steps_to_tol": s.reached[0],
         "seconds_to_tol": s.reached[1]}
        for (p, m), s in selected.items()
    ]
    common.write_json(out / "results.json", {
        "settings": asdict(settings), "problems": info, "skipped": skipped,
        "best_elbo": [{"problem": p, "seed": s, "elbo": v} for (p, s), v in best.items()],
        "selection": selection, "summary": rows, "runs": run_records(runs),
    })
    return [out / "table.md", out / "summary.csv", out / "results.json"]


def rows_for_csv(rows: List[dict]) -> List[dict]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k, "") for k in keys} for r in rows]


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m experiments vi``; unset ones come from the preset."""
    common.add_preset_arguments(parser, "about 4-5 hours")
    parser.add_argument("--out", type=Path, default=Path("results/vi"), help="output directory")
    parser.add_argument("--problems", nargs="+", choices=vi_data.DATASETS, help="data sets")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), help="methods")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (split, init, noise)")
    parser.add_argument("--ngd-steps", type=int, help="SVI steps of NGD runs")
    parser.add_argument("--adam-steps", type=int, help="SVI steps of Adam runs")
    parser.add_argument("--adam-lrs", type=float, nargs="+", help="Adam learning rates")
    parser.add_argument("--adam-particles", type=int, help="particles per Adam step")
    parser.add_argument("--ngd-estimator", choices=("auto", "price", "reparam"), help="NGD gradient estimator")
    parser.add_argument("--ngd-price-lrs", type=float, nargs="+", help="NGD learning rates with price")
    parser.add_argument("--ngd-reparam-lrs", type=float, nargs="+", help="NGD learning rates with reparam")
    parser.add_argument("--ngd-max-step", type=common.parse_optional_float, help="NGD trust region ('none' = off)")
    parser.add_argument("--ngd-particles", type=int, help="particles per NGD reparam step")
    parser.add_argument("--eval-particles", type=int, help="particles of the ELBO evaluations")
    parser.add_argument("--eval-points", type=int, help="about how many ELBO evaluations per run (x2)")
    parser.add_argument("--max-dense-dim", type=int, help="skip O(d^2) guides above this latent dim")
    parser.add_argument("--tol", type=float, help="nats to the best ELBO for steps/seconds to reach")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument("--uci-ngd-steps", type=int, help="SVI steps of NGD runs on UCI problems")
    parser.add_argument("--uci-adam-steps", type=int, help="SVI steps of Adam runs on UCI problems")
    parser.add_argument("--uci-max-dense-dim", type=int, help="skip O(d^2) guides on UCI problems above this dim")
    parser.add_argument("--uci-root", type=str,
                        help="read the UCI sets from this folder (original layout) instead of the vendored copies")
    parser.add_argument("--device", help="device of the data, the models and the guides (default cpu; e.g. cuda)")


def resolve_settings(args: argparse.Namespace) -> Settings:
    preset = common.resolve_preset(PRESETS, args, skip=("ngd",))
    ngd = {}
    for name, attr in (("estimator", "ngd_estimator"), ("price_lrs", "ngd_price_lrs"),
                       ("reparam_lrs", "ngd_reparam_lrs"), ("particles", "ngd_particles")):
        value = getattr(args, attr, None)
        if value is not None:
            ngd[name] = tuple(value) if isinstance(value, list) else value
    if "ngd_max_step" in vars(args) and args.ngd_max_step is not None:
        ngd["max_step"] = args.ngd_max_step
    return replace(preset, ngd=replace(preset.ngd, **ngd))


def run(args: argparse.Namespace) -> None:
    settings = resolve_settings(args)
    common.configure_torch(settings.threads, torch.float64)
    warnings.filterwarnings("ignore", message=".*gradient layout contract.*")
    start = time.perf_counter()
    runs, info, skipped = run_all(settings)
    best = attach_gaps(runs)
    selected = select(runs, settings.tol)
    rows = summary_rows(selected, info, best, skipped, settings)
    report = markdown_report(rows, info, settings, time.perf_counter() - start, notes_for(runs, selected))
    paths = write_outputs(args.out, settings, runs, info, skipped, best, selected, rows, report)
    paths += plot_curves(selected, info, settings, args.out)
    if "gap1d" in settings.problems:
        band = plot_bands(selected, "gap1d", settings, args.out)
        paths += [band] if band else []
    print(report)
    print(f"total runtime {time.perf_counter() - start:.0f} s; wrote:")
    for path in paths:
        print(f"  {path}")
