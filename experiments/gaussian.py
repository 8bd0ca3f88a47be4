"""Structured NGD against Adam on Gaussian targets: KL(q || p) per structure, vs iterations and seconds.

Every structure of structngd.groups is fitted to random Gaussian targets, with exact or Monte Carlo
gradients, by NaturalGradient and by Adam on the same parameters: the gap KL - KL* to the
structure's own optimum against iterations and seconds, and each method's best setting (fewest
iterations to gap < tol, else smallest final gap).

Outputs in --out (default results/gaussian): table.md, verdict.json, summary.csv, runs.json and
gap_vs_{iterations,seconds}_{exact,mc}.png. Presets: --tiny (seconds), --quick (the default: d in
{10, 100}) and --full (d in {10, 100, 1000}, mostly spent at d = 1000).

Full description: docs/studies.md."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from structngd.families import ESTIMATORS, Gaussian
from structngd.optim import NaturalGradient
from structngd.groups import GROUPS
from structngd.targets import GaussianTarget

from . import common, harness, progress
from .cli import option
from .common import Curve, Line, fmt, fmt_ratio

STRUCTURES = tuple(GROUPS)  # every registered structure
GRADIENTS = ("exact", "mc")
METHODS = {"ngd": "NGD", "adam": "Adam"}  # key -> display name
#: structures whose optimum is the exact posterior (KL* = 0)
EXACT_STRUCTURES = ("dense", "lower_triangular", "upper_triangular")


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines one study; built from a preset and the command line."""

    dims: Tuple[int, ...] = option(help="target dimensions")
    conds: Tuple[float, ...] = option(help="target condition numbers")
    seeds: Tuple[int, ...] = option(help="seeds (target draw and MC noise)")
    structures: Tuple[str, ...] = option(STRUCTURES, "structures to fit", choices=STRUCTURES)
    gradients: Tuple[str, ...] = option(GRADIENTS, "gradient types", choices=GRADIENTS)
    iterations: int = option(500, "steps per run with exact gradients")
    mc_iterations: int = option(1000, "steps per run with MC gradients")
    num_samples: int = option(32, "MC samples per step")
    estimator: str = option("reparam", "MC gradient estimator", choices=ESTIMATORS)
    ngd_lrs: Tuple[float, ...] = option((0.05, 0.2, 0.5), "NGD learning rates (exact gradients)")
    ngd_mc_lrs: Tuple[float, ...] = option((1e-3, 1e-2, 1e-1), "NGD learning rates (MC gradients)")
    ngd_max_steps: Tuple[Optional[float], ...] = option((None, 1.0), "NGD trust regions max_step ('none' = off)")
    adam_lrs: Tuple[float, ...] = option((1e-3, 1e-2, 1e-1), "Adam learning rates (exact gradients)")
    adam_mc_lrs: Tuple[float, ...] = option((1e-3, 1e-2, 1e-1), "Adam learning rates (MC gradients)")
    tol: float = option(1e-2, "gap threshold for iterations/seconds to reach it")
    eval_points: int = option(100, "about how many evaluations per run (x2)")
    threads: Optional[int] = option(1, "torch threads (1: steadier timings under load)")
    device: str = option("cpu", "device of the targets (drawn on the CPU, then moved) and of every fitted q "
                         "(e.g. cuda)", check=common.resolve_device)

    def steps(self, gradient: str) -> int:
        """Number of optimizer steps of a run with this gradient type."""
        return self.iterations if gradient == "exact" else self.mc_iterations

    def configs(self, gradient: str) -> List["OptimizerConfig"]:
        """Every optimizer setting tried with this gradient type (NGD grid, then Adam grid)."""
        exact = gradient == "exact"
        ngd_lrs, adam_lrs = (self.ngd_lrs, self.adam_lrs) if exact else (self.ngd_mc_lrs, self.adam_mc_lrs)
        ngd = [OptimizerConfig("ngd", lr, max_step) for max_step, lr in itertools.product(self.ngd_max_steps, ngd_lrs)]
        return ngd + [OptimizerConfig("adam", lr) for lr in adam_lrs]


PRESETS = {
    "tiny": Settings(
        dims=(5,), conds=(10.0,), seeds=(0,), structures=("dense", "diagonal", "block_triangular"),
        iterations=20, mc_iterations=20, num_samples=4, ngd_lrs=(0.5,), ngd_mc_lrs=(0.01,),
        ngd_max_steps=(1.0,), adam_lrs=(0.01,), adam_mc_lrs=(0.01,), eval_points=5,
    ),
    "quick": Settings(dims=(10, 100), conds=(10.0, 1e3), seeds=(0,), iterations=200, mc_iterations=300, num_samples=16),
    "full": Settings(dims=(10, 100, 1000), conds=(10.0, 1e4), seeds=(0,), iterations=500, mc_iterations=1000),
}


@dataclass(frozen=True)
class OptimizerConfig(common.LrSetting):
    """One optimizer setting: ``NaturalGradient(lr, max_step)`` or ``Adam(lr)``."""

    def build(self, q: Gaussian) -> torch.optim.Optimizer:
        if self.method == "ngd":
            return NaturalGradient(q, lr=self.lr, max_step=self.max_step)
        return torch.optim.Adam(q.parameters(), lr=self.lr)


@dataclass(frozen=True)
class TargetSpec:
    """A target family member: dimension and condition number (the seed picks the draw)."""

    dim: int
    cond: float

    @property
    def label(self) -> str:
        return f"d={self.dim}, cond={common.cond_text(self.cond)}"

    def build(self, seed: int, device="cpu") -> GaussianTarget:
        """The seed's target, drawn on the CPU (the same on every device) and moved to ``device``."""
        return GaussianTarget.random(self.dim, self.cond, torch.Generator().manual_seed(seed)).to(device)


@dataclass(frozen=True)
class StructureSpec:
    """A structure name and its group options."""

    name: str
    options: Tuple[Tuple[str, int], ...] = ()

    @property
    def label(self) -> str:
        values = ",".join(str(v) for _, v in self.options)
        return f"{self.name}({values})" if values else self.name

    def family(self, target: GaussianTarget, **kwargs) -> Gaussian:
        """A float64 ``Gaussian`` over ``target``'s space with this structure, on the target's
        device (``N(0, I)`` unless ``kwargs`` say otherwise)."""
        return Gaussian(target.dim, structure=self.name, dtype=torch.float64, device=target.mean.device,
                        **dict(self.options), **kwargs)


def structure_specs(dim: int, names: Sequence[str] = STRUCTURES) -> List[StructureSpec]:
    """The structures for dimension ``dim``: ``k = clamp(round(sqrt(d)/2), 2, 10)`` for the
    low-rank groups and the largest divisor of ``d`` up to ``max(2, sqrt(d))`` as block size."""
    k = common.low_rank(dim)
    block = max(b for b in range(1, max(2, int(math.sqrt(dim))) + 1) if dim % b == 0)
    options = {"block_diagonal": (("block_size", block),), "block_triangular": (("k", k),), "heisenberg": (("k", k),),
               "hierarchical": (("k1", k), ("k2", k))}
    return [StructureSpec(name, options.get(name, ())) for name in names]


# ---------------------------------------------------------------- optimum
def block_mean_field_kl(target: GaussianTarget, block_size: int) -> float:
    """KL of the best Gaussian with block-diagonal precision: ``S_b = P_bb`` for each block."""
    d = target.dim
    blocks = target.precision.reshape(d // block_size, block_size, d // block_size, block_size)
    blocks = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n_blocks, b, b)
    return float(0.5 * (torch.linalg.slogdet(blocks)[1].sum() - target.logdet))


def lbfgs_kl(target: GaussianTarget, spec: StructureSpec, max_rounds: int = 20) -> float:
    """The structure's optimal KL by L-BFGS on the exact KL, started at the mean-field optimum."""
    q = spec.family(target, loc=target.mean, precision=target.precision.diagonal())
    opt = torch.optim.LBFGS(q.parameters(), lr=1.0, max_iter=200, history_size=50, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = target.kl(q)
        loss.backward()
        return loss

    previous = math.inf
    for _ in range(max_rounds):
        opt.step(closure)
        with torch.no_grad():
            value = float(target.kl(q))
        if previous - value <= 1e-13 * max(1.0, abs(value)):
            break
        previous = value
    return value


def reference_optimum(target: GaussianTarget, spec: StructureSpec) -> Tuple[float, str]:
    """``(KL*, source)``: the structure's optimal KL in closed form where known, else by L-BFGS."""
    if spec.name in EXACT_STRUCTURES:
        return 0.0, "exact posterior"
    if spec.name == "diagonal":
        return float(target.mean_field_kl()), "mean field"
    if spec.name == "block_diagonal":
        return block_mean_field_kl(target, dict(spec.options)["block_size"]), "block mean field"
    return lbfgs_kl(target, spec), "L-BFGS"


# ------------------------------------------------------------------ runs
@dataclass
class Run:
    """One optimization run and its KL curve (``gap`` is filled in once ``KL*`` is known)."""

    target: TargetSpec
    seed: int
    structure: StructureSpec
    gradient: str
    config: OptimizerConfig
    kl: Curve
    status: str
    gap: Optional[Curve] = None


def exact_kl(q: Gaussian, target: GaussianTarget) -> float:
    """``KL(q || p)``; raises ``FloatingPointError`` when it is not finite."""
    with torch.no_grad():
        value = float(target.kl(q))
    if not math.isfinite(value):
        raise FloatingPointError(f"KL is {value}")
    return value


def run_one(target: GaussianTarget, spec: StructureSpec, gradient: str, config: OptimizerConfig, seed: int,
            settings: Settings) -> Tuple[Curve, str]:
    """Optimize ``q = N(0, I)`` with one optimizer setting on the exact or Monte Carlo gradient
    of ``KL(q || p)``; returns the KL curve and a status. A failing step or evaluation
    (non-finite gradient or KL, singular factor) ends the run; the rest of the curve is ``nan``."""
    torch.manual_seed(seed)  # the Monte Carlo noise: the same stream for every optimizer
    q = spec.family(target)
    optimizer = config.build(q)
    steps = settings.steps(gradient)
    points = common.eval_points(steps, settings.eval_points)
    curve = Curve([0], [0.0], [exact_kl(q, target)])
    clock, status = common.Stopwatch(target.mean.device), "ok"
    for it in range(1, steps + 1):
        try:
            with clock:
                optimizer.zero_grad()
                if gradient == "exact":
                    target.kl(q).backward()
                else:
                    q.estimate_gradients(target.log_prob, settings.num_samples, estimator=settings.estimator)
                optimizer.step()
            if it == points[len(curve.iterations)]:
                curve.append(it, clock.seconds, exact_kl(q, target))
        except (ValueError, RuntimeError, FloatingPointError) as err:
            status = f"diverged at iteration {it}: {common.error_text(err, 120)}"
            break
    curve.pad_to(points)
    return curve, status


def run_all(settings: Settings) -> Tuple[List[Run], Dict[tuple, dict]]:
    """Every run of the study, and per ``(target, seed, structure)`` the reference optimum."""
    specs = [TargetSpec(d, c) for d in settings.dims for c in settings.conds]
    configs = sum(len(settings.configs(g)) for g in settings.gradients)
    bar = progress.bar(len(specs) * len(settings.seeds) * len(settings.structures) * configs, "gaussian")
    runs, optima = [], {}
    for spec, seed in itertools.product(specs, settings.seeds):
        target = spec.build(seed, settings.device)
        for structure in structure_specs(spec.dim, settings.structures):
            bar.set_postfix_str(f"{spec.label} {structure.label}")
            value, source = reference_optimum(target, structure)
            optima[(spec, seed, structure)] = {"reference": value, "source": source}
            for gradient in settings.gradients:
                for config in settings.configs(gradient):
                    curve, status = run_one(target, structure, gradient, config, seed, settings)
                    runs.append(Run(spec, seed, structure, gradient, config, curve, status))
                    bar.update()
    bar.close()
    return runs, optima


def attach_gaps(runs: List[Run], optima: Dict[tuple, dict]) -> None:
    """Set ``KL*`` = min(reference, best KL of any run) and every run's gap curve."""
    common.settle_optima(optima, (((run.target, run.seed, run.structure), run.kl) for run in runs))
    for run in runs:
        optimum = optima[(run.target, run.seed, run.structure)]["optimum"]
        run.gap = replace(run.kl, values=[v - optimum for v in run.kl.values])


# ---------------------------------------------------------------- summary
def best_results(runs: List[Run], settings: Settings) -> Dict[tuple, Dict[str, harness.Best]]:
    """``{(target, structure, gradient): {method: harness.Best}}``, the value curve the KL."""
    return harness.best_settings(runs, lambda r: (r.target, r.structure, r.gradient), lambda r: r.kl, settings.tol)


def summary_rows(results: "Results", settings: Settings) -> List[dict]:
    """One row per (target, structure, gradient): best settings, finals, times to ``tol``, ratios."""
    rows = []
    for (target, structure, gradient), methods in results.best.items():
        ngd, adam = methods["ngd"], methods["adam"]
        entries = [results.optima[(target, s, structure)] for s in settings.seeds]
        steps = settings.steps(gradient)
        row = {
            "target": target.label, "dim": target.dim, "cond": target.cond, "structure": structure.label,
            "gradient": gradient,
            "optimum": sum(e["optimum"] for e in entries) / len(entries),
            "optimum_source": entries[0]["source"],
        }
        for name, result in (("ngd", ngd), ("adam", adam)):
            row.update({
                f"{name}_lr": result.config.label,
                f"{name}_final_kl": result.value.final,
                f"{name}_final_gap": result.gap.final,
                f"{name}_iterations_to_tol": result.reached[0],
                f"{name}_seconds_to_tol": result.reached[1],
                f"{name}_total_seconds": result.value.total_seconds,
                f"{name}_diverged": sum(not r.status.startswith("ok") for r in result.runs),
            })
        row["ratio_iterations"] = fmt_ratio(adam.reached[0], ngd.reached[0], steps, steps)
        row["ratio_seconds"] = fmt_ratio(adam.reached[1], ngd.reached[1], row["adam_total_seconds"],
                                         row["ngd_total_seconds"])
        rows.append(row)
    return rows


#: KL values closer than this to zero are float64 round-off of an exact optimum
ROUNDOFF = 1e-12


def _final_text(value: float, is_gap: bool = False) -> str:
    """A final KL or gap: ``diverged`` for ``nan``; round-off shown as ``0`` / ``<1e-12``."""
    if value != value:
        return "diverged"
    if abs(value) < ROUNDOFF:
        return f"<{ROUNDOFF:g}" if is_gap else "0"
    return fmt(value)


def markdown_report(results: "Results", settings: Settings, runtime: float) -> str:
    """The results table (one section per target) with the settings and notes."""
    header = ["structure", "grad", "KL*", "NGD lr", "Adam lr", "KL NGD", "KL Adam", "gap NGD", "gap Adam",
              "it NGD", "it Adam", "it Adam/NGD", "s NGD", "s Adam", "s Adam/NGD"]
    grid = common.grid_text
    lines = [
        f"`KL` = KL(q || p) = -ELBO (exact, final iterate); `gap` = KL - KL* (the structure's optimum); "
        f"`it`/`s` = iterations / seconds of optimization work to reach gap < {settings.tol:g} "
        f"(on the seed-averaged curve); ratios Adam/NGD (> 1: NGD faster; `>x` / `<x`: bound when one "
        f"method did not reach it). Best setting per method: fewest iterations to the tolerance, else "
        f"smallest final gap. NGD lr `a, tr b` = lr a with trust region max_step b.",
        "",
        f"Settings: seeds {list(settings.seeds)}; init N(0, I); float64 on {settings.device}; "
        f"{settings.iterations} exact / {settings.mc_iterations} MC iterations; MC: {settings.num_samples} samples, "
        f"estimator `{settings.estimator}`; NGD lr exact {grid(settings.ngd_lrs)}, MC "
        f"{grid(settings.ngd_mc_lrs)}, max_step {grid(settings.ngd_max_steps)}; Adam lr exact "
        f"{grid(settings.adam_lrs)}, MC {grid(settings.adam_mc_lrs)}; {common.environment_text(runtime)}",
    ]
    reach = lambda value: common.reach_text(value, 2)  # noqa: E731
    for target, rows in common.group_by(results.rows, lambda row: row["target"]).items():
        body = [
            [row["structure"], row["gradient"], _final_text(row["optimum"]), row["ngd_lr"], row["adam_lr"],
             _final_text(row["ngd_final_kl"]), _final_text(row["adam_final_kl"]),
             _final_text(row["ngd_final_gap"], True), _final_text(row["adam_final_gap"], True),
             reach(row["ngd_iterations_to_tol"]), reach(row["adam_iterations_to_tol"]), row["ratio_iterations"],
             reach(row["ngd_seconds_to_tol"]), reach(row["adam_seconds_to_tol"]), row["ratio_seconds"]]
            for row in rows
        ]
        lines += ["", f"## {target}", "", common.markdown_table(header, body)]
    return "\n".join(lines + common.notes_section(notes(results.runs, results.optima))) + "\n"


def notes(runs: List[Run], optima: Dict[tuple, dict]) -> List[str]:
    """Failed runs and runs that ended above their initial KL, per method and gradient type,
    and reference optima that a run beat."""
    out = []
    for method, gradient in itertools.product(METHODS, GRADIENTS):
        members = [r for r in runs if r.config.method == method and r.gradient == gradient]
        failed = [r for r in members if r.status != "ok"]
        worse = [r for r in members if r.status == "ok" and r.kl.final > r.kl.values[0]]
        for bad, what, detail in (
            (failed, "stopped by a non-finite value or a singular factor", lambda r: r.status),
            (worse, "ended above their initial KL", lambda r: f"final KL {r.kl.final:.3g}"),
        ):
            if bad:
                out.append(f"{METHODS[method]} ({gradient}): {len(bad)} of {len(members)} runs {what}, e.g. "
                           f"{bad[0].target.label} {bad[0].structure.label} lr {bad[0].config.label}: "
                           f"{detail(bad[0])} (all in runs.json)")
    for (target, seed, structure), entry in optima.items():
        if entry["reference"] - entry["best_run"] > 1e-8 * max(1.0, abs(entry["reference"])):
            out.append(f"{target.label} seed {seed} {structure.label}: a run reached KL {entry['best_run']:.10g} "
                       f"below the {entry['source']} reference {entry['reference']:.10g}")
    return out


# ------------------------------------------------------------------ plots
def plot_all(results: "Results", settings: Settings, out: Path) -> List[Path]:
    """Gap vs iterations and vs seconds, one figure per gradient type, one panel per target."""
    import matplotlib

    color_of = {name: matplotlib.colormaps["tab10"](i % 10) for i, name in enumerate(STRUCTURES)}
    styles = {"ngd": "-", "adam": "--"}
    legend = [(name, color_of[name], "-") for name in settings.structures]
    legend += [("NGD (solid)", "black", "-"), ("Adam (dashed)", "black", "--")]
    paths = []
    for gradient, axis in itertools.product(settings.gradients, ("iterations", "seconds")):
        panels: Dict[str, List[Line]] = defaultdict(list)
        for (target, structure, grad), methods in results.best.items():
            if grad == gradient:
                panels[_panel_title(target)] += [
                    Line(result.gap.along(axis), result.gap.values, color_of[structure.name], styles[method])
                    for method, result in methods.items()
                ]
        what = ("exact gradients" if gradient == "exact"
                else f"MC gradients ({settings.num_samples} samples, {settings.estimator})")
        paths.append(out / f"gap_vs_{axis}_{gradient}.png")
        common.plot_panels(
            paths[-1], dict(panels), xlabel=axis if axis == "iterations" else "time (s, optimization work only)",
            ylabel="KL - KL* (nats)", legend=legend, floor=ROUNDOFF,
            title=f"Gaussian targets, {what}: gap to each structure's optimum KL*, best NGD and Adam setting",
        )
    return paths


def _panel_title(target: TargetSpec) -> str:
    """Target label with the rank ``k`` and block size its structures use."""
    options = {key: value for spec in structure_specs(target.dim) for key, value in spec.options}
    return f"{target.label} (k={options['k']}, block={options['block_size']})"


# ---------------------------------------------------------------- outputs
def write_outputs(results: "Results", settings: Settings, out: Path) -> List[Path]:
    """``summary.csv`` and ``runs.json`` (settings, optima, every run with its curves) in ``out``."""
    common.write_csv(out / "summary.csv", results.rows)
    optima = [{"target": t.label, "seed": s, "structure": st.label, **entry}
              for (t, s, st), entry in results.optima.items()]
    runs = [
        {"target": run.target.label, "dim": run.target.dim, "cond": run.target.cond, "seed": run.seed,
         "structure": run.structure.label, "structure_name": run.structure.name,
         "structure_options": dict(run.structure.options), "gradient": run.gradient, **asdict(run.config),
         "status": run.status, "iterations": run.kl.iterations, "seconds": common.rounded(run.kl.seconds),
         "kl": common.rounded(run.kl.values, 12), "gap": common.rounded(run.gap.values)}
        for run in results.runs
    ]
    common.write_json(out / "runs.json", {"settings": asdict(settings), "optima": optima, "runs": runs})
    return [out / "summary.csv", out / "runs.json"]


# ------------------------------------------------------------------- study
Results = harness.OptimaResults


def compute(settings: Settings) -> Results:
    """Every run, its gap to the structure's optimum, the selection and the table's rows."""
    return Results.compute(settings, run_all, attach_gaps, best_results, summary_rows)


def verdict(results: Results, settings: Settings) -> List[str]:
    """Per gradient type: how often NGD reached the tolerance before Adam, and how much faster."""
    lines = []
    for gradient in settings.gradients:
        rows = [row for row in results.rows if row["gradient"] == gradient]
        pairs = {unit: [(row[f"ngd_{unit}_to_tol"], row[f"adam_{unit}_to_tol"]) for row in rows]
                 for unit in ("iterations", "seconds")}
        seconds = harness.median_ratio(pairs["seconds"])
        what = "Exact gradients" if gradient == "exact" else f"Monte Carlo gradients ({settings.num_samples} samples)"
        lines.append(
            f"{what}: " + harness.head_to_head(pairs["iterations"], "NGD", "Adam", f"gap < {settings.tol:g}",
                                               "(target, structure) cells", "iterations",
                                               [(row["ngd_final_gap"], row["adam_final_gap"]) for row in rows])
            + (f" In seconds of optimization work NGD was {harness.times_text(seconds)} (median)." if seconds else "")
        )
    return lines


STUDY = harness.Study(
    name="gaussian", title="Structured NGD vs Adam on Gaussian targets", presets=PRESETS,
    full_time="about 9 hours, most of it d = 1000", dtype=torch.float64, compute=compute,
    report=markdown_report, verdict=verdict, write=write_outputs, plot=plot_all,
)
add_arguments, resolve_settings, run = STUDY.add_arguments, STUDY.resolve_settings, STUDY.run
