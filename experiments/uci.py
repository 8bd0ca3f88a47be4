"""UCI regression benchmark: structured NGD against tuned baselines on the published splits.

On the nine UCI sets with their published splits (Hernandez-Lobato & Adams 2015: one hidden layer
of 50 ReLU units, 100 for protein), every method of experiments.uci_methods (map, adam_normal,
lowrank, ngd_diag, ivon, mc_dropout, ensemble, kron_ngd, vkfac) picks its hyperparameters and its
number of steps on a validation part of each split's training data, is refitted on the whole
training part and evaluated once on the test part: test log-likelihood and RMSE in original units,
mean +- standard error over splits, beside the published PBP, MC dropout and deep-ensemble numbers.

Outputs in --out (default results/uci): table.md, verdict.json, summary.csv, results.json (per set
and method the per-split test LL, RMSE, chosen hyperparameters and validation grid) and
uci_test_ll.png.
Presets: --tiny (seconds), --quick (the default: yacht, energy, boston, few splits, small grids,
a few minutes) and --full (all nine sets and splits, full grids: about 2-3 days on one core).

Full description: docs/studies.md."""

from __future__ import annotations

import itertools
import math
import statistics
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import common, harness, progress, uci_data
from . import uci_methods as um
from .cli import option
from .common import fmt

# ---------------------------------------------------------------- literature
#: Published test log-likelihoods (original units, mean over the 20 splits, 5 for protein).
LITERATURE_SOURCES = {
    "PBP": "Hernández-Lobato & Adams, Probabilistic backpropagation for scalable learning of Bayesian "
           "neural networks, ICML 2015",
    "MC dropout": "Gal & Ghahramani, Dropout as a Bayesian approximation: representing model uncertainty "
                  "in deep learning, ICML 2016",
    "deep ensembles": "Lakshminarayanan, Pritzel & Blundell, Simple and scalable predictive uncertainty "
                      "estimation using deep ensembles, NIPS 2017 (Table 1, 5 nets)",
}
LITERATURE_LL: Dict[str, Tuple[float, float, float]] = {  # PBP, MC dropout, deep ensembles
    "boston": (-2.57, -2.46, -2.41), "concrete": (-3.16, -3.04, -3.06), "energy": (-2.04, -1.99, -1.38),
    "kin8nm": (0.90, 0.95, 1.20), "naval": (3.73, 3.80, 5.63), "power": (-2.84, -2.80, -2.79),
    "protein": (-2.97, -2.89, -2.83), "wine": (-0.97, -0.93, -0.94), "yacht": (-1.63, -1.55, -1.18),
}
PUBLISHED = tuple(LITERATURE_SOURCES)
#: our baselines the verdict compares the best structured NGD method with
BASELINES = ("map", "adam_normal", "ivon")
LIKELIHOOD_CHOICES = ("validation", "homoscedastic", "heteroscedastic")


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines one study; built from a preset and the command line."""

    datasets: Tuple[str, ...] = option(help="UCI sets", choices=tuple(uci_data.NAMES))
    splits: Tuple[int, ...] = option(help="split indices (protein has 5: higher ones are skipped there)")
    methods: Tuple[str, ...] = option(um.METHODS, "methods", choices=um.METHODS)
    likelihood: str = option("validation", "noise model: 'validation' puts both in every grid (map stays "
                             "homoscedastic, ensemble heteroscedastic)", choices=LIKELIHOOD_CHOICES)
    checkpoints: Tuple[int, ...] = option((500, 1000, 2000, 4000), "steps at which the validation LL is "
                                          "evaluated (the largest is the cosine schedule's horizon)")
    valid_fraction: float = option(0.2, "share of each split's training part held out for validation")
    adam_lrs: Tuple[float, ...] = option((0.003, 0.01), "Adam learning rates of map, mc_dropout, ensemble")
    svi_lrs: Tuple[float, ...] = option((0.01, 0.03), "Adam learning rates of adam_normal, lowrank")
    ngd_lrs: Tuple[float, ...] = option((0.01, 0.03), "NGD learning rates of ngd_diag, kron_ngd")
    ivon_lrs: Tuple[float, ...] = option((0.03, 0.1), "IVON learning rates")
    ivon_hess_inits: Tuple[float, ...] = option((1.0, 10.0, 100.0), "IVON hess_init values")
    vkfac_lrs: Tuple[float, ...] = option((0.03, 0.1), "VariationalKFAC learning rates")
    kron_fisher: str = option("empirical", "G statistic of kron_ngd's AutoKroneckerNormal: the observed labels' "
                              "gradients or those of labels drawn from the model", choices=("empirical", "true"))
    prior_scales: Tuple[float, ...] = option((0.3, 1.0), "prior standard deviations of the weights (every method)")
    dropout_rates: Tuple[float, ...] = option((0.01, 0.05, 0.1), "MC dropout rates")
    particles: int = option(8, "SVI particles per step")
    predictive_samples: int = option(100, "posterior draws / MC dropout passes per prediction")
    ensemble_size: int = option(5, "ensemble members")
    lowrank_rank: int = option(10, "rank of AutoLowRankMultivariateNormal")
    ivon_beta2: float = option(0.99999, "IVON beta2 (its default)")
    batch_size: int = option(128, "minibatch size on sets with more than --full-batch-max training points")
    full_batch_max: int = option(2000, "sets with at most this many training points train full-batch")
    threads: Optional[int] = option(1, "torch threads")
    data_root: Optional[str] = option(None, "read the sets from this folder (original layout) instead of the "
                                      "vendored copies")
    device: str = option("cpu", "device of the data and of every model (e.g. cuda)", check=common.resolve_device)

    def grid(self, method: str) -> List[dict]:
        """The hyperparameter grid of ``method`` (steps are chosen along each run)."""
        lrs = {"map": self.adam_lrs, "mc_dropout": self.adam_lrs, "ensemble": self.adam_lrs, "ivon": self.ivon_lrs,
               "adam_normal": self.svi_lrs, "lowrank": self.svi_lrs, "ngd_diag": self.ngd_lrs,
               "kron_ngd": self.ngd_lrs, "vkfac": self.vkfac_lrs}[method]
        axes = {"lr": lrs, "prior_scale": self.prior_scales, "likelihood": self.likelihoods(method)}
        if method == "ivon":
            axes["hess_init"] = self.ivon_hess_inits
        if method == "mc_dropout":
            axes["dropout"] = self.dropout_rates
        return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]

    def likelihoods(self, method: str) -> Tuple[str, ...]:
        if method in um.FIXED_LIKELIHOOD:
            return (um.FIXED_LIKELIHOOD[method],)
        return ("homoscedastic", "heteroscedastic") if self.likelihood == "validation" else (self.likelihood,)

    def options(self, dataset: str, train_size: int) -> um.Options:
        full_batch = train_size <= self.full_batch_max
        return um.Options(hidden=uci_data.HIDDEN_UNITS[dataset], horizon=max(self.checkpoints),
                          batch_size=None if full_batch else self.batch_size, particles=self.particles,
                          predictive_samples=self.predictive_samples, ensemble_size=self.ensemble_size,
                          lowrank_rank=self.lowrank_rank, ivon_beta2=self.ivon_beta2, kron_fisher=self.kron_fisher)


PRESETS = {
    "tiny": Settings(
        datasets=("yacht",), splits=(0,), likelihood="heteroscedastic", checkpoints=(10, 20), adam_lrs=(0.01,),
        svi_lrs=(0.03,), ngd_lrs=(0.03,), ivon_lrs=(0.1,), ivon_hess_inits=(10.0, 100.0), vkfac_lrs=(0.1,),
        prior_scales=(1.0,), dropout_rates=(0.05,), particles=2, predictive_samples=10, ensemble_size=2,
    ),
    "quick": Settings(
        datasets=("yacht", "energy", "boston"), splits=(0,), likelihood="heteroscedastic",
        checkpoints=(250, 500, 1000), adam_lrs=(0.01,), svi_lrs=(0.03,), ngd_lrs=(0.03,), ivon_lrs=(0.1,),
        ivon_hess_inits=(10.0, 100.0), vkfac_lrs=(0.1,), prior_scales=(1.0,), dropout_rates=(0.01, 0.05),
        particles=4, predictive_samples=50,
    ),
    "full": Settings(datasets=tuple(uci_data.NAMES), splits=tuple(range(20))),
}


# ------------------------------------------------------------------ data
def split_count(dataset: str, root: Optional[str] = None) -> int:
    return uci_data.load_arrays(dataset, root)["index_train"].shape[0]


def validation_split(train_size: int, split: int, fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """Positions within a split's training part: ``(fit, valid)``, ``valid`` the last ``fraction`` of a
    permutation seeded by the split index."""
    order = np.random.default_rng(split).permutation(train_size)
    held = max(1, int(round(fraction * train_size)))
    return np.sort(order[:-held]), np.sort(order[-held:])


@dataclass
class SplitData:
    """One split, standardized on its training part: train, its fit / validation parts, test, ``y_std``."""

    train: um.Data
    fit: um.Data
    valid: um.Data
    test: um.Data
    y_std: float
    fit_index: np.ndarray
    valid_index: np.ndarray


def load_split(dataset: str, split: int, fraction: float, root: Optional[str] = None, device="cpu") -> SplitData:
    """Split ``split`` of ``dataset`` in the default dtype on ``device``, with its validation part."""
    x_train, y_train, x_test, y_test, y_std = uci_data.load_uci(dataset, split, root)
    kw = dict(dtype=torch.get_default_dtype(), device=device)
    train = um.Data(torch.tensor(x_train, **kw), torch.tensor(y_train, **kw))
    fit_index, valid_index = validation_split(train.size, split, fraction)
    test = um.Data(torch.tensor(x_test, **kw), torch.tensor(y_test, **kw))
    fit, valid = (train.subset(torch.as_tensor(index, device=device)) for index in (fit_index, valid_index))
    return SplitData(train, fit, valid, test, y_std, fit_index, valid_index)


# ------------------------------------------------------------------ runs
@dataclass
class SplitResult:
    """One method on one split: the chosen hyperparameters, the validation grid and the test metrics."""

    split: int
    chosen: dict
    grid: List[dict]
    test_ll: float
    rmse: float
    seconds_per_step: float


def choose(method: str, data: SplitData, settings: Settings, options: um.Options, seed: int) -> Tuple[dict, List[dict]]:
    """The grid point and checkpoint with the highest validation LL (a failed point ranks last)."""
    grid, best = [], None
    for hyper in settings.grid(method):
        try:
            curve = um.fit(method, data.fit, data.valid, hyper, max(settings.checkpoints), seed, options,
                           settings.checkpoints).valid_ll
            status = "ok"
        except (ValueError, RuntimeError, FloatingPointError) as err:
            curve, status = {}, common.error_text(err, 120)
        grid.append({**hyper, "valid_ll": {str(k): v for k, v in curve.items()}, "status": status})
        for steps, value in curve.items():
            if math.isfinite(value) and (best is None or value > best["valid_ll"]):
                best = {**hyper, "steps": steps, "valid_ll": value}
    if best is None:
        raise FloatingPointError(f"{method}: every grid point failed on validation")
    return best, grid


def run_split(method: str, dataset: str, split: int, settings: Settings) -> SplitResult:
    """Choose on validation, refit on the whole training part with the choice, evaluate on test."""
    data = load_split(dataset, split, settings.valid_fraction, settings.data_root, settings.device)
    seed = split
    chosen, grid = choose(method, data, settings, settings.options(dataset, data.fit.size), seed)
    hyper = {k: v for k, v in chosen.items() if k not in ("steps", "valid_ll")}
    refit = um.fit(method, data.train, None, hyper, chosen["steps"], seed, settings.options(dataset, data.train.size))
    ll, rmse = um.original_units(*refit.predictor.evaluate(data.test), data.y_std)
    return SplitResult(split, chosen, grid, ll, rmse, refit.seconds_per_step)


@dataclass
class Results:
    """``cells[dataset][method]``: the split results; ``skipped``: method -> reason; ``failed``: notes."""

    cells: Dict[str, Dict[str, List[SplitResult]]]
    skipped: Dict[str, str]
    failed: List[str] = field(default_factory=list)

    def summary(self, dataset: str, method: str, metric: str) -> Tuple[float, float]:
        """Mean and standard error over splits of ``metric`` (``test_ll`` or ``rmse``)."""
        return mean_se([getattr(r, metric) for r in self.cells[dataset].get(method, [])])


def mean_se(values: List[float]) -> Tuple[float, float]:
    """Mean and standard error ``std / sqrt(n)`` (nan for fewer than 2 values)."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def compute(settings: Settings) -> Results:
    """Every (dataset, split, method) run; methods whose imports fail are skipped."""
    warnings.filterwarnings("ignore", message=".*gradient layout contract.*")
    skipped = {m: reason for m in settings.methods if (reason := um.unavailable(m))}
    methods = [m for m in settings.methods if m not in skipped]
    plan = [(d, s, m) for d in settings.datasets for s in settings.splits
            if s < split_count(d, settings.data_root) for m in methods]
    results = Results({d: {} for d in settings.datasets}, skipped)
    bar = progress.bar(len(plan), "uci")
    for dataset, split, method in plan:
        bar.set_postfix_str(f"{dataset} split {split} {method}")
        try:
            result = run_split(method, dataset, split, settings)
            results.cells[dataset].setdefault(method, []).append(result)
        except (ValueError, RuntimeError, FloatingPointError) as err:
            results.failed.append(f"{dataset} split {split} {method}: {common.error_text(err, 160)}")
        bar.update()
    bar.close()
    return results


# ------------------------------------------------------------------ report
def _pm(mean: float, se: float, digits: int = 2) -> str:
    if mean != mean:
        return "–"
    return f"{mean:.{digits}f}" if se != se else f"{mean:.{digits}f} ± {se:.{digits}f}"


def _digits(value: float) -> int:
    """Decimals that show about three significant digits of an RMSE."""
    return 2 if not value == value or value <= 0 else max(2, 2 - math.floor(math.log10(value)))


def _chosen_text(runs: List[SplitResult]) -> str:
    """The chosen values over splits, e.g. ``lr 0.01; steps 500 (x2), 1000``."""
    keys = [k for k in runs[0].chosen if k != "valid_ll"]
    parts = []
    for key in keys:
        counts = Counter(r.chosen.get(key) for r in runs)
        values = [f"{v:g}" if isinstance(v, float) else str(v) for v in counts]
        shown = ", ".join(f"{text} (x{n})" if n > 1 else text for text, n in zip(values, counts.values()))
        parts.append(f"{key.replace('_', ' ')} {shown}")
    return "; ".join(parts)


def dataset_table(results: Results, dataset: str, settings: Settings) -> str:
    """One set's rows: ours (best bold, the published lines each beats) then the published lines."""
    ran = [m for m in settings.methods if results.cells[dataset].get(m)]
    lls = {m: results.summary(dataset, m, "test_ll") for m in ran}
    rmses = {m: results.summary(dataset, m, "rmse") for m in ran}
    best_ll = max((lls[m][0] for m in ran), default=math.nan)
    best_rmse = min((rmses[m][0] for m in ran), default=math.nan)
    published = dict(zip(PUBLISHED, LITERATURE_LL[dataset]))
    rows = []
    for m in ran:
        ll_text, rmse_text = _pm(*lls[m]), _pm(*rmses[m], _digits(rmses[m][0]))
        ll_text = f"**{ll_text}**" if lls[m][0] == best_ll else ll_text
        rmse_text = f"**{rmse_text}**" if rmses[m][0] == best_rmse else rmse_text
        beats = ", ".join(name for name, value in published.items() if lls[m][0] > value) or "none"
        runs = results.cells[dataset][m]
        rows.append([m, ll_text, rmse_text, beats, fmt(1000 * statistics.fmean(r.seconds_per_step for r in runs), 3),
                     _chosen_text(runs)])
    rows += [[f"{name} (published)", f"{value:.2f}", "–", "–", "–", "–"] for name, value in published.items()]
    header = ["method", "test LL", "RMSE", "beats published", "ms/step", "chosen on validation"]
    return common.markdown_table(header, rows)


def markdown_report(results: Results, settings: Settings, runtime: float) -> str:
    """The protocol, then one table per set, the sources and the notes."""
    grid = common.grid_text
    lines = [
        "Protocol (Hernández-Lobato & Adams 2015): published splits, one hidden layer of 50 ReLU units (100 for "
        "protein), inputs and targets standardized on the training part. Each method's hyperparameters and steps "
        f"are chosen on the last {settings.valid_fraction:.0%} of a permutation (seeded by the split) of the split's "
        "training part (the validation LL at the checkpoints of one run per grid point), then the method is refitted "
        "on the whole training part and evaluated once on test. Test LL (mean log predictive density per point) "
        "and RMSE in original units, mean ± standard error over the splits; bold: the best of ours; `beats "
        "published`: the published LL lines below the mean.",
        "",
        f"Settings: splits {list(settings.splits)}; likelihood `{settings.likelihood}`; checkpoints "
        f"{list(settings.checkpoints)} of a cosine-decayed lr; grids: Adam (map, mc_dropout, ensemble) lr "
        f"{grid(settings.adam_lrs)}, SVI Adam lr {grid(settings.svi_lrs)}, NGD lr {grid(settings.ngd_lrs)}, IVON lr "
        f"{grid(settings.ivon_lrs)} x hess_init {grid(settings.ivon_hess_inits)}, VariationalKFAC lr "
        f"{grid(settings.vkfac_lrs)}, prior scale {grid(settings.prior_scales)}, kron_ngd Fisher "
        f"`{settings.kron_fisher}`, dropout "
        f"{grid(settings.dropout_rates)}; {settings.particles} SVI particles, {settings.predictive_samples} "
        f"predictive draws, {settings.ensemble_size} ensemble members; full batch up to {settings.full_batch_max} "
        f"training points, else batches of {settings.batch_size}; float64. {common.environment_text(runtime)}",
    ]
    for dataset in settings.datasets:
        count = min(len(settings.splits), sum(s < split_count(dataset, settings.data_root) for s in settings.splits))
        lines += ["", f"## {dataset} ({count} split{'s' * (count != 1)})", "", dataset_table(results, dataset, settings)]
    lines += ["", "Published sources (test LL, mean over 20 splits, 5 for protein):", ""]
    lines += [f"- {name}: {source}." for name, source in LITERATURE_SOURCES.items()]
    notes = [f"{m} skipped: {reason}" for m, reason in results.skipped.items()] + results.failed
    return "\n".join(lines + common.notes_section(notes)) + "\n"


# ------------------------------------------------------------------ verdict
def best_structured(results: Results, dataset: str) -> Optional[Tuple[str, float]]:
    """The structured NGD method with the highest mean test LL on ``dataset`` and that mean."""
    means = [(m, results.summary(dataset, m, "test_ll")[0]) for m in um.STRUCTURED if results.cells[dataset].get(m)]
    means = [(m, v) for m, v in means if v == v]
    return max(means, key=lambda item: item[1]) if means else None


def verdict(results: Results, settings: Settings) -> List[str]:
    """Per set: does the best structured NGD method beat map, adam_normal, ivon and the published MC
    dropout and deep-ensemble LLs; then the counts over sets."""
    lines, wins, seen = [], Counter(), Counter()
    for dataset in settings.datasets:
        best = best_structured(results, dataset)
        if best is None:
            continue
        method, value = best
        rivals = {m: results.summary(dataset, m, "test_ll")[0] for m in BASELINES if results.cells[dataset].get(m)}
        rivals.update({f"published {name}": v for name, v in zip(PUBLISHED[1:], LITERATURE_LL[dataset][1:])})
        beaten = [f"{name} ({v:.2f})" for name, v in rivals.items() if value > v]
        lost = [f"{name} ({v:.2f})" for name, v in rivals.items() if not value > v]
        for name, v in rivals.items():
            seen[name] += 1
            wins[name] += value > v
        lines.append(f"{dataset}: {method} (test LL {value:.2f}) beats {', '.join(beaten) or 'none'}"
                     + (f"; not {', '.join(lost)}." if lost else "."))
    if not lines:
        return ["No structured NGD method (kron_ngd, vkfac, ngd_diag) ran, so there is nothing to compare."]
    counts = ", ".join(f"{name} on {wins[name]} of {seen[name]}" for name in seen)
    return lines + [f"Over the sets, the best structured NGD method beats {counts} (mean test LL over splits "
                    f"{list(settings.splits)}; the published numbers are 20-split means)."]


# ------------------------------------------------------------------ outputs
def summary_rows(results: Results, settings: Settings) -> List[dict]:
    """One row per (set, method that ran): mean and standard error of the test LL and RMSE."""
    rows = []
    for dataset in settings.datasets:
        for method, runs in results.cells[dataset].items():
            ll, rmse = results.summary(dataset, method, "test_ll"), results.summary(dataset, method, "rmse")
            rows.append({"dataset": dataset, "method": method, "status": "ok", "splits": len(runs),
                         "test_ll": ll[0], "test_ll_se": ll[1], "rmse": rmse[0], "rmse_se": rmse[1],
                         "seconds_per_step": statistics.fmean(r.seconds_per_step for r in runs)})
    return rows


def write_outputs(results: Results, settings: Settings, out: Path) -> List[Path]:
    """``summary.csv`` (the table's numbers) and ``results.json``: per set and method the per-split
    metrics, choices and validation grids."""
    common.write_csv(out / "summary.csv", summary_rows(results, settings))
    datasets = {}
    for dataset, methods in results.cells.items():
        datasets[dataset] = {
            method: {"test_ll": [r.test_ll for r in runs], "rmse": [r.rmse for r in runs],
                     "splits": [r.split for r in runs],
                     "seconds_per_step": statistics.fmean(r.seconds_per_step for r in runs),
                     "chosen": [r.chosen for r in runs], "validation": [r.grid for r in runs]}
            for method, runs in methods.items() if runs
        }
    literature = {d: dict(zip(PUBLISHED, values)) for d, values in LITERATURE_LL.items()}
    common.write_json(out / "results.json", {"datasets": datasets, "skipped": results.skipped,
                                             "failed": results.failed, "literature_test_ll": literature,
                                             "settings": asdict(settings)})
    return [out / "summary.csv", out / "results.json"]


def plot(results: Results, settings: Settings, out: Path) -> List[Path]:
    """Test LL per set (one panel each): methods side by side with error bars, published lines."""
    import matplotlib

    plt = common.pyplot()
    colors = {m: matplotlib.colormaps["tab10"](i % 10) for i, m in enumerate(um.METHODS)}
    styles = dict(zip(PUBLISHED, ("--", "-.", ":")))
    ncols = min(3, len(settings.datasets))
    nrows = math.ceil(len(settings.datasets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
    for ax, dataset in zip(axes.flat, settings.datasets):
        ran = [m for m in settings.methods if results.cells[dataset].get(m)]
        for i, method in enumerate(ran):
            mean, se = results.summary(dataset, method, "test_ll")
            ax.errorbar([i], [mean], yerr=[0.0 if se != se else se], color=colors[method], marker="o", capsize=3)
        for name, value in zip(PUBLISHED, LITERATURE_LL[dataset]):
            ax.axhline(value, color="gray", linestyle=styles[name], linewidth=1)
        ax.set_xticks(range(len(ran)))
        ax.set_xticklabels(ran, rotation=45, ha="right", fontsize=8)
        ax.set_title(dataset, fontsize=10)
        ax.set_ylabel("test log-likelihood (original units)")
        ax.set_xlabel("method")
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(settings.datasets):]:
        ax.set_visible(False)
    fig.suptitle("UCI regression: test LL, mean ± s.e. over splits", fontsize=11)
    shown = [m for m in settings.methods if any(results.cells[d].get(m) for d in settings.datasets)]
    handles = [plt.Line2D([], [], color=colors[m], marker="o", linestyle="") for m in shown]
    handles += [plt.Line2D([], [], color="gray", linestyle=styles[name]) for name in PUBLISHED]
    path = out / "uci_test_ll.png"
    common.save_with_legend(fig, path, handles, shown + [f"{name} (published)" for name in PUBLISHED])
    return [path]


STUDY = harness.Study(
    name="uci", title="UCI regression: structured NGD against tuned baselines", presets=PRESETS,
    full_time="about 2-3 days on one core; --datasets and --splits slice it", dtype=torch.float64,
    compute=compute, report=markdown_report, verdict=verdict, write=write_outputs, plot=plot,
)
add_arguments, resolve_settings, run = STUDY.add_arguments, STUDY.resolve_settings, STUDY.run
