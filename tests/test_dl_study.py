"""The deep-learning study (experiments/dl.py) end to end with its ``--tiny`` preset."""

import argparse
import csv
import json
import math

import pytest
import torch

from experiments import dl


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
