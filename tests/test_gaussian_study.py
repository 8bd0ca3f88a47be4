"""The Gaussian-target study (experiments/gaussian.py) on a device."""


import pytest
import torch

from experiments import gaussian
from structngd.targets import GaussianTarget

from helpers import DEVICES, study_settings


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

