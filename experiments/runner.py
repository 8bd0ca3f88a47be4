"""Run the studies: ``python -m experiments <study> [options]`` or ``python -m experiments quick``.

(This module holds the runner, apart from ``__main__``, so that ``quick``'s worker processes
can import what they run.)

Adding a study is one line in :data:`STUDIES`: its name and the module that defines
``add_arguments(parser)`` (its command-line options, including ``--tiny/--quick/--full`` and
``--out``) and ``run(args)``. ``quick`` runs every study's quick preset (``--tiny``: the
seconds-long smoke presets) into ``<out>/<study>/`` and writes ``<out>/REPORT.md`` linking
their tables and plots; ``--jobs 2`` (the default on 2 cores) runs two studies at a time, each
in its own single-threaded process with its output in ``<out>/logs/<study>.log`` (every study
times its methods against each other inside its own process; ``--jobs 1`` gives the quietest
timings). The console script ``structngd-experiments`` is the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import common

#: study name -> module defining ``add_arguments(parser)`` and ``run(args)``
STUDIES = {
    "gaussian": "experiments.gaussian",
    "vi": "experiments.vi",
    "dl": "experiments.dl",
    "es": "experiments.es",
    "wishart": "experiments.wishart",
}


#: what ``quick`` adds to each study's ``--quick`` preset so that the whole run stays near 10 minutes
#: on 2 cores (one seed / one instance; the studies' own ``--quick`` keep more for the README tables)
QUICK_OVERVIEW = {
    "gaussian": [],
    "vi": ["--seeds", "0"],
    "dl": ["--seeds", "0"],
    "es": ["--instances", "1"],
    "wishart": [],
}

#: the order in which ``quick`` hands studies to its workers: the longest first (2-core timings)
LONGEST_FIRST = ("es", "gaussian", "dl", "vi", "wishart")


def study_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one study's options."""
    return _with_study(argparse.ArgumentParser(prog=f"python -m experiments {name}", **_study_help(name)), name)


def _study_help(name: str) -> dict:
    """The parser keywords of a study: its module docstring, kept as written."""
    module = importlib.import_module(STUDIES[name])
    return {"description": module.__doc__, "formatter_class": argparse.RawDescriptionHelpFormatter}


def _with_study(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """``parser`` with the study's options and its ``run``."""
    module = importlib.import_module(STUDIES[name])
    module.add_arguments(parser)
    parser.set_defaults(run=module.run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-command per study, plus ``quick``."""
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    quick = commands.add_parser("quick", help="every study's quick preset and one REPORT.md")
    quick.add_argument("--tiny", action="store_true", help="the seconds-long smoke presets instead")
    quick.add_argument("--out", type=Path, default=Path("results"), help="output root (default results/)")
    quick.add_argument("--studies", nargs="+", choices=tuple(STUDIES), default=list(STUDIES))
    quick.add_argument("--device", help="passed to every study (default cpu; e.g. cuda)")
    quick.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                       help="studies run at once, each in its own single-threaded process (default: 2 "
                            "where there are 2 cores; 1 runs them one after the other, in this process, "
                            "with their progress bars)")
    quick.set_defaults(run=run_quick)
    for name, module_name in STUDIES.items():
        summary = (importlib.import_module(module_name).__doc__ or name).strip().splitlines()[0]
        _with_study(commands.add_parser(name, help=summary, **_study_help(name)), name)
    return parser


def run_study(name: str, preset: str, extra: List[str], out: Path) -> float:
    """Run one study's preset into ``out / name``; returns its seconds."""
    study_args = study_parser(name).parse_args([preset, *extra, "--out", str(out / name)])
    torch.set_default_dtype(torch.float32)  # each study sets what it needs
    start = time.perf_counter()
    study_args.run(study_args)
    return time.perf_counter() - start


def _run_study_logged(name: str, preset: str, extra: List[str], out: Path, log: Path) -> float:
    """:func:`run_study` in a worker process, its output (tables, progress bars) into ``log``."""
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        return run_study(name, preset, extra, out)


def run_quick(args: argparse.Namespace) -> None:
    """Run the chosen studies (``--jobs`` at once), then write the report."""
    common.check_jobs(args.jobs)
    preset = "--tiny" if args.tiny else "--quick"
    names = [n for n in LONGEST_FIRST if n in args.studies] + [n for n in args.studies if n not in LONGEST_FIRST]
    device = ["--device", args.device] if args.device else []
    extras = {name: ([] if args.tiny else QUICK_OVERVIEW[name]) + device for name in names}
    commands = {name: " ".join([f"python -m experiments {name}", preset, *extras[name]]) for name in names}
    seconds: Dict[str, float] = {}
    start = time.perf_counter()
    if args.jobs == 1:
        for name in names:
            print(f"\n=== {name} ({preset})", flush=True)
            seconds[name] = run_study(name, preset, extras[name], args.out)
    else:
        logs = args.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        print(f"running {len(names)} studies, {args.jobs} at a time; their output goes to {logs}/", flush=True)
        context = multiprocessing.get_context("spawn")  # no forked torch / OpenMP state
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            futures = {
                pool.submit(_run_study_logged, name, preset, extras[name], args.out, logs / f"{name}.log"): name
                for name in names
            }
            for future in as_completed(futures):
                name = futures[future]
                seconds[name] = future.result()
                print(f"  {name} done in {seconds[name]:.0f} s ({time.perf_counter() - start:.0f} s so far)",
                      flush=True)
    wall = time.perf_counter() - start
    report = write_report(args.out, list(args.studies), seconds, commands, preset, wall, args.jobs)
    print(f"\nreport: {report}")


def write_report(out: Path, studies: List[str], seconds: Dict[str, float], commands: Dict[str, str],
                 preset: str, wall: float, jobs: int = 1) -> Path:
    """``out/REPORT.md``: per study its command, run time, table and plots (relative links)."""
    parallel = f", {jobs} studies at a time (their own times add up to {sum(seconds.values()):.0f} s)" if jobs > 1 else ""
    lines = [
        "# structngd: study report",
        "",
        f"`python -m experiments quick{' --tiny' if preset == '--tiny' else ''}`; "
        f"{wall:.0f} s wall clock{parallel}. Each section links the study's files under `{out}`.",
        "",
    ]
    for name in studies:
        folder = out / name
        module = importlib.import_module(STUDIES[name])
        lines += [f"## {name}: {(module.__doc__ or name).strip().splitlines()[0]}", ""]
        lines += [f"`{commands[name]}` ({seconds[name]:.0f} s). Files: "
                  + ", ".join(f"[{p.name}]({name}/{p.name})" for p in sorted(folder.iterdir()) if p.is_file()), ""]
        table = folder / "table.md"
        if table.exists():
            body = table.read_text().splitlines()
            lines += [line.replace("# ", "### ", 1) if line.startswith("#") else line for line in body] + [""]
        lines += [f"![{p.stem}]({name}/{p.name})" for p in sorted(folder.glob("*.png"))] + [""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


#: the modules of the ``experiments`` extra (import name -> distribution name)
EXTRA_MODULES = {"matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn", "mnist1d": "mnist1d",
                 "cma": "cma"}


def missing_extras() -> List[str]:
    """The distributions of the ``experiments`` extra that are not installed."""
    return [dist for module, dist in EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]


def program_name() -> str:
    """How the command was called: the console script's name, else ``python -m experiments``."""
    called = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return called if called.startswith("structngd-experiments") else "python -m experiments"


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m experiments ...`` (and the ``structngd-experiments`` console script)."""
    parser = build_parser()
    parser.prog = program_name()
    args = parser.parse_args(argv)
    missing = missing_extras()
    if missing:
        print(f"{parser.prog}: the studies need the experiments extra (missing: {', '.join(missing)}); "
              'install it with: pip install "structngd[experiments]"', file=sys.stderr)
        return 2
    args.run(args)
    return 0
