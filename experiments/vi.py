"""Variational inference in Pyro: structured NGD guides against Pyro's autoguides with Adam.

AutoStructuredNormal + NGD with five structures runs against Pyro's AutoNormal,
AutoLowRankMultivariateNormal and AutoMultivariateNormal with Adam (SVI, same start) on logistic
regression and BNNs, UCI regression included: the final ELBO, the steps and seconds to within --tol
nats of the best ELBO, and the posterior predictive's test metrics.

Outputs in --out (default results/vi): table.md, verdict.json, summary.csv, results.json and plots
of the ELBO gap and of gap1d's predictive bands. Presets: --tiny (seconds), --quick (the default,
minutes) and --full (hours); --problems uci_<name> adds a UCI set to any of them.

Full description: docs/studies.md."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal, init_to_median

from structngd.pyro import NGD, AutoStructuredNormal

from . import common, harness, progress, vi_data
from .cli import option
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

    estimator: str = option("auto", "NGD gradient estimator", choices=("auto", "price", "reparam"))
    price_max_dim: int = option(160, "largest latent dim where estimator auto uses price")
    #: non-dense structures need lr < 2 / lambda_max(S^-1 P)
    price_lrs: Tuple[float, ...] = option((0.1, 0.3, 1.0), "NGD learning rates with price")
    reparam_lrs: Tuple[float, ...] = option((0.05, 0.1, 0.2), "NGD learning rates with reparam")
    max_step: Optional[float] = option(1.0, "NGD trust region ('none' = off)")
    num_pairs: int = option(1, "mirrored sample pairs per step of the price estimator")
    particles: int = option(16, "particles per NGD reparam step")
    momentum: float = option(0.0, "NGD momentum")

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
AUTOGUIDES = {cls.__name__: cls for cls in (AutoNormal, AutoLowRankMultivariateNormal, AutoMultivariateNormal)}


@dataclass(frozen=True)
class Method:
    """A guide and the optimizer family that moves it."""

    key: str
    optimizer: str  # "ngd" or "adam"
    guide: str  # "structured" or a name of AUTOGUIDES
    structure: Optional[str] = None
    quadratic: bool = False  # O(d^2) memory, O(d^3) time: skipped above max_dense_dim
    estimator: Optional[str] = None  # NGD: force this estimator (None: NGDSettings.estimator_for)

    def options(self, dim: int) -> Dict[str, int]:
        k = guide_rank(dim)
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
        kwargs = dict(init_loc_fn=init_to_median, init_scale=0.1, **self.options(dim))
        if self.guide == "structured":
            return AutoStructuredNormal(model, structure=self.structure, **kwargs)
        return AUTOGUIDES[self.guide](model, **kwargs)


def guide_rank(dim: int) -> int:
    """The low-rank guides' ``k`` (:func:`experiments.common.low_rank`), below ``d / 2`` so that
    ``hierarchical(k, k)`` keeps a diagonal block."""
    return common.low_rank(dim, most=dim // 2 - 1)


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
    """One optimizer setting of a method."""

    method: str
    lr: float
    estimator: Optional[str] = None  # NGD only
    max_step: Optional[float] = None
    particles: int = 16

    @property
    def label(self) -> str:
        if self.estimator is None:
            return f"lr {self.lr:g}"
        return f"{self.estimator} lr {common.setting_text(self.lr, self.max_step)}"

    def build_optimizer(self, ngd: NGDSettings):
        if METHODS[self.method].optimizer == "ngd":
            return NGD(lr=self.lr, estimator=self.estimator, num_pairs=ngd.num_pairs, momentum=ngd.momentum,
                       max_step=self.max_step, fallback=False)
        return pyro.optim.Adam({"lr": self.lr})


# ---------------------------------------------------------------- literature
#: Published test RMSE and test log-likelihood (original units; mean ± the published error over
#: the 20 standard splits, 5 for protein; one hidden layer of 50 units, 100 for protein) as
#: tabulated in Gal & Ghahramani (2016), Table 1: "VI" is mean-field VI (Graves, 2011) and "PBP"
#: probabilistic backpropagation, both as run by Hernandez-Lobato & Adams (2015); "MC dropout" Gal &
#: Ghahramani's own (the paper's numbers, not the later 10x-epoch ones).
LITERATURE_SOURCES = {
    "PBP": "Hernández-Lobato & Adams, Probabilistic backpropagation for scalable learning of Bayesian "
           "neural networks, ICML 2015",
    "MC dropout": "Gal & Ghahramani, Dropout as a Bayesian approximation: representing model uncertainty "
                  "in deep learning, ICML 2016 (Table 1)",
    "VI": "mean-field VI (Graves, Practical variational inference for neural networks, NIPS 2011) as run "
          "by Hernández-Lobato & Adams 2015 and tabulated by Gal & Ghahramani 2016",
}
_Pub = Tuple[Optional[float], Optional[float], Optional[float], Optional[float]]  # rmse, se, ll, se
#: per problem, one entry per source of ``LITERATURE_SOURCES``, in order (``None``: a value not known with confidence)
LITERATURE: Dict[str, Tuple[_Pub, _Pub, _Pub]] = {
    "uci_boston": ((3.01, 0.18, -2.57, 0.09), (2.97, 0.85, -2.46, 0.25), (4.32, 0.29, -2.90, 0.07)),
    "uci_concrete": ((5.67, 0.09, -3.16, 0.02), (5.23, 0.53, -3.04, 0.09), (None, None, -3.39, 0.02)),
    "uci_energy": ((1.80, 0.05, -2.04, 0.02), (1.66, 0.19, -1.99, 0.09), (2.65, 0.08, -2.39, 0.03)),
    "uci_kin8nm": ((0.10, 0.00, 0.90, 0.01), (0.10, 0.00, 0.95, 0.03), (0.10, 0.00, 0.90, 0.01)),
    "uci_naval": ((0.01, 0.00, 3.73, 0.01), (0.01, 0.00, 3.80, 0.05), (0.01, 0.00, 3.73, 0.12)),
    "uci_power": ((4.12, 0.03, -2.84, 0.01), (4.02, 0.18, -2.80, 0.05), (4.33, 0.04, -2.89, 0.01)),
    "uci_protein": ((4.73, 0.01, -2.97, 0.00), (4.36, 0.04, -2.89, 0.01), (4.84, 0.03, -2.99, 0.01)),
    "uci_wine": ((0.64, 0.01, -0.97, 0.01), (0.62, 0.04, -0.93, 0.06), (0.65, 0.01, -0.98, 0.01)),
    "uci_yacht": ((1.02, 0.05, -1.63, 0.02), (1.11, 0.38, -1.55, 0.12), (6.89, 0.67, -3.43, 0.16)),
}


def _pm(mean: Optional[float], err: Optional[float], digits: int = 2) -> str:
    if mean is None or mean != mean:
        return "–"
    return f"{mean:.{digits}f}" if err is None or err != err else f"{mean:.{digits}f} ± {err:.{digits}f}"


def literature_line(problem: str) -> Optional[str]:
    """A Markdown line with the published RMSE / LL of ``problem`` (``None`` if none known)."""
    if problem not in LITERATURE:
        return None
    protein = problem == "uci_protein"
    entries = zip(LITERATURE_SOURCES, LITERATURE[problem])
    parts = [f"{name} {_pm(r, rs)} / {_pm(l, ls)}" for name, (r, rs, l, ls) in entries]
    return (f"Literature (test RMSE / test LL, original units, {5 if protein else 20} splits, "
            f"1 x {100 if protein else 50} units; ± as published; sources below): " + "; ".join(parts) + ".")


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines one study; built from a preset and the command line."""

    size: str = option(cli=False)
    seeds: Tuple[int, ...] = option(help="seeds (split, init, noise)")
    problems: Tuple[str, ...] = option(help="data sets", choices=vi_data.DATASETS)
    methods: Tuple[str, ...] = option(tuple(METHODS), "methods", choices=tuple(METHODS))
    ngd_steps: int = option(300, "SVI steps of NGD runs")
    adam_steps: int = option(1500, "SVI steps of Adam runs")
    adam_lrs: Tuple[float, ...] = option((0.003, 0.01, 0.03), "Adam learning rates")
    adam_particles: int = option(16, "particles per Adam step")
    ngd: NGDSettings = option(NGD_SETTINGS)  # one option per field: --ngd-estimator, --ngd-price-lrs, ...
    eval_particles: int = option(256, "particles of the ELBO evaluations")
    eval_points: int = option(25, "about how many ELBO evaluations per run (x2)")
    predictive_samples: int = option(400, "posterior draws of the test metrics")
    max_dense_dim: int = option(2000, "skip O(d^2) guides above this latent dim")
    tol: float = option(1.0, "nats to the best ELBO for steps/seconds to reach")
    threads: Optional[int] = option(1, "torch threads")
    uci_ngd_steps: Optional[int] = option(None, "SVI steps of NGD runs on UCI problems ('none': --ngd-steps)")
    uci_adam_steps: Optional[int] = option(None, "SVI steps of Adam runs on UCI problems ('none': --adam-steps)")
    uci_max_dense_dim: int = option(300, "skip O(d^2) guides on UCI problems above this dim")
    uci_root: Optional[str] = option(None, "read the UCI sets from this folder (original layout) instead of the "
                                     "vendored copies")
    device: str = option("cpu", "device of the data, the models' priors and the guides (the splits are made on "
                         "the CPU; e.g. cuda)", check=common.resolve_device)

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


# ---------------------------------------------------------------------- runs
def elbo_estimate(problem: Problem, guide, particles: int, seed: int) -> float:
    """ELBO from ``particles`` vectorized particles with a fixed noise stream (``seed``)."""
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad(), common.fork_rng(problem.x_train.device):
        torch.manual_seed(seed)
        value = -loss.loss(problem.model, guide, problem.x_train, problem.y_train)
    if not math.isfinite(value):
        raise FloatingPointError(f"ELBO estimate is {value}")
    return value


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


def _error_text(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


def run_one(problem: Problem, config: RunConfig, seed: int, steps: int, settings: Settings,
            dim: int, eval_seed: int = 12345, band: bool = False) -> Tuple[Run, object]:
    """Fit one guide by SVI; a failing step or evaluation (non-finite value, singular factor)
    ends the run with status ``diverged at step ...`` and ``nan`` for the rest of the curve."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = METHODS[config.method].build_guide(problem.model, dim)
    with torch.no_grad():
        guide(problem.x_train, problem.y_train)  # initialize (same init for every method)
    loss = Trace_ELBO(num_particles=config.particles, vectorize_particles=config.particles > 1, max_plate_nesting=1)
    svi = SVI(problem.model, guide, config.build_optimizer(settings.ngd), loss)
    points = common.eval_points(steps, settings.eval_points)
    clock, status, curve, it = common.Stopwatch(problem.x_train.device), "ok", Curve([], [], []), 0

    def evaluate(step: int) -> None:
        curve.values.append(elbo_estimate(problem, guide, settings.eval_particles, eval_seed))
        curve.iterations.append(step)
        curve.seconds.append(clock.seconds)

    try:
        evaluate(0)
        for it in range(1, steps + 1):
            with clock:
                value = svi.step(problem.x_train, problem.y_train)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value}")
            if it == points[len(curve.iterations)]:
                evaluate(it)
    except (ValueError, RuntimeError, FloatingPointError, AssertionError) as err:
        status = f"diverged at step {it}: {_error_text(err)}"
    curve.pad_to(points)
    run = Run(problem.name, seed, config, curve, status)
    if status == "ok":
        try:
            run.metrics = vi_data.test_metrics(problem, guide, settings.predictive_samples, eval_seed)
            if band and problem.x_grid is not None:
                run.band = vi_data.predictive_band(problem, guide, settings.predictive_samples, eval_seed)
        except (ValueError, RuntimeError) as err:
            run.status = f"predictive failed: {_error_text(err)}"
    return run, guide


def warm_up(plan, settings: Settings) -> None:
    """Two untimed steps of each method's first setting: one-time costs (e.g. torch's first
    batched-gradient call behind the price estimator) stay out of the timings."""
    seen = set()
    for problem, config, seed, dim in plan:
        if config.method not in seen:
            seen.add(config.method)
            run_one(problem, config, seed, 2, replace(settings, eval_points=1, eval_particles=2), dim)


def skip_reason(method: Method, dim: int, settings: Settings, problem: str) -> Optional[str]:
    """Why ``method`` does not run at latent dimension ``dim`` on ``problem`` (``None``: it runs)."""
    if method.quadratic and dim > settings.max_dense_dim:
        return f"latent dim {dim} > {settings.max_dense_dim}"
    if method.quadratic and vi_data.is_uci(problem) and dim > settings.uci_max_dense_dim:
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
            dim = vi_data.latent_dim(problem)
            info.setdefault(name, {
                "label": spec.label, "task": spec.task, "latent_dim": dim, "hidden": spec.hidden,
                "num_train": problem.x_train.shape[0], "num_test": problem.x_test.shape[0],
                "features": problem.x_train.shape[1], "k": guide_rank(dim),
                "original_units": problem.y_std is not None,
            })
            for key in settings.methods:
                reason = skip_reason(METHODS[key], dim, settings, name)
                if reason and seed == settings.seeds[0]:
                    skipped.append({"problem": name, "method": key, "reason": reason})
                if not reason:
                    plan += [(problem, config, seed, dim) for config in settings.configs(key, dim)]
    warm_up(plan, settings)
    bar = progress.bar(len(plan), "vi")
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
        key = (run.problem, run.seed)
        best[key] = max([best[key]] + [v for v in run.curve.values if v == v])
    for run in runs:
        b = best[(run.problem, run.seed)]
        run.gap = replace(run.curve, values=[b - v for v in run.curve.values])
    return dict(best)


@dataclass
class Selected:
    """The best learning rate of a method on a problem, seed-averaged."""

    method: str
    config: RunConfig
    runs: List[Run]
    curve: Curve  # mean ELBO
    gap: Curve  # mean gap to the per-seed best ELBO
    reached: Tuple[Optional[int], Optional[float]]
    grid: List[dict]  # every lr of the grid: label and mean final ELBO

    def metric(self, name: str) -> Tuple[float, float]:
        """Seed mean of ``name`` and its standard error (``std / sqrt(seeds)``; nan with one seed)."""
        values = [r.metrics.get(name, math.nan) for r in self.runs]
        n = len(values)
        mean = sum(values) / n
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan

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
        candidates[(problem, method)].append(Selected(method, config, members, curve, gap, gap.first_below(tol), []))
    best = {key: max(options, key=lambda s: _mean_final(s.curve)) for key, options in candidates.items()}
    for key, options in candidates.items():
        best[key].grid = [{"setting": s.config.label, "final_elbo": s.curve.final, "diverged": s.diverged}
                          for s in options]
    return best


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); both nan if a value is nan."""
    if not values or any(v != v for v in values):
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def summary_rows(selected: Dict[Tuple[str, str], Selected], info: Dict[str, dict], best: Dict[Tuple[str, int], float],
                 skipped: List[dict], settings: Settings) -> List[dict]:
    """One row per (problem, method): best setting, ELBO, times to ``tol``, test metrics."""
    rows = []
    for problem in settings.problems:
        dim = info[problem]["latent_dim"]
        best_mean = _mean_std([best[(problem, s)] for s in settings.seeds])[0]
        for key in settings.methods:
            row = {"problem": problem, "latent_dim": dim, "best_elbo": best_mean, "method": METHODS[key].label(dim)}
            rows.append(row)
            skip = next((s for s in skipped if s["problem"] == problem and s["method"] == key), None)
            sel = selected.get((problem, key))
            if skip or sel is None:
                row.update({"setting": "skipped" if skip else "–", "status": skip["reason"] if skip else "no runs"})
                continue
            mean, std = _mean_std([r.curve.final for r in sel.runs])
            total_s, steps = sel.curve.total_seconds, settings.steps(key, problem)
            row.update({
                "setting": sel.config.label, "status": "ok" if not sel.diverged else f"{sel.diverged} diverged",
                "final_elbo": mean, "final_elbo_std": std,
                "steps_to_tol": sel.reached[0], "seconds_to_tol": sel.reached[1],
                "steps": steps, "total_seconds": total_s,
                "ms_per_step": 1000 * total_s / steps if total_s == total_s else math.nan,
            })
            for name in ("test_loglik", "accuracy", "ece", "rmse", "coverage90"):
                if any(name in r.metrics for r in sel.runs):
                    row[name], row[name + "_se"] = sel.metric(name)
    return rows


# ------------------------------------------------------------------- report
def _reach(value) -> str:
    return "not reached" if value is None else fmt(value, 2)


def _digits(value: Optional[float]) -> int:
    """Decimals that show about three significant digits of an RMSE."""
    if value is None or not value == value or value <= 0:
        return 2
    return max(2, 2 - math.floor(math.log10(value)))


def table_row(row: dict, meta: dict, spread: bool, width: int) -> List[str]:
    """A summary row as ``width`` table cells (``spread``: show the ELBO's std over seeds)."""
    if "final_elbo" not in row:
        return [row["method"], row["setting"], row["status"]] + ["–"] * (width - 3)
    final = row["final_elbo"]
    elbo = "diverged" if final != final else _pm(final, row["final_elbo_std"] if spread else None)
    if row["status"] != "ok":
        elbo += f" ({row['status']})"
    if meta.get("original_units"):
        metrics = [_pm(row.get("test_loglik"), row.get("test_loglik_se")),
                   _pm(row.get("rmse"), row.get("rmse_se"), _digits(row.get("rmse"))), fmt(row.get("coverage90"), 3)]
    else:
        names = ("accuracy", "ece") if meta["task"] != "regression" else ("rmse", "coverage90")
        metrics = [fmt(row.get(name), 3) for name in ("test_loglik",) + names]
    return [row["method"], row["setting"], elbo, _reach(row["steps_to_tol"]), _reach(row["seconds_to_tol"]),
            fmt(row["ms_per_step"], 2)] + metrics


def markdown_report(results: Results, settings: Settings, runtime: float) -> str:
    """The results table (one section per problem) with the settings, literature and notes."""
    ngd, grid = settings.ngd, common.grid_text
    lines = [
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
        f"init_to_median, init_scale 0.1; float64 on {settings.device}; {common.environment_text(runtime)}",
    ]
    header = ["method", "setting", "final ELBO", "steps to 1 nat", "s to 1 nat", "ms/step", "test LL"]
    for problem in settings.problems:
        meta = results.info[problem]
        members = [r for r in results.rows if r["problem"] == problem]
        extra = ["acc", "ECE"] if meta["task"] != "regression" else ["RMSE", "cov90"]
        body = [table_row(r, meta, len(settings.seeds) > 1, len(header) + len(extra)) for r in members]
        best = members[0]["best_elbo"] if members else math.nan
        steps = ""
        if vi_data.is_uci(problem):
            steps = (f", NGD {settings.steps('ngd_diagonal', problem)} / Adam {settings.steps('adam_normal', problem)} "
                     f"steps, splits {list(settings.seeds)}")
        heading = (f"## {meta['label']}: d = {meta['latent_dim']}, n = {meta['num_train']} train / "
                   f"{meta['num_test']} test, k = {meta['k']}, best ELBO {best:.2f}{steps}")
        lines += ["", heading, "", common.markdown_table(header + extra, body)]
        literature = literature_line(problem)
        if literature:
            lines += ["", literature]
    if any(p in LITERATURE for p in settings.problems):
        lines += ["", "Literature sources:", ""] + [f"- {k}: {v}." for k, v in LITERATURE_SOURCES.items()]
    notes = notes_for(results.runs, results.selected)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def notes_for(runs: List[Run], selected: Dict[Tuple[str, str], Selected]) -> List[str]:
    """The failed runs of each method, and the grid settings that diverged in some seeds."""
    out = []
    for key in dict.fromkeys(r.method for r in runs if r.status != "ok"):
        bad = [r for r in runs if r.method == key and r.status != "ok"]
        total, ex = sum(r.method == key for r in runs), bad[0]
        out.append(f"{METHODS[key].label()}: {len(bad)} of {total} runs failed, e.g. {ex.problem} seed {ex.seed} "
                   f"{ex.config.label}: {ex.status} (all in results.json)")
    for (problem, key), sel in selected.items():
        lost = [g for g in sel.grid if g["diverged"]]
        if lost and not sel.diverged:
            names = [g["setting"] for g in lost]
            out.append(f"{problem} {METHODS[key].label()}: settings {names} diverged in some seeds")
    return out


# -------------------------------------------------------------------- plots
def plot_curves(selected: Dict[Tuple[str, str], Selected], info: Dict[str, dict], settings: Settings,
                out: Path) -> List[Path]:
    """Gap to the best ELBO vs steps and vs seconds, one panel per problem, best lr per method."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    color = {key: cmap(i % 10) for i, key in enumerate(METHODS)}
    style = {key: "-" if method.optimizer == "ngd" else "--" for key, method in METHODS.items()}
    legend = [(METHODS[k].label(), color[k], style[k]) for k in settings.methods]
    legend.append((f"{settings.tol:g} nat", "gray", ":"))
    paths = []
    for axis, xlabel in (("steps", "SVI steps"), ("seconds", "time (s, svi.step only)")):
        panels: Dict[str, List[Line]] = {}
        for problem in settings.problems:
            chosen = [(key, selected[(problem, key)]) for key in settings.methods if (problem, key) in selected]
            lines = [Line(sel.gap.iterations if axis == "steps" else sel.gap.seconds, sel.gap.values, color[key],
                          style[key]) for key, sel in chosen]
            xmax = max((max((v for v in line.x if v == v), default=0) for line in lines), default=1)
            lines.append(Line([0, xmax], [settings.tol, settings.tol], "gray", ":"))
            panels[f"{info[problem]['label']}, d={info[problem]['latent_dim']}"] = lines
        path = out / f"elbo_vs_{axis}.png"
        common.plot_panels(path, panels, xlabel=xlabel, ylabel="best ELBO - ELBO (nats)",
                           title="VI: gap to the best ELBO (best lr per method, seed mean)", legend=legend, floor=1e-2)
        paths.append(path)
    return paths


def plot_bands(selected: Dict[Tuple[str, str], Selected], problem: str, settings: Settings,
               out: Path) -> Optional[Path]:
    """Predictive mean and 90% band of each method (best lr, first seed) with the training data."""
    from matplotlib.patches import Patch

    plt = common.pyplot()
    entries = [(key, selected[(problem, key)]) for key in settings.methods if (problem, key) in selected]
    entries = [(key, sel, next((r for r in sel.runs if r.band is not None), None)) for key, sel in entries]
    entries = [e for e in entries if e[2] is not None]
    if not entries:
        return None
    data = vi_data.load(vi_data.problem_specs(settings.size)[problem], entries[0][2].seed)
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
    for ax in axes[-1, :]:
        ax.set_xlabel("input x")
    for ax in axes[:, 0]:
        ax.set_ylabel("output y")
    for ax in list(axes.flat)[len(entries):]:
        ax.set_visible(False)
    fig.suptitle(f"{problem}: posterior predictive mean and 90% band (seed {entries[0][2].seed})", fontsize=10)
    path = out / f"{problem}_bands.png"
    handles = [plt.Line2D([], [], color="tab:blue", linewidth=1.4), Patch(color="tab:blue", alpha=0.25),
               plt.Line2D([], [], color="black", linewidth=0.8, linestyle=":"),
               plt.Line2D([], [], color="black", marker="o", markersize=3, linestyle="")]
    common.save_with_legend(fig, path, handles, ["predictive mean", "90% predictive band",
                                                 "sin(3x), the noise-free truth", "training data"])
    return path


# ------------------------------------------------------------------ outputs
def write_outputs(results: Results, settings: Settings, out: Path) -> List[Path]:
    """``summary.csv`` (one column per key of any row) and ``results.json`` in ``out``; returns their paths."""
    keys = list(dict.fromkeys(k for r in results.rows for k in r))
    common.write_csv(out / "summary.csv", [{k: r.get(k, "") for k in keys} for r in results.rows])
    selection = [
        {"problem": p, "method": m, "setting": s.config.label, "grid": s.grid, "steps_to_tol": s.reached[0],
         "seconds_to_tol": s.reached[1]}
        for (p, m), s in results.selected.items()
    ]
    runs = [
        {"problem": r.problem, "seed": r.seed, "method": r.method, "method_label": METHODS[r.method].label(),
         **asdict(r.config), "status": r.status, "iterations": r.curve.iterations,
         "seconds": common.rounded(r.curve.seconds), "elbo": common.rounded(r.curve.values, 8), "metrics": r.metrics,
         **({"band": r.band} if r.band else {})}
        for r in results.runs
    ]
    common.write_json(out / "results.json", {
        "settings": asdict(settings), "problems": results.info, "skipped": results.skipped,
        "best_elbo": [{"problem": p, "seed": s, "elbo": v} for (p, s), v in results.best.items()],
        "selection": selection, "summary": results.rows, "runs": runs,
    })
    return [out / "summary.csv", out / "results.json"]


# ------------------------------------------------------------------- study
@dataclass
class Results:
    """Every run, the problems, the skipped pairs, the best ELBOs, the selection and the table's rows."""

    runs: List[Run]
    info: Dict[str, dict]
    skipped: List[dict]
    best: Dict[Tuple[str, int], float]
    selected: Dict[Tuple[str, str], Selected]
    rows: List[dict]


def compute(settings: Settings) -> Results:
    """Every run, the gaps to the best ELBO, the best lr per method and the table's rows."""
    warnings.filterwarnings("ignore", message=".*gradient layout contract.*")
    runs, info, skipped = run_all(settings)
    best = attach_gaps(runs)
    selected = select(runs, settings.tol)
    return Results(runs, info, skipped, best, selected, summary_rows(selected, info, best, skipped, settings))


def plot_all(results: Results, settings: Settings, out: Path) -> List[Path]:
    """The ELBO-gap curves and, with gap1d, its predictive bands."""
    paths = plot_curves(results.selected, results.info, settings, out)
    band = plot_bands(results.selected, "gap1d", settings, out) if "gap1d" in settings.problems else None
    return paths + ([band] if band else [])


def _winner_text(problem: str, chosen: Dict[str, Selected], baseline: str, info: Dict[str, dict]) -> str:
    """``problem: method (+x nats over the baseline)`` for the highest final ELBO."""
    best = max(chosen.values(), key=lambda s: _mean_final(s.curve))
    margin = _mean_final(best.curve) - _mean_final(chosen[baseline].curve)
    text = f"{info[problem]['label']}: {METHODS[best.method].label()}"
    if best.method == baseline:
        return text
    name = METHODS[baseline].label()
    return text + (f" (+{fmt(margin, 3)} nats over {name})" if math.isfinite(margin) else f" ({name} diverged)")


def verdict(results: Results, settings: Settings) -> List[str]:
    """Per problem: the guide with the highest final ELBO and its margin over the Adam baseline;
    then how often NGD's fastest guide got within ``tol`` of the best ELBO before the baseline (Adam
    ``AutoNormal``, else the first Adam guide that ran)."""
    adam = [key for key in settings.methods if METHODS[key].optimizer == "adam"]
    baseline = "adam_normal" if "adam_normal" in adam else next(iter(adam), None)
    if baseline is None:
        return ["No Adam guide ran, so there is no baseline to compare with."]
    winners, pairs, finals = [], [], []
    for problem in settings.problems:
        chosen = {key: sel for (p, key), sel in results.selected.items() if p == problem}
        ngd = [sel for key, sel in chosen.items() if METHODS[key].optimizer == "ngd"]
        if baseline not in chosen or not ngd:
            continue
        winners.append(_winner_text(problem, chosen, baseline, results.info))
        fastest = min(ngd, key=lambda s: common.reach_then_final(s.reached[1], s.gap))
        pairs.append((fastest.reached[1], chosen[baseline].reached[1]))
        finals.append((fastest.gap.final, chosen[baseline].gap.final))
    if not winners:
        return [f"No problem has both an NGD guide and {METHODS[baseline].label()}."]
    return [f"Highest final ELBO: {'; '.join(winners)}.",
            harness.head_to_head(pairs, "NGD (its fastest guide)", METHODS[baseline].label(),
                                 f"within {settings.tol:g} nat of the best ELBO", "problems", "seconds of svi.step",
                                 finals)]


STUDY = harness.Study(
    name="vi", title="Variational inference: structured NGD vs Pyro autoguides with Adam", presets=PRESETS,
    full_time="about 4-5 hours", dtype=torch.float64, compute=compute, report=markdown_report, verdict=verdict,
    write=write_outputs, plot=plot_all,
)
add_arguments, resolve_settings, run = STUDY.add_arguments, STUDY.resolve_settings, STUDY.run
