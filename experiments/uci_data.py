"""The UCI regression benchmark with its standard splits (PBP / MC dropout / VI literature).

``load_uci(name, split)`` returns one train/test split standardized with the training split's
statistics (the usual protocol), and the target's training standard deviation ``y_std``, which
takes metrics back to the original units: ``RMSE_orig = RMSE_std * y_std`` and
``loglik_orig = loglik_std - log(y_std)`` per test point.

Data: the vendored copies ``experiments/data/uci/<name>.npz`` (``root=None``; written by
``experiments/data/uci/vendor.py``, see the README there) or a folder in the original layout
(``root=path``: ``<root>/<name>/data.txt``, ``index_features.txt``, ``index_target.txt``,
``index_train_K.txt``, ``index_test_K.txt``, ``n_splits.txt``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

#: short name -> folder / file name of each set
NAMES: Dict[str, str] = {
    "boston": "bostonHousing",
    "concrete": "concrete",
    "energy": "energy",
    "kin8nm": "kin8nm",
    "naval": "naval-propulsion-plant",
    "power": "power-plant",
    "protein": "protein-tertiary-structure",
    "wine": "wine-quality-red",
    "yacht": "yacht",
}
#: hidden units of the literature protocol (one hidden layer)
HIDDEN_UNITS = {name: 100 if name == "protein" else 50 for name in NAMES}
VENDORED = Path(__file__).resolve().parent / "data" / "uci"


def canonical(name: str) -> str:
    """The folder name of a set from its short name (``boston``) or folder name (``bostonHousing``)."""
    if name in NAMES:
        return NAMES[name]
    if name in NAMES.values():
        return name
    raise ValueError(f"unknown UCI data set {name!r}; known: {sorted(NAMES)} (or {sorted(NAMES.values())})")


def _ints(path: Path) -> np.ndarray:
    return np.atleast_1d(np.loadtxt(path, dtype=np.int64))


@functools.lru_cache(maxsize=None)
def load_arrays(name: str, root: Optional[Union[str, Path]] = None) -> Dict[str, np.ndarray]:
    """All of one set, cached and read-only: ``data`` (rows x columns), ``index_features``,
    ``index_target`` and the splits ``index_train`` ``(n_splits, n_train)`` / ``index_test``
    ``(n_splits, n_test)``; from the vendored ``.npz`` (``root=None``) or the original layout under ``root``."""
    folder = canonical(name)
    if root is None:
        path = VENDORED / f"{folder}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run experiments/data/uci/vendor.py or pass root=")
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    else:
        base = Path(root) / folder
        splits = range(int(np.loadtxt(base / "n_splits.txt")))
        arrays = {
            "data": np.loadtxt(base / "data.txt", dtype=np.float64, ndmin=2),
            "index_features": _ints(base / "index_features.txt"),
            "index_target": _ints(base / "index_target.txt"),
            "index_train": np.stack([_ints(base / f"index_train_{k}.txt") for k in splits]),
            "index_test": np.stack([_ints(base / f"index_test_{k}.txt") for k in splits]),
        }
    for value in arrays.values():
        value.setflags(write=False)
    return arrays


def _standardize(train: np.ndarray, test: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training mean and (ddof=0) std; constant columns (max == min: their computed std is a
    round-off residue, not 0) get std 1, i.e. are only centered. Returns both sets and the std."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(np.ptp(train, axis=0) > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std, std


def load_uci(name: str, split: int, root: Optional[Union[str, Path]] = None):
    """Split ``split`` of set ``name``, standardized with the training split's statistics.

    Returns ``(x_train, y_train, x_test, y_test, y_std)``: float64 arrays ``x`` of shape
    ``(n, features)`` and ``y`` of shape ``(n,)``, and the target's training std (``ddof=0`` as
    in the PBP / MC dropout code) that converts standardized metrics to the original units.
    """
    arrays = load_arrays(name, root)
    count = arrays["index_train"].shape[0]
    if not 0 <= split < count:
        raise ValueError(f"{canonical(name)} has splits 0..{count - 1}, got {split}")
    data = arrays["data"].astype(np.float64)
    features, target = arrays["index_features"].astype(np.int64), int(arrays["index_target"][0])
    train, test = arrays["index_train"][split].astype(np.int64), arrays["index_test"][split].astype(np.int64)
    x_train, x_test, _ = _standardize(data[np.ix_(train, features)], data[np.ix_(test, features)])
    y_train, y_test, y_std = _standardize(data[train, target], data[test, target])
    return x_train, y_train, x_test, y_test, float(y_std)
