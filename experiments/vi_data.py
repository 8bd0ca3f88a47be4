"""Data sets, models and guides of the VI study (``experiments/vi.py``) and of
``benchmarks/vi_logistic.py``.

Data sets (nothing to download: scikit-learn's bundled copies, or generated):

* ``breast_cancer``: 569 x 30, binary; Bayesian logistic regression (31 weights).
* ``wine``: 178 x 13, 3 classes; BNN with a categorical likelihood.
* ``digits``: 1797 x 64 (8 x 8 images), 10 classes; BNN, categorical likelihood.
* ``diabetes``: 442 x 10, regression; BNN with a Gaussian likelihood and learned noise.
* ``gap1d``: generated 1-D regression ``y = sin(3 x) + N(0, 0.1^2)`` with training inputs in
  ``[-1.5, -0.5] U [0.5, 1.5]`` (a gap around 0) and test inputs uniform on ``[-1.5, 1.5]``
  (the gap included, so test metrics see in-between uncertainty); BNN, Gaussian likelihood,
  learned noise.
* ``uci_<name>`` (``uci_boston``, ``uci_concrete``, ``uci_energy``, ``uci_kin8nm``,
  ``uci_naval``, ``uci_power``, ``uci_protein``, ``uci_wine``, ``uci_yacht``): the UCI regression
  benchmark with its standard splits (``experiments/uci_data.py``, vendored in
  ``experiments/data/uci``); the seed is the split index (0..19, protein 0..4). The literature
  protocol: a BNN with one hidden layer of 50 ReLU units (100 for protein), Gaussian likelihood
  with learned noise; test RMSE and log-likelihood reported in the target's original units.

Features are standardized with the training split's mean and standard deviation
(constant features are left centered); regression targets of ``diabetes`` and the UCI sets
too. The train/test split (80/20, stratified for classification; the fixed split ``seed`` for
UCI) and the generated data depend on the seed. Everything is float64 (the current default
dtype when the tensors are made).

Predictive metrics (Monte Carlo posterior predictive of any guide): ``test_metrics`` (test
log-likelihood; accuracy and ECE or RMSE and 90%-interval coverage) and ``predictive_band``.
Problems with ``extra["y_std"]`` (the UCI sets) report RMSE and log-likelihood in the original
units: ``RMSE * y_std`` and ``loglik - log(y_std)``.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import pyro
import torch
from pyro import poutine
from torch import Tensor

from models import BNN, BayesianLogisticRegression

from . import uci_data
from .common import fork_rng, rounded

TASKS = ("binary", "multiclass", "regression")


@dataclass(frozen=True)
class ProblemSpec:
    """One data set and the model fitted to it.

    ``hidden`` is the BNN's hidden layer sizes (``None``: the logistic regression model).
    """

    name: str
    task: str
    hidden: Optional[Tuple[int, ...]] = None
    activation: str = "tanh"
    prior_scale: float = 1.0
    test_fraction: float = 0.2
    num_train: Optional[int] = None  # gap1d only: number of generated training points
    uci_root: Optional[str] = None  # UCI only: original folder layout instead of the vendored npz

    @property
    def label(self) -> str:
        if self.hidden is None:
            return f"{self.name} (logistic)"
        return f"{self.name} (BNN {'-'.join(map(str, self.hidden)) or 'linear'})"


@dataclass
class Problem:
    """A data set split and its model (``model(x, y=None)``)."""

    spec: ProblemSpec
    model: Callable
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_grid: Optional[Tensor] = None  # 1-D inputs for uncertainty plots (gap1d)
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


# -------------------------------------------------------------- loading
_SKLEARN = {
    "breast_cancer": ("load_breast_cancer", "binary"),
    "wine": ("load_wine", "multiclass"),
    "digits": ("load_digits", "multiclass"),
    "diabetes": ("load_diabetes", "regression"),
}
UCI_PREFIX = "uci_"
UCI_DATASETS = tuple(UCI_PREFIX + name for name in uci_data.NAMES)
DATASETS = tuple(_SKLEARN) + ("gap1d",) + UCI_DATASETS


def is_uci(name: str) -> bool:
    return name.startswith(UCI_PREFIX)


def uci_spec(name: str) -> ProblemSpec:
    """The literature protocol for a UCI set (``uci_boston`` or ``boston``): one hidden layer of
    50 ReLU units (100 for protein), ``Normal(0, 1)`` weight priors, learned noise."""
    short = name[len(UCI_PREFIX):] if is_uci(name) else name
    short = uci_data.short_name(short)
    return ProblemSpec(UCI_PREFIX + short, "regression", hidden=(uci_data.HIDDEN_UNITS[short],), activation="relu")


def _standardize(train: Tensor, test: Tensor) -> Tuple[Tensor, Tensor]:
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


def _split(x: Tensor, y: Tensor, task: str, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = torch.arange(x.shape[0]).numpy()
    stratify = y.numpy() if task != "regression" else None
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    return x[train], y[train], x[test], y[test]


def gap_data(num: int, generator: torch.Generator, gap: bool = True) -> Tuple[Tensor, Tensor]:
    """``num`` points of ``y = sin(3x) + N(0, 0.1^2)``; inputs in ``[-1.5,-0.5] U [0.5,1.5]``
    (``gap=True``) or uniform on ``[-1.5, 1.5]``. ``x`` has shape ``(num, 1)``."""
    dtype = torch.get_default_dtype()
    u = torch.rand(num, generator=generator, dtype=dtype)
    if gap:
        sign = torch.where(torch.rand(num, generator=generator, dtype=dtype) < 0.5, -1.0, 1.0)
        x = sign * (0.5 + u)
    else:
        x = 3.0 * u - 1.5
    y = torch.sin(3.0 * x) + 0.1 * torch.randn(num, generator=generator, dtype=dtype)
    return x.unsqueeze(-1), y


def load(spec: ProblemSpec, seed: int, device=None) -> Problem:
    """The split of ``spec``'s data set for ``seed`` (standardized) and its model; the tensors are
    made on the CPU (the same split everywhere) and moved to ``device`` (the models follow their
    inputs' device)."""
    dtype = torch.get_default_dtype()
    grid, extra = None, {}
    if is_uci(spec.name):
        *arrays, y_std = uci_data.load_uci(spec.name[len(UCI_PREFIX):], seed, spec.uci_root)
        x_train, y_train, x_test, y_test = (torch.as_tensor(a, dtype=dtype) for a in arrays)
        extra = {"y_std": y_std, "split": seed}
    elif spec.name == "gap1d":
        g = torch.Generator().manual_seed(10_000 + seed)
        num = spec.num_train or 60
        x_train, y_train = gap_data(num, g, gap=True)
        x_test, y_test = gap_data(max(200, num), g, gap=False)
        grid = torch.linspace(-2.5, 2.5, 201, dtype=dtype).unsqueeze(-1)
    elif spec.name in _SKLEARN:
        import sklearn.datasets

        loader, task = _SKLEARN[spec.name]
        x_np, y_np = getattr(sklearn.datasets, loader)(return_X_y=True)
        x = torch.as_tensor(x_np, dtype=dtype)
        y = torch.as_tensor(y_np, dtype=dtype if task != "multiclass" else torch.long)
        x_train, y_train, x_test, y_test = _split(x, y, task, spec.test_fraction, seed)
        x_train, x_test = _standardize(x_train, x_test)
        if task == "regression":
            y_train, y_test = (v.squeeze(-1) for v in _standardize(y_train.unsqueeze(-1), y_test.unsqueeze(-1)))
    else:
        raise ValueError(f"unknown data set {spec.name!r}; known: {DATASETS}")
    if device is not None:
        x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
        grid = None if grid is None else grid.to(device)
    return Problem(spec, build_model(spec, x_train, y_train), x_train, y_train, x_test, y_test, grid, extra)


def build_model(spec: ProblemSpec, x: Tensor, y: Tensor):
    """Logistic regression (``hidden=None``, binary task) or a BNN sized for the data."""
    if spec.hidden is None:
        if spec.task != "binary":
            raise ValueError(f"{spec.name}: the logistic model needs a binary task")
        return BayesianLogisticRegression(prior_scale=spec.prior_scale)
    if spec.task == "regression":
        return BNN(x.shape[1], 1, hidden=spec.hidden, activation=spec.activation, likelihood="gaussian",
                   prior_scale=spec.prior_scale)
    classes = int(y.max()) + 1
    return BNN(x.shape[1], classes, hidden=spec.hidden, activation=spec.activation, likelihood="categorical",
               prior_scale=spec.prior_scale)


def latent_dim(spec: ProblemSpec, problem: Optional[Problem] = None) -> int:
    """Number of unconstrained latent variables of ``spec``'s model."""
    problem = problem or load(spec, 0)
    if spec.hidden is None:
        return problem.x_train.shape[1] + 1
    return problem.model.latent_dim


# -------------------------------------------------------- presets of problems
def problem_specs(size: str) -> Dict[str, ProblemSpec]:
    """The problems of each study size: ``tiny`` (smoke test), ``quick``, ``full``.

    Every size also knows every UCI problem (the literature protocol, the same at all sizes), so
    ``--problems uci_yacht`` works with any preset.
    """
    specs = _sized_specs(size)
    return {**{name: uci_spec(name) for name in UCI_DATASETS}, **specs}


def _sized_specs(size: str) -> Dict[str, ProblemSpec]:
    if size == "tiny":
        return {
            "breast_cancer": ProblemSpec("breast_cancer", "binary"),
            "gap1d": ProblemSpec("gap1d", "regression", hidden=(8,), num_train=40),
        }
    if size == "quick":
        return {
            "breast_cancer": ProblemSpec("breast_cancer", "binary"),
            "wine": ProblemSpec("wine", "multiclass", hidden=(4,)),
            "gap1d": ProblemSpec("gap1d", "regression", hidden=(16,), num_train=60),
        }
    if size == "full":
        return {
            "breast_cancer": ProblemSpec("breast_cancer", "binary"),
            "wine": ProblemSpec("wine", "multiclass", hidden=(8,)),
            "digits": ProblemSpec("digits", "multiclass", hidden=(8,)),
            "diabetes": ProblemSpec("diabetes", "regression", hidden=(8,)),
            "gap1d": ProblemSpec("gap1d", "regression", hidden=(50,), num_train=80),
        }
    raise ValueError(f"unknown size {size!r}")


# ------------------------------------------------------- predictive metrics
def predictive_distribution(problem: Problem, guide, x: torch.Tensor, samples: int, seed: int):
    """The likelihood ``p(y | x, theta_s)`` (batch ``(samples, n)``) for posterior draws."""
    with torch.no_grad(), fork_rng(x.device):
        torch.manual_seed(seed)
        with pyro.plate("_posterior_samples", samples, dim=-2):
            guide_trace = poutine.trace(guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(problem.model, trace=guide_trace)).get_trace(x)
    return model_trace.nodes["y"]["fn"]


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """ECE: bin-weighted ``|accuracy - confidence|`` over equal-width confidence bins."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).to(probs.dtype)
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype, device=probs.device)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.to(probs.dtype).mean().item() * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    return ece


def test_metrics(problem: Problem, guide, samples: int, seed: int) -> Dict[str, float]:
    """Posterior predictive on the test split: log-likelihood, accuracy/ECE or RMSE/coverage."""
    fn = predictive_distribution(problem, guide, problem.x_test, samples, seed)
    y = problem.y_test
    log_lik = fn.log_prob(y)  # (samples, n)
    lpd = (torch.logsumexp(log_lik, 0) - math.log(samples)).mean().item()
    y_std = problem.extra.get("y_std")
    out = {"test_loglik": lpd if y_std is None else lpd - math.log(y_std)}
    task = problem.spec.task
    if task == "binary":
        p1 = fn.probs.mean(0)
        probs = torch.stack([1 - p1, p1], -1)
    elif task == "multiclass":
        probs = fn.probs.mean(0)
    if task in ("binary", "multiclass"):
        out["accuracy"] = (probs.argmax(-1) == y.long()).double().mean().item()
        out["ece"] = expected_calibration_error(probs, y.long())
    else:
        mean = fn.mean.mean(0)
        draws = fn.sample()
        lo, hi = torch.quantile(draws, draws.new_tensor([0.05, 0.95]), dim=0)
        out["rmse"] = (mean - y).pow(2).mean().sqrt().item() * (1.0 if y_std is None else y_std)
        out["coverage90"] = ((y >= lo) & (y <= hi)).double().mean().item()
    return out


def predictive_band(problem: Problem, guide, samples: int, seed: int) -> Dict[str, List[float]]:
    """Predictive mean and 5% / 95% quantiles of ``y`` on ``problem.x_grid``."""
    fn = predictive_distribution(problem, guide, problem.x_grid, samples, seed)
    draws = fn.sample()
    lo, hi = torch.quantile(draws, draws.new_tensor([0.05, 0.95]), dim=0)
    rnd = lambda t: rounded(t.tolist())
    return {"x": rnd(problem.x_grid.squeeze(-1)), "mean": rnd(fn.mean.mean(0)), "lo": rnd(lo), "hi": rnd(hi)}
