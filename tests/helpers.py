"""Small helpers shared by the test modules (ids for group configurations, seeded
generators, relative errors in float64)."""

import torch


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
