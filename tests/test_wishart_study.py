"""The covariance-learning study (issue 7) end to end at its ``--tiny`` size: files, finite numbers,
no SPD failure for the natural-gradient methods."""

import argparse
import csv
import json
import math

import pytest
import torch

from experiments import wishart

from helpers import DEVICES, study_settings


def test_wishart_study_tiny(tmp_path):
    parser = argparse.ArgumentParser()
    wishart.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--out", str(tmp_path)])
    assert wishart.resolve_settings(args) == wishart.PRESETS["tiny"]
    wishart.run(args)
    for name in ("table.md", "summary.csv", "results.json", "gap_vs_iterations_map.png",
                 "gap_vs_seconds_map.png", "gap_vs_iterations_vi.png", "gap_vs_seconds_vi.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    settings = wishart.PRESETS["tiny"]
    with (tmp_path / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    problems = {row["problem"] for row in rows}
    assert len(problems) == len(settings.problems) * len(settings.dims) * len(settings.conds)
    assert len(rows) == len(problems) * len(settings.methods)  # one row per method and problem
    for row in rows:
        assert math.isfinite(float(row["seconds"])) and float(row["seconds"]) > 0, row
        if row["method_key"] in wishart.OURS:
            assert math.isfinite(float(row["final_objective"])), row
            assert int(row["spd_failures_grid"]) == 0, row
            assert row["status"] == "ok", row
            # exact gradients, lr 1: ours solves both problems to the tolerance within the tiny budget
            assert row["iterations_to_tol"] != "", row
    results = json.loads((tmp_path / "results.json").read_text())
    for run in results["runs"]:
        if run["method"].endswith("(ours)"):
            assert run["spd_failures"] == 0 and run["status"] == "ok", run
            assert all(v is not None and math.isfinite(v) for v in run["objective"]), run
            assert all(v is not None and math.isfinite(v) for v in run["relative_gap"]), run
    for entry in results["problems"]:
        assert math.isfinite(entry["optimum"])
    table = (tmp_path / "table.md").read_text()
    assert "## map, d=5, cond=10" in table and "## vi, d=5, cond=10" in table and "RAdam (geoopt)" in table


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", wishart.PROBLEMS)
@pytest.mark.parametrize("method", wishart.METHODS)
def test_a_run_on_a_device_follows_the_cpu_run(device, kind, method):
    """``--device``: the same data and the same deterministic steps give the CPU's objective
    curve (to float64 round-off), with the data and the iterate on that device."""
    settings = study_settings(wishart, ["--tiny", "--device", device])
    spec = wishart.ProblemSpec(kind, 5, 10.0)
    config = settings.configs(method)[0]
    curves, statuses = {}, {}
    for where in ("cpu", device):
        data = wishart.CovarianceData(5, 10.0, 0, settings.samples_per_dim, where)
        assert data.a.device.type == where
        reference = data.map_optimum() if kind == "map" else 0.0
        run = wishart.run_one(spec, data, config, 0, settings, reference)
        curves[where], statuses[where] = run.objective.values, run.status
        assert wishart.Solver(kind, data, config).point()[1].device.type == where
    assert statuses[device] == statuses["cpu"]  # a diverging learning rate diverges on both
    assert math.isfinite(curves["cpu"][1])
    torch.testing.assert_close(torch.tensor(curves[device]), torch.tensor(curves["cpu"]), rtol=1e-9, atol=1e-12,
                               equal_nan=True)


