"""Small helpers shared by the test modules (ids for group configurations, seeded
generators, relative errors in float64, the devices to run on, study options, running a
documented example)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: parametrize over these: CUDA cases skip where CUDA is absent
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def study_settings(module, argv):
    """``module.resolve_settings`` of a study's command line ``argv``."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.resolve_settings(parser.parse_args(argv))


def run_with_gaps(module, settings):
    """A study's ``run_all(settings)`` with ``attach_gaps`` applied: ``(runs, optima)``."""
    runs, optima = module.run_all(settings)
    module.attach_gaps(runs, optima)
    return runs, optima


def config_id(cfg) -> str:
    """Test id of a ``(structure, dim, options)`` configuration."""
    name, d, opts = cfg
    return f"{name}-d{d}" + "".join(f"-{k}{v}" for k, v in opts.items())


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``||got - expected|| / ||expected||`` computed in float64."""
    got, expected = got.detach().to(torch.float64), expected.detach().to(torch.float64)
    return ((got - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def compact_basis(group):
    """Storage slots whose dense image is a single unit entry of the pattern.

    Returns (slots, positions): flat compact indices and their dense (i, j). Slots
    mapping to nothing or off the pattern (the unused triangle of a triangular factor
    stored as d x d) are not coordinates of the group.
    """
    n = group.numel()
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(group.shape))
    dense = group.to_dense(eye)
    mask = group.mask(dtype=torch.float64).bool()
    slots, positions = [], []
    for c in range(n):
        nz = dense[c].nonzero()
        if len(nz) == 0:
            continue
        assert len(nz) == 1 and dense[c][nz[0, 0], nz[0, 1]] == 1, f"slot {c} is not a unit entry"
        i, j = int(nz[0, 0]), int(nz[0, 1])
        if not mask[i, j]:
            assert group.restrict(dense[c]).abs().sum() == 0
            continue
        slots.append(c)
        positions.append((i, j))
    assert sorted(positions) == sorted(map(tuple, mask.nonzero().tolist()))
    return slots, positions


def assert_same(a: dict, b: dict) -> None:
    """Two dicts of tensors agree bit for bit, dtype included, NaN where NaN was (a user's non-finite
    gradient stays as it came)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].isnan(), b[k].isnan()) and torch.equal(a[k].nan_to_num(), b[k].nan_to_num()), k


def run_example(code: str, folder: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code`` in ``folder`` as a reader would run an example: the repository importable,
    one thread, no display; a timeout is a failed run (return code -1)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-c", code]
    try:
        return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, -1, "", f"no result after {timeout} s")
