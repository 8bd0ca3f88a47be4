"""Data sets, models and predictive metrics of the VI study (``experiments/vi.py``).

Data sets (nothing to download: scikit-learn's bundled copies, or generated):

* ``breast_cancer``: 569 x 30, binary; Bayesian logistic regression (31 weights).
* ``wine``: 178 x 13, 3 classes; ``digits``: 1797 x 64, 10 classes; BNNs, categorical likelihood.
* ``diabetes``: 442 x 10, regression; BNN with a Gaussian likelihood and learned noise.
* ``gap1d``: generated ``y = sin(3 x) + N(0, 0.1^2)`` with training inputs in
  ``[-1.5, -0.5] U [0.5, 1.5]`` and test inputs uniform on ``[-1.5, 1.5]`` (the gap included, so
  test metrics see in-between uncertainty); BNN, Gaussian likelihood, learned noise.
* ``uci_<name>``: the UCI regression benchmark with its standard splits
  (``experiments/uci_data.py``); the seed is the split index. The literature protocol: one hidden
  layer of 50 ReLU units (100 for protein), Gaussian likelihood with learned noise.

Features are standardized with the training split's statistics (constant features only centered),
regression targets too. The split (80/20, stratified for classification; the UCI split ``seed``)
and the generated data depend on the seed. Tensors take the default dtype (float64 in the study).
Problems with a ``y_std`` (the UCI sets) report RMSE and log-likelihood in the original units:
``RMSE * y_std`` and ``loglik - log(y_std)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import pyro
import torch
from pyro import poutine
from torch import Tensor

from models import BNN, BayesianLogisticRegression

from . import uci_data
from .common import fork_rng, rounded


@dataclass(frozen=True)
class ProblemSpec:
    """One data set and the model fitted to it (``hidden``: the BNN's layer sizes; ``None``: logistic regression)."""

    name: str
    task: str  # "binary", "multiclass" or "regression"
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
    y_std: Optional[float] = None  # UCI: the target's training std (metrics in original units)

    @property
    def name(self) -> str:
        return self.spec.name


# -------------------------------------------------------------- loading
_SKLEARN_LOADERS = {"breast_cancer": "load_breast_cancer", "wine": "load_wine", "digits": "load_digits",
                    "diabetes": "load_diabetes"}
UCI_PREFIX = "uci_"
UCI_DATASETS = tuple(UCI_PREFIX + name for name in uci_data.NAMES)
DATASETS = tuple(_SKLEARN_LOADERS) + ("gap1d",) + UCI_DATASETS


def is_uci(name: str) -> bool:
    return name.startswith(UCI_PREFIX)


def _standardize(train: Tensor, test: Tensor) -> Tuple[Tensor, Tensor]:
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


def gap_data(num: int, generator: torch.Generator, gap: bool = True) -> Tuple[Tensor, Tensor]:
    """``num`` points of gap1d (``x`` of shape ``(num, 1)``): inputs in its two intervals, or uniform."""
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
    grid, y_std = None, None
    if is_uci(spec.name):
        *arrays, y_std = uci_data.load_uci(spec.name[len(UCI_PREFIX):], seed, spec.uci_root)
        x_train, y_train, x_test, y_test = (torch.as_tensor(a, dtype=dtype) for a in arrays)
    elif spec.name == "gap1d":
        g = torch.Generator().manual_seed(10_000 + seed)
        num = spec.num_train or 60
        x_train, y_train = gap_data(num, g, gap=True)
        x_test, y_test = gap_data(max(200, num), g, gap=False)
        grid = torch.linspace(-2.5, 2.5, 201, dtype=dtype).unsqueeze(-1)
    elif spec.name in _SKLEARN_LOADERS:
        import sklearn.datasets
        from sklearn.model_selection import train_test_split

        x_np, y_np = getattr(sklearn.datasets, _SKLEARN_LOADERS[spec.name])(return_X_y=True)
        x = torch.as_tensor(x_np, dtype=dtype)
        y = torch.as_tensor(y_np, dtype=dtype if spec.task != "multiclass" else torch.long)
        stratify = y.numpy() if spec.task != "regression" else None
        split = train_test_split(torch.arange(x.shape[0]).numpy(), test_size=spec.test_fraction, random_state=seed,
                                 stratify=stratify)
        train, test = map(torch.as_tensor, split)
        x_train, x_test = _standardize(x[train], x[test])
        y_train, y_test = y[train], y[test]
        if spec.task == "regression":
            y_train, y_test = (v.squeeze(-1) for v in _standardize(y_train.unsqueeze(-1), y_test.unsqueeze(-1)))
    else:
        raise ValueError(f"unknown data set {spec.name!r}; known: {DATASETS}")
    if device is not None:
        x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
        grid = None if grid is None else grid.to(device)
    return Problem(spec, build_model(spec, x_train, y_train), x_train, y_train, x_test, y_test, grid, y_std)


def build_model(spec: ProblemSpec, x: Tensor, y: Tensor):
    """Logistic regression (``hidden=None``, binary task) or a BNN sized for the data."""
    if spec.hidden is None:
        if spec.task != "binary":
            raise ValueError(f"{spec.name}: the logistic model needs a binary task")
        return BayesianLogisticRegression(prior_scale=spec.prior_scale)
    regression = spec.task == "regression"
    return BNN(x.shape[1], 1 if regression else int(y.max()) + 1, hidden=spec.hidden, activation=spec.activation,
               likelihood="gaussian" if regression else "categorical", prior_scale=spec.prior_scale)


def latent_dim(problem: Problem) -> int:
    """Number of unconstrained latent variables of ``problem``'s model."""
    return problem.x_train.shape[1] + 1 if problem.spec.hidden is None else problem.model.latent_dim


# -------------------------------------------------------- presets of problems
_SIZED_SPECS = {
    "tiny": (ProblemSpec("breast_cancer", "binary"), ProblemSpec("gap1d", "regression", hidden=(8,), num_train=40)),
    "quick": (ProblemSpec("breast_cancer", "binary"), ProblemSpec("wine", "multiclass", hidden=(4,)),
              ProblemSpec("gap1d", "regression", hidden=(16,), num_train=60)),
    "full": (ProblemSpec("breast_cancer", "binary"), ProblemSpec("wine", "multiclass", hidden=(8,)),
             ProblemSpec("digits", "multiclass", hidden=(8,)), ProblemSpec("diabetes", "regression", hidden=(8,)),
             ProblemSpec("gap1d", "regression", hidden=(50,), num_train=80)),
}


def problem_specs(size: str) -> Dict[str, ProblemSpec]:
    """The problems of each study size (``tiny``, ``quick``, ``full``); every size also knows every
    UCI problem (the literature protocol, so ``--problems uci_yacht`` works with any preset)."""
    if size not in _SIZED_SPECS:
        raise ValueError(f"unknown size {size!r}")
    uci = {UCI_PREFIX + name: ProblemSpec(UCI_PREFIX + name, "regression", hidden=(units,), activation="relu")
           for name, units in uci_data.HIDDEN_UNITS.items()}
    return {**uci, **{spec.name: spec for spec in _SIZED_SPECS[size]}}


# ------------------------------------------------------- predictive metrics
def predictive_distribution(problem: Problem, guide, x: torch.Tensor, samples: int, seed: int):
    """The likelihood ``p(y | x, theta_s)`` (batch ``(samples, n)``) for posterior draws."""
    with torch.no_grad(), fork_rng(x.device):
        torch.manual_seed(seed)
        with pyro.plate("_posterior_samples", samples, dim=-2):
            guide_trace = poutine.trace(guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(problem.model, trace=guide_trace)).get_trace(x)
    return model_trace.nodes["y"]["fn"]


def _interval90(fn) -> Tensor:
    """The 5% and 95% quantiles (stacked) of one draw of ``y`` per posterior sample."""
    draws = fn.sample()
    return torch.quantile(draws, draws.new_tensor([0.05, 0.95]), dim=0)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """ECE: bin-weighted ``|accuracy - confidence|`` over equal-width confidence bins."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).to(probs.dtype)
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype, device=probs.device)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            gap = abs(correct[inside].mean().item() - confidence[inside].mean().item())
            ece += inside.to(probs.dtype).mean().item() * gap
    return ece


def test_metrics(problem: Problem, guide, samples: int, seed: int) -> Dict[str, float]:
    """Posterior predictive on the test split: log-likelihood, accuracy/ECE or RMSE/coverage."""
    fn = predictive_distribution(problem, guide, problem.x_test, samples, seed)
    y, y_std = problem.y_test, problem.y_std
    lpd = (torch.logsumexp(fn.log_prob(y), 0) - math.log(samples)).mean().item()
    out = {"test_loglik": lpd if y_std is None else lpd - math.log(y_std)}
    if problem.spec.task == "regression":
        lo, hi = _interval90(fn)
        out["rmse"] = (fn.mean.mean(0) - y).pow(2).mean().sqrt().item() * (1.0 if y_std is None else y_std)
        out["coverage90"] = ((y >= lo) & (y <= hi)).double().mean().item()
    else:
        probs = fn.probs.mean(0)
        if problem.spec.task == "binary":
            probs = torch.stack([1 - probs, probs], -1)
        out["accuracy"] = (probs.argmax(-1) == y.long()).double().mean().item()
        out["ece"] = expected_calibration_error(probs, y.long())
    return out


def predictive_band(problem: Problem, guide, samples: int, seed: int) -> Dict[str, List[float]]:
    """Predictive mean and 5% / 95% quantiles of ``y`` on ``problem.x_grid``."""
    fn = predictive_distribution(problem, guide, problem.x_grid, samples, seed)
    lo, hi = _interval90(fn)
    rnd = lambda t: rounded(t.tolist())
    return {"x": rnd(problem.x_grid.squeeze(-1)), "mean": rnd(fn.mean.mean(0)), "lo": rnd(lo), "hi": rnd(hi)}
