"""Steps and wall time to a converged ELBO: structured NGD against AutoMultivariateNormal + Adam.

Two problems, every method run side by side in one process (so machine load hits all alike):

1. Bayesian logistic regression on scikit-learn's breast cancer data (569 x 30, standardized;
   31 latents: weights and bias), float64;
2. a small BNN on the wine data (178 x 13, standardized; 13-4-3 tanh MLP, categorical
   likelihood, 71 latents).

The **optimal ELBO** comes from a long converged run: ``AutoStructuredNormal(dense)`` moved by
``NGD(estimator="price")`` for ``--reference-steps`` steps at lr 1 then with a decaying lr and
more Price pairs (``REFERENCE_SCHEDULE``), evaluated with the estimator below. Every ELBO in
this benchmark (reference and curves) is the same **common-random-numbers** estimate:
``E[log p(x, mu + L eps)] + H(q)`` with the closed-form Gaussian entropy, ``L`` the Cholesky
factor of the guide's covariance and one fixed draw of ``--eval-particles`` standard normal
vectors ``eps`` shared by all evaluations; a deterministic function of ``(mu, Sigma)``, so runs
and reference are compared without Monte Carlo noise between them. Runs stop at the target,
so a run may end slightly above the optimum; the best value any run reached is reported
beside it (well above it would mean the reference run is not converged, or, for the BNN, found
a worse mode).

Methods (all ``init_to_median``, ``init_scale=0.1``, same seed, so the same start):

* ``AutoStructuredNormal`` + ``NGD`` for every structure (dense with ``price`` and with
  ``reparam`` gradients; lower_triangular, block_triangular(k), hierarchical(k, k),
  diagonal with ``price``), over the learning rates of ``experiments.vi.NGD_SETTINGS`` (the one
  place where NGD's lr grids, trust region, estimator and particles are set);
* ``AutoMultivariateNormal`` + ``pyro.optim.Adam`` over ``--adam-lrs``, with the same
  number of vectorized particles as NGD's reparam runs.

For each run: steps and seconds of ``svi.step`` work (evaluations are not timed) to the first
evaluation within ``--tol`` (1 nat) of the optimal ELBO; runs stop there (or at their step
budget: NGD ``--ngd-steps``, Adam ``--adam-steps``). The best setting of each method is the one
with the fewest median steps over seeds to the target (ties: seconds); if none reaches it,
the highest best ELBO. Ratios are Adam's best setting over each NGD method's (``>x``: Adam did
not reach the target in its budget, a lower bound). Non-dense structures have a lower optimal
ELBO than the dense family, so they may never come within 1 nat of it: that is a property
of the structure, shown by their best ELBO.

Run ``python -m benchmarks.vi_logistic --threads 1`` (3 seeds on the logistic regression, 1 on
the BNN; about 20-25 minutes on 2 shared cores) or ``--quick`` (the logistic regression only,
1 seed, shorter budgets; about 3 minutes). Writes ``benchmarks/results/vi_logistic.md``
(``vi_logistic_quick.md`` with ``--quick``, or ``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, init_to_median
from pyro.poutine.util import prune_subsample_sites

from experiments.vi import NGD_SETTINGS, NGDSettings
from models import BNN, BayesianLogisticRegression
from structngd.pyro import NGD, AutoStructuredNormal

from .step_time import CpuMonitor, Progress

#: the long reference run after ``--reference-steps`` steps at lr 1: (steps, lr, Price pairs)
REFERENCE_SCHEDULE = ((100, 0.3, 4), (100, 0.1, 8), (100, 0.03, 16))
ADAM_LRS = (0.003, 0.01, 0.03, 0.1)


# ----------------------------------------------------------------- problems
@dataclass
class Problem:
    name: str
    label: str
    model: object
    x: torch.Tensor
    y: torch.Tensor
    k: int  # rank parameter of the low-rank structures
    dim: int = 0  # latent dimension, filled in by __post_init__

    def __post_init__(self):
        self.dim = _latent_dim(self)


def _standardized(loader: str):
    import sklearn.datasets

    x_np, y_np = getattr(sklearn.datasets, loader)(return_X_y=True)
    x = torch.as_tensor(x_np, dtype=torch.float64)
    return (x - x.mean(0)) / x.std(0), y_np


def logistic_problem() -> Problem:
    x, y = _standardized("load_breast_cancer")
    return Problem("logistic", "breast cancer, Bayesian logistic regression", BayesianLogisticRegression(1.0),
                   x, torch.as_tensor(y, dtype=torch.float64), k=3)


def bnn_problem() -> Problem:
    x, y = _standardized("load_wine")
    model = BNN(13, 3, hidden=(4,), activation="tanh", likelihood="categorical", prior_scale=1.0)
    return Problem("bnn", "wine, BNN 13-4-3 (tanh, categorical)", model, x, torch.as_tensor(y, dtype=torch.long), k=4)


def _latent_dim(problem: Problem) -> int:
    pyro.clear_param_store()  # a stale "AutoStructuredNormal.loc" of another model would be reused
    guide = AutoStructuredNormal(problem.model, structure="diagonal")
    with torch.no_grad():
        guide(problem.x, problem.y)
    return guide.latent_dim


# ------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Setting:
    """One method (guide + optimizer) at one learning rate."""

    method: str  # display name
    guide: str  # structure name or "mvn"
    lr: float
    estimator: Optional[str] = None  # NGD only
    max_step: Optional[float] = None
    particles: int = 16

    @property
    def is_ngd(self) -> bool:
        return self.guide != "mvn"

    @property
    def label(self) -> str:
        if not self.is_ngd:
            return f"lr {self.lr:g}"
        tr = "" if self.max_step is None else f", tr {self.max_step:g}"
        return f"lr {self.lr:g}{tr}"


NGD_METHODS = (  # (display name, structure, estimator)
    ("NGD dense (price)", "dense", "price"),
    ("NGD dense (reparam)", "dense", "reparam"),
    ("NGD lower_triangular (price)", "lower_triangular", "price"),
    ("NGD block_triangular (price)", "block_triangular", "price"),
    ("NGD hierarchical (price)", "hierarchical", "price"),
    ("NGD diagonal (price)", "diagonal", "price"),
)
ADAM_METHOD = "Adam AutoMVN"


def settings_for(ngd: NGDSettings, adam_lrs: Sequence[float], methods: Sequence[str]) -> List[Setting]:
    out = []
    for name, structure, estimator in NGD_METHODS:
        if name in methods:
            out += [Setting(name, structure, lr, estimator, ngd.max_step, ngd.particles_for(estimator))
                    for lr in ngd.lrs(estimator)]
    if ADAM_METHOD in methods:
        out += [Setting(ADAM_METHOD, "mvn", lr, particles=ngd.particles) for lr in adam_lrs]
    return out


def build_guide(problem: Problem, guide: str):
    init = dict(init_loc_fn=init_to_median, init_scale=0.1)
    if guide == "mvn":
        return AutoMultivariateNormal(problem.model, **init)
    options = {"block_triangular": {"k": problem.k}, "hierarchical": {"k1": problem.k, "k2": problem.k}}
    return AutoStructuredNormal(problem.model, structure=guide, **init, **options.get(guide, {}))


def build_svi(problem: Problem, setting: Setting, ngd: NGDSettings, seed: int):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = build_guide(problem, setting.guide)
    with torch.no_grad():
        guide(problem.x, problem.y)  # initialize: the same start for every method
    if setting.is_ngd:
        optim = NGD(lr=setting.lr, estimator=setting.estimator, num_pairs=ngd.num_pairs, momentum=ngd.momentum,
                    max_step=setting.max_step, fallback=False)
    else:
        optim = pyro.optim.Adam({"lr": setting.lr})
    loss = Trace_ELBO(num_particles=setting.particles, vectorize_particles=setting.particles > 1, max_plate_nesting=1)
    return SVI(problem.model, guide, optim, loss), guide, optim


# ------------------------------------------------------- CRN ELBO estimate
class CRNElbo:
    """``E[log p(x, mu + L eps)] + H(q)`` with fixed ``eps`` (common random numbers)."""

    def __init__(self, problem: Problem, particles: int, seed: int = 2024):
        self.problem = problem
        g = torch.Generator().manual_seed(seed)
        self.eps = torch.randn(particles, problem.dim, generator=g, dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, guide) -> float:
        post = guide.get_posterior()
        loc, cov = post.loc if hasattr(post, "loc") else post.mean, post.covariance_matrix
        chol = torch.linalg.cholesky(cov)
        d = loc.numel()
        entropy = 0.5 * d * (1 + math.log(2 * math.pi)) + chol.diagonal().log().sum()
        z = loc + self.eps @ chol.mT
        # chunks of 128 particles: much faster than one big batch (no page faults on huge temporaries)
        log_joint = torch.cat([self.log_joint(guide, chunk) for chunk in z.split(128)])
        value = float(log_joint.mean() + entropy)
        if not math.isfinite(value):
            raise FloatingPointError(f"ELBO is {value}")
        return value

    def log_joint(self, guide, z: torch.Tensor) -> torch.Tensor:
        """``log p(x, theta(z)) + log|d theta / d z|`` per row of ``z`` (vectorized)."""
        n = z.shape[0]
        latent = f"_{guide._pyro_name}_latent"
        with poutine.block(), pyro.plate("_crn_particles", n, dim=-2):
            guide_trace = poutine.trace(poutine.condition(guide, data={latent: z.unsqueeze(1)})).get_trace(
                self.problem.x, self.problem.y)
            model_trace = poutine.trace(poutine.replay(self.problem.model, trace=guide_trace)).get_trace(
                self.problem.x, self.problem.y)
        total = torch.zeros(n, dtype=z.dtype)
        for trace, sign in ((prune_subsample_sites(model_trace), 1.0), (prune_subsample_sites(guide_trace), -1.0)):
            trace.compute_log_prob()
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and name != latent:
                    total = total + sign * site["log_prob"].reshape(n, -1).sum(-1)
        return total


# ------------------------------------------------------------------- runs
@dataclass
class RunResult:
    setting: Setting
    seed: int
    steps: List[int] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    elbo: List[float] = field(default_factory=list)
    reached: Optional[Tuple[int, float]] = None
    status: str = "ok"
    budget: int = 0
    others: float = math.nan  # cores used by other processes meanwhile

    @property
    def best(self) -> float:
        return max((v for v in self.elbo if v == v), default=-math.inf)

    @property
    def total_seconds(self) -> float:
        return self.seconds[-1] if self.seconds else math.nan

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds[-1] / self.steps[-1] if self.steps and self.steps[-1] else math.nan


def eval_due(step: int) -> bool:
    """Evaluation schedule: every step to 50, every 5 to 500, every 25 to 5000, then every 100."""
    if step <= 50:
        return True
    if step <= 500:
        return step % 5 == 0
    if step <= 5000:
        return step % 25 == 0
    return step % 100 == 0


def run_setting(problem: Problem, setting: Setting, seed: int, budget: int, target: float, evaluate: CRNElbo,
                ngd: NGDSettings, monitor: CpuMonitor) -> RunResult:
    """Run until the ELBO is within the target (evaluated on :func:`eval_due` steps) or ``budget``."""
    result = RunResult(setting, seed, budget=budget)
    svi, guide, _ = build_svi(problem, setting, ngd, seed)
    before = monitor.snapshot()
    elapsed, step = 0.0, 0
    try:
        result.steps.append(0), result.seconds.append(0.0), result.elbo.append(evaluate(guide))
        while step < budget:
            step += 1
            start = time.perf_counter()
            loss = svi.step(problem.x, problem.y)
            elapsed += time.perf_counter() - start
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss}")
            if eval_due(step) or step == budget:
                value = evaluate(guide)
                result.steps.append(step), result.seconds.append(elapsed), result.elbo.append(value)
                if value >= target:
                    result.reached = (step, elapsed)
                    break
    except (ValueError, RuntimeError, FloatingPointError) as err:
        result.status = f"diverged at step {step}: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    result.others = monitor.others(before, monitor.snapshot())
    return result


def reference_optimum(problem: Problem, steps: int, evaluate: CRNElbo, ngd: NGDSettings) -> Tuple[float, List[float]]:
    """The optimal ELBO from a long dense price-NGD run (lr 1, then ``REFERENCE_SCHEDULE``)."""
    setting = Setting("reference", "dense", 1.0, "price", ngd.max_step, 1)
    svi, guide, optim = build_svi(problem, setting, ngd, seed=0)
    trace = []
    phases = ((steps, 1.0, ngd.num_pairs),) + REFERENCE_SCHEDULE
    for count, lr, pairs in phases:
        optim.lr, optim.num_pairs = lr, pairs
        for _ in range(count):
            svi.step(problem.x, problem.y)
        trace.append(evaluate(guide))
    return trace[-1], trace


# ---------------------------------------------------------------- summary
@dataclass
class Summary:
    method: str
    setting: Setting
    runs: List[RunResult]

    def _median(self, values: List[float]) -> float:
        return statistics.median(values) if values else math.nan

    @property
    def steps(self) -> float:
        """Median over seeds of the steps to the target (``inf`` for a seed that missed it)."""
        return self._median([r.reached[0] if r.reached else math.inf for r in self.runs])

    @property
    def seconds(self) -> float:
        return self._median([r.reached[1] if r.reached else math.inf for r in self.runs])

    @property
    def reached_count(self) -> int:
        return sum(r.reached is not None for r in self.runs)

    @property
    def best(self) -> float:
        return self._median([r.best for r in self.runs])

    @property
    def ms_per_step(self) -> float:
        return self._median([r.ms_per_step for r in self.runs])

    @property
    def budget(self) -> int:
        return self.runs[0].budget

    @property
    def budget_seconds(self) -> float:
        """Median seconds of the full budget (a bound for ratios when the target was missed)."""
        return self._median([r.total_seconds for r in self.runs if r.reached is None] or [math.nan])

    def key(self) -> tuple:
        return (self.steps, self.seconds, -self.best)


def summarize(results: List[RunResult]) -> Dict[str, Summary]:
    """Best setting per method: fewest median steps to the target, then seconds, then best ELBO."""
    by_setting: Dict[Setting, List[RunResult]] = {}
    for r in results:
        by_setting.setdefault(r.setting, []).append(r)
    best: Dict[str, Summary] = {}
    for setting, runs in by_setting.items():
        s = Summary(setting.method, setting, runs)
        if setting.method not in best or s.key() < best[setting.method].key():
            best[setting.method] = s
    return best


def _num(x: float, digits: int = 3) -> str:
    if x is None or x != x:
        return "–"
    if math.isinf(x):
        return "not reached"
    if float(x).is_integer() and abs(x) >= 1:
        return str(int(x))
    return f"{x:.{digits}g}"


def ratio(adam: Summary, other: Summary, what: str) -> str:
    """Adam / method for steps or seconds; ``>x`` when only Adam missed the target."""
    a, b = (adam.steps, other.steps) if what == "steps" else (adam.seconds, other.seconds)
    if math.isinf(b):
        return "–"
    if math.isinf(a):
        bound = adam.budget if what == "steps" else adam.budget_seconds
        return f">{bound / b:.3g}" if b > 0 and bound == bound else "–"
    return f"{a / b:.3g}" if b > 0 else "–"


def problem_report(problem: Problem, optimum: float, reference: List[float], best_any: float,
                   results: List[RunResult], args: argparse.Namespace, seeds: Sequence[int]) -> str:
    best = summarize(results)
    adam = best.get(ADAM_METHOD)
    header = ["method", "best setting", "steps to 1 nat", "s to 1 nat", "ms/step", "best ELBO",
              "reached (seeds)", "Adam/method steps", "Adam/method s"]
    rows = []
    for name in [m for m, _, _ in NGD_METHODS] + [ADAM_METHOD]:
        s = best.get(name)
        if s is None:
            continue
        rows.append([
            name, s.setting.label, _num(s.steps), _num(s.seconds, 2), _num(s.ms_per_step, 2), f"{s.best:.2f}",
            f"{s.reached_count}/{len(s.runs)}",
            ratio(adam, s, "steps") if adam and s is not adam else "1", ratio(adam, s, "seconds") if adam and s is not adam else "1",
        ])
    lines = [
        f"## {problem.label}: d = {problem.dim}, n = {problem.x.shape[0]}",
        "",
        f"Optimal ELBO {optimum:.3f} (reference run: {', '.join(f'{v:.3f}' for v in reference)} after each phase; "
        f"best of any run {best_any:.3f}); target = optimum - {args.tol:g}. Seeds {list(seeds)}; medians over seeds. "
        f"Budgets: NGD {results_budget(results, True)} steps, Adam {results_budget(results, False)} steps.",
        "",
        table(header, rows),
        "",
        "Every setting (steps / seconds to the target per seed; `–` = not reached; `other CPU` = cores used by other "
        "processes during the run, median):",
        "",
    ]
    grid_rows = []
    by_setting: Dict[Setting, List[RunResult]] = {}
    for r in results:
        by_setting.setdefault(r.setting, []).append(r)
    for setting, runs in by_setting.items():
        per_seed = "; ".join(f"{r.reached[0]} / {r.reached[1]:.2f}s" if r.reached else
                             ("diverged" if r.status != "ok" else "–") for r in runs)
        grid_rows.append([setting.method, setting.label + (f", {setting.particles} particles" if setting.estimator != "price" else ""),
                          per_seed, f"{statistics.median([r.best for r in runs]):.2f}",
                          _num(statistics.median([r.ms_per_step for r in runs]), 2),
                          f"{statistics.median([r.others for r in runs]):.2f}"])
    lines.append(table(["method", "setting", "steps / s per seed", "best ELBO", "ms/step", "other CPU"], grid_rows))
    failed = [r for r in results if r.status != "ok"]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {r.setting.method} {r.setting.label} seed {r.seed}: {r.status}" for r in failed]
    return "\n".join(lines)


def results_budget(results: List[RunResult], ngd: bool) -> str:
    budgets = sorted({r.budget for r in results if r.setting.is_ngd == ngd})
    return "/".join(map(str, budgets)) or "–"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def environment(args: argparse.Namespace, argv: Sequence[str], elapsed: float, load: Tuple[str, str]) -> str:
    ngd = NGD_SETTINGS
    return "\n".join([
        "# VI benchmark: structured NGD vs AutoMultivariateNormal + Adam (steps and seconds to 1 nat)",
        "",
        f"- command: `python -m benchmarks.vi_logistic{(' ' + ' '.join(argv)) if argv else ''}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, pyro "
        f"{pyro.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}{' (set by --threads)' if args.threads else ' (default)'}, float64",
        f"- load average at start / end: {load[0]} / {load[1]} (other processes share the machine: compare ratios)",
        f"- NGD settings (experiments.vi.NGD_SETTINGS): price lrs {list(ngd.price_lrs)} ({ngd.num_pairs} pair), "
        f"reparam lrs {list(ngd.reparam_lrs)} ({ngd.particles} particles), max_step {ngd.max_step}; Adam lrs "
        f"{list(args.adam_lrs)} ({ngd.particles} particles); ELBO: CRN estimate, {args.eval_particles} fixed draws, "
        f"exact entropy; init_to_median, init_scale 0.1",
        f"- total run time {elapsed:.0f} s",
    ])


# -------------------------------------------------------------------- main
PROBLEMS = {"logistic": logistic_problem, "bnn": bnn_problem}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vi_logistic", description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=None, choices=list(PROBLEMS),
                   help="default: both (--quick: logistic only)")
    p.add_argument("--methods", nargs="+", default=[m for m, _, _ in NGD_METHODS] + [ADAM_METHOD],
                   help="method names (quote them), default all")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="logistic seeds (default 0 1 2; --quick 0)")
    p.add_argument("--bnn-seeds", type=int, nargs="+", default=None, help="BNN seeds (default 0)")
    p.add_argument("--adam-lrs", type=float, nargs="+", default=list(ADAM_LRS))
    p.add_argument("--adam-steps", type=int, default=None, help="Adam budget (default 20000 logistic / 10000 BNN; --quick 4000)")
    p.add_argument("--ngd-steps", type=int, default=None, help="NGD budget (default 300 logistic / 600 BNN; --quick 150)")
    p.add_argument("--reference-steps", type=int, default=None, help="lr-1 steps of the reference run (default 300 / 600 BNN)")
    p.add_argument("--eval-particles", type=int, default=512, help="fixed draws of the CRN ELBO estimate")
    p.add_argument("--tol", type=float, default=1.0, help="nats below the optimal ELBO that count as reached")
    p.add_argument("--quick", action="store_true", help="logistic regression only, one seed, shorter budgets (about 3 minutes)")
    p.add_argument("--out", type=Path, default=None, help="Markdown output (default benchmarks/results/vi_logistic.md)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.problems is None:
        args.problems = ["logistic"] if args.quick else list(PROBLEMS)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.bnn_seeds is None:
        args.bnn_seeds = [0]
    if args.out is None:
        args.out = Path(__file__).resolve().parent / "results" / ("vi_logistic_quick.md" if args.quick else "vi_logistic.md")
    return args


def budgets(problem: str, args: argparse.Namespace) -> Tuple[int, int, int]:
    """(NGD steps, Adam steps, reference lr-1 steps) for a problem."""
    bnn = problem == "bnn"
    ngd = args.ngd_steps or (150 if args.quick else (600 if bnn else 300))
    adam = args.adam_steps or (4000 if args.quick else (10000 if bnn else 20000))
    ref = args.reference_steps or (300 if args.quick or not bnn else 600)
    return ngd, adam, ref


def main(argv: Optional[Sequence[str]] = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    warnings.filterwarnings("ignore", message=".*gradient layout contract.*")
    monitor = CpuMonitor()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    begin = time.perf_counter()
    sections = []
    plan = []
    for name in args.problems:
        problem = PROBLEMS[name]()
        seeds = args.bnn_seeds if name == "bnn" else args.seeds
        ngd_steps, adam_steps, ref_steps = budgets(name, args)
        settings = settings_for(NGD_SETTINGS, args.adam_lrs, args.methods)
        plan.append((problem, seeds, ngd_steps, adam_steps, ref_steps, settings))
    progress = Progress(sum(1 + len(p[1]) * len(p[5]) for p in plan), enabled=not args.no_progress)
    for problem, seeds, ngd_steps, adam_steps, ref_steps, settings in plan:
        evaluate = CRNElbo(problem, args.eval_particles)
        progress.start(f"{problem.name} reference ({ref_steps}+ price steps)")
        for setting in settings[:1] + [s for s in settings if not s.is_ngd][:1]:  # warm-up (untimed)
            run_setting(problem, setting, 0, 2, math.inf, evaluate, NGD_SETTINGS, monitor)
        optimum, reference = reference_optimum(problem, ref_steps, evaluate, NGD_SETTINGS)
        progress.done()
        results = []
        for seed in seeds:
            for setting in settings:
                progress.start(f"{problem.name} {setting.method} {setting.label} seed {seed}")
                budget = ngd_steps if setting.is_ngd else adam_steps
                results.append(run_setting(problem, setting, seed, budget, optimum - args.tol, evaluate,
                                           NGD_SETTINGS, monitor))
                progress.done()
        best_any = max(r.best for r in results)
        sections.append(problem_report(problem, optimum, reference, best_any, results, args, seeds))
    progress.close()
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = environment(args, argv, time.perf_counter() - begin, (load_start, load_end)) + "\n\n" + "\n\n".join(sections) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return report


if __name__ == "__main__":
    main()
