"""Covariance learning: structured NGD against geoopt (SPD manifold) and Adam (Cholesky).

On a precision's MAP estimate and a Wishart variational posterior, both with exact optima, NGD on
dense and lower-triangular factors runs against geoopt's RSGD and RAdam and against Adam on a
Cholesky factor: the relative gap against iterations and seconds, the iterations and seconds to a
tolerance as ratios to the best geoopt method, and SPD failures.

Outputs in --out (default results/wishart): table.md, verdict.json, summary.csv, results.json and
gap_vs_{iterations,seconds}_{map,vi}.png. Presets: --tiny (d = 5), --quick (the default: d in
{10, 50}, 400 iterations) and --full (d in {10, 50, 200}, 2000 iterations).

Full description: docs/studies.md."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from structngd.families import Gaussian, Wishart
from structngd.families.wishart import multivariate_digamma
from structngd.optim import NaturalGradient

from . import common, harness, progress
from .cli import option
from .common import Curve, Line, fmt, fmt_ratio

PROBLEMS = ("map", "vi")
PROBLEM_TITLES = {
    "map": "MAP precision (negative log posterior per sample)",
    "vi": "Wishart variational posterior (KL to the exact posterior)",
}
METHOD_NAMES = {"ngd_dense": "NGD dense (ours)", "ngd_tril": "NGD lower_triangular (ours)", "rsgd": "RSGD (geoopt)",
                "radam": "RAdam (geoopt)", "adam_chol": "Adam Cholesky"}
METHODS = tuple(METHOD_NAMES)
OURS = ("ngd_dense", "ngd_tril")
GEOOPT = ("rsgd", "radam")
NGD_STRUCTURES = {"ngd_dense": "dense", "ngd_tril": "lower_triangular"}


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines one study; built from a preset and the command line."""

    dims: Tuple[int, ...] = option(help="dimensions d")
    conds: Tuple[float, ...] = option((10.0, 1e4), "condition numbers of Sigma*")
    seeds: Tuple[int, ...] = option((0,), "seeds (data draw)")
    problems: Tuple[str, ...] = option(PROBLEMS, "problems", choices=PROBLEMS)
    methods: Tuple[str, ...] = option(METHODS, "methods", choices=METHODS)
    iterations: int = option(400, "steps per run")
    samples_per_dim: int = option(4, "N = this x d data points")
    ngd_lrs: Tuple[float, ...] = option((0.5, 1.0), "NGD learning rates")
    #: without a trust region the first steps from the prior overflow on the cond = 1e4 problems
    ngd_max_steps: Tuple[Optional[float], ...] = option((1.0, 2.0), "NGD trust regions max_step ('none' = off)")
    rsgd_lrs: Tuple[float, ...] = option((0.001, 0.01, 0.1, 1.0), "geoopt RiemannianSGD learning rates")
    radam_lrs: Tuple[float, ...] = option((0.01, 0.1, 1.0), "geoopt RiemannianAdam learning rates")
    adam_lrs: Tuple[float, ...] = option((0.001, 0.01, 0.1), "Adam (Cholesky) learning rates")
    tol: float = option(1e-6, "relative-gap tolerance for iterations/seconds to reach it")
    eval_points: int = option(60, "about how many evaluations per run (x2)")
    threads: Optional[int] = option(1, "torch threads")
    device: str = option("cpu", "device of the data (drawn on the CPU, then moved) and of every method's "
                         "parameters (e.g. cuda)", check=common.resolve_device)

    def configs(self, method: str) -> List["Config"]:
        if method in OURS:
            return [Config(method, lr, m) for m, lr in itertools.product(self.ngd_max_steps, self.ngd_lrs)]
        lrs = {"rsgd": self.rsgd_lrs, "radam": self.radam_lrs, "adam_chol": self.adam_lrs}[method]
        return [Config(method, lr) for lr in lrs]


PRESETS = {
    "tiny": Settings(
        dims=(5,), conds=(10.0,), iterations=40, ngd_lrs=(1.0,), rsgd_lrs=(0.1,), radam_lrs=(0.1,),
        adam_lrs=(0.1,), eval_points=10,
    ),
    "quick": Settings(dims=(10, 50), iterations=400),
    "full": Settings(dims=(10, 50, 200), iterations=2000, eval_points=100),
}


Config = common.LrSetting  # one optimizer setting of one method


@dataclass(frozen=True)
class ProblemSpec:
    kind: str
    dim: int
    cond: float

    @property
    def label(self) -> str:
        return f"{self.kind}, d={self.dim}, cond={common.cond_text(self.cond)}"


# ------------------------------------------------------------------ problem
class CovarianceData:
    """Samples of ``N(0, Sigma*)`` and the conjugate Wishart prior/posterior of the precision."""

    def __init__(self, dim: int, cond: float, seed: int, samples_per_dim: int, device="cpu"):
        g = torch.Generator().manual_seed(seed)  # the same draws on every device
        d = self.d = dim
        rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        half = 0.5 * math.log10(cond)
        scales = torch.logspace(-half, half, d, dtype=torch.float64)  # eigenvalues of Sigma*
        self.num = samples_per_dim * d
        x = torch.randn(self.num, d, generator=g, dtype=torch.float64) @ (rot * scales.sqrt()).mT
        self.n0 = d + 1.0
        a = self.n0 * torch.eye(d, dtype=torch.float64) + x.mT @ x  # V_p^{-1}
        a = 0.5 * (a + a.mT)
        self.n_post = self.n0 + self.num
        self.c = self.n_post - d - 1  # exponent of log|P| in the log posterior
        self.device = torch.device(device)
        self.a = a.to(self.device)
        self.logdet_a = (2 * torch.linalg.cholesky(a).diagonal().log().sum()).to(self.device)

    def objective(self, kind: str, m: torch.Tensor, logdet: torch.Tensor, n: Optional[torch.Tensor]) -> torch.Tensor:
        """The problem's objective at the SPD matrix ``m`` (``P`` or ``Psi``) with ``log|m|`` and ``n`` (``vi``)."""
        return self.map_objective(m, logdet) if kind == "map" else self.kl(n, m, logdet)

    def map_objective(self, p: torch.Tensor, logdet_p: torch.Tensor) -> torch.Tensor:
        """``[tr(A P) - (n_p - d - 1) log|P|] / (2 N)``."""
        return (0.5 * (self.a * p).sum() - 0.5 * self.c * logdet_p) / self.num

    def map_optimum(self) -> float:
        """The objective at ``P* = (n_p - d - 1) A^{-1}``."""
        d = self.d
        logdet = d * math.log(self.c) - float(self.logdet_a)
        return (0.5 * self.c * d - 0.5 * self.c * logdet) / self.num

    def kl(self, n: torch.Tensor, psi: torch.Tensor, logdet_psi: torch.Tensor) -> torch.Tensor:
        """``KL(W(n, Psi / n) || W(n_p, V_p))``."""
        d, n_p = self.d, self.n_post
        ln2 = math.log(2.0)
        log_det_v = logdet_psi - d * torch.log(n)
        psi_d = multivariate_digamma(0.5 * n, d)
        expected_logdet = psi_d + d * ln2 + log_det_v
        entropy = (
            0.5 * (d + 1) * log_det_v + 0.5 * d * (d + 1) * ln2 + torch.mvlgamma(0.5 * n, d)
            - 0.5 * (n - d - 1) * psi_d + 0.5 * n * d
        )
        expected_log_p = (
            0.5 * (n_p - d - 1) * expected_logdet - 0.5 * (self.a * psi).sum() - 0.5 * n_p * d * ln2
            + 0.5 * n_p * self.logdet_a - torch.mvlgamma(self.a.new_tensor(0.5 * n_p), d)
        )
        return -entropy - expected_log_p


def _chol_logdet(m: torch.Tensor) -> Tuple[Optional[torch.Tensor], bool]:
    """``(log|m|, True)`` by Cholesky, or ``(None, False)`` if ``m`` is not (numerically) SPD."""
    if not torch.isfinite(m).all():
        return None, False
    chol, info = torch.linalg.cholesky_ex(0.5 * (m + m.mT))
    if int(info) != 0:
        return None, False
    return 2 * chol.diagonal().log().sum(), True


# ------------------------------------------------------------------ solvers
class Solver:
    """One method on one problem: ``loss()`` (with autograd), ``step()``, ``point()`` (detached)."""

    def __init__(self, kind: str, data: CovarianceData, config: Config):
        self.kind, self.data, self.config = kind, data, config
        d, kw = data.d, dict(dtype=torch.float64, device=data.device)
        method = config.method
        self.log_excess = None  # vi baselines: n = d - 1 + exp(r)
        if method in OURS:
            structure = NGD_STRUCTURES[method]
            if kind == "map":
                self.family = Gaussian(d, structure=structure, **kw)
            else:
                self.family = Wishart(d, data.n0, structure, mean=1.0, **kw)
            self.optimizer = NaturalGradient(self.family, lr=config.lr, max_step=config.max_step)
            return
        if kind == "vi":
            self.log_excess = torch.nn.Parameter(torch.tensor(math.log(data.n0 - d + 1), **kw))
        extra = [] if self.log_excess is None else [self.log_excess]
        if method in GEOOPT:
            import geoopt

            self.spd = geoopt.ManifoldParameter(torch.eye(d, **kw), manifold=geoopt.SymmetricPositiveDefinite())
            cls = geoopt.optim.RiemannianSGD if method == "rsgd" else geoopt.optim.RiemannianAdam
            self.optimizer = cls([self.spd] + extra, lr=config.lr)
        else:  # adam_chol: L = tril(R, -1) + diag(exp(diag R)), R = 0 at L = I
            self.raw = torch.nn.Parameter(torch.zeros(d, d, **kw))
            self.optimizer = torch.optim.Adam([self.raw] + extra, lr=config.lr)

    def _matrix(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The SPD matrix (``P`` or ``Psi``) and its log-determinant, differentiably."""
        method = self.config.method
        if method in OURS:
            q = self.family
            b = q.group.to_dense(q.factor)
            return b @ b.mT, 2 * q.group.logdet(q.factor)
        if method in GEOOPT:
            sign, logabs = torch.linalg.slogdet(self.spd)
            return self.spd, torch.where(sign > 0, logabs, torch.full_like(logabs, math.nan))
        diag = self.raw.diagonal()
        chol = self.raw.tril(-1) + torch.diag_embed(diag.exp())
        return chol @ chol.mT, 2 * diag.sum()

    def _df(self) -> Optional[torch.Tensor]:
        """The degrees of freedom ``n`` (``vi``; ``None`` for ``map``)."""
        if self.kind == "map":
            return None
        return self.family.df if self.config.method in OURS else self.data.d - 1 + self.log_excess.exp()

    def loss(self) -> torch.Tensor:
        return self.data.objective(self.kind, *self._matrix(), self._df())

    def step(self) -> None:
        self.optimizer.zero_grad()
        self.loss().backward()
        if self.config.method in OURS and self.kind == "map":
            self.family.loc.grad = torch.zeros_like(self.family.loc)  # the mean stays at 0
        self.optimizer.step()

    @torch.no_grad()
    def point(self) -> Tuple[Optional[float], torch.Tensor]:
        m, n = self._matrix()[0], self._df()
        return None if n is None else float(n), m.detach()

    @torch.no_grad()
    def evaluate(self) -> Tuple[float, bool, bool]:
        """``(objective, valid, finite)``: the objective of the current iterate (by an independent
        Cholesky log-determinant), whether it is SPD (and ``n > d - 1``), whether it is finite."""
        n, m = self.point()
        finite = bool(torch.isfinite(m).all()) and (n is None or math.isfinite(n))
        logdet, spd = _chol_logdet(m)
        valid = finite and spd and (n is None or n > self.data.d - 1)
        if not valid:
            return math.nan, False, finite
        value = float(self.data.objective(self.kind, m, logdet, None if n is None else m.new_tensor(n)))
        return value, math.isfinite(value), math.isfinite(value)


# ------------------------------------------------------------------ runs
@dataclass
class Run:
    spec: ProblemSpec
    seed: int
    config: Config
    objective: Curve
    spd_failures: int
    status: str
    gap: Optional[Curve] = None


def run_one(spec: ProblemSpec, data: CovarianceData, config: Config, seed: int, settings: Settings,
            reference: float) -> Run:
    """Optimize from the problem's start; evaluate (and check SPD) after every step. A value
    below the exact optimum ``reference`` (beyond rounding) can only come from a loss of
    precision in a diverging iterate: it ends the run like a non-finite one."""
    floor = reference - 1e-9 * max(1.0, abs(reference))
    torch.manual_seed(seed)
    solver = Solver(spec.kind, data, config)
    steps = settings.iterations
    points = common.eval_points(steps, settings.eval_points)
    curve = Curve([0], [0.0], [solver.evaluate()[0]])
    clock, status, failures = common.Stopwatch(data.device), "ok", 0
    for it in range(1, steps + 1):
        try:
            with clock:
                solver.step()
        except (ValueError, RuntimeError, FloatingPointError) as err:
            failures += 1
            status = f"step {it} raised {common.error_text(err, 100)}"
            break
        value, valid, finite = solver.evaluate()  # every step: the SPD check (outside the clock)
        if not valid:
            failures += 1
            if status == "ok":
                status = f"first SPD failure at iteration {it}"
        if not finite:
            status = f"non-finite iterate at iteration {it}"
            break
        if value < floor:
            status = f"objective {value:.3g} below the exact optimum at iteration {it} (loss of precision)"
            break
        if it == points[len(curve.iterations)]:
            curve.append(it, clock.seconds, value)
    curve.pad_to(points)
    return Run(spec, seed, config, curve, failures, status)


def run_all(settings: Settings) -> Tuple[List[Run], Dict[tuple, dict]]:
    """Every run of the study, and per ``(problem, seed)`` the exact optimum and the data's size."""
    specs = [ProblemSpec(k, d, c) for k in settings.problems for d in settings.dims for c in settings.conds]
    configs = [c for m in settings.methods for c in settings.configs(m)]
    bar = progress.bar(len(specs) * len(settings.seeds) * len(configs), "wishart")
    runs, optima = [], {}
    for spec, seed in itertools.product(specs, settings.seeds):
        data = CovarianceData(spec.dim, spec.cond, seed, settings.samples_per_dim, settings.device)
        reference = data.map_optimum() if spec.kind == "map" else 0.0
        optima[(spec, seed)] = {"reference": reference, "n_post": data.n_post, "num_samples": data.num}
        for config in configs:
            bar.set_postfix_str(f"{spec.label} {METHOD_NAMES[config.method]} lr {config.label}")
            runs.append(run_one(spec, data, config, seed, settings, reference))
            bar.update()
    bar.close()
    return runs, optima


def attach_gaps(runs: List[Run], optima: Dict[tuple, dict]) -> None:
    """``f*`` = min(exact optimum, best value of any run) (runs stop below the optimum minus
    rounding, so this only absorbs rounding); relative gap ``(f - f*) / (f_0 - f*)``."""
    common.settle_optima(optima, (((run.spec, run.seed), run.objective) for run in runs))
    for run in runs:
        optimum = optima[(run.spec, run.seed)]["optimum"]
        initial = run.objective.values[0] - optimum
        run.gap = replace(run.objective, values=[(v - optimum) / initial for v in run.objective.values])


# ---------------------------------------------------------------- summary
def best_results(runs: List[Run], settings: Settings) -> Dict[ProblemSpec, Dict[str, harness.Best]]:
    """``{problem: {method: harness.Best}}``, the value curve the objective."""
    return harness.best_settings(runs, lambda r: r.spec, lambda r: r.objective, settings.tol)


def _fastest(results: List[harness.Best]) -> Optional[harness.Best]:
    """Fewest seconds to ``tol``, else smallest final gap (``None`` for no results)."""
    return min(results, key=lambda r: common.reach_then_final(r.reached[1], r.gap), default=None)


def _geoopt_reference(methods: Dict[str, harness.Best]) -> Optional[harness.Best]:
    """The best geoopt method."""
    return _fastest([methods[m] for m in GEOOPT if m in methods])


def summary_rows(results: "Results", settings: Settings) -> List[dict]:
    """One row per problem and method: best lr, finals, times to ``tol`` and their ratios to geoopt's."""
    grid_failures = defaultdict(int)
    for run in results.runs:
        grid_failures[(run.spec, run.config.method)] += run.spd_failures
    rows, steps = [], settings.iterations
    for spec, methods in results.best.items():
        ref = _geoopt_reference(methods)
        entries = [results.optima[(spec, s)] for s in settings.seeds]
        optimum = sum(e["optimum"] for e in entries) / len(entries)
        for method in settings.methods:
            r = methods[method]
            seconds = r.value.total_seconds
            last_it = max((i for i, v in zip(r.value.iterations, r.value.values) if v == v), default=0)
            row = {
                "problem": spec.label, "kind": spec.kind, "dim": spec.dim, "cond": spec.cond,
                "method": METHOD_NAMES[method], "method_key": method, "best_lr": r.config.label, "optimum": optimum,
                "final_objective": r.value.final, "final_gap": r.value.final - optimum,
                "final_relative_gap": r.gap.final, "iterations_to_tol": r.reached[0], "seconds_to_tol": r.reached[1],
                "seconds": seconds, "ms_per_step": 1e3 * seconds / last_it if last_it else math.nan,
                "spd_failures": sum(run.spd_failures for run in r.runs),
                "spd_failures_grid": grid_failures[(spec, method)],
                "status": "; ".join(sorted({run.status for run in r.runs})),
            }
            if ref is not None:
                row["ratio_iterations_vs_geoopt"] = fmt_ratio(r.reached[0], ref.reached[0], steps, steps)
                row["ratio_seconds_vs_geoopt"] = fmt_ratio(r.reached[1], ref.reached[1], seconds,
                                                           ref.value.total_seconds)
                row["geoopt_reference"] = METHOD_NAMES[ref.config.method]
            else:
                row.update(ratio_iterations_vs_geoopt="–", ratio_seconds_vs_geoopt="–", geoopt_reference="")
            rows.append(row)
    return rows


def markdown_report(results: "Results", settings: Settings, runtime: float) -> str:
    """The results table (one section per problem) with the settings and notes."""
    grid = common.grid_text
    header = [
        "method", "best lr", "final rel. gap", "final gap", f"iters to {settings.tol:g}",
        f"s to {settings.tol:g}", "iters / geoopt", "s / geoopt", "ms/step", "SPD failures (best / grid)",
    ]
    lines = [
        "Relative gap = (f - f*) / (f_0 - f*), f* exact (MAP: closed form; VI: KL = 0). Times to "
        f"relative gap < {settings.tol:g}; ratios = method / best geoopt method (fewest seconds to tol; "
        "< 1: faster than geoopt; >x / <x when one side did not reach tol). SPD failures: steps after which "
        "the iterate failed Cholesky, was non-finite or the step raised.",
        "",
        f"Settings: seeds {list(settings.seeds)}; N = {settings.samples_per_dim} d samples; "
        f"{settings.iterations} iterations on {settings.device}; float64; lr grids: NGD {grid(settings.ngd_lrs)} "
        f"with max_step {grid(settings.ngd_max_steps)}, RSGD {grid(settings.rsgd_lrs)}, RAdam "
        f"{grid(settings.radam_lrs)}, Adam {grid(settings.adam_lrs)}; {common.environment_text(runtime)}",
    ]
    for problem, rows in common.group_by(results.rows, lambda row: row["problem"]).items():
        body = [
            [row["method"], row["best_lr"], fmt(row["final_relative_gap"]), fmt(row["final_gap"]),
             common.reach_text(row["iterations_to_tol"]), common.reach_text(row["seconds_to_tol"]),
             row["ratio_iterations_vs_geoopt"], row["ratio_seconds_vs_geoopt"], fmt(row["ms_per_step"]),
             f"{row['spd_failures']} / {row['spd_failures_grid']}"]
            for row in rows
        ]
        lines += ["", f"## {problem} ({PROBLEM_TITLES[rows[0]['kind']]})", "", common.markdown_table(header, body)]
    notes = [f"{r['problem']}, {r['method']} (lr {r['best_lr']}): {r['status']}"
             for r in results.rows if r["status"] != "ok"]
    return "\n".join(lines + common.notes_section(notes)) + "\n"


# ------------------------------------------------------------------ plots
def plot_all(results: "Results", settings: Settings, out: Path) -> List[Path]:
    """Relative gap vs iterations and vs seconds, one figure per problem kind, one panel per (d, cond)."""
    import matplotlib

    colors = {m: matplotlib.colormaps["tab10"](i) for i, m in enumerate(METHODS)}
    styles = {m: ("-" if m in OURS else "--" if m in GEOOPT else ":") for m in METHODS}
    paths = []
    for kind, axis in itertools.product(settings.problems, ("iterations", "seconds")):
        panels: Dict[str, List[Line]] = defaultdict(list)
        for spec, methods in results.best.items():
            if spec.kind != kind:
                continue
            panels[spec.label.split(", ", 1)[1]] += [
                Line(result.gap.along(axis), result.gap.values, colors[method], styles[method])
                for method, result in methods.items()
            ]
        if not panels:
            continue
        paths.append(out / f"gap_vs_{axis}_{kind}.png")
        common.plot_panels(
            paths[-1], dict(panels), xlabel=axis if axis == "iterations" else "time (s, optimization work only)",
            ylabel="relative gap (f - f*) / (f0 - f*)", title=f"{PROBLEM_TITLES[kind]}: best lr per method",
            legend=[(METHOD_NAMES[m], colors[m], styles[m]) for m in settings.methods], floor=1e-14,
        )
    return paths


# ---------------------------------------------------------------- outputs
def write_outputs(results: "Results", settings: Settings, out: Path) -> List[Path]:
    """``summary.csv`` and ``results.json`` (settings, problems, summary, every run's curves) in ``out``."""
    common.write_csv(out / "summary.csv", results.rows)
    problems = [{"problem": s.label, "seed": seed, **e} for (s, seed), e in results.optima.items()]
    runs = [
        {"problem": r.spec.label, "kind": r.spec.kind, "dim": r.spec.dim, "cond": r.spec.cond, "seed": r.seed,
         "method": METHOD_NAMES[r.config.method], **asdict(r.config), "status": r.status,
         "spd_failures": r.spd_failures, "iterations": r.objective.iterations,
         "seconds": common.rounded(r.objective.seconds), "objective": common.rounded(r.objective.values, 14),
         "relative_gap": common.rounded(r.gap.values)}
        for r in results.runs
    ]
    common.write_json(out / "results.json", {"settings": asdict(settings), "problems": problems,
                                             "summary": results.rows, "runs": runs})
    return [out / "summary.csv", out / "results.json"]


# ------------------------------------------------------------------- study
Results = harness.OptimaResults


def compute(settings: Settings) -> Results:
    """Every run, its relative gap, the selection and the table's rows."""
    return Results.compute(settings, run_all, attach_gaps, best_results, summary_rows)


def verdict(results: Results, settings: Settings) -> List[str]:
    """Per problem kind: how often NGD (its faster structure) reached the tolerance before the
    best geoopt method, and how much faster; then the SPD failures of both."""
    lines = []
    for kind in settings.problems:
        pairs, finals = [], []
        for spec, methods in results.best.items():
            mine, reference = _fastest([methods[m] for m in OURS if m in methods]), _geoopt_reference(methods)
            if spec.kind == kind and mine is not None and reference is not None:
                pairs.append((mine.reached[1], reference.reached[1]))
                finals.append((mine.gap.final, reference.gap.final))
        if pairs:
            lines.append(f"{PROBLEM_TITLES[kind]}: " + harness.head_to_head(
                pairs, "NGD", "the best geoopt method", f"relative gap < {settings.tol:g}", "(d, cond) problems",
                "seconds", finals))
    failures = {name: sum(r.spd_failures for r in results.runs if r.config.method in keys)
                for name, keys in (("NGD", OURS), ("geoopt", GEOOPT))}
    lines.append(f"SPD failures over every learning rate: NGD {failures['NGD']}, geoopt {failures['geoopt']}.")
    return lines


STUDY = harness.Study(
    name="wishart", title="Covariance learning: structured NGD vs geoopt (SPD) and Adam (Cholesky)",
    presets=PRESETS, full_time="about 17 minutes", dtype=torch.float64, compute=compute,
    report=markdown_report, verdict=verdict, write=write_outputs, plot=plot_all,
)
add_arguments, resolve_settings, run = STUDY.add_arguments, STUDY.resolve_settings, STUDY.run
