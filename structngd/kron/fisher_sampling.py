"""The true Fisher's sampled-label loss: ``-log p(y_hat | output)`` with ``y_hat ~ p(. | output)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


def sampled_label_loss(output: Tensor, likelihood: str, batch_averaged: bool) -> Tensor:
    """``-log p(y_hat | output)`` summed over the batch (``batch_averaged=False``) or averaged.

    ``"categorical"``: ``output`` are logits of shape ``(N, C)``; ``"gaussian"``: means of a
    unit-variance Gaussian, ``-log p = |y - output|^2 / 2`` per example; ``"bernoulli"``:
    logits of independent binary outputs, summed per example. Half / bfloat16 outputs are
    computed in float32.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if likelihood == "categorical" and output.dim() != 2:
        raise ValueError(f"the categorical likelihood needs (N, C) logits, got shape {tuple(output.shape)}: pass "
                         "the logits as the loss sees them, e.g. sequence logits (N, T, V) as "
                         "logits.flatten(0, -2) for a cross-entropy over the flattened tokens")
    if output.dtype not in (torch.float32, torch.float64):
        output = output.float()
    with torch.no_grad():
        logits = output.detach()
        if likelihood == "categorical":
            sampled = torch.distributions.Categorical(logits=logits).sample()
        elif likelihood == "gaussian":
            sampled = logits + torch.randn_like(logits)
        else:
            sampled = torch.bernoulli(torch.sigmoid(logits))
    if likelihood == "categorical":
        return F.cross_entropy(output, sampled, reduction="mean" if batch_averaged else "sum")
    if likelihood == "bernoulli":  # independent pixels / labels: summed per example
        per_example = F.binary_cross_entropy_with_logits(output, sampled, reduction="none").flatten(1).sum(1)
    else:
        per_example = 0.5 * (output - sampled).pow(2).flatten(1).sum(1)
    return per_example.mean() if batch_averaged else per_example.sum()
