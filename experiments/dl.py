"""Kronecker preconditioners on deep nets: KFAC, EKFAC and LocalKFAC structures against SGD and Adam.

Tasks (``TASKS``; data from ``experiments/dl_data.py``, nothing downloads):

* ``curves``: the deep autoencoder of the KFAC paper (``models.DeepAutoencoder``, tanh,
  Bernoulli cross-entropy summed over pixels) scaled down to 16x16 CURVES-style images,
  256-200-100-50-25-6 and mirrored;
* ``digits``: the same kind of autoencoder (64-128-64-32-8, mirrored) on scikit-learn's 8x8 digits;
* ``mnist1d_mlp`` / ``mnist1d_cnn``: classifiers (``models.MLP`` 40-256-256-10, ``models.CNN``
  with three ``(1, 5)`` convolutions of stride 2) on MNIST-1D, cross-entropy.

Methods (``METHODS``): SGD with momentum 0.9, Adam, and the preconditioners of
``structngd.kron`` in front of SGD with momentum 0.9 (as in the KFAC paper): ``KFAC``,
``EKFAC`` and ``LocalKFAC`` with the structures ``dense``, ``diagonal``, ``hierarchical(k, k)``
(default ``k = 10``), ``lower_triangular`` and ``block_diagonal`` (blocks of ``--block-size``,
a smaller last block where it does not divide a factor's size; opt-in).
Preconditioners use the true Fisher by default (``--fisher true``: output gradients for
targets sampled from the model, ``Task.sample_fisher``; the autoencoders' Bernoulli pixels go
through ``sample_fisher(..., "bernoulli")``), or ``--fisher empirical``. ``--kl-clip`` bounds each
preconditioned step's predicted KL change (``lr^2 <p, g>``; ``0`` turns it off). Every method runs a small learning-rate grid on
every seed; the seed sets the initialization (the same for every method) and the mini-batch
order (the same for every method); the data draw is fixed (``--data-seed``).

Metrics, per task and method (best learning rate = lowest seed-averaged final training loss):

* the training loss (the training objective on a fixed subset of ``--eval-examples`` training
  examples, in eval mode, without gradients and inside ``torch.random.fork_rng``, so
  evaluations never perturb training) at a schedule of steps, against steps and against
  seconds of training work (forward, backward, preconditioner and optimizer steps only);
* the final test loss, and the test accuracy (classifiers) or test squared reconstruction
  error (autoencoders, summed over pixels);
* the key target: the steps and seconds each method needs to reach **Adam's final training
  loss** (best Adam setting, seed-averaged curves) and the ratio of those seconds to Adam's
  own (``< 1``: faster than Adam; the KFAC paper's claim corresponds to ``<= 0.5``).

Outputs in ``--out`` (default ``results/dl``): ``results.json`` (settings, every run with its
curve, metrics and the preconditioner's layer structures, the selection), ``summary.csv``,
``table.md`` (also printed; it opens with the verdict against Adam), ``verdict.json``,
``loss_vs_steps.png`` and ``loss_vs_seconds.png`` (one panel per
task, best setting per method).

Presets (one torch thread, float32): ``--tiny`` (seconds; end-to-end test), the default quick
study (curves, digits and MNIST-1D MLP, 2 seeds, 400 steps; a few minutes on 2 cores) and
``--full`` (all four tasks and all nine methods, 2 seeds, 1000 steps, the same learning-rate
grids: the README's tables are slices of it, e.g. ``--full --tasks curves digits --methods adam
kfac``; about 45 minutes). Timings are wall-clock on a shared machine: compare methods within
one run of the study.
"""

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

from . import common, dl_data, harness
from .cli import option
from .common import Curve, Line, fmt, fmt_ratio


# ------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A data set, a model and its loss."""

    key: str
    label: str
    kind: str  # "autoencoder" or "classifier"
    data: str  # key of dl_data.DATASETS
    build: Callable[[dl_data.Dataset, "Settings"], nn.Module]

    def loss(self, model: nn.Module, x: Tensor, y: Optional[Tensor]) -> Tensor:
        """The training objective: a mean over the batch of per-example negative log-likelihoods."""
        return self.loss_of(model(x), x, y)

    def loss_of(self, output: Tensor, x: Tensor, y: Optional[Tensor]) -> Tensor:
        if self.kind == "autoencoder":  # models.autoencoder.loss on given logits
            return F.binary_cross_entropy_with_logits(output, x.reshape(x.shape[0], -1), reduction="sum") / x.shape[0]
        return F.cross_entropy(output, y)

    def sample_fisher(self, pre, output: Tensor) -> None:
        """Feed the true Fisher's sampled output gradients to ``pre`` (``fisher="true"``,
        ``batch_averaged=False``: the sampled loss is a sum, so its gradients are per example).
        Autoencoders sample every pixel from its Bernoulli (``likelihood="bernoulli"``)."""
        pre.sample_fisher(output, "bernoulli" if self.kind == "autoencoder" else "categorical")

    @property
    def metric(self) -> str:
        return "squared_error" if self.kind == "autoencoder" else "accuracy"


TASKS = {
    task.key: task
    for task in (
        Task("curves", "CURVES-16 autoencoder", "autoencoder", "curves",
             lambda d, s: DeepAutoencoder((d.x_train[0].numel(), 200, 100, 50, 25, 6), init=s.ae_init)),
        Task("digits", "digits autoencoder", "autoencoder", "digits",
             lambda d, s: DeepAutoencoder((64, 128, 64, 32, 8), init=s.ae_init)),
        Task("mnist1d_mlp", "MNIST-1D MLP", "classifier", "mnist1d", lambda d, s: MLP((40, 256, 256, 10))),
        Task("mnist1d_cnn", "MNIST-1D CNN", "classifier", "mnist1d", lambda d, s: CNN((1, 1, 40), (32, 32, 32))),
    )
}


# ----------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A base optimizer, optionally behind a Kronecker preconditioner."""

    key: str
    label: str
    base: str  # "sgd" or "adam"
    preconditioner: Optional[str] = None  # "kfac", "ekfac", "local"
    structure: Optional[str] = None  # LocalKFAC's group


METHODS = {
    m.key: m
    for m in (
        Method("sgd", "SGD", "sgd"),
        Method("adam", "Adam", "adam"),
        Method("kfac", "KFAC", "sgd", "kfac"),
        Method("ekfac", "EKFAC", "sgd", "ekfac"),
        Method("local_dense", "Local dense", "sgd", "local", "dense"),
        Method("local_diagonal", "Local diagonal", "sgd", "local", "diagonal"),
        Method("local_hierarchical", "Local hierarchical", "sgd", "local", "hierarchical"),
        Method("local_lower_triangular", "Local lower-tri", "sgd", "local", "lower_triangular"),
        Method("local_block_diagonal", "Local block-diag", "sgd", "local", "block_diagonal"),
    )
}
DEFAULT_METHODS = ("sgd", "adam", "kfac", "ekfac", "local_dense", "local_diagonal", "local_hierarchical")


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines one study; built from a preset and the command line."""

    size: str = option(cli=False)
    tasks: Tuple[str, ...] = option(help="tasks", choices=tuple(TASKS))
    seeds: Tuple[int, ...] = option(help="seeds (initialization and batch order)")
    methods: Tuple[str, ...] = option(DEFAULT_METHODS, "methods", choices=tuple(METHODS))
    steps: int = option(1000, "training steps per run")
    batch_size: int = option(256, "mini-batch size")
    momentum: float = option(0.9, "SGD momentum (SGD and the base optimizer of the preconditioners)")
    #: learning-rate grids; SGD's is per task kind (the autoencoder losses sum over pixels)
    sgd_lrs: Tuple[float, ...] = option((0.01, 0.03, 0.1), "SGD learning rates (classifiers)")
    sgd_autoencoder_lrs: Tuple[float, ...] = option((1e-3, 3e-3, 1e-2), "SGD learning rates (autoencoders)")
    adam_lrs: Tuple[float, ...] = option((1e-3, 3e-3, 1e-2), "Adam learning rates")
    kfac_lrs: Tuple[float, ...] = option((0.03, 0.1, 0.3), "learning rates of SGD behind KFAC")
    ekfac_lrs: Tuple[float, ...] = option((0.03, 0.1, 0.3), "learning rates of SGD behind EKFAC")
    local_lrs: Tuple[float, ...] = option((0.01, 0.03, 0.1), "learning rates of SGD behind LocalKFAC")
    #: preconditioner hyperparameters (shared by every task); fisher "true" samples the
    #: model's own outputs (Task.sample_fisher), "empirical" uses the loss's gradients
    fisher: str = option("true", "Fisher of the preconditioners", choices=("true", "empirical"))
    #: kl_clip 3e-3 and damping per task kind: 0.01 on the autoencoders (their loss sums 256
    #: or 64 pixels), 0.03 on the classifiers. Tuned at 1000 steps, seeds 0 and 1, steps to
    #: Adam's final loss: on CURVES KFAC 184 against 212 with damping 0.03 and 260 with
    #: (0.03, 1e-3); EKFAC 180 against 220 with (0.03, 3e-3), 280 with damping 0.1 and 240
    #: with kl_clip 1e-2; LocalKFAC dense (local damping 0.01 or 0.003) 212 against 280 with
    #: (0.03, 1e-3). On MNIST-1D only KFAC reaches Adam's final loss: after 640 steps with
    #: (0.03, 3e-3), 960 with (0.03, 1e-3), not at all with damping 0.01. The clip binds: lr 0.3
    #: and 1 gave the same CURVES step counts. Without it KFAC needs damping 1 to stay stable
    damping: float = option(0.03, "KFAC / EKFAC damping (classifiers)")
    autoencoder_damping: float = option(0.01, "KFAC / EKFAC damping (autoencoders)")
    kl_clip: Optional[float] = option(3e-3, "bound on lr^2 <p, g> per step (preconditioners; 0 or 'none' = off)")
    factor_decay: float = option(0.95, "KFAC / EKFAC factor moving-average decay")
    update_every: int = option(10, "steps between preconditioner updates")
    #: EKFAC's eigenbasis period (None: update_every) and scaling period (re-fitting s costs
    #: per-example projections and, with the true Fisher, a second backward pass). Chosen on
    #: CURVES (1000 steps, 2 seeds, runs on a loaded machine, so the ratios are noisy): time to
    #: Adam's final loss 0.37x Adam's with (20, 5), 0.42x with (20, 10), 0.54x with (10, 10),
    #: 0.59x with (10, 5); a quieter run of (20, 5) gave 0.60x; (10, 1) about 1.3x
    ekfac_update_every: Optional[int] = option(20, "steps between EKFAC's eigenbasis updates ('none': update-every)")
    ekfac_scale_every: int = option(5, "steps between EKFAC's scaling re-fits")
    lr_cov: float = option(0.3, "LocalKFAC factor step size")
    local_momentum: float = option(0.5, "LocalKFAC Riemannian momentum")
    local_damping: float = option(0.03, "LocalKFAC damping (classifiers)")
    local_autoencoder_damping: float = option(0.01, "LocalKFAC damping (autoencoders)")
    local_k: int = option(10, "LocalKFAC hierarchical k1 = k2")
    block_size: int = option(8, "LocalKFAC block_diagonal block size")
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
        """The preconditioner's damping for a task kind (``autoencoder_damping`` /
        ``local_autoencoder_damping`` on the autoencoders, whose losses sum over pixels)."""
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
        local_lrs=(0.1,), update_every=5, ekfac_update_every=None, curves_train=256, curves_test=64, mnist1d_samples=400,
        eval_examples=128, eval_points=4, warmup_steps=1,
    ),
    "quick": Settings(size="quick", tasks=("curves", "digits", "mnist1d_mlp"), seeds=(0, 1), steps=400),
    # the README's configuration (1000 steps, the default grids, 2 seeds) on every task and
    # method, so its tables are slices of this grid
    "full": Settings(size="full", tasks=tuple(TASKS), seeds=(0, 1), methods=tuple(METHODS), eval_points=50),
}


# ---------------------------------------------------------------- building
def group_options(structure: Optional[str], settings: Settings) -> Optional[dict]:
    if structure == "hierarchical":
        return {"k1": settings.local_k, "k2": settings.local_k}
    if structure == "block_diagonal":
        return {"block_size": settings.block_size}
    return None


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
        return LocalKFAC(
            model, structure=method.structure, damping=damping, lr_cov=settings.lr_cov,
            momentum=settings.local_momentum, group_options=group_options(method.structure, settings), **shared,
        )
    return None


def build_optimizer(method: Method, model: nn.Module, lr: float, settings: Settings) -> torch.optim.Optimizer:
    if method.base == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.momentum)


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


# -------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(task: Task, model: nn.Module, x: Tensor, y: Optional[Tensor], chunk: int = 2048) -> Dict[str, float]:
    """Loss (the training objective) and the task's metric on ``(x, y)``, in eval mode, without
    gradients and inside ``fork_rng`` (evaluations never perturb the training stream)."""
    was_training = model.training
    model.eval()
    loss = metric = 0.0
    with common.fork_rng(x.device):
        for start in range(0, x.shape[0], chunk):
            xb = x[start : start + chunk]
            yb = None if y is None else y[start : start + chunk]
            n = xb.shape[0]
            loss += float(task.loss(model, xb, yb)) * n
            if task.kind == "autoencoder":
                metric += float(model.squared_error(xb)) * n
            else:
                metric += float((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    n = x.shape[0]
    return {"loss": loss / n, task.metric: metric / n}


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
    """Train one model; a failing step (non-finite loss or gradient, singular factor) ends the
    run with status ``diverged at step ...`` and ``nan`` for the rest of the curve."""
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
    optimizer = build_optimizer(method, model, lr, settings)
    n_eval = min(settings.eval_examples, data.x_train.shape[0])
    x_eval = data.x_train[:n_eval]
    y_eval = None if data.y_train is None else data.y_train[:n_eval]
    points = common.eval_points(steps, settings.eval_points)
    clock, curve, it = common.Stopwatch(settings.device), run.curve, 0
    order = batches(data.x_train.shape[0], settings.batch_size, seed)
    try:
        _record(curve, 0, 0.0, evaluate(task, model, x_eval, y_eval)["loss"])
        for it in range(1, steps + 1):
            index = next(order)
            xb = data.x_train[index]
            yb = None if data.y_train is None else data.y_train[index]
            with clock:
                optimizer.zero_grad()
                output = model(xb)
                if pre is not None and settings.fisher == "true":
                    task.sample_fisher(pre, output)
                loss = task.loss_of(output, xb, yb)
                loss.backward()
                if pre is not None:
                    pre.step()
                optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss is {value}")
            if it == points[len(curve.iterations)]:
                _record(curve, it, clock.seconds, evaluate(task, model, x_eval, y_eval)["loss"])
    except (ValueError, RuntimeError, FloatingPointError) as err:
        run.status = f"diverged at step {it}: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    curve.pad_to(points)
    if run.status == "ok":
        test = evaluate(task, model, data.x_test, data.y_test)
        run.metrics = {"train_loss": curve.final, "test_loss": test["loss"], f"test_{task.metric}": test[task.metric],
                       "seconds": clock.seconds, "ms_per_step": 1e3 * clock.seconds / steps}
    if pre is not None:
        pre.remove_hooks()
    return run


def _record(curve: Curve, it: int, seconds: float, value: float) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"evaluation loss is {value}")
    curve.iterations.append(it)
    curve.seconds.append(seconds)
    curve.values.append(value)


def run_all(settings: Settings) -> Tuple[List[Run], Dict[str, dict]]:
    """Every run of the study and, per task, a description of its data and model."""
    plan = [(t, m) for t in settings.tasks for m in settings.methods]
    total = sum(len(settings.lrs(METHODS[m], TASKS[t])) * len(settings.seeds) for t, m in plan)
    bar = common.progress(total, "dl")
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

    @property
    def diverged(self) -> int:
        return sum(r.status != "ok" for r in self.runs)


def select(runs: List[Run]) -> Dict[str, Dict[str, Selected]]:
    """``{task: {method: best Selected}}``: the lowest seed-averaged final training loss."""
    grouped = defaultdict(list)
    for run in runs:
        grouped[(run.task, run.method, run.lr)].append(run)
    best: Dict[str, Dict[str, Selected]] = defaultdict(dict)
    for (task, method, lr), members in grouped.items():
        candidate = Selected(method, lr, common.mean_curve([r.curve for r in members]), members)
        current = best[task].get(method)
        if current is None or _final_key(candidate) < _final_key(current):
            best[task][method] = candidate
    return best


def _final_key(selected: Selected) -> float:
    return common.missing_last(selected.curve.final)


def reach(curve: Curve, target: float) -> Tuple[Optional[int], Optional[float]]:
    """``(steps, seconds)`` of the first evaluation at or below ``target``."""
    return curve.first_below(target + 1e-9 * abs(target))


def summary_rows(selected: Dict[str, Dict[str, Selected]], info: Dict[str, dict], settings: Settings) -> List[dict]:
    """One row per (task, method): best lr, finals, steps / seconds to Adam's final loss, ratios."""
    rows = []
    for task_key, methods in selected.items():
        task = TASKS[task_key]
        adam = methods.get("adam")
        target = adam.curve.final if adam is not None else math.nan
        adam_steps, adam_seconds = reach(adam.curve, target) if adam is not None and target == target else (None, None)
        adam_total = adam.curve.total_seconds if adam is not None else math.nan
        for method_key in settings.methods:
            sel = methods.get(method_key)
            if sel is None:
                continue
            steps, seconds = reach(sel.curve, target) if target == target else (None, None)
            total = sel.curve.total_seconds
            rows.append({
                "task": task_key, "task_label": task.label, "method": method_key, "method_label": METHODS[method_key].label,
                "lr": sel.lr, "lr_grid": " ".join(f"{lr:g}" for lr in settings.lrs(METHODS[method_key], task)),
                "final_train_loss": sel.curve.final, "test_loss": sel.metric("test_loss"),
                "test_metric": task.metric, "test_metric_value": sel.metric(f"test_{task.metric}"),
                "adam_final_loss": target,
                "steps_to_adam": steps, "seconds_to_adam": seconds,
                "ratio_seconds": fmt_ratio(seconds, adam_seconds, total, adam_total) if adam is not None else "–",
                "ratio_steps": fmt_ratio(steps, adam_steps, settings.steps, settings.steps) if adam is not None else "–",
                "total_seconds": total, "ms_per_step": sel.metric("ms_per_step"),
                "diverged_runs": sel.diverged, "runs": len(sel.runs),
            })
    return rows


def markdown_report(results: "Results", settings: Settings, runtime: float) -> str:
    """The results table, one section per task, with the settings and notes."""
    rows, info, notes = results.rows, results.info, notes_for(results.runs)
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
        f"Settings: preset `{settings.size}`; seeds {list(settings.seeds)}; {settings.steps} steps of batch "
        f"{settings.batch_size}; base optimizer of the preconditioners SGD momentum {settings.momentum:g}; "
        f"{settings.fisher} Fisher; "
        f"KFAC/EKFAC damping {settings.damping:g} (autoencoders {settings.autoencoder_damping:g}), kl_clip {settings.kl_clip}, factor_decay {settings.factor_decay:g}, "
        f"EKFAC update_every {settings.ekfac_period}, scale_every "
        f"{settings.ekfac_scale_every}; LocalKFAC damping "
        f"{settings.local_damping:g} (autoencoders {settings.local_autoencoder_damping:g}), lr_cov {settings.lr_cov:g}, momentum {settings.local_momentum:g}, "
        f"hierarchical k1 = k2 = {settings.local_k}; update_every {settings.update_every}; float32 on "
        f"{settings.device}; {common.environment_text(runtime)}",
    ]
    for task_key in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task_key]
        meta = info[task_key]
        body = [
            [
                row["method_label"], f"{row['lr']:g} ({row['lr_grid']})",
                "diverged" if row["final_train_loss"] != row["final_train_loss"] else fmt(row["final_train_loss"], 4),
                fmt(row["test_loss"], 4),
                (f"{100 * row['test_metric_value']:.1f}%" if row["test_metric"] == "accuracy"
                 else fmt(row["test_metric_value"], 4)),
                _reach_text(row["steps_to_adam"]), _reach_text(row["seconds_to_adam"]),
                row["ratio_seconds"], row["ratio_steps"], fmt(row["ms_per_step"], 3),
            ]
            for row in task_rows
        ]
        lines += [
            "", f"## {meta['label']}", "",
            f"{meta['train']} train / {meta['test']} test examples of shape {tuple(meta['input_shape'])}; "
            f"{meta['parameters']} parameters; Adam's final training loss {fmt(task_rows[0]['adam_final_loss'], 4)}.",
            "", common.markdown_table(header, body),
        ]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _reach_text(value) -> str:
    return "not reached" if value is None else (fmt(value, 3) if isinstance(value, float) else str(value))


def notes_for(runs: List[Run]) -> List[str]:
    """Diverged runs and preconditioner warnings (e.g. structure fallbacks), per task and method."""
    out = []
    grouped = defaultdict(list)
    for run in runs:
        grouped[(run.task, run.method)].append(run)
    for (task, method), members in grouped.items():
        failed = [r for r in members if r.status != "ok"]
        if failed:
            out.append(f"{task} {METHODS[method].label}: {len(failed)} of {len(members)} runs stopped, e.g. lr "
                       f"{failed[0].lr:g} seed {failed[0].seed}: {failed[0].status}")
        for message in sorted({w for r in members for w in r.warnings}):
            out.append(f"{task} {METHODS[method].label}: {message}")
    return out


# ------------------------------------------------------------------- plots
def plot_all(results: "Results", settings: Settings, out: Path) -> List[Path]:
    """Training loss vs steps and vs seconds, one panel per task, best setting per method."""
    import matplotlib

    colors = [matplotlib.colormaps["tab10"](i) for i in range(10)]
    color_of = {key: colors[i % 10] for i, key in enumerate(METHODS)}
    style_of = lambda key: "--" if METHODS[key].preconditioner is None else "-"
    paths = []
    for axis in ("steps", "seconds"):
        panels: Dict[str, List[Line]] = {}
        for task_key, methods in results.selected.items():
            panels[TASKS[task_key].label] = [
                Line(sel.curve.iterations if axis == "steps" else sel.curve.seconds, sel.curve.values,
                     color_of[key], style_of(key))
                for key, sel in methods.items()
            ]
        legend = [(METHODS[key].label, color_of[key], style_of(key)) for key in settings.methods]
        path = out / f"loss_vs_{axis}.png"
        common.plot_panels(
            path, panels, xlabel="steps" if axis == "steps" else "time (s, training work only)",
            ylabel="training loss (nats per example)", title="Kronecker preconditioners on deep nets: best lr per method (seed mean)",
            legend=legend, ncols=min(2, len(panels)),
        )
        paths.append(path)
    return paths


# ----------------------------------------------------------------- outputs
def run_records(runs: List[Run]) -> List[dict]:
    return [
        {
            "task": r.task, "method": r.method, "lr": r.lr, "seed": r.seed, "status": r.status,
            "metrics": r.metrics, "structures": r.structures, "warnings": r.warnings,
            "steps": r.curve.iterations, "seconds": common.rounded(r.curve.seconds),
            "train_loss": common.rounded(r.curve.values, 6),
        }
        for r in runs
    ]


def write_outputs(results: "Results", settings: Settings, out: Path) -> List[Path]:
    """``summary.csv`` and ``results.json`` in ``out``; returns their paths."""
    common.write_csv(out / "summary.csv", results.rows)
    selection = {task: {m: {"lr": s.lr, "final_train_loss": s.curve.final} for m, s in methods.items()}
                 for task, methods in results.selected.items()}
    common.write_json(out / "results.json", {
        "settings": asdict(settings), "tasks": results.info, "selection": selection, "summary": results.rows,
        "runs": run_records(results.runs),
    })
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
    return Results(runs, info, selected, summary_rows(selected, info, settings))


#: the KFAC paper's claim: a preconditioner reaches Adam's final loss in at most this fraction of Adam's time
TARGET_TIME_RATIO = 0.5


def _fastest_preconditioner(rows: Dict[str, dict]) -> Optional[Tuple[str, float]]:
    """``(method, seconds / Adam's)`` of the preconditioner first at Adam's final loss (``None``: none got there)."""
    adam = rows["adam"]["seconds_to_adam"]
    ratios = {key: row["seconds_to_adam"] / adam for key, row in rows.items()
              if METHODS[key].preconditioner and row["seconds_to_adam"] is not None and adam}
    return min(ratios.items(), key=lambda item: item[1]) if ratios else None


def verdict(results: Results, settings: Settings) -> List[str]:
    """Per task: the preconditioner that reached Adam's final training loss soonest, its time
    as a fraction of Adam's own, and whether that meets the KFAC paper's claim."""
    found, holds = [], []
    for task_key in dict.fromkeys(row["task"] for row in results.rows):
        rows = {row["method"]: row for row in results.rows if row["task"] == task_key}
        if "adam" not in rows:
            continue
        fastest = _fastest_preconditioner(rows)
        label = TASKS[task_key].label
        if fastest is None:
            found.append(f"{label}: no preconditioner reached it")
            continue
        found.append(f"{label}: {METHODS[fastest[0]].label} in {fmt(fastest[1], 2)}x Adam's time")
        holds += [label] * (fastest[1] <= TARGET_TIME_RATIO)
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
