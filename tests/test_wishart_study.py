"""The covariance-learning study end to end at its ``--tiny`` size: files, finite numbers,
no SPD failure for the natural-gradient methods."""

import argparse
import csv
import json
import math

import pytest
import torch

from experiments import wishart

from helpers import DEVICES, run_with_gaps, study_settings


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
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["study"] == "wishart" and verdict["lines"]
    assert table.splitlines()[2] == "**Verdict.** " + " ".join(verdict["lines"])  # under the title
    assert "NGD reached relative gap < 1e-06 first in 1 of 1" in verdict["lines"][0]


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


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


def test_a_cell_of_a_small_grid_is_the_same_cell_of_a_larger_grid():
    """Slices of ``--full``'s grid (``--dims``, ``--conds``, ``--seeds``, ``--problems``, the
    methods in any order) reproduce the larger grid's runs: the data of a (d, cond, seed) comes
    from its own generator and every run starts from the problem's fixed start, so a run's
    objective curve, SPD failures and relative gap do not depend on which runs came before. (The
    gap's ``f*`` is lowered to the best value any run of the problem reached, within rounding of
    the exact optimum, so it is compared where the slice keeps the methods, as here.)"""
    torch.set_default_dtype(torch.float64)  # as the study runs (conftest restores it)
    big = study_settings(wishart, ["--tiny", "--dims", "3", "5", "--conds", "10", "1000", "--seeds", "0", "1",
                                   "--methods", "ngd_dense", "rsgd", "adam_chol"])
    small = study_settings(wishart, ["--tiny", "--dims", "5", "--conds", "1000", "--seeds", "1", "--problems", "vi", "map",
                                     "--methods", "adam_chol", "rsgd", "ngd_dense"])
    big_runs, big_optima = run_with_gaps(wishart, big)
    small_runs, small_optima = run_with_gaps(wishart, small)
    cells = {(r.spec, r.seed, r.config): r for r in big_runs}
    assert len(small_runs) == 2 * (2 + 1 + 1)  # two problems; NGD has two trust regions
    for run in small_runs:
        expected = cells[(run.spec, run.seed, run.config)]
        assert (run.status, run.spd_failures) == (expected.status, expected.spd_failures)
        assert run.objective.iterations == expected.objective.iterations
        torch.testing.assert_close(_f64(run.objective.values), _f64(expected.objective.values),
                                   rtol=0, atol=0, equal_nan=True)  # bit for bit (a diverged run's tail is nan)
        torch.testing.assert_close(_f64(run.gap.values), _f64(expected.gap.values),
                                   rtol=0, atol=0, equal_nan=True)
    assert any(math.isfinite(r.objective.final) for r in small_runs)
    for key, entry in small_optima.items():
        assert entry == big_optima[key]
