"""The VI study end to end at its ``--tiny`` size: every file written, every number finite."""

import json
import math

import pytest
import torch

from experiments import vi, vi_data
from experiments.__main__ import main

from helpers import DEVICES, study_settings


def test_vi_study_tiny_writes_finite_results(tmp_path):
    main(["vi", "--tiny", "--out", str(tmp_path)])
    for name in ("table.md", "summary.csv", "results.json", "verdict.json", "elbo_vs_steps.png", "elbo_vs_seconds.png",
                 "gap1d_bands.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = (tmp_path / "table.md").read_text()
    assert "over Adam AutoNormal" in table.splitlines()[2]  # the verdict names the baseline
    assert "± 0.00" not in table  # one seed: no spread shown
    results = json.loads((tmp_path / "results.json").read_text())
    methods = {row["method"] for row in results["summary"]}
    assert {"NGD dense", "Adam AutoMVN", "Adam AutoNormal"} <= methods
    for row in results["summary"]:
        assert row["status"] == "ok", row
        for key in ("final_elbo", "test_loglik", "ms_per_step"):
            assert math.isfinite(row[key]), (row["method"], key)
    # the structured dense guide (Price gradients, 20 steps) ends above Adam's full-covariance guide (40 steps)
    for name in results["problems"]:
        rows = {r["method"]: r for r in results["summary"] if r["problem"] == name}
        assert rows["NGD dense"]["final_elbo"] > rows["Adam AutoMVN"]["final_elbo"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["ngd_dense", "adam_normal"])
def test_a_run_on_a_device_fits_the_same_problem(device, method):
    """``--device``: the data and the fitted guide live on that device, and the run reaches the
    CPU run's final ELBO within Monte Carlo noise (the two devices draw different noise)."""
    torch.set_default_dtype(torch.float64)  # as the study runs (conftest restores it)
    settings = study_settings(vi, ["--tiny", "--device", device])
    spec = vi_data.problem_specs("tiny")["gap1d"]
    results = {}
    for where in ("cpu", device):
        problem = vi_data.load(spec, 0, where)
        assert problem.x_train.device.type == where and problem.y_test.device.type == where
        dim = vi_data.latent_dim(problem)
        config = settings.configs(method, dim)[0]
        run, guide = vi.run_one(problem, config, 0, settings.steps(method), settings, dim)
        assert run.status == "ok", run.status
        assert {p.device.type for p in guide.parameters()} == {where}
        results[where] = run
    assert all(math.isfinite(v) for v in results[device].curve.values)
    assert abs(results[device].curve.values[-1] - results["cpu"].curve.values[-1]) < 5.0
    assert results[device].curve.values[-1] > results[device].curve.values[0]


def test_a_cell_of_a_small_grid_is_the_same_cell_of_a_larger_grid():
    """Slices of ``--full``'s grid (``--problems``, ``--seeds``, ``--methods`` in any order)
    reproduce the larger grid's runs: every run clears the param store and re-seeds Pyro with its
    seed, the split comes from the seed alone and the evaluations use their own fixed noise, so
    a run's ELBO curve and test metrics do not depend on which runs came before (nor on the
    untimed warm-up). The gap is to the best ELBO of any method on the (problem, seed), so it
    matches only where the slice keeps the methods, as here."""
    torch.set_default_dtype(torch.float64)  # as the study runs (conftest restores it)
    big = study_settings(vi, ["--tiny", "--problems", "breast_cancer", "gap1d", "--seeds", "0", "1",
                              "--methods", "ngd_diagonal", "adam_normal"])
    small = study_settings(vi, ["--tiny", "--problems", "gap1d", "--seeds", "1", "--methods", "adam_normal", "ngd_diagonal"])
    big_runs, _, _ = vi.run_all(big)
    small_runs, _, _ = vi.run_all(small)
    vi.attach_gaps(big_runs)
    vi.attach_gaps(small_runs)
    cells = {(r.problem, r.seed, r.config): r for r in big_runs}
    assert len(small_runs) == 2
    for run in small_runs:
        expected = cells[(run.problem, run.seed, run.config)]
        assert run.status == expected.status == "ok", run.status
        assert run.curve.iterations == expected.curve.iterations
        assert run.curve.values == expected.curve.values  # bit for bit
        assert run.gap.values == expected.gap.values
        assert run.metrics == expected.metrics and "rmse" in run.metrics
