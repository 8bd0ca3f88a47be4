"""Scale: Kronecker NGD on a Bayesian MLP with 10^5 weights (MNIST-1D) against AutoNormal + Adam and IVON.

A 40-300-300-10 ReLU MLP (105,610 weights and biases, each with the prior ``N(0, s^2)``, one ``s`` for
all) with a softmax likelihood on MNIST-1D's training split, minibatches of 128, float32. Methods, each
over a small grid of settings (the best by final ELBO is reported):

* ``kron_ngd``: ``AutoKroneckerNormal(structure="dense")`` + ``NGD(estimator="kronecker")`` on
  ``models.BNN`` (SVI, the likelihood scaled by ``N / B``);
* ``adam_normal``: Pyro's ``AutoNormal`` + Adam on the same model;
* ``vkfac``: ``VariationalKFAC`` on the same MLP in plain torch (``ess = N``, ``prior_precision = 1 / s^2``);
* ``ivon``: ``ivon.IVON`` on the plain MLP (``ess = N``, ``weight_decay = 1 / (s^2 N)``, cosine lr).

Every posterior is Gaussian, so every method's ELBO is measured the same way: ``E_q[sum_n log p(y_n | x_n,
W)]`` over the whole training split by fixed-noise posterior draws, minus ``KL(q || p)`` in closed form
(``-H(q) + sum_i [log(2 pi s^2) / 2 + (m_i^2 + v_i) / (2 s^2)]``). On the test split: accuracy, NLL
``-log((1/S) sum_s p_s(y))`` and 15-bin ECE of the posterior predictive (``S`` draws averaged in
probability space). The per-step wall time is the median over steps of the best settings timed round-robin
in one process. Ratios of Kronecker NGD: the fraction of Adam's steps and seconds it needs to reach
AutoNormal + Adam's final ELBO, its test NLL and ECE over both baselines', its per-step time over Adam's.

Outputs in --out (default results/bnn_scale): table.md, verdict.json, results.json, elbo_vs_steps.png and
elbo_vs_seconds.png. Presets: --tiny (a 40-16-10 net, seconds), --quick (the default: 400 steps, about
3 minutes on 2 cores) and --full (3000 steps).

Full description: docs/studies.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pyro
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_median
from torch import Tensor, nn

from models import BNN

from . import common, dl_data, harness, progress
from .cli import option
from .common import Curve, Line, fmt
from .uci_methods import batches, cosine
from .vi_data import expected_calibration_error

METHOD_NAMES = {"kron_ngd": "AutoKroneckerNormal + NGD (ours)", "adam_normal": "AutoNormal + Adam",
                "vkfac": "VariationalKFAC (ours)", "ivon": "IVON"}
METHODS = tuple(METHOD_NAMES)
PYRO_METHODS = ("kron_ngd", "adam_normal")
OURS, ADAM, BASELINES, VKFAC = "kron_ngd", "adam_normal", ("adam_normal", "ivon"), "vkfac"
#: the seed of the fixed noise of every evaluation (ELBO and predictive draws)
EVAL_SEED = 12345
Params = List[Tuple[Tensor, Tensor]]  # (weight, bias) per layer


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines one study; built from a preset and the command line."""

    hidden: Tuple[int, ...] = option((300, 300), "hidden layer widths (ReLU)")
    num_samples: int = option(5000, "MNIST-1D samples (train and test)")
    train_split: float = option(0.8, "fraction of the samples in the training split")
    data_seed: int = option(0, "seed of the MNIST-1D generator")
    seed: int = option(0, "seed of the initializations, the minibatch order and the training noise")
    prior_scale: float = option(0.1, "prior standard deviation s of every weight and bias")
    init_scale: float = option(0.02, "initial posterior standard deviation of the Pyro guides")
    batch_size: int = option(128, "minibatch size")
    steps: int = option(400, "steps per run")
    methods: Tuple[str, ...] = option(METHODS, "methods", choices=METHODS)
    kron_lrs: Tuple[float, ...] = option((0.01, 0.03), "NGD learning rates (kron_ngd)")
    adam_lrs: Tuple[float, ...] = option((0.003, 0.01, 0.03), "Adam learning rates (adam_normal)")
    vkfac_lrs: Tuple[float, ...] = option((0.003, 0.01), "VariationalKFAC learning rates")
    ivon_lrs: Tuple[float, ...] = option((0.1, 0.3, 1.0), "IVON peak learning rates (cosine decay to 0)")
    ivon_hess_inits: Tuple[float, ...] = option((0.003, 0.01), "IVON hess_init values")
    elbo_samples: int = option(4, "posterior draws of each ELBO evaluation")
    predictive_samples: int = option(32, "posterior draws of the test predictive")
    ece_bins: int = option(15, "equal-width confidence bins of the ECE")
    eval_points: int = option(10, "about how many ELBO evaluations per run (x2)")
    timing_rounds: int = option(30, "round-robin steps per method of the per-step timing")
    timing_warmup: int = option(5, "round-robin steps per method before the timing")
    threads: Optional[int] = option(1, "torch threads")
    device: str = option("cpu", "device of the data (drawn on the CPU, then moved) and of every model (e.g. cuda)",
                         check=common.resolve_device)

    @property
    def num_train(self) -> int:
        return round(self.num_samples * self.train_split)

    def configs(self, method: str) -> List["Config"]:
        if method == "ivon":
            return [Config(method, lr, h) for lr in self.ivon_lrs for h in self.ivon_hess_inits]
        lrs = {"kron_ngd": self.kron_lrs, "adam_normal": self.adam_lrs, "vkfac": self.vkfac_lrs}[method]
        return [Config(method, lr) for lr in lrs]


PRESETS = {
    "tiny": Settings(hidden=(16,), num_samples=400, batch_size=32, steps=12, kron_lrs=(0.1,), adam_lrs=(0.03,),
                     vkfac_lrs=(0.1,), ivon_lrs=(0.3,), ivon_hess_inits=(0.1,), elbo_samples=1, predictive_samples=4,
                     eval_points=4, timing_rounds=3, timing_warmup=1),
    "quick": Settings(),
    "full": Settings(steps=3000, kron_lrs=(0.003, 0.01, 0.03), eval_points=40, predictive_samples=64),
}


@dataclass(frozen=True)
class Config:
    """One setting of one method: a learning rate and, for IVON, ``hess_init``."""

    method: str
    lr: float
    hess_init: Optional[float] = None

    @property
    def label(self) -> str:
        return f"lr {self.lr:g}" + ("" if self.hess_init is None else f", hess_init {self.hess_init:g}")


def architecture(settings: Settings, num_classes: int = 10) -> BNN:
    """The Bayesian MLP; its ``network(x, params)`` evaluates every method's draws."""
    return BNN(40, num_classes, hidden=settings.hidden, activation="relu", likelihood="categorical",
               prior_scale=settings.prior_scale)


def num_weights(settings: Settings) -> int:
    """Weights and biases of the MLP (the dimension of every posterior)."""
    return architecture(settings).num_weights


def load_data(settings: Settings) -> dl_data.Dataset:
    """MNIST-1D from the local generator, on ``settings.device``."""
    data = dl_data.mnist1d(settings.num_samples, settings.data_seed, settings.train_split)
    device = torch.device(settings.device)
    return dl_data.Dataset(data.name, *(t.to(device) for t in (data.x_train, data.x_test, data.y_train, data.y_test)))


# ------------------------------------------------------------------ metrics
def kl_to_isotropic_normal(means: Tensor, variances: Tensor, entropy: Tensor, prior_scale: float) -> Tensor:
    """``KL(q || N(0, s^2 I)) = -H(q) + sum_i [log(2 pi s^2) / 2 + (m_i^2 + v_i) / (2 s^2)]`` for a Gaussian
    ``q`` with marginal means ``m``, variances ``v`` and entropy ``H(q)``."""
    second_moment = (means.double().square() + variances.double()).sum()
    return (0.5 * means.numel() * math.log(2 * math.pi * prior_scale**2) + second_moment / (2 * prior_scale**2)
            - entropy.double())


def diagonal_entropy(variances: Tensor) -> Tensor:
    """``H = sum_i log(2 pi e v_i) / 2`` of a diagonal Gaussian."""
    return 0.5 * (variances.double().log() + math.log(2 * math.pi * math.e)).sum()


def predictive_nll(log_probs: Tensor, labels: Tensor) -> float:
    """``mean_n -log((1/S) sum_s p_s(y_n))`` of per-draw log-probabilities ``log_probs`` ``(S, n, classes)``."""
    picked = log_probs.double().gather(-1, labels.expand(log_probs.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return float(-(torch.logsumexp(picked, 0) - math.log(log_probs.shape[0])).mean())


def predictive_metrics(log_probs: Tensor, labels: Tensor, bins: int) -> Dict[str, float]:
    """Accuracy, NLL and ECE of the predictive ``(1/S) sum_s p_s`` (probability space)."""
    probs = log_probs.double().exp().mean(0)
    return {"accuracy": float((probs.argmax(-1) == labels).double().mean()),
            "nll": predictive_nll(log_probs, labels), "ece": expected_calibration_error(probs, labels, bins)}


# ------------------------------------------------------------------ methods
class PyroMethod:
    """``kron_ngd`` and ``adam_normal``: SVI (``Trace_ELBO``, one particle) on ``models.BNN``, minibatches scaling
    the likelihood by ``N / B`` (``data_size=N``)."""

    def __init__(self, config: Config, settings: Settings, data: dl_data.Dataset):
        from structngd.pyro import NGD, AutoKroneckerNormal

        self.model, self.size = architecture(settings, data.num_classes), data.x_train.shape[0]
        self.layers = len(self.model.layers)
        # the guides' set-up pass sees a batch as training does (AutoKroneckerNormal reads N / B from it)
        self.args = (data.x_train[:settings.batch_size], data.y_train[:settings.batch_size])
        if config.method == "kron_ngd":
            self.guide = AutoKroneckerNormal(self.model, structure="dense", init_scale=settings.init_scale)
            optimizer = NGD(lr=config.lr, estimator="kronecker")
        else:
            self.guide = AutoNormal(self.model, init_loc_fn=init_to_median, init_scale=settings.init_scale)
            optimizer = pyro.optim.Adam({"lr": config.lr})
        with torch.no_grad():
            self.guide(*self.args, data_size=self.size)
        self.svi = SVI(self.model, self.guide, optimizer, Trace_ELBO())

    def step(self, x: Tensor, y: Tensor, step: int) -> float:
        """One SVI step; returns its ``-ELBO`` estimate per training example."""
        return self.svi.step(x, y, data_size=self.size) / self.size

    @torch.no_grad()
    def draw(self) -> Params:
        values = self.guide(*self.args, data_size=self.size)
        return [(values[f"layers.{i}.weight"], values[f"layers.{i}.bias"]) for i in range(self.layers)]

    @torch.no_grad()
    def moments(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Marginal means, marginal variances and the entropy of ``q``."""
        if isinstance(self.guide, AutoNormal):
            names = [f"layers.{i}.{part}" for i in range(self.layers) for part in ("weight", "bias")]
            locs = [_attribute(self.guide.locs, n).reshape(-1) for n in names]
            variances = torch.cat([_attribute(self.guide.scales, n).reshape(-1) for n in names]).square()
            return torch.cat(locs), variances, diagonal_entropy(variances)
        posterior = self.guide.get_posterior()
        return posterior.mean, posterior.variance, posterior.entropy()


def _attribute(module: nn.Module, dotted: str) -> Tensor:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def plain_mlp(settings: Settings, num_classes: int = 10) -> nn.Sequential:
    """The same MLP as ``architecture`` in plain torch (default initialization)."""
    sizes = [40, *settings.hidden, num_classes]
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class TorchMethod:
    """``vkfac`` and ``ivon`` on the plain MLP: one posterior draw per step (``sampled_params(train=True)``)."""

    def __init__(self, config: Config, settings: Settings, data: dl_data.Dataset):
        self.config, self.steps, self.size = config, settings.steps, data.x_train.shape[0]
        self.net = plain_mlp(settings, data.num_classes).to(data.x_train.device)
        self.linears = [m for m in self.net if isinstance(m, nn.Linear)]
        if config.method == "vkfac":
            from structngd.kron import VariationalKFAC

            self.optimizer = VariationalKFAC(self.net, ess=self.size, lr=config.lr,
                                             prior_precision=settings.prior_scale**-2)
        else:
            import ivon

            self.optimizer = ivon.IVON(self.net.parameters(), lr=config.lr, ess=self.size, hess_init=config.hess_init,
                                       weight_decay=1.0 / (settings.prior_scale**2 * self.size))

    def step(self, x: Tensor, y: Tensor, step: int) -> float:
        """One step; returns the minibatch's mean NLL at the step's draw."""
        if self.config.method == "ivon":
            self.optimizer.param_groups[0]["lr"] = self.config.lr * cosine(step - 1, self.steps)
        self.optimizer.zero_grad()
        with self.optimizer.sampled_params(train=True):
            loss = F.cross_entropy(self.net(x), y)
            loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def draw(self) -> Params:
        with self.optimizer.sampled_params(train=False):
            return [(layer.weight.clone(), layer.bias.clone()) for layer in self.linears]

    @torch.no_grad()
    def moments(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Marginal means, marginal variances and the entropy of ``q``."""
        if self.config.method == "ivon":
            group = self.optimizer.param_groups[0]
            means = torch.cat([p.reshape(-1) for p in group["params"]])
            variances = 1.0 / (group["ess"] * (group["hess"] + group["weight_decay"]))
            return means, variances, diagonal_entropy(variances)
        means, variances, entropy = [], [], 0.0
        for name in self.optimizer.blocks:
            q = self.optimizer.posterior(name)
            means.append(q.mean.reshape(-1))
            variances.append((q.row_covariance().diagonal()[:, None] * q.column_covariance().diagonal()).reshape(-1))
            entropy = entropy + q.entropy()
        return torch.cat(means), torch.cat(variances), entropy


def build(config: Config, settings: Settings, data: dl_data.Dataset):
    return (PyroMethod if config.method in PYRO_METHODS else TorchMethod)(config, settings, data)


@torch.no_grad()
def draw_log_probs(method, arch: BNN, x: Tensor, samples: int) -> Tensor:
    """``log p_s(class | x)`` ``(samples, n, classes)`` of ``samples`` fixed-noise posterior draws."""
    with common.fork_rng():
        torch.manual_seed(EVAL_SEED)
        draws = [method.draw() for _ in range(samples)]
    return torch.stack([F.log_softmax(arch.network(x, params), -1) for params in draws])


@torch.no_grad()
def elbo_per_example(method, arch: BNN, data: dl_data.Dataset, settings: Settings) -> float:
    """``(E_q[sum_n log p(y_n | x_n, W)] - KL(q || p)) / N`` on the whole training split."""
    log_probs = draw_log_probs(method, arch, data.x_train, settings.elbo_samples)
    expected = log_probs.double().gather(-1, data.y_train.expand(len(log_probs), -1).unsqueeze(-1)).sum() / len(
        log_probs)
    kl = kl_to_isotropic_normal(*method.moments(), settings.prior_scale)
    return float(expected - kl) / data.x_train.shape[0]


# ------------------------------------------------------------------ runs
@dataclass
class Run:
    config: Config
    elbo: Curve  # ELBO per training example against steps and training seconds
    status: str
    train_loss: List[float] = field(default_factory=list)  # at the evaluation steps
    test: Dict[str, float] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def ms_per_step(self) -> float:
        last = max((i for i, v in zip(self.elbo.iterations, self.elbo.values) if v == v), default=0)
        return 1e3 * self.elbo.total_seconds / last if last else math.nan


def run_one(config: Config, settings: Settings, data: dl_data.Dataset, arch: BNN) -> Run:
    """Train one setting, the ELBO at the evaluation points; a step that raises or a non-finite value ends
    the run (its reason recorded); then the test predictive."""
    pyro.clear_param_store()
    pyro.set_rng_seed(settings.seed)  # torch's generator too: the same initialization stream for every method
    points = common.eval_points(settings.steps, settings.eval_points)
    run, loss = Run(config, Curve([], [], []), "ok"), math.nan
    try:
        method = build(config, settings, data)
    except (ValueError, RuntimeError, TypeError) as err:
        run.status = f"set-up raised {common.error_text(err, 100)}"
        run.elbo.pad_to(points)
        return run
    clock, order = common.Stopwatch(), batches(data.x_train.shape[0], settings.batch_size, settings.seed)
    for step in range(settings.steps + 1):
        if step:
            index = next(order)
            try:
                with clock:
                    loss = method.step(data.x_train[index], data.y_train[index], step)
            except (ValueError, RuntimeError, FloatingPointError) as err:
                run.status = f"step {step} raised {common.error_text(err, 100)}"
                break
            if not math.isfinite(loss):
                run.status = f"non-finite training loss at step {step}"
                break
        if step == points[len(run.elbo.iterations)]:
            value = elbo_per_example(method, arch, data, settings)
            run.elbo.append(step, clock.seconds, value)
            run.train_loss.append(loss)
            if not math.isfinite(value):
                run.status = f"non-finite ELBO at step {step}"
                break
    run.elbo.pad_to(points)
    if run.status == "ok":
        log_probs = draw_log_probs(method, arch, data.x_test, settings.predictive_samples)
        run.test = predictive_metrics(log_probs, data.y_test, settings.ece_bins)
    return run


def warm_up(settings: Settings, data: dl_data.Dataset, steps: int = 2) -> None:
    """A few untimed steps of each method, so that the process's one-time costs (lazy set-ups of torch and the
    libraries) fall on no timed run."""
    x, y = data.x_train[:settings.batch_size], data.y_train[:settings.batch_size]
    for method in settings.methods:
        pyro.clear_param_store()
        with contextlib.suppress(ValueError, RuntimeError, TypeError, FloatingPointError):
            trainer = build(settings.configs(method)[0], settings, data)
            for step in range(1, steps + 1):
                trainer.step(x, y, step)


def best_runs(runs: Sequence[Run]) -> Dict[str, Run]:
    """The run of the highest final ELBO per method (a failed run only where every setting failed)."""
    best: Dict[str, Run] = {}
    for run in runs:
        common.keep_best(best, run.method, run, lambda r: (r.status != "ok", common.missing_last(-r.elbo.final)))
    return best


def time_round_robin(best: Dict[str, Run], settings: Settings, data: dl_data.Dataset) -> Dict[str, dict]:
    """Per method: the wall times (ms) of ``timing_rounds`` steps of its best setting after ``timing_warmup``,
    every method stepping once per round on the same minibatch, and their median."""
    pyro.clear_param_store()
    pyro.set_rng_seed(settings.seed)
    methods, times, status = {}, {name: [] for name in best}, {name: "ok" for name in best}
    for name, run in best.items():
        try:
            methods[name] = build(run.config, settings, data)
        except (ValueError, RuntimeError, TypeError) as err:
            status[name] = f"set-up raised {common.error_text(err, 100)}"
    order = batches(data.x_train.shape[0], settings.batch_size, settings.seed + 1)
    for round_ in range(settings.timing_warmup + settings.timing_rounds):
        index = next(order)
        x, y = data.x_train[index], data.y_train[index]
        for name, method in methods.items():
            if status[name] != "ok":
                continue
            start = time.perf_counter()
            try:
                method.step(x, y, round_ + 1)
            except (ValueError, RuntimeError, FloatingPointError) as err:
                status[name] = f"timing step {round_ + 1} raised {common.error_text(err, 100)}"
                continue
            if round_ >= settings.timing_warmup:
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: {"ms": times[name], "median_ms": statistics.median(times[name]) if times[name] else math.nan,
                   "status": status[name]} for name in best}


# ------------------------------------------------------------------ ratios
def first_reaching(curve: Curve, target: float) -> Tuple[Optional[int], Optional[float]]:
    """``(step, seconds)`` of the first value ``>= target``, or ``(None, None)``."""
    for step, seconds, value in zip(curve.iterations, curve.seconds, curve.values):
        if value >= target:
            return step, seconds
    return None, None


def _quotient(a: Optional[float], b: Optional[float]) -> Optional[float]:
    ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and b != 0
    return a / b if ok else None


def compute_ratios(best: Dict[str, Run], timing: Dict[str, dict], method: str = OURS) -> Dict[str, Optional[float]]:
    """``method`` (Kronecker NGD by default) against AutoNormal + Adam (reach of Adam's final ELBO, per-step time)
    and against both baselines (test NLL and ECE); ``None`` where a side is missing or failed."""
    ours, adam = best.get(method), best.get(ADAM)
    out: Dict[str, Optional[float]] = {}
    if ours is not None and adam is not None:
        target = adam.elbo.final
        step, seconds = first_reaching(ours.elbo, target) if math.isfinite(target) else (None, None)
        adam_last = max((i for i, v in zip(adam.elbo.iterations, adam.elbo.values) if v == v), default=None)
        out.update(adam_final_elbo=target, steps_to_adam_final=step, seconds_to_adam_final=seconds,
                   steps_fraction_of_adam=_quotient(step, adam_last),
                   seconds_fraction_of_adam=_quotient(seconds, adam.elbo.total_seconds),
                   step_time_ratio_to_adam=_quotient(timing.get(method, {}).get("median_ms"),
                                                     timing.get(ADAM, {}).get("median_ms")))
    for baseline in BASELINES:
        other = best.get(baseline)
        for metric in ("nll", "ece"):
            mine = ours.test.get(metric) if ours is not None else None
            theirs = other.test.get(metric) if other is not None else None
            out[f"test_{metric}_ratio_to_{baseline}"] = _quotient(mine, theirs)
    return out


# ------------------------------------------------------------------ study
@dataclass
class Results:
    runs: List[Run]
    best: Dict[str, Run]
    timing: Dict[str, dict]
    ratios: Dict[str, Optional[float]]
    num_weights: int
    num_train: int
    num_test: int


def compute(settings: Settings) -> Results:
    """Every setting of every method, the best per method, the round-robin timing and the ratios."""
    data, arch = load_data(settings), architecture(settings)
    configs = [c for m in settings.methods for c in settings.configs(m)]
    bar = progress.bar(len(configs) + 1, "bnn_scale")
    warm_up(settings, data)
    runs = []
    for config in configs:
        bar.set_postfix_str(f"{METHOD_NAMES[config.method]} {config.label}")
        runs.append(run_one(config, settings, data, arch))
        bar.update()
    best = best_runs(runs)
    bar.set_postfix_str("round-robin timing")
    timing = time_round_robin(best, settings, data)
    bar.update()
    bar.close()
    ratios = compute_ratios(best, timing)  # Kronecker NGD's, then VariationalKFAC's under "vkfac_" keys
    ratios.update({f"{VKFAC}_{key}": value for key, value in compute_ratios(best, timing, VKFAC).items()})
    return Results(runs, best, timing, ratios, arch.num_weights, data.x_train.shape[0], data.x_test.shape[0])


def _percent(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.3g}%"


def verdict(results: Results, settings: Settings) -> List[str]:
    """Reach of Adam's final ELBO by Kronecker NGD and by VariationalKFAC (steps and seconds), their per-step
    cost, test NLL and ECE."""
    if OURS not in results.best:
        return ["Kronecker NGD did not run."]
    lines = _verdict_of(results, settings, OURS, "Kronecker NGD", "")
    if VKFAC in results.best:
        lines += _verdict_of(results, settings, VKFAC, "VariationalKFAC", f"{VKFAC}_")
    return lines


def _verdict_of(results: Results, settings: Settings, method: str, name: str, prefix: str) -> List[str]:
    r = {key[len(prefix):]: value for key, value in results.ratios.items() if key.startswith(prefix)}
    best, ours, lines = results.best, results.best[method], []
    if ADAM in best:
        if r.get("steps_to_adam_final") is None:
            lines.append(f"{name} did not reach AutoNormal + Adam's final ELBO ({fmt(r['adam_final_elbo'])} "
                         f"nats per example) within {settings.steps} steps (its own final: {fmt(ours.elbo.final)}).")
        else:
            lines.append(f"{name} reached AutoNormal + Adam's final ELBO ({fmt(r['adam_final_elbo'])} nats per "
                         f"example after {settings.steps} steps) in {_percent(r['steps_fraction_of_adam'])} of "
                         f"Adam's steps and {_percent(r['seconds_fraction_of_adam'])} of its wall time, and ended at "
                         f"{fmt(ours.elbo.final)}.")
        lines.append(f"One {name} step costs {fmt(r.get('step_time_ratio_to_adam'), 2)}x an Adam step "
                     "(median, timed round-robin).")
    parts = [f"{METHOD_NAMES[b]} {fmt(r[f'test_nll_ratio_to_{b}'], 2)}x NLL and {fmt(r[f'test_ece_ratio_to_{b}'], 2)}x "
             "ECE" for b in BASELINES if b in best]
    if ours.test and parts:
        lines.append(f"Test predictive of {name} (NLL {fmt(ours.test['nll'])}, ECE {fmt(ours.test['ece'])}, "
                     f"accuracy {fmt(ours.test['accuracy'])}) against " + "; ".join(parts) + ".")
    return lines


def _row(name: str, run: Run, timing: Dict[str, dict], ratios: dict) -> list:
    adam = ratios.get("adam_final_elbo")
    step, seconds = first_reaching(run.elbo, adam) if adam is not None and math.isfinite(adam) else (None, None)
    ms = timing.get(name, {}).get("median_ms")
    base = timing.get(ADAM, {}).get("median_ms")
    test = run.test
    return [METHOD_NAMES[name], run.config.label, fmt(run.elbo.final), common.reach_text(step),
            common.reach_text(seconds), fmt(run.elbo.total_seconds), fmt(test.get("accuracy")), fmt(test.get("nll")),
            fmt(test.get("ece")), fmt(ms), fmt(_quotient(ms, base), 2), run.status]


def markdown_report(results: Results, settings: Settings, runtime: float) -> str:
    """The best setting per method, the ratios, every run of the grids, the settings."""
    header = ["method", "best setting", "final ELBO / N", "steps to Adam's final", "s to Adam's final",
              "train s", "test acc", "test NLL", f"ECE ({settings.ece_bins} bins)", "ms/step (round-robin)",
              "step / Adam step", "status"]
    body = [_row(name, run, results.timing, results.ratios) for name, run in results.best.items()]
    grid = [[METHOD_NAMES[r.method], r.config.label, fmt(r.elbo.final), fmt(r.test.get("nll")), fmt(r.ms_per_step),
             r.status] for r in results.runs]
    ratios = [[key.replace("_", " "), fmt(value, 4)] for key, value in results.ratios.items()]
    sizes = "-".join(map(str, (40, *settings.hidden, 10)))
    lines = [
        f"Bayesian MLP {sizes} (ReLU, {results.num_weights:,} weights and biases, prior "
        f"N(0, {settings.prior_scale:g}^2) on each) on MNIST-1D: {results.num_train} training and "
        f"{results.num_test} test examples, minibatches of "
        f"{settings.batch_size}, {settings.steps} steps, float32. ELBO / N in nats per training example: "
        f"E_q[log lik] over the whole training split ({settings.elbo_samples} fixed-noise draws) minus KL(q || p) in "
        f"closed form. Test metrics: the predictive mean of {settings.predictive_samples} draws in probability "
        "space. Steps / seconds to Adam's final: the first evaluation at or above AutoNormal + Adam's final ELBO.",
        "", common.markdown_table(header, body),
        "", "## Ratios (Kronecker NGD; `vkfac`: VariationalKFAC)", "",
        common.markdown_table(["quantity", "value"], ratios),
        "", "## Every setting", "", common.markdown_table(["method", "setting", "final ELBO / N", "test NLL",
                                                          "ms/step (in the run)", "status"], grid),
        "", f"Settings: grids NGD lr {common.grid_text(settings.kron_lrs)}, Adam lr "
        f"{common.grid_text(settings.adam_lrs)}, VariationalKFAC lr {common.grid_text(settings.vkfac_lrs)}, IVON lr "
        f"{common.grid_text(settings.ivon_lrs)} x "
        f"hess_init {common.grid_text(settings.ivon_hess_inits)}; Pyro guides' initial std {settings.init_scale:g}; "
        f"per-step times: median of {settings.timing_rounds} round-robin steps after {settings.timing_warmup}; "
        f"seed {settings.seed}; {common.environment_text(runtime)}",
    ]
    return "\n".join(lines) + "\n"


def plot_all(results: Results, settings: Settings, out: Path) -> List[Path]:
    """``-ELBO / N`` of each method's best setting against steps and against training seconds."""
    import matplotlib

    colors = {m: matplotlib.colormaps["tab10"](i) for i, m in enumerate(METHODS)}
    styles = {m: "-" if m in (OURS, "vkfac") else "--" for m in METHODS}
    legend = [(f"{METHOD_NAMES[m]} ({r.config.label})", colors[m], styles[m]) for m, r in results.best.items()]
    paths = []
    for axis, name, xlabel in (("iterations", "elbo_vs_steps.png", "steps"),
                               ("seconds", "elbo_vs_seconds.png", "training time (s, evaluations excluded)")):
        lines = [Line(r.elbo.along(axis), [-v for v in r.elbo.values], colors[m], styles[m])
                 for m, r in results.best.items()]
        paths.append(out / name)
        common.plot_panels(paths[-1], {f"MNIST-1D, {results.num_weights:,} weights": lines}, xlabel=xlabel,
                           ylabel="-ELBO / N (nats per training example)",
                           title="Bayesian MLP: negative ELBO of the best setting per method (lower is better)",
                           legend=legend, ncols=1)
    return paths


def _run_json(run: Run) -> dict:
    return {"method": run.method, **asdict(run.config), "label": run.config.label, "status": run.status,
            "steps": run.elbo.iterations, "seconds": common.rounded(run.elbo.seconds, 6),
            "elbo": common.rounded(run.elbo.values, 8), "train_loss": common.rounded(run.train_loss),
            "ms_per_step": run.ms_per_step, "test": run.test}


def summary_rows(results: Results) -> List[dict]:
    """One row per method at its best setting: final ELBO per example, the test metrics and the step time."""
    rows = []
    for method, run in results.best.items():
        finite = [v for v in run.elbo.values if v == v]
        rows.append({"method": method, "setting": run.config.label, "final_elbo": finite[-1] if finite else math.nan,
                     **{f"test_{k}": v for k, v in run.test.items()},
                     "ms_per_step": results.timing.get(method, {}).get("median_ms", run.ms_per_step)})
    return rows


def write_outputs(results: Results, settings: Settings, out: Path) -> List[Path]:
    """``summary.csv`` (the best setting of each method) and ``results.json``: settings, sizes, every run's
    curves and test metrics, the best per method, the round-robin times and the ratios."""
    common.write_csv(out / "summary.csv", summary_rows(results))
    common.write_json(out / "results.json", {
        "settings": asdict(settings), "num_weights": results.num_weights, "num_train": results.num_train,
        "num_test": results.num_test, "runs": [_run_json(r) for r in results.runs],
        "best": {m: r.config.label for m, r in results.best.items()}, "timing": results.timing,
        "ratios": results.ratios})
    return [out / "summary.csv", out / "results.json"]


STUDY = harness.Study(
    name="bnn_scale", title="Scale: Kronecker NGD on a Bayesian MLP with 10^5 weights (MNIST-1D)",
    presets=PRESETS, full_time="about 20 minutes on 2 cores", dtype=torch.float32, compute=compute,
    report=markdown_report, verdict=verdict, write=write_outputs, plot=plot_all,
)
add_arguments, resolve_settings, run = STUDY.add_arguments, STUDY.resolve_settings, STUDY.run


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m experiments.bnn_scale [options]``."""
    parser = argparse.ArgumentParser(prog="python -m experiments.bnn_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
