"""Data sets of the deep-learning study, all generated or bundled locally (nothing downloads).

* :func:`curves`: CURVES-style images (Hinton & Salakhutdinov 2006): one random smooth curve
  per image, a cubic Bezier curve with random control points drawn as a thin anti-aliased
  stroke into a ``size x size`` image with intensities in ``[0, 1]``;
* :func:`digits`: scikit-learn's bundled 8x8 handwritten digits (1797 images), scaled to
  ``[0, 1]``;
* :func:`mnist1d`: MNIST-1D (Greydanus 2020) from the ``mnist1d`` package's local generator
  (``make_dataset``; never ``get_dataset``, which may download or write a cache file): 40-long
  signals standardized to mean 0, std 1, 10 classes.

Every function is deterministic in its ``seed`` and returns a :class:`Dataset` of float32
inputs (and int64 labels for the classification sets).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor


@dataclass
class Dataset:
    """Train / test tensors; ``y_*`` are ``None`` for unlabeled (autoencoder) data."""

    name: str
    x_train: Tensor
    x_test: Tensor
    y_train: Optional[Tensor] = None
    y_test: Optional[Tensor] = None

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.y_train is None else int(self.y_train.max()) + 1


# ------------------------------------------------------------------ CURVES
def bezier_points(control: Tensor, samples: int) -> Tensor:
    """Points of cubic Bezier curves: ``control`` ``(N, 4, 2)`` -> ``(N, samples, 2)``."""
    t = torch.linspace(0.0, 1.0, samples, dtype=control.dtype).unsqueeze(1)  # (S, 1)
    basis = torch.cat([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], dim=1)  # (S, 4)
    return torch.einsum("sk,nkd->nsd", basis, control)


def render_curves(control: Tensor, size: int, width: float = 0.6) -> Tensor:
    """Rasterize Bezier curves (control points in ``[0, 1]^2``) into ``(N, size, size)`` images.

    A pixel's intensity is ``exp(-d^2 / (2 width^2))`` with ``d`` its distance in pixels to the
    nearest sampled curve point (samples at most 0.25 pixel apart along the control polygon,
    which bounds the curve's length), cut to 0 beyond about three widths: 1 on the curve.
    Every sample paints the ``(2R + 1)^2`` pixels around it (a max-scatter), so the cost is
    linear in the curve length, not in the image area.
    """
    n = control.shape[0]
    scaled = control.double() * (size - 1)  # pixel coordinates of the control points
    polygon = (scaled[:, 1:] - scaled[:, :-1]).norm(dim=-1).sum(1).max().item() if n else 0.0
    samples = max(16, int(4 * polygon) + 1)
    radius = int(math.ceil(3 * width + 0.5))
    span = torch.arange(-radius, radius + 1)
    offsets = torch.stack(torch.meshgrid(span, span, indexing="ij"), -1).reshape(-1, 2).float()  # (K, 2)
    chunk = max(1, int(1e7 // (samples * offsets.shape[0])))
    images = torch.zeros(n, size * size)
    for start in range(0, n, chunk):
        points = bezier_points(scaled[start : start + chunk], samples).float()  # (n, S, 2) as (x, y)
        rows, cols = (points[..., 1:2].round() + offsets[:, 0]), (points[..., 0:1].round() + offsets[:, 1])  # (n, S, K)
        d2 = (rows - points[..., 1:2]).square_() + (cols - points[..., 0:1]).square_()
        value = d2.mul_(-0.5 / width**2).exp_()
        value.masked_fill_((rows < 0) | (rows >= size) | (cols < 0) | (cols >= size), 0.0)
        index = rows.clamp_(0, size - 1).mul_(size).add_(cols.clamp_(0, size - 1)).long()
        images[start : start + chunk].scatter_reduce_(1, index.flatten(1), value.flatten(1), reduce="amax")
    return images.reshape(n, size, size)


def curves(n_train: int = 10000, n_test: int = 2000, size: int = 16, seed: int = 0, width: float = 0.6,
           margin: float = 0.1) -> Dataset:
    """CURVES-style images: one cubic Bezier curve per image through 4 control points drawn
    uniformly in ``[margin, 1 - margin]^2`` (the curve stays in their convex hull, so inside
    the image); intensities in ``[0, 1]``. Inputs ``(N, size, size)``."""
    if not (0 <= margin < 0.5):
        raise ValueError(f"margin must be in [0, 0.5), got {margin!r}")
    g = torch.Generator().manual_seed(seed)
    control = margin + (1 - 2 * margin) * torch.rand(n_train + n_test, 4, 2, generator=g, dtype=torch.float64)
    images = render_curves(control, size, width)
    return Dataset(f"curves{size}", images[:n_train], images[n_train:])


# ------------------------------------------------------------------ digits
def digits(seed: int = 0, test_fraction: float = 0.2, flatten: bool = False) -> Dataset:
    """scikit-learn's 8x8 digits scaled to ``[0, 1]`` (pixel / 16), split at random by ``seed``.

    Inputs ``(N, 8, 8)`` (``(N, 64)`` with ``flatten``), labels ``0..9``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    if not flatten:
        x = x.reshape(-1, 8, 8)
    return Dataset("digits", x[train], x[test], y[train], y[test])


# ----------------------------------------------------------------- MNIST-1D
def mnist1d(num_samples: int = 5000, seed: int = 0, train_split: float = 0.8, **overrides) -> Dataset:
    """MNIST-1D from ``mnist1d.data.make_dataset`` (the package's defaults, with ``seed``,
    ``num_samples`` and ``train_split`` set; ``overrides`` replace other generator
    arguments, e.g. ``shuffle_seq=True``). Inputs ``(N, 40)``, labels ``0..9``.

    The generator seeds NumPy's and ``random``'s global generators; their states are restored
    afterwards, so calling this does not change other random streams.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise ValueError(f"unknown MNIST-1D argument {key!r}")
        setattr(args, key, value)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    as_x = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
    as_y = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.int64)
    return Dataset("mnist1d", as_x(data["x"]), as_x(data["x_test"]), as_y(data["y"]), as_y(data["y_test"]))
