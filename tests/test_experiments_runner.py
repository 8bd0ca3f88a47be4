"""``python -m experiments quick --tiny`` end to end (every study's files, a report that opens
with the verdicts, ``run.json``, status lines while the workers run, finite headline numbers for
every method), the run directory (fresh by default, an occupied ``--out`` refused), the status
line's arithmetic, and ``pages``: documentation pages whose every link resolves."""

import contextlib
import csv
import dataclasses
import importlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from experiments import pages, progress, runner
from experiments.__main__ import STUDIES, main
from experiments.runner import build_parser

ROOT = Path(__file__).resolve().parents[1]

#: study -> the summary.csv columns that must be finite on every row
HEADLINES = {
    "gaussian": ("ngd_final_kl", "adam_final_kl"),
    "vi": ("final_elbo", "test_loglik"),
    "dl": ("final_train_loss", "test_loss"),
    "es": ("median_final_gap", "evaluations"),
    "wishart": ("final_objective", "seconds"),
    "uci": ("test_ll", "rmse"),
    "bnn_scale": ("final_elbo", "test_nll"),
}

#: a status line: ``[m:ss] ...``
STATUS_LINE = re.compile(r"^\[\d+:\d\d\] .+", re.MULTILINE)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """``jobs -> (out, console)``: one ``quick --tiny`` per jobs count, made once for the module
    (status lines every second, so that a seconds-long run prints some)."""
    made = {}

    def run(jobs):
        if jobs not in made:
            out, console = tmp_path_factory.mktemp(f"quick{jobs}"), io.StringIO()
            with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(console):
                patch.setattr(runner, "STATUS_EVERY_SECONDS", 1.0)
                main(["quick", "--tiny", "--jobs", str(jobs), "--out", str(out)])
            made[jobs] = out, console.getvalue()
        return made[jobs]

    return run


@pytest.mark.parametrize("jobs", [1, 2])
def test_quick_tiny_writes_every_study_and_the_report(tiny_runs, jobs):
    assert set(HEADLINES) == set(STUDIES)
    out, console = tiny_runs(jobs)
    if jobs > 1:
        assert {p.stem for p in (out / "logs").glob("*.log")} == set(STUDIES)
        assert STATUS_LINE.search(console), console
    report = (out / "REPORT.md").read_text()
    assert report.index("## Verdict") < min(report.index(f"## {study}:") for study in STUDIES)
    record = json.loads((out / "run.json").read_text())
    assert record["layout"] == "quick" and record["command"] == f"python -m experiments quick --tiny --jobs {jobs}"
    assert set(record["seconds"]) == set(STUDIES) and record["cpu_count"] == os.cpu_count()
    for study, columns in HEADLINES.items():
        folder = out / study
        assert (folder / "table.md").stat().st_size > 0
        assert f"- **{study}**: " in report
        pngs = list(folder.glob("*.png"))
        assert pngs, study
        for target in re.findall(rf"\]\(({study}/[^)]+)\)", report):
            assert (out / target).is_file(), target  # every link resolves
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


def _fake_study(name, preset, extra, out):
    """A stand-in for :func:`runner.run_study`: a one-line table, no time."""
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "table.md").write_text(f"# {name}\n\nnothing ran\n")
    return 0.0


def test_every_study_takes_a_device_and_quick_passes_it_on(tmp_path, monkeypatch):
    for name, module in STUDIES.items():
        args = runner.study_parser(name).parse_args(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
        assert importlib.import_module(module).resolve_settings(args).device == "cpu", name
    calls = []
    monkeypatch.setattr(runner, "run_study", lambda name, preset, extra, out: calls.append((name, extra)) or 0.0)
    monkeypatch.setattr(runner, "write_report", lambda out, *a, **k: out / "REPORT.md")
    main(["quick", "--tiny", "--jobs", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert sorted(name for name, _ in calls) == sorted(STUDIES)
    assert all(extra[-2:] == ["--device", "cpu"] for _, extra in calls)


def test_a_rerun_into_the_same_out_is_refused_without_overwrite(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run_study", _fake_study)
    command = ["quick", "--tiny", "--jobs", "1", "--studies", "wishart", "--out", str(tmp_path)]
    main(command)
    (tmp_path / "wishart" / "stale.png").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"already holds files .* pass --overwrite"):
        main(command)
    main(command + ["--overwrite"])
    assert not (tmp_path / "wishart" / "stale.png").exists()  # what the rerun writes again starts empty
    assert (tmp_path / "REPORT.md").is_file()


def test_the_default_out_is_a_fresh_directory_that_latest_points_at(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_study", _fake_study)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        main(["quick", "--tiny", "--jobs", "1", "--studies", "wishart"])
    runs = sorted(p for p in (tmp_path / "results").iterdir() if p.name != "latest")
    assert len(runs) == 2 and all((run / "REPORT.md").is_file() for run in runs)
    assert f"results go to {Path('results') / runs[-1].name}/" in capsys.readouterr().out
    assert pages.resolve_run_dir(tmp_path / "results" / "latest").resolve() == runs[-1].resolve()


def test_a_fresh_run_dir_is_named_by_its_start_and_never_reused(tmp_path):
    now = datetime(2024, 5, 6, 7, 8, 9)
    first, second = runner.fresh_run_dir(tmp_path, now), runner.fresh_run_dir(tmp_path, now)
    assert (first.name, second.name) == ("20240506-070809", "20240506-070809-2")
    runner.point_latest(tmp_path, second)
    assert pages.resolve_run_dir(tmp_path / "latest").resolve() == second.resolve()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_a_missing_cuda_device_is_a_clear_error(study, tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available"):
        main([study, "--tiny", "--device", "cuda", "--out", str(tmp_path)])


def test_a_study_command_records_its_command_and_hardware(tmp_path, monkeypatch):
    module = importlib.import_module(STUDIES["wishart"])
    monkeypatch.setattr(module, "run", lambda args: args.out.mkdir(parents=True, exist_ok=True))
    main(["wishart", "--tiny", "--out", str(tmp_path / "w")])
    record = json.loads((tmp_path / "w" / "run.json").read_text())
    assert record["layout"] == "study" and record["command"] == "python -m experiments wishart --tiny"
    assert record["device"] == "cpu" and record["cpu_count"] >= 1


# ------------------------------------------------------------ progress
def test_bars_record_their_study_as_they_move(tmp_path):
    with progress.recording(tmp_path, "es"):
        assert progress.read_states(tmp_path)["es"]["total"] == 0  # started, no bar yet
        first = progress.bar(4, "es bbob")
        for _ in range(4):
            first.update()
        first.close()
        second = progress.bar(4, "es large")
        second.update()
        moving = progress.read_states(tmp_path)["es"]
        second.close()
    assert (moving["desc"], moving["n"], moving["total"]) == ("es large", 1, 4)
    assert progress.read_states(tmp_path)["es"]["n"] == 4  # a closed bar is done
    outside = progress.bar(1, "wishart")
    outside.update()
    outside.close()
    assert set(progress.read_states(tmp_path)) == {"es"}  # recording ends with its block


def test_the_status_line_reads_the_progress_files(tmp_path):
    now, finished, typical = 1_000_000.0, {"vi": 102.0}, runner.TYPICAL_QUICK_SECONDS
    progress.write_state(tmp_path / "es.json", {"started": now - 150, "desc": "es large", "n": 41, "total": 120})
    progress.write_state(tmp_path / "gaussian.json", {"started": now - 60, "desc": "gaussian", "n": 12, "total": 30})
    line = progress.status_line(tmp_path, list(STUDIES), finished, 192.0, 2, typical, now)
    assert line.startswith("[3:12] es large 41/120, gaussian 12/30, done: vi (102 s), 4 waiting | about ")
    minutes = int(re.search(r"about (\d+) min left$", line).group(1))
    left = progress.seconds_left(progress.read_states(tmp_path), finished, ["dl", "wishart", "uci", "bnn_scale"], 2, typical, now)
    assert minutes == math.ceil(left / 60)
    assert 60 < left < sum(typical.values())


def test_the_time_left_follows_the_pace_and_fills_free_workers(tmp_path):
    running = {"wishart": {"started": 0.0, "desc": "wishart", "n": 1, "total": 2}}
    typical = {"wishart": 40.0, "vi": 10.0}
    # half of wishart in 20 s (its typical 40 s: pace 1): 20 s left; vi on the free worker: 10 s, or after it
    assert progress.seconds_left(running, {}, ["vi"], 2, typical, now=20.0) == pytest.approx(20.0)
    assert progress.seconds_left(running, {}, ["vi"], 1, typical, now=20.0) == pytest.approx(30.0)
    starting = {"started": 17.0, "desc": "wishart", "n": 0, "total": 0}
    assert progress.seconds_left({"wishart": starting}, {}, ["vi"], 2, typical, now=20.0) is None
    progress.write_state(tmp_path / "wishart.json", starting)
    line = progress.status_line(tmp_path, ["wishart", "vi"], {}, 3.0, 2, typical, now=20.0)
    assert line == "[0:03] wishart starting, 1 waiting"


# ------------------------------------------------------------ pages
def _relative_links(page: Path):
    for match in pages.LINK.finditer(page.read_text()):
        target = match.group(3).split("#")[0]
        if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target):
            yield target


def test_pages_of_a_run_link_only_to_files_they_hold(tiny_runs, tmp_path):
    out, _ = tiny_runs(2)
    to = tmp_path / "docs" / "results"
    assert main(["pages", str(out), "--to", str(to)]) == 0
    assert {p.stem for p in to.glob("*.md")} == set(STUDIES) | {"index"}
    index = (to / "index.md").read_text()
    for page in to.glob("*.md"):
        text = page.read_text()
        assert str(out) not in text and str(tmp_path) not in text  # no path of the machine
        for target in _relative_links(page):
            assert (to / target).is_file() and to.resolve() in (to / target).resolve().parents, (page.name, target)
    for study in STUDIES:
        text = (to / f"{study}.md").read_text()
        assert f"Made by `python -m experiments {study} --tiny` (in `python -m experiments quick --tiny" in text
        assert "-core CPU" in text and "## Verdict" in text
        assert f"]({study}.md)" in index and list((to / study).glob("*.png"))


def test_pages_of_one_study_without_a_record(tiny_runs, tmp_path):
    out, _ = tiny_runs(2)
    folder = tmp_path / "alone" / "wishart"
    folder.mkdir(parents=True)
    for path in (out / "wishart").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "table.md").write_text((out / "wishart" / "table.md").read_text() + "\n[data](summary.csv)\n")
    to = tmp_path / "pages"
    pages.write_pages(folder, to)
    text = (to / "wishart.md").read_text()
    assert "no run.json" in text and "[data]" not in text  # a link to a file outside the pages is dropped
    assert all((to / target).is_file() for page in to.glob("*.md") for target in _relative_links(page))


def test_the_hardware_of_a_page_names_cores_and_gpu():
    cpu = {"cpu_count": 2, "cuda": False, "torch": "2.4.0"}
    gpu = {"cpu_count": 16, "cuda": True, "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.4.0"}
    assert pages.hardware_text(cpu) == "a 2-core CPU, torch 2.4.0"
    assert pages.hardware_text(gpu) == "a 16-core CPU and one GPU (NVIDIA H100 80GB HBM3), torch 2.4.0"
    assert pages.hardware_text({}) == "hardware not recorded"


def test_pages_build_with_mkdocs_strict(tiny_runs, tmp_path):
    pytest.importorskip("mkdocs")
    out, _ = tiny_runs(2)
    pages.write_pages(out, tmp_path / "docs" / "results")
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[Results](results/index.md)\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: check\ndocs_dir: docs\n")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr


# ------------------------------------------------------------ documented commands
def _documented_commands():
    """The concrete ``python -m experiments ...`` commands quoted in README.md and in every
    docs/**/*.md (templates with ``{...}``, ``[...]`` or ``...`` left out)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    commands = {c for path in files for c in re.findall(r"`(python -m experiments [^`]+)`", path.read_text())}
    return sorted(c for c in commands if not any(mark in c for mark in ("{", "[", "...")))


@pytest.mark.parametrize("command", _documented_commands())
def test_every_readme_command_parses_and_resolves(command):
    """Each command the README or the docs give is valid: its options exist and its settings
    resolve (a renamed or removed option fails here, not for a reader)."""
    argv = shlex.split(command)[3:]
    args = build_parser().parse_args(argv)
    if args.study in STUDIES and "--device" not in argv:
        settings = importlib.import_module(STUDIES[args.study]).resolve_settings(args)
        assert dataclasses.is_dataclass(settings)


def test_the_readme_quotes_commands_of_every_study():
    quoted = {shlex.split(c)[3] for c in _documented_commands()}
    assert quoted >= set(STUDIES) | {"quick"}, quoted


def test_a_missing_extra_is_one_line_naming_the_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cma" else real(name, *a))
    assert runner.main(["quick", "--tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing: cma" in err and 'pip install -e ".[experiments]"' in err
    assert err.startswith("python -m experiments: ")
