"""Convert the UCI regression benchmark (original folder layout) into one ``.npz`` per data set.

Usage (from the repository root)::

    python experiments/data/uci/vendor.py [--source ../shared/data/uci] [--out experiments/data/uci]

The source has per data set ``UCI_Datasets/<name>/data/`` with ``data.txt``, ``index_features.txt``,
``index_target.txt``, ``index_train_K.txt`` / ``index_test_K.txt`` and ``n_splits.txt``; the ``.npz``
format is described in this folder's README (float32 data: more digits than any column carries).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

#: folder names of the nine sets (the file names of the vendored copies)
NAMES = (
    "bostonHousing", "concrete", "energy", "kin8nm", "naval-propulsion-plant", "power-plant",
    "protein-tertiary-structure", "wine-quality-red", "yacht",
)


def _ints(path: Path) -> np.ndarray:
    return np.atleast_1d(np.loadtxt(path, dtype=np.int64))


def read_original(folder: Path) -> dict:
    """The arrays of one set in the original layout (float64 data, int64 indices)."""
    n_splits = int(np.loadtxt(folder / "n_splits.txt"))
    return {
        "data": np.loadtxt(folder / "data.txt", dtype=np.float64, ndmin=2),
        "index_features": _ints(folder / "index_features.txt"),
        "index_target": _ints(folder / "index_target.txt"),
        "index_train": np.stack([_ints(folder / f"index_train_{k}.txt") for k in range(n_splits)]),
        "index_test": np.stack([_ints(folder / f"index_test_{k}.txt") for k in range(n_splits)]),
    }


def compact(arrays: dict) -> dict:
    """float32 data, the smallest of int16 / int32 for the indices; checks the splits."""
    data = arrays["data"]
    rows = data.shape[0]
    row_type = np.int16 if rows <= np.iinfo(np.int16).max else np.int32
    for k, (train, test) in enumerate(zip(arrays["index_train"], arrays["index_test"])):
        if np.intersect1d(train, test).size or train.size + test.size != rows:
            raise ValueError(f"split {k}: train and test rows must partition the {rows} rows")
    return {
        "data": data.astype(np.float32),
        "index_features": arrays["index_features"].astype(np.int16),
        "index_target": arrays["index_target"].astype(np.int16),
        "index_train": arrays["index_train"].astype(row_type),
        "index_test": arrays["index_test"].astype(row_type),
    }


def main(argv=None) -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=here.parents[2].parent / "shared" / "data" / "uci",
                        help="folder with one sub-folder per data set (original layout)")
    parser.add_argument("--out", type=Path, default=here, help="where the .npz files go")
    parser.add_argument("--names", nargs="+", default=list(NAMES), choices=NAMES, help="data sets")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name in args.names:
        arrays = compact(read_original(args.source / name))
        path = args.out / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        size = path.stat().st_size
        total += size
        print(f"{name:28s} data {arrays['data'].shape}, {arrays['index_train'].shape[0]} splits "
              f"({arrays['index_train'].shape[1]} train / {arrays['index_test'].shape[1]} test), "
              f"{size / 1024:.0f} KiB")
    print(f"total {total / 1e6:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()
