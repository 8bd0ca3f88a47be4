"""The deep-learning study (experiments/dl.py) end to end with its ``--tiny`` preset."""

import argparse
import csv
import dataclasses
import json
import math

import pytest
import torch

from experiments import dl

from helpers import DEVICES, study_settings


@pytest.fixture
def restore_torch():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def test_tiny_study_end_to_end(tmp_path, restore_torch, capsys):
    parser = argparse.ArgumentParser()
    dl.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--out", str(tmp_path)])
    dl.run(args)
    settings = dl.resolve_settings(args)

    for name in ("table.md", "summary.csv", "results.json", "loss_vs_steps.png", "loss_vs_seconds.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    expected = {(t, m) for t in settings.tasks for m in settings.methods}
    assert {(r["task"], r["method"]) for r in runs} == expected
    for run in runs:
        where = f"{run['task']} {run['method']} lr {run['lr']}"
        assert run["status"] == "ok", where
        values = run["train_loss"] + run["seconds"]
        assert all(v is not None and math.isfinite(v) for v in values), where
        assert run["steps"][0] == 0 and run["steps"][-1] == settings.steps
        assert run["seconds"] == sorted(run["seconds"]) and run["seconds"][-1] > 0
        metrics = run["metrics"]
        assert all(v is not None and math.isfinite(v) for v in metrics.values()), where
        assert metrics["train_loss"] == pytest.approx(run["train_loss"][-1], rel=1e-5)
        if run["task"].startswith("mnist1d"):
            assert 0 <= metrics["test_accuracy"] <= 1
        else:
            assert metrics["test_squared_error"] >= 0

    with open(tmp_path / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["task"], r["method"]) for r in rows} == expected
    for row in rows:
        for key in ("final_train_loss", "test_loss", "test_metric_value", "adam_final_loss", "ms_per_step"):
            assert math.isfinite(float(row[key])), (row["task"], row["method"], key)
        if row["method"] == "adam":
            assert row["ratio_seconds"] == "1" and float(row["final_train_loss"]) == float(row["adam_final_loss"])
    table = (tmp_path / "table.md").read_text()
    assert table == capsys.readouterr().out.split("total runtime")[0].rstrip("\n") + "\n"
    for task in settings.tasks:
        assert dl.TASKS[task].label in table
    for method in settings.methods:
        assert f"| {dl.METHODS[method].label} |" in table


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["adam", "kfac", "ekfac", "local_dense"])
def test_a_run_on_a_device_follows_the_cpu_run(device, method, restore_torch):
    """Same seed, same batches: the training-loss curve on ``device`` is the CPU curve (to float32
    round-off), and the model, data and preconditioner all live on that device."""
    torch.set_default_dtype(torch.float32)
    base = dl.PRESETS["tiny"]
    task = dl.TASKS["curves"]
    curves = {}
    for where in ("cpu", device):
        settings = dataclasses.replace(base, device=where)
        data = dl.load_data(task, settings)
        assert data.x_train.device.type == where
        run = dl.run_one(task, data, dl.METHODS[method], settings.lrs(dl.METHODS[method], task)[0], 0, settings)
        assert run.status == "ok", run.status
        curves[where] = run.curve.values
    torch.testing.assert_close(torch.tensor(curves[device]), torch.tensor(curves["cpu"]), rtol=2e-3, atol=1e-3)


def test_damping_is_chosen_per_task_kind_and_reaches_the_preconditioner():
    """Autoencoders (summed pixel losses) and classifiers get their own damping, from the
    command line into the built preconditioners."""
    parser = argparse.ArgumentParser()
    dl.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--damping", "0.2", "--autoencoder-damping", "0.05",
                              "--local-damping", "0.3", "--local-autoencoder-damping", "0.07"])
    settings = dl.resolve_settings(args)
    expected = {("curves", "kfac"): 0.05, ("curves", "ekfac"): 0.05, ("curves", "local_dense"): 0.07,
                ("mnist1d_mlp", "kfac"): 0.2, ("mnist1d_mlp", "ekfac"): 0.2, ("mnist1d_mlp", "local_dense"): 0.3}
    for (task_key, method_key), damping in expected.items():
        task, method = dl.TASKS[task_key], dl.METHODS[method_key]
        model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        pre = dl.build_preconditioner(method, model, settings, 0.1, settings.damping_for(method, task))
        assert pre.damping == damping, (task_key, method_key)


def test_a_cell_of_a_small_grid_is_the_same_cell_of_a_larger_grid(restore_torch):
    """Slices of the grid (``--tasks``, ``--methods``, ``--seeds`` in any order) reproduce the
    larger grid's runs: the data comes from ``--data-seed`` alone, every run re-seeds torch (the
    initialization and the true Fisher's sampled labels) and its own batch-order generator with
    its seed, and evaluations run inside ``fork_rng``, so a run's training-loss curve and test
    metrics do not depend on which runs (or warm-ups) came before."""
    torch.set_default_dtype(torch.float32)  # as the study runs
    big = study_settings(dl, ["--tiny", "--tasks", "curves", "mnist1d_mlp", "--methods", "adam", "kfac", "local_dense",
                              "--seeds", "0", "1"])
    small = study_settings(dl, ["--tiny", "--tasks", "mnist1d_mlp", "--methods", "local_dense", "adam", "--seeds", "1"])
    big_runs, _ = dl.run_all(big)
    small_runs, _ = dl.run_all(small)
    cells = {(r.task, r.method, r.lr, r.seed): r for r in big_runs}
    assert len(small_runs) == 2
    for run in small_runs:
        expected = cells[(run.task, run.method, run.lr, run.seed)]
        assert run.status == expected.status == "ok", run.status
        assert run.curve.iterations == expected.curve.iterations
        assert run.curve.values == expected.curve.values  # bit for bit
        assert run.curve.values[-1] < run.curve.values[0]
        wall = {"seconds", "ms_per_step"}
        assert {k: v for k, v in run.metrics.items() if k not in wall} == \
            {k: v for k, v in expected.metrics.items() if k not in wall}
