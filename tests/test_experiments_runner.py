"""``python -m experiments quick --tiny`` end to end: every study's files, a report linking
them, and finite headline numbers for every method."""

import csv
import dataclasses
import importlib
import importlib.util
import math
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from experiments.__main__ import STUDIES, main
from experiments import runner
from experiments.runner import build_parser

#: study -> the summary.csv columns that must be finite on every row
HEADLINES = {
    "gaussian": ("ngd_final_kl", "adam_final_kl"),
    "vi": ("final_elbo", "test_loglik"),
    "dl": ("final_train_loss", "test_loss"),
    "es": ("median_final_gap", "evaluations"),
    "wishart": ("final_objective", "seconds"),
}


@pytest.mark.parametrize("jobs", [1, 2])
def test_quick_tiny_writes_every_study_and_the_report(tmp_path, jobs):
    assert set(HEADLINES) == set(STUDIES)
    main(["quick", "--tiny", "--jobs", str(jobs), "--out", str(tmp_path)])
    if jobs > 1:
        assert {p.stem for p in (tmp_path / "logs").glob("*.log")} == set(STUDIES)
    report = (tmp_path / "REPORT.md").read_text()
    for study, columns in HEADLINES.items():
        folder = tmp_path / study
        assert (folder / "table.md").stat().st_size > 0
        pngs = list(folder.glob("*.png"))
        assert pngs, study
        for target in re.findall(rf"\]\(({study}/[^)]+)\)", report):
            assert (tmp_path / target).is_file(), target  # every link resolves
        assert f"## {study}:" in report and all(f"{study}/{p.name}" in report for p in pngs)
        with open(folder / "summary.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows, study
        for row in rows:
            if row.get("status", "ok") != "ok":  # a baseline that diverged: reported, not hidden
                assert "NGD" not in row["method"], row  # ours must not
                continue
            for column in columns:
                assert math.isfinite(float(row[column])), (study, row.get("method"), column, row[column])


def test_quick_rejects_a_bad_jobs_count(tmp_path):
    with pytest.raises(SystemExit, match="--jobs must be a positive integer"):
        main(["quick", "--tiny", "--jobs", "0", "--out", str(tmp_path)])


def test_every_study_takes_a_device_and_quick_passes_it_on(tmp_path, monkeypatch):
    import importlib

    from experiments import runner

    for name, module in STUDIES.items():
        args = runner.study_parser(name).parse_args(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
        assert importlib.import_module(module).resolve_settings(args).device == "cpu", name
    calls = []
    monkeypatch.setattr(runner, "run_study", lambda name, preset, extra, out: calls.append((name, extra)) or 0.0)
    monkeypatch.setattr(runner, "write_report", lambda out, *a, **k: out / "REPORT.md")
    main(["quick", "--tiny", "--jobs", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert sorted(name for name, _ in calls) == sorted(STUDIES)
    assert all(extra[-2:] == ["--device", "cpu"] for _, extra in calls)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_a_missing_cuda_device_is_a_clear_error(study, tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available"):
        main([study, "--tiny", "--device", "cuda", "--out", str(tmp_path)])


def _readme_commands():
    """The concrete ``python -m experiments ...`` commands quoted in the README (templates with
    ``{...}``, ``[...]`` or ``...`` left out)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = {c for c in re.findall(r"`(python -m experiments [^`]+)`", readme)}
    return sorted(c for c in commands if not any(mark in c for mark in ("{", "[", "...")))


@pytest.mark.parametrize("command", _readme_commands())
def test_every_readme_command_parses_and_resolves(command):
    """Each command the README gives for a table is valid: its options exist and its settings
    resolve (a renamed or removed option fails here, not for a reader)."""
    argv = shlex.split(command)[3:]
    args = build_parser().parse_args(argv)
    if args.study != "quick" and "--device" not in argv:
        settings = importlib.import_module(STUDIES[args.study]).resolve_settings(args)
        assert dataclasses.is_dataclass(settings)


def test_the_readme_quotes_commands_of_every_study():
    quoted = {shlex.split(c)[3] for c in _readme_commands()}
    assert quoted >= set(STUDIES) | {"quick"}, quoted


def test_a_missing_extra_is_one_line_naming_the_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cma" else real(name, *a))
    assert runner.main(["quick", "--tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing: cma" in err and 'pip install "structngd[experiments]"' in err


def test_the_console_script_help_names_itself(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/structngd-experiments", "--help"])
    with pytest.raises(SystemExit):
        runner.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: structngd-experiments ")
