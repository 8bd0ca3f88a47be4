"""The Gaussian-target study (experiments/gaussian.py) on a device."""


import pytest
import torch

from experiments import gaussian
from structngd.targets import GaussianTarget

from helpers import DEVICES, run_with_gaps, study_settings


@pytest.mark.parametrize("device", DEVICES)
def test_a_moved_target_holds_the_same_numbers(device):
    target = GaussianTarget.random(7, 100.0, torch.Generator().manual_seed(3))
    moved = target.to(device)
    for name in ("mean", "precision", "chol", "logdet"):
        value = getattr(moved, name)
        assert value.device.type == device
        assert torch.equal(value.cpu(), getattr(target, name)), name
    w = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(moved.log_prob(w.to(device)).cpu(), target.log_prob(w))
    assert target.to(dtype=torch.float32).mean.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", ["dense", "heisenberg"])
def test_an_exact_gradient_run_on_a_device_follows_the_cpu_run(device, structure):
    """``--device``: same target, same deterministic steps: the KL curve on ``device`` is the CPU
    curve to float64 round-off, and the fitted Gaussian lives on that device."""
    settings = study_settings(gaussian, ["--tiny", "--device", device])
    spec = gaussian.TargetSpec(6, 10.0)
    struct = next(s for s in gaussian.structure_specs(6, (structure,)))
    config = settings.configs("exact")[0]
    curves = {}
    for where in ("cpu", device):
        target = spec.build(0, where)
        assert target.precision.device.type == where
        assert gaussian.StructureSpec.family(struct, target).loc.device.type == where
        curve, status = gaussian.run_one(target, struct, "exact", config, 0, settings)
        assert status == "ok", status
        curves[where] = curve.values
    assert curves["cpu"][-1] < 0.5 * curves["cpu"][0]  # the run made progress
    torch.testing.assert_close(torch.tensor(curves[device]), torch.tensor(curves["cpu"]), rtol=1e-9, atol=1e-12)


def test_a_cell_of_a_small_grid_is_the_same_cell_of_a_larger_grid():
    """Slices of ``--full``'s grid (``--dims``, ``--structures``, ``--seeds``) reproduce the larger
    grid's runs: each target is drawn from its own (dim, cond, seed) generator and each run
    re-seeds the Monte Carlo stream with its seed, so a run (exact and MC) and its gap to the
    structure's optimum do not depend on which other runs came before."""
    big = study_settings(gaussian, ["--tiny", "--dims", "4", "6", "--seeds", "0", "1",
                                    "--structures", "dense", "diagonal", "block_triangular"])
    small = study_settings(gaussian, ["--tiny", "--dims", "6", "--seeds", "1", "--structures", "block_triangular", "dense"])
    big_runs, big_optima = run_with_gaps(gaussian, big)
    small_runs, small_optima = run_with_gaps(gaussian, small)
    cells = {(r.target, r.seed, r.structure, r.gradient, r.config): r for r in big_runs}
    assert len(small_runs) == 2 * 4 and {r.gradient for r in small_runs} == {"exact", "mc"}
    for run in small_runs:
        expected = cells[(run.target, run.seed, run.structure, run.gradient, run.config)]
        assert run.status == expected.status
        assert run.kl.iterations == expected.kl.iterations
        assert run.kl.values == expected.kl.values  # bit for bit
        assert run.gap.values == expected.gap.values
        assert run.kl.values[-1] < run.kl.values[0]  # the run moved
    for key, entry in small_optima.items():
        assert entry == big_optima[key]
