"""The deep autoencoder of the KFAC paper (Martens & Grosse 2015), after Hinton & Salakhutdinov (2006).

CURVES: encoder 784-400-200-100-50-25-6, the mirrored decoder 6-25-50-100-200-400-784, a
nonlinearity after every layer except the code layer (linear, as in Hinton & Salakhutdinov)
and the output layer, whose logits parameterize independent Bernoulli pixels (the loss is the
logistic cross-entropy against intensities in ``[0, 1]``, summed over pixels and averaged over
examples). The default is scaled down for CPU: 16x16 inputs, 256-200-100-50-25-6.

Every parameterized layer is an ``nn.Linear``, so ``structngd.kron`` preconditions all of them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the CURVES architecture of Hinton & Salakhutdinov (2006) and Martens & Grosse (2015)
CURVES_SIZES = (784, 400, 200, 100, 50, 25, 6)
#: the scaled-down default for 16x16 images
SMALL_SIZES = (256, 200, 100, 50, 25, 6)

INITS = ("sparse", "xavier", "torch")
ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "softplus": nn.Softplus}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class DeepAutoencoder(nn.Module):
    """Fully connected autoencoder ``sizes[0] -> ... -> sizes[-1] (code) -> ... -> sizes[0]``.

    Args:
        sizes: the encoder's widths, input first, code last; the decoder mirrors them.
        activation: ``"tanh"`` (default), ``"sigmoid"`` (logistic units, as in Hinton &
            Salakhutdinov), ``"relu"`` or ``"softplus"``; none after the code layer and the
            output layer.
        init: ``"xavier"`` (default: Glorot normal with the activation's gain, zero biases),
            ``"sparse"`` (Martens 2010, used by the KFAC paper with logistic units:
            ``sparse_inputs`` incoming weights per unit drawn from ``N(0, 1)``, the others and
            the biases 0; it saturates tanh units) or ``"torch"`` (``nn.Linear``'s default).
        sparse_inputs: nonzero incoming weights per unit of the sparse initialization (all
            of them for layers with fewer inputs).

    ``forward(x)`` flattens ``x`` to ``(N, sizes[0])`` and returns the output logits of that
    shape; :meth:`loss` is the training objective.
    """

    def __init__(
        self, sizes: Sequence[int] = SMALL_SIZES, activation: str = "tanh", init: str = "xavier",
        sparse_inputs: int = 15,
    ):
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes needs at least two positive widths, got {sizes}")
        _activation(activation)  # validate the name
        self.sizes, self.activation = sizes, activation
        self.encoder = self._stack(sizes, activation)
        self.decoder = self._stack(sizes[::-1], activation)
        self.reset_parameters(init, sparse_inputs)

    @torch.no_grad()
    def reset_parameters(self, init: str = "xavier", sparse_inputs: int = 15) -> None:
        """Re-initialize every layer (see the class docstring); draws from torch's global RNG."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        gain = nn.init.calculate_gain(self.activation) if self.activation in ("tanh", "sigmoid", "relu") else 1.0
        for layer in self.modules():
            if not isinstance(layer, nn.Linear):
                continue
            if init == "torch":
                layer.reset_parameters()
                continue
            layer.bias.zero_()
            if init == "xavier":
                nn.init.xavier_normal_(layer.weight, gain=gain)
            else:
                out_dim, in_dim = layer.weight.shape
                k = min(sparse_inputs, in_dim)
                scores = torch.rand(out_dim, in_dim)
                mask = torch.zeros(out_dim, in_dim).scatter_(1, scores.topk(k, dim=1).indices, 1.0)
                layer.weight.copy_(torch.randn(out_dim, in_dim) * mask)

    @staticmethod
    def _stack(sizes: Sequence[int], activation: str) -> nn.Sequential:
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(_activation(activation))
        return nn.Sequential(*layers)

    @property
    def input_dim(self) -> int:
        return self.sizes[0]

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x.reshape(x.shape[0], -1))

    def forward(self, x: Tensor) -> Tensor:
        """Output logits, ``(N, sizes[0])``."""
        return self.decoder(self.encode(x))

    def loss(self, x: Tensor) -> Tensor:
        """Bernoulli cross-entropy, summed over pixels, averaged over examples (see :func:`loss`)."""
        return loss(self, x)

    def squared_error(self, x: Tensor) -> Tensor:
        """Reconstruction error ``||sigmoid(logits) - x||^2`` summed over pixels, averaged over
        examples (the error the autoencoder papers report)."""
        target = x.reshape(x.shape[0], -1)
        return (torch.sigmoid(self(x)) - target).pow(2).sum(1).mean()


def loss(model: nn.Module, x: Tensor) -> Tensor:
    """``mean_n sum_pixels BCE(logits, x)`` for a model returning logits of ``x``'s flattened shape.

    A mean over the batch of per-example negative log-likelihoods, as ``structngd.kron``
    expects (``batch_averaged=True``).
    """
    target = x.reshape(x.shape[0], -1)
    logits = model(x)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / x.shape[0]
