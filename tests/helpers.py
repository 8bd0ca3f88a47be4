"""Small helpers shared by the test modules (ids for group configurations, seeded
generators, relative errors in float64, the devices to run on, study options)."""

import argparse

import pytest
import torch

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
