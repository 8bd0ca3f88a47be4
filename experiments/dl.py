"""Kronecker preconditioners on deep nets: KFAC, EKFAC and LocalKFAC structures against SGD and Adam.

KFAC, EKFAC and LocalKFAC (dense, diagonal, hierarchical and more structures) in front of SGD with
momentum, SGD and Adam train deep autoencoders (CURVES-style images, 8x8 digits) and MNIST-1D
classifiers over small learning-rate grids: training loss against steps and seconds, test metrics,
and the steps and seconds to Adam's final training loss as a ratio to Adam's own (< 1: faster).

Outputs in --out (default results/dl): table.md, verdict.json, summary.csv, results.json,
loss_vs_steps.png and loss_vs_seconds.png. Presets: --tiny (seconds), --quick (the default: three
tasks, 2 seeds, 400 steps) and --full (all four tasks and nine methods, 1000 steps).

Full description: docs/studies.md."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.autoencoder import INITS, DeepAutoencoder
from models.classifiers import CNN, MLP
from structngd.kron import EKFAC, KFAC, LocalKFAC

from . import common, dl_data, harness, progress
from .cli import option
from .common import Curve, Line, fmt, fmt_ratio


# ------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A data set, a model and its loss."""

    key: str
    label: str
    kind: str  # "autoencoder" or "classifier"
    data: str  # "curves", "digits" or "mnist1d" (load_data)
    build: Callable[[dl_data.Dataset, "Settings"], nn.Module]

    def loss(self, output: Tensor, x: Tensor, y: Optional[Tensor]) -> Tensor:
        """The training objective on the model's ``output``: the batch mean of per-example
        negative log-likelihoods (``models.autoencoder.loss`` for the autoencoders)."""
        if self.kind == "autoencoder":
            return F.binary_cross_entropy_with_logits(output, x.reshape(x.shape[0], -1), reduction="sum") / x.shape[0]
        return F.cross_entropy(output, y)

    def sample_fisher(self, pre, output: Tensor) -> None:
        """Feed the true Fisher's sampled output gradients to ``pre`` (Bernoulli pixels for the
        autoencoders, a categorical label for the classifiers)."""
        pre.sample_fisher(output, "bernoulli" if self.kind == "autoencoder" else "categorical")

    @property
    def metric(self) -> str:
        return "squared_error" if self.kind == "autoencoder" else "accuracy"


TASKS = {task.key: task for task in (
    Task("curves", "CURVES-16 autoencoder", "autoencoder", "curves",
         lambda d, s: DeepAutoencoder((d.x_train[0].numel(), 200, 100, 50, 25, 6), init=s.ae_init)),
    Task("digits", "digits autoencoder", "autoencoder", "digits",
         lambda d, s: DeepAutoencoder((64, 128, 64, 32, 8), init=s.ae_init)),
    Task("mnist1d_mlp", "MNIST-1D MLP", "classifier", "mnist1d", lambda d, s: MLP((40, 256, 256, 10))),
    Task("mnist1d_cnn", "MNIST-1D CNN", "classifier", "mnist1d", lambda d, s: CNN((1, 1, 40), (32, 32, 32))),
)}


# ----------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A base optimizer, optionally behind a Kronecker preconditioner."""

    key: str
    label: str
    base: str  # "sgd" or "adam"
    preconditioner: Optional[str] = None  # "kfac", "ekfac", "local"
    structure: Optional[str] = None  # LocalKFAC's group


METHODS = {m.key: m for m in (
    Method("sgd", "SGD", "sgd"),
    Method("adam", "Adam", "adam"),
    Method("kfac", "KFAC", "sgd", "kfac"),
    Method("ekfac", "EKFAC", "sgd", "ekfac"),
    Method("local_dense", "Local dense", "sgd", "local", "dense"),
    Method("local_diagonal", "Local diagonal", "sgd", "local", "diagonal"),
    Method("local_hierarchical", "Local hierarchical", "sgd", "local", "hierarchical"),
    Method("local_lower_triangular", "Local lower-tri", "sgd", "local", "lower_triangular"),
    Method("local_block_diagonal", "Local block-diag", "sgd", "local", "block_diagonal"),
)}
DEFAULT_METHODS = ("sgd", "adam", "kfac", "ekfac", "local_dense", "local_diagonal", "local_hierarchical")


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines one study; built from a preset and the command line. Learning
    rates and dampings of SGD and the preconditioners are per task kind: the autoencoder
    losses sum 256 or 64 pixels."""

    size: str = option(cli=False)
    tasks: Tuple[str, ...] = option(help="tasks", choices=tuple(TASKS))
    seeds: Tuple[int, ...] = option(help="seeds (initialization and batch order)")
    methods: Tuple[str, ...] = option(DEFAULT_METHODS, "methods", choices=tuple(METHODS))
    steps: int = option(1000, "training steps per run")
    batch_size: int = option(256, "mini-batch size")
    momentum: float = option(0.9, "SGD momentum (SGD and the base optimizer of the preconditioners)")
    sgd_lrs: Tuple[float, ...] = option((0.01, 0.03, 0.1), "SGD learning rates (classifiers)")
    sgd_autoencoder_lrs: Tuple[float, ...] = option((1e-3, 3e-3, 1e-2), "SGD learning rates (autoencoders)")
    adam_lrs: Tuple[float, ...] = option((1e-3, 3e-3, 1e-2), "Adam learning rates")
    kfac_lrs: Tuple[float, ...] = option((0.03, 0.1, 0.3), "learning rates of SGD behind KFAC")
    ekfac_lrs: Tuple[float, ...] = option((0.03, 0.1, 0.3), "learning rates of SGD behind EKFAC")
    local_lrs: Tuple[float, ...] = option((0.01, 0.03, 0.1), "learning rates of SGD behind LocalKFAC")
    fisher: str = option("true", "Fisher of the preconditioners", choices=("true", "empirical"))
    damping: float = option(0.03, "KFAC / EKFAC damping (classifiers)")
    autoencoder_damping: float = option(0.01, "KFAC / EKFAC damping (autoencoders)")
    #: without the clip KFAC needs damping 1 to stay stable
    kl_clip: Optional[float] = option(3e-3, "bound on lr^2 <p, g> per step (preconditioners; 0 or 'none' = off)")
    factor_decay: float = option(0.95, "KFAC / EKFAC factor moving-average decay")
    update_every: int = option(10, "steps between preconditioner updates")
    #: a scaling re-fit costs per-example projections and, with the true Fisher, a second backward pass
    ekfac_update_every: Optional[int] = option(20, "steps between EKFAC's eigenbasis updates ('none': update-every)")
    ekfac_scale_every: int = option(5, "steps between EKFAC's scaling re-fits")
    lr_cov: float = option(0.3, "LocalKFAC factor step size")
    local_momentum: float = option(0.5, "LocalKFAC Riemannian momentum")
    local_damping: float = option(0.03, "LocalKFAC damping (classifiers)")
    local_autoencoder_damping: float = option(0.01, "LocalKFAC damping (autoencoders)")
    local_k: int = option(10, "LocalKFAC hierarchical k1 = k2")
    block_size: int = option(8, "LocalKFAC block_diagonal block size (a smaller last block where it does not divide)")
    ae_init: str = option("xavier", "autoencoder initialization (models.DeepAutoencoder's init)", choices=INITS)
    data_seed: int = option(0, "seed of the data draw / split")
    curves_train: int = option(10000, "CURVES training images")
    curves_test: int = option(2000, "CURVES test images")
    curves_size: int = option(16, "CURVES image side (pixels)")
    mnist1d_samples: int = option(5000, "MNIST-1D examples (train and test)")
    eval_examples: int = option(2000, "training examples of the loss evaluations")
    eval_points: int = option(30, "about how many evaluations per run (x2)")
    warmup_steps: int = option(3, "untimed warm-up steps per method and task")
    threads: Optional[int] = option(1, "torch threads")
    device: str = option("cpu", "device of models, data and preconditioner state (e.g. cuda, cuda:1)",
                         check=common.resolve_device)

    @property
    def ekfac_period(self) -> int:
        """EKFAC's eigenbasis period (its own, else ``update_every``)."""
        return self.ekfac_update_every or self.update_every

    def damping_for(self, method: Method, task: Task) -> float:
        autoencoder = task.kind == "autoencoder"
        if method.preconditioner == "local":
            return self.local_autoencoder_damping if autoencoder else self.local_damping
        return self.autoencoder_damping if autoencoder else self.damping

    def lrs(self, method: Method, task: Task) -> Tuple[float, ...]:
        if method.preconditioner is not None:
            return getattr(self, f"{method.preconditioner}_lrs")
        if method.base == "adam":
            return self.adam_lrs
        return self.sgd_autoencoder_lrs if task.kind == "autoencoder" else self.sgd_lrs


PRESETS = {
    "tiny": Settings(
        size="tiny", tasks=tuple(TASKS), seeds=(0,), steps=10, batch_size=32,
        sgd_lrs=(0.03,), sgd_autoencoder_lrs=(3e-3,), adam_lrs=(3e-3,), kfac_lrs=(0.1,), ekfac_lrs=(0.1,),
        local_lrs=(0.1,), update_every=5, ekfac_update_every=None, curves_train=256, curves_test=64,
        mnist1d_samples=400, eval_examples=128, eval_points=4, warmup_steps=1,
    ),
    "quick": Settings(size="quick", tasks=("curves", "digits", "mnist1d_mlp"), seeds=(0, 1), steps=400),
    # the README's configuration on every task and method, so its tables are slices of this grid
    "full": Settings(size="full", tasks=tuple(TASKS), seeds=(0, 1), methods=tuple(METHODS), eval_points=50),
}


# ---------------------------------------------------------------- building
def build_preconditioner(method: Method, model: nn.Module, settings: Settings, lr: float, damping: float):
    """The method's preconditioner on ``model`` (``None`` for plain SGD / Adam)."""
    shared = dict(update_every=settings.update_every, fisher=settings.fisher)
    if settings.kl_clip:  # None or 0: off
        shared.update(kl_clip=settings.kl_clip, optimizer_lr=lr)
    if settings.fisher == "true":
        shared["batch_averaged"] = False  # Task.sample_fisher backpropagates a summed loss
    if method.preconditioner == "kfac":
        return KFAC(model, damping=damping, factor_decay=settings.factor_decay, **shared)
    if method.preconditioner == "ekfac":
        shared["update_every"] = settings.ekfac_period
        return EKFAC(model, damping=damping, factor_decay=settings.factor_decay,
                     scale_every=settings.ekfac_scale_every, **shared)
    if method.preconditioner == "local":
        options = {"hierarchical": {"k1": settings.local_k, "k2": settings.local_k},
                   "block_diagonal": {"block_size": settings.block_size}}.get(method.structure)
        return LocalKFAC(model, structure=method.structure, damping=damping, lr_cov=settings.lr_cov,
                         momentum=settings.local_momentum, group_options=options, **shared)
    return None


def load_data(task: Task, settings: Settings) -> dl_data.Dataset:
    """The task's data set, generated on the CPU and moved to ``settings.device``."""
    if task.data == "curves":
        data = dl_data.curves(settings.curves_train, settings.curves_test, settings.curves_size, settings.data_seed)
    elif task.data == "digits":
        data = dl_data.digits(settings.data_seed)
    else:
        data = dl_data.mnist1d(settings.mnist1d_samples, settings.data_seed)
    move = lambda t: None if t is None else t.to(settings.device)  # noqa: E731
    return dl_data.Dataset(data.name, move(data.x_train), move(data.x_test), move(data.y_train), move(data.y_test))


def _rows(y: Optional[Tensor], index) -> Optional[Tensor]:
    """The labels at ``index`` (``None`` for unlabeled data)."""
    return None if y is None else y[index]


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, x: Tensor, y: Optional[Tensor], chunk: int = 2048) -> Dict[str, float]:
    """Loss (the training objective) and the task's metric on ``(x, y)``, in eval mode, without
    gradients and inside ``fork_rng`` (evaluations never perturb the training stream)."""
    was_training = model.training
    model.eval()
    loss = metric = 0.0
    with common.fork_rng(x.device):
        for start in range(0, x.shape[0], chunk):
            xb, yb = x[start : start + chunk], _rows(y, slice(start, start + chunk))
            output = model(xb)
            loss += float(task.loss(output, xb, yb)) * xb.shape[0]
            if task.kind == "autoencoder":
                metric += float(model.squared_error(xb)) * xb.shape[0]
            else:
                metric += float((output.argmax(1) == yb).sum())
    model.train(was_training)
    return {"loss": loss / x.shape[0], task.metric: metric / x.shape[0]}


# -------------------------------------------------------------------- runs
@dataclass
class Run:
    """One training run: its training-loss curve, status and final metrics."""

    task: str
    method: str
    lr: float
    seed: int
    curve: Curve
    status: str
    metrics: Dict[str, float] = field(default_factory=dict)
    structures: Dict[str, List[str]] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)


def batches(n: int, batch_size: int, seed: int):
    """Endless mini-batch indices: a fresh permutation of ``range(n)`` per epoch (``seed``)."""
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=g)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def run_one(task: Task, data: dl_data.Dataset, method: Method, lr: float, seed: int, settings: Settings,
            steps: Optional[int] = None) -> Run:
    """Train one model; a failing step or evaluation (non-finite loss or gradient, singular
    factor) ends the run with status ``diverged at step ...`` and ``nan`` for the rest of the curve."""
    steps = settings.steps if steps is None else steps
    torch.manual_seed(seed)  # the initialization: the same for every method (drawn on the CPU)
    model = task.build(data, settings).to(settings.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre = build_preconditioner(method, model, settings, lr, settings.damping_for(method, task))
    run = Run(task.key, method.key, lr, seed, Curve([], [], []), "ok")
    run.warnings = sorted({str(w.message) for w in caught})
    if isinstance(pre, LocalKFAC):
        run.structures = {name: list(pair) for name, pair in pre.structures.items()}
    if method.base == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.momentum)
    n_eval = min(settings.eval_examples, data.x_train.shape[0])
    x_eval, y_eval = data.x_train[:n_eval], _rows(data.y_train, slice(n_eval))
    points = common.eval_points(steps, settings.eval_points)
    clock, curve, it = common.Stopwatch(settings.device), run.curve, 0
    order = batches(data.x_train.shape[0], settings.batch_size, seed)

    def record(seconds: float) -> None:
        value = evaluate(task, model, x_eval, y_eval)["loss"]
        if not math.isfinite(value):
            raise FloatingPointError(f"evaluation loss is {value}")
        curve.append(it, seconds, value)

    try:
        record(0.0)
        for it in range(1, steps + 1):
            index = next(order)
            xb, yb = data.x_train[index], _rows(data.y_train, index)
            with clock:
                optimizer.zero_grad()
                output = model(xb)
                if pre is not None and settings.fisher == "true":
                    task.sample_fisher(pre, output)
                loss = task.loss(output, xb, yb)
                loss.backward()
                if pre is not None:
                    pre.step()
                optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss is {value}")
            if it == points[len(curve.iterations)]:
                record(clock.seconds)
    except (ValueError, RuntimeError, FloatingPointError) as err:
        run.status = f"diverged at step {it}: {common.error_text(err, 160)}"
    curve.pad_to(points)
    if run.status == "ok":
        test = evaluate(task, model, data.x_test, data.y_test)
        run.metrics = {"train_loss": curve.final, "test_loss": test["loss"], f"test_{task.metric}": test[task.metric],
                       "seconds": clock.seconds, "ms_per_step": 1e3 * clock.seconds / steps}
    if pre is not None:
        pre.remove_hooks()
    return run


def run_all(settings: Settings) -> Tuple[List[Run], Dict[str, dict]]:
    """Every run of the study and, per task, a description of its data and model."""
    plan = [(t, m) for t in settings.tasks for m in settings.methods]
    bar = progress.bar(sum(len(settings.lrs(METHODS[m], TASKS[t])) * len(settings.seeds) for t, m in plan), "dl")
    runs, info = [], {}
    for task_key in settings.tasks:
        task = TASKS[task_key]
        bar.set_postfix_str(f"{task_key}: data")
        data = load_data(task, settings)
        model = task.build(data, settings)
        info[task_key] = {
            "label": task.label, "kind": task.kind, "data": data.name,
            "train": data.x_train.shape[0], "test": data.x_test.shape[0], "input_shape": list(data.input_shape),
            "model": repr(model), "parameters": sum(p.numel() for p in model.parameters()),
        }
        for method_key in settings.methods:
            method = METHODS[method_key]
            # untimed warm-up: one-time costs (first LAPACK calls, allocator) stay out of the timings
            run_one(task, data, method, settings.lrs(method, task)[0], settings.seeds[0], settings,
                    steps=settings.warmup_steps)
            for lr in settings.lrs(method, task):
                for seed in settings.seeds:
                    bar.set_postfix_str(f"{task_key} {method.label} lr {lr:g} seed {seed}")
                    runs.append(run_one(task, data, method, lr, seed, settings))
                    bar.update()
    bar.close()
    return runs, info


# ----------------------------------------------------------------- summary
@dataclass
class Selected:
    """The best learning rate of one method on one task, seed-averaged."""

    method: str
    lr: float
    curve: Curve
    runs: List[Run]

    def metric(self, name: str) -> float:
        values = [r.metrics.get(name, math.nan) for r in self.runs]
        return sum(values) / len(values) if values else math.nan


def select(runs: List[Run]) -> Dict[str, Dict[str, Selected]]:
    """``{task: {method: best Selected}}``: the lowest seed-averaged final training loss."""
    best: Dict[str, Dict[str, Selected]] = defaultdict(dict)
    for (task, method, lr), members in common.group_by(runs, lambda r: (r.task, r.method, r.lr)).items():
        candidate = Selected(method, lr, common.mean_curve([r.curve for r in members]), members)
        common.keep_best(best[task], method, candidate, lambda s: common.missing_last(s.curve.final))
    return best


def reach(curve: Curve, target: float) -> Tuple[Optional[int], Optional[float]]:
    """``(steps, seconds)`` of the first evaluation at or below ``target`` (never for ``nan``)."""
    return curve.first_below(target + 1e-9 * abs(target))


def summary_rows(selected: Dict[str, Dict[str, Selected]], settings: Settings) -> List[dict]:
    """One row per (task, method): best lr, finals, steps / seconds to Adam's final loss, ratios."""
    rows = []
    for task_key, methods in selected.items():
        task, adam = TASKS[task_key], methods.get("adam")
        target = adam.curve.final if adam else math.nan
        adam_steps, adam_seconds = reach(adam.curve, target) if adam else (None, None)
        adam_total = adam.curve.total_seconds if adam else math.nan
        for key in settings.methods:
            sel = methods.get(key)
            if sel is None:
                continue
            steps, seconds = reach(sel.curve, target)
            total = sel.curve.total_seconds
            rows.append({
                "task": task_key, "task_label": task.label, "method": key, "method_label": METHODS[key].label,
                "lr": sel.lr, "lr_grid": " ".join(f"{lr:g}" for lr in settings.lrs(METHODS[key], task)),
                "final_train_loss": sel.curve.final, "test_loss": sel.metric("test_loss"),
                "test_metric": task.metric, "test_metric_value": sel.metric(f"test_{task.metric}"),
                "adam_final_loss": target, "steps_to_adam": steps, "seconds_to_adam": seconds,
                "ratio_seconds": fmt_ratio(seconds, adam_seconds, total, adam_total),
                "ratio_steps": fmt_ratio(steps, adam_steps, settings.steps, settings.steps),
                "total_seconds": total, "ms_per_step": sel.metric("ms_per_step"),
                "diverged_runs": sum(r.status != "ok" for r in sel.runs), "runs": len(sel.runs),
            })
    return rows


def _cells(row: dict) -> list:
    """A summary row as the report's table shows it."""
    final = row["final_train_loss"]
    value = row["test_metric_value"]
    return [
        row["method_label"], f"{row['lr']:g} ({row['lr_grid']})", "diverged" if final != final else fmt(final, 4),
        fmt(row["test_loss"], 4), f"{100 * value:.1f}%" if row["test_metric"] == "accuracy" else fmt(value, 4),
        common.reach_text(row["steps_to_adam"]), common.reach_text(row["seconds_to_adam"]),
        row["ratio_seconds"], row["ratio_steps"], fmt(row["ms_per_step"], 3),
    ]


def markdown_report(results: "Results", settings: Settings, runtime: float) -> str:
    """The results table, one section per task, with the settings and notes."""
    s = settings
    header = ["method", "lr", "final train loss", "test loss", "test metric", "steps to Adam's final",
              "s to Adam's final", "time ratio vs Adam", "step ratio vs Adam", "ms/step"]
    lines = [
        "Training loss = the training objective on a fixed subset of training examples; best lr per "
        "method = lowest seed-averaged final training loss. `steps/s to Adam's final`: first evaluation "
        "at or below the best Adam run's final training loss (seed-averaged curves; seconds of training "
        "work only); `time ratio vs Adam` = those seconds / Adam's own (< 1: faster than Adam; `>x`: "
        "not reached, bound from the run's total). Test metric: accuracy (classifiers) or squared "
        "reconstruction error summed over pixels (autoencoders).",
        "",
        f"Settings: preset `{s.size}`; seeds {list(s.seeds)}; {s.steps} steps of batch {s.batch_size}; base "
        f"optimizer of the preconditioners SGD momentum {s.momentum:g}; {s.fisher} Fisher; KFAC/EKFAC damping "
        f"{s.damping:g} (autoencoders {s.autoencoder_damping:g}), kl_clip {s.kl_clip}, factor_decay "
        f"{s.factor_decay:g}, EKFAC update_every {s.ekfac_period}, scale_every {s.ekfac_scale_every}; LocalKFAC "
        f"damping {s.local_damping:g} (autoencoders {s.local_autoencoder_damping:g}), lr_cov {s.lr_cov:g}, "
        f"momentum {s.local_momentum:g}, hierarchical k1 = k2 = {s.local_k}; update_every {s.update_every}; "
        f"float32 on {s.device}; {common.environment_text(runtime)}",
    ]
    for task_key, rows in common.group_by(results.rows, lambda row: row["task"]).items():
        meta = results.info[task_key]
        lines += [
            "", f"## {meta['label']}", "",
            f"{meta['train']} train / {meta['test']} test examples of shape {tuple(meta['input_shape'])}; "
            f"{meta['parameters']} parameters; Adam's final training loss {fmt(rows[0]['adam_final_loss'], 4)}.",
            "", common.markdown_table(header, [_cells(row) for row in rows]),
        ]
    return "\n".join(lines + common.notes_section(notes_for(results.runs))) + "\n"


def notes_for(runs: List[Run]) -> List[str]:
    """Diverged runs and preconditioner warnings (e.g. structure fallbacks), per task and method."""
    out = []
    for (task, method), members in common.group_by(runs, lambda r: (r.task, r.method)).items():
        failed = [r for r in members if r.status != "ok"]
        if failed:
            out.append(f"{task} {METHODS[method].label}: {len(failed)} of {len(members)} runs stopped, e.g. lr "
                       f"{failed[0].lr:g} seed {failed[0].seed}: {failed[0].status}")
        messages = sorted({w for r in members for w in r.warnings})
        out += [f"{task} {METHODS[method].label}: {message}" for message in messages]
    return out


# ------------------------------------------------------------------- plots
def plot_all(results: "Results", settings: Settings, out: Path) -> List[Path]:
    """Training loss vs steps and vs seconds, one panel per task, best setting per method."""
    import matplotlib

    color_of = {key: matplotlib.colormaps["tab10"](i % 10) for i, key in enumerate(METHODS)}
    style_of = {key: "--" if method.preconditioner is None else "-" for key, method in METHODS.items()}
    legend = [(METHODS[key].label, color_of[key], style_of[key]) for key in settings.methods]
    paths = []
    for axis in ("steps", "seconds"):
        panels = {TASKS[task_key].label: [Line(sel.curve.along(axis), sel.curve.values, color_of[key], style_of[key])
                                          for key, sel in methods.items()]
                  for task_key, methods in results.selected.items()}
        paths.append(out / f"loss_vs_{axis}.png")
        common.plot_panels(
            paths[-1], panels, xlabel="steps" if axis == "steps" else "time (s, training work only)",
            ylabel="training loss (nats per example)", legend=legend, ncols=min(2, len(panels)),
            title="Kronecker preconditioners on deep nets: best lr per method (seed mean)",
        )
    return paths


# ----------------------------------------------------------------- outputs
def write_outputs(results: "Results", settings: Settings, out: Path) -> List[Path]:
    """``summary.csv`` and ``results.json`` in ``out``; returns their paths."""
    common.write_csv(out / "summary.csv", results.rows)
    selection = {task: {m: {"lr": s.lr, "final_train_loss": s.curve.final} for m, s in methods.items()}
                 for task, methods in results.selected.items()}
    runs = [{"task": r.task, "method": r.method, "lr": r.lr, "seed": r.seed, "status": r.status,
             "metrics": r.metrics, "structures": r.structures, "warnings": r.warnings, "steps": r.curve.iterations,
             "seconds": common.rounded(r.curve.seconds), "train_loss": common.rounded(r.curve.values, 6)}
            for r in results.runs]
    common.write_json(out / "results.json", {"settings": asdict(settings), "tasks": results.info,
                                             "selection": selection, "summary": results.rows, "runs": runs})
    return [out / "summary.csv", out / "results.json"]


# ------------------------------------------------------------------- study
@dataclass
class Results:
    """What the study computed: every run, the tasks' descriptions, the selection and the table's rows."""

    runs: List[Run]
    info: Dict[str, dict]
    selected: Dict[str, Dict[str, Selected]]
    rows: List[dict]


def compute(settings: Settings) -> Results:
    """Every run, the best lr per method and task, and the table's rows."""
    runs, info = run_all(settings)
    selected = select(runs)
    return Results(runs, info, selected, summary_rows(selected, settings))


#: the KFAC paper's claim: a preconditioner reaches Adam's final loss in at most this fraction of Adam's time
TARGET_TIME_RATIO = 0.5


def verdict(results: Results, settings: Settings) -> List[str]:
    """Per task: the preconditioner that reached Adam's final training loss soonest, its time
    as a fraction of Adam's own, and whether that meets the KFAC paper's claim."""
    found, holds = [], []
    for task_key, task_rows in common.group_by(results.rows, lambda row: row["task"]).items():
        rows = {row["method"]: row for row in task_rows}
        if "adam" not in rows:
            continue
        adam, label = rows["adam"]["seconds_to_adam"], TASKS[task_key].label
        ratios = {key: row["seconds_to_adam"] / adam for key, row in rows.items()
                  if METHODS[key].preconditioner and row["seconds_to_adam"] is not None and adam}
        if not ratios:
            found.append(f"{label}: no preconditioner reached it")
            continue
        fastest, ratio = min(ratios.items(), key=lambda item: item[1])
        found.append(f"{label}: {METHODS[fastest].label} in {fmt(ratio, 2)}x Adam's time")
        holds += [label] * (ratio <= TARGET_TIME_RATIO)
    if not found:
        return ["Adam is not among the methods, so there is no baseline to compare with."]
    return [
        "Fastest preconditioner to Adam's final training loss (seconds of training work, Adam's own = 1): "
        + "; ".join(found) + ".",
        f"Target (at most {TARGET_TIME_RATIO:g}x Adam's time, the KFAC paper's claim): met on {len(holds)} of "
        f"{len(found)} tasks" + (f" ({', '.join(holds)})." if holds else "."),
    ]


STUDY = harness.Study(
    name="dl", title="Kronecker preconditioners on deep nets", presets=PRESETS, full_time="about 45 minutes",
    dtype=torch.float32, compute=compute, report=markdown_report, verdict=verdict, write=write_outputs,
    plot=plot_all,
)
add_arguments, resolve_settings, run = STUDY.add_arguments, STUDY.resolve_settings, STUDY.run
