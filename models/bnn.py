"""Bayesian neural network (MLP) as a ``pyro.nn.PyroModule``: ``model(x, y=None)``.

Every weight and bias has an independent ``Normal(0, prior_scale)`` prior (``PyroSample``
sites ``layers.<i>.weight`` of shape ``(out, in)`` and ``layers.<i>.bias`` of shape
``(out,)``); a Gaussian likelihood adds a learned observation noise ``sigma`` (a
``LogNormal`` latent site, so it is part of the guide, constrained to ``sigma > 0``); a
heteroscedastic one has two output heads, the mean and a variance
``softplus(raw) + VARIANCE_FLOOR`` (:func:`heteroscedastic_variance`), and no ``sigma`` site.

Vectorized particles: under ``Trace_ELBO(vectorize_particles=True)`` or
``Predictive(parallel=True)`` the weights carry extra leading batch dimensions
``(..., 1, out, in)``, the trailing ``1`` being the slot of the data plate (``dim=-1``).
The network is evaluated with broadcasting matrix products in that layout and the data
dimension is moved into the data plate's slot at the end, so the likelihood has batch
shape ``(..., n)``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import Tensor, nn

LIKELIHOODS = ("gaussian", "heteroscedastic", "categorical")
#: smallest variance of the heteroscedastic likelihood (keeps its log-density finite)
VARIANCE_FLOOR = 1e-6
ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "sigmoid": torch.sigmoid,
}


def heteroscedastic_variance(raw: Tensor) -> Tensor:
    """The variance head's output ``raw`` as a variance: ``softplus(raw) + VARIANCE_FLOOR``."""
    return nn.functional.softplus(raw) + VARIANCE_FLOOR


def _set_reference(module: nn.Module, reference: Tensor) -> None:
    """A plain (non-buffer) scalar whose dtype and device the priors take."""
    object.__setattr__(module, "_reference", reference)


def _plate_slot(value: Tensor, event_dim: int) -> Tensor:
    """Give a global site's value with batch dims a trailing singleton (the data plate's slot).

    Pyro's own vectorized particles already have it (``(..., 1, *event)``); samples that
    ``Predictive(parallel=True, guide=...)`` passes in come as ``(num_samples, *event)``.
    A global site is never inside the data plate, so a trailing batch size other than 1
    can only be a particle dimension.
    """
    if value.dim() > event_dim and value.shape[value.dim() - event_dim - 1] != 1:
        value = value.unsqueeze(value.dim() - event_dim)
    return value


class BayesianLinear(PyroModule):
    """An affine layer with ``Normal(0, prior_scale)`` priors on its weight and bias."""

    def __init__(self, in_features: int, out_features: int, prior_scale: float = 1.0):
        super().__init__()
        self.in_features, self.out_features, self.prior_scale = in_features, out_features, float(prior_scale)
        _set_reference(self, torch.zeros(()))
        self.weight = PyroSample(lambda self: self._prior([self.out_features, self.in_features]))
        self.bias = PyroSample(lambda self: self._prior([self.out_features]))

    def _prior(self, shape) -> dist.Distribution:
        # dtype and device follow the data of the current call (see BNN.forward)
        return dist.Normal(self._reference, self.prior_scale).expand(shape).to_event(len(shape))

    @staticmethod
    def apply(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``h W^T + b`` for ``h`` of shape ``(..., n, in)`` and parameters with leading batch dims."""
        return h @ weight.transpose(-1, -2) + bias.unsqueeze(-2)


class BNN(PyroModule):
    """MLP with Gaussian priors on all weights and biases.

    Args:
        in_features: number of input features ``p`` (``x`` has shape ``(n, p)``).
        out_features: outputs: ``1`` for ``likelihood="gaussian"``, ``2`` (mean and raw variance)
            for ``"heteroscedastic"``, the number of classes for ``"categorical"``.
        hidden: hidden layer sizes (``()`` gives a Bayesian linear / softmax regression).
        activation: ``"tanh"``, ``"relu"``, ``"gelu"``, ``"silu"``, ``"sigmoid"`` or a callable.
        likelihood: ``"gaussian"`` (``y ~ N(f(x), sigma^2)`` with latent
            ``sigma ~ LogNormal(log noise_median, noise_log_scale)``), ``"heteroscedastic"``
            (``y ~ N(f_0(x), softplus(f_1(x)) + VARIANCE_FLOOR)``, no noise site) or ``"categorical"``
            (``y ~ Categorical(logits=f(x))``, integer labels).
        prior_scale: standard deviation of the weight and bias priors.
        noise_median, noise_log_scale: the prior of ``sigma`` (Gaussian likelihood only).
        subsample_size: subsample the data plate (Pyro rescales the likelihood).

    ``forward(x, y=None)`` returns the predictive mean ``f(x)`` (shape ``(..., n)``) for a
    Gaussian or heteroscedastic likelihood, the logits (``(..., n, classes)``) for a categorical one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        hidden: Sequence[int] = (50,),
        activation: Union[str, Callable[[Tensor], Tensor]] = "tanh",
        likelihood: str = "gaussian",
        prior_scale: float = 1.0,
        noise_median: float = 0.5,
        noise_log_scale: float = 1.0,
        subsample_size: Optional[int] = None,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood == "gaussian" and out_features != 1:
            raise ValueError(f"a gaussian likelihood needs out_features=1, got {out_features}")
        if likelihood == "heteroscedastic" and out_features != 2:
            raise ValueError(f"a heteroscedastic likelihood needs out_features=2 (mean, variance), got {out_features}")
        if likelihood == "categorical" and out_features < 2:
            raise ValueError(f"a categorical likelihood needs out_features >= 2 classes, got {out_features}")
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}")
            activation = ACTIVATIONS[activation]
        if not (prior_scale > 0 and noise_median > 0 and noise_log_scale > 0):
            raise ValueError("prior_scale, noise_median and noise_log_scale must be > 0")
        sizes = [int(in_features), *map(int, hidden), int(out_features)]
        if min(sizes) < 1:
            raise ValueError(f"layer sizes must be positive, got {sizes}")
        self.sizes, self.activation, self.likelihood = tuple(sizes), activation, likelihood
        self.prior_scale, self.subsample_size = float(prior_scale), subsample_size
        self.layers = PyroModule[nn.ModuleList](
            [BayesianLinear(a, b, prior_scale) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        self.noise_median, self.noise_log_scale = float(noise_median), float(noise_log_scale)
        _set_reference(self, torch.zeros(()))
        if likelihood == "gaussian":
            self.sigma = PyroSample(
                lambda self: dist.LogNormal(self._reference + math.log(self.noise_median), self.noise_log_scale)
            )

    @property
    def num_weights(self) -> int:
        """Number of weights and biases (the latent dimension without ``sigma``)."""
        return sum(a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def latent_dim(self) -> int:
        """Total number of scalar latent variables (weights, biases and ``sigma`` if any)."""
        return self.num_weights + (1 if self.likelihood == "gaussian" else 0)

    def network(self, x: Tensor, params) -> Tensor:
        """The MLP output for inputs ``x`` of shape ``(n, p)`` and ``params`` =
        ``[(weight, bias), ...]`` with common leading batch dims ``batch``.

        Returns shape ``(n, out)`` without batch dims; with batch dims ``batch = (..., 1)``
        (the ``1`` is the data plate's slot) it returns ``(..., n, out)``.
        """
        h = x
        last = len(params) - 1
        for i, (weight, bias) in enumerate(params):
            h = BayesianLinear.apply(h, weight, bias)
            if i < last:
                h = self.activation(h)
        if h.dim() > 2:  # (..., 1, n, out): move n into the data plate's slot
            if h.shape[-3] != 1:
                raise ValueError(
                    "weights with batch dims must have a trailing singleton for the data plate "
                    f"(dim=-1), got output shape {tuple(h.shape)}"
                )
            h = h.squeeze(-3)
        return h

    def forward(self, x: Tensor, y: Optional[Tensor] = None, data_size: Optional[int] = None) -> Tensor:
        """``data_size``: the size of the whole data set when ``x, y`` are a minibatch of it (the
        likelihood is scaled by ``data_size / n``; not with ``subsample_size``)."""
        if x.dim() != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"x must have shape (n, {self.sizes[0]}), got {tuple(x.shape)}")
        if y is not None and y.shape != x.shape[:1]:
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        reference = x.new_zeros(())  # priors in the dtype and on the device of x
        for module in (self, *self.layers):
            _set_reference(module, reference)
        # sample every global latent outside the data plate
        params = [(_plate_slot(layer.weight, 2), _plate_slot(layer.bias, 1)) for layer in self.layers]
        sigma = _plate_slot(self.sigma, 0) if self.likelihood == "gaussian" else None
        with self._data_plate(x, data_size) as idx:
            out = self.network(x[idx], params)
            obs = None if y is None else y[idx]
            if self.likelihood == "gaussian":
                mean = out.squeeze(-1)
                pyro.sample("y", dist.Normal(mean, sigma), obs=obs)
                return mean
            if self.likelihood == "heteroscedastic":
                mean, variance = out[..., 0], heteroscedastic_variance(out[..., 1])
                pyro.sample("y", dist.Normal(mean, variance.sqrt()), obs=obs)
                return mean
            pyro.sample("y", dist.Categorical(logits=out), obs=obs)
            return out

    def _data_plate(self, x: Tensor, data_size: Optional[int]) -> pyro.plate:
        """The data plate: over ``x``, subsampled by ``subsample_size``, or ``x`` as a minibatch of ``data_size``."""
        if data_size is None:
            return pyro.plate("data", x.shape[0], subsample_size=self.subsample_size)
        if self.subsample_size is not None:
            raise ValueError("data_size and subsample_size cannot be combined")
        if int(data_size) < x.shape[0]:
            raise ValueError(f"data_size must be at least the batch size {x.shape[0]}, got {data_size}")
        return pyro.plate("data", int(data_size), subsample=torch.arange(x.shape[0], device=x.device))
