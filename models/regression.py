"""Plain ``torch.nn`` regression nets: one hidden layer, a mean head and a noise model.

``RegressionMLP(in_features, hidden, noise, dropout)`` maps ``x`` of shape ``(n, p)`` to the mean
and variance of ``y ~ N(mean, variance)``, each of shape ``(n,)``:

* ``noise="homoscedastic"``: one learned variance ``exp(2 log_noise)`` for every input;
* ``noise="heteroscedastic"``: a second output head, ``variance = softplus(raw) + VARIANCE_FLOOR``
  (:func:`models.bnn.heteroscedastic_variance`, as ``models.BNN``'s heteroscedastic likelihood).

``dropout > 0`` drops hidden units (inverted dropout) in training mode, and in evaluation mode too
while :meth:`RegressionMLP.mc_dropout` is on (MC dropout).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Tuple

import torch
from torch import Tensor, nn

from .bnn import heteroscedastic_variance

NOISE_MODELS = ("homoscedastic", "heteroscedastic")


class RegressionMLP(nn.Module):
    """``in_features -> hidden (ReLU, dropout) -> mean [, raw variance]``.

    Args:
        in_features: input features ``p``.
        hidden: hidden units of the single hidden layer.
        noise: ``"homoscedastic"`` (a learned ``log_noise``, the log standard deviation, starting at
            ``log initial_noise``) or ``"heteroscedastic"`` (a variance head).
        dropout: dropout rate on the hidden units, in ``[0, 1)``.
        initial_noise: the homoscedastic noise's starting standard deviation.
    """

    def __init__(self, in_features: int, hidden: int = 50, noise: str = "homoscedastic", dropout: float = 0.0,
                 initial_noise: float = 0.5):
        super().__init__()
        if noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
        if int(in_features) < 1 or int(hidden) < 1:
            raise ValueError(f"in_features and hidden must be positive, got {in_features} and {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not initial_noise > 0:
            raise ValueError(f"initial_noise must be > 0, got {initial_noise}")
        self.noise, self.dropout = noise, float(dropout)
        self.hidden = nn.Linear(int(in_features), int(hidden))
        self.head = nn.Linear(int(hidden), 2 if noise == "heteroscedastic" else 1)
        if noise == "homoscedastic":
            self.log_noise = nn.Parameter(torch.tensor(math.log(initial_noise)))
        self._mc = False

    @contextlib.contextmanager
    def mc_dropout(self) -> Iterator[None]:
        """Within: dropout stays on whatever the mode (each forward pass is one MC dropout sample)."""
        before, self._mc = self._mc, True
        try:
            yield
        finally:
            self._mc = before

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(mean, variance)`` of ``y`` given ``x`` of shape ``(n, p)``, each of shape ``(n,)``."""
        if x.dim() != 2 or x.shape[1] != self.hidden.in_features:
            raise ValueError(f"x must have shape (n, {self.hidden.in_features}), got {tuple(x.shape)}")
        h = torch.relu(self.hidden(x))
        if self.dropout > 0:
            h = nn.functional.dropout(h, self.dropout, training=self.training or self._mc)
        out = self.head(h)
        if self.noise == "heteroscedastic":
            return out[:, 0], heteroscedastic_variance(out[:, 1])
        return out[:, 0], torch.exp(2 * self.log_noise).expand(x.shape[0])

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """``log N(y | mean(x), variance(x))`` per point, shape ``(n,)``."""
        mean, variance = self(x)
        return torch.distributions.Normal(mean, variance.sqrt()).log_prob(y)
