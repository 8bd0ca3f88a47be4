"""Run the studies: ``python -m experiments <study> [options]`` or ``python -m experiments quick``.

Adding a study is one line in :data:`STUDIES`: its name and the module that defines
``add_arguments(parser)`` and ``run(args)``. ``quick`` runs every study's quick preset (``--tiny``:
the smoke presets) into ``<out>/<study>/``, by default a fresh ``results/<date-time>/`` that
``results/latest`` points at, and writes ``<out>/REPORT.md`` (the verdicts, then each study's table
and plots) and ``<out>/run.json`` (the commands and hardware). With ``--jobs 2`` two studies run at
a time, each in its own single-threaded process logging to ``<out>/logs/<study>.log``, with a status
line every :data:`STATUS_EVERY_SECONDS`; ``--jobs 1`` gives the quietest timings and shows the
progress bars. (The runner lives apart from ``__main__`` so that those processes can import it.)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import multiprocessing
import os
import platform
import shlex
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import common, pages, progress

#: study name -> module defining ``add_arguments(parser)`` and ``run(args)``
STUDIES = {"gaussian": "experiments.gaussian", "vi": "experiments.vi", "dl": "experiments.dl",
           "es": "experiments.es", "wishart": "experiments.wishart", "uci": "experiments.uci",
           "bnn_scale": "experiments.bnn_scale"}

#: what ``quick`` adds to a study's ``--quick`` preset to keep the whole run near 10 minutes on 2 cores
#: (one seed / one instance; the studies' own ``--quick`` keep more for the README tables)
QUICK_OVERVIEW = {"vi": ["--seeds", "0"], "dl": ["--seeds", "0"], "es": ["--instances", "1"]}

#: typical seconds of each study in ``quick`` (two at a time on 2 cores), scaled by the pace seen for the time left
TYPICAL_QUICK_SECONDS = {"gaussian": 184, "es": 251, "vi": 102, "dl": 206, "wishart": 66, "uci": 228,
                         "bnn_scale": 132}

#: seconds between two status lines while the studies run in workers
STATUS_EVERY_SECONDS = 15.0

#: where ``quick`` puts a fresh run directory when ``--out`` is not given
RESULTS_ROOT = Path("results")


def _summary(module) -> str:
    """The first line of a module's docstring."""
    return (module.__doc__ or module.__name__).strip().splitlines()[0]


def _command_parser(module, name: str, commands: Optional[argparse._SubParsersAction] = None):
    """The parser of ``module``'s options and ``run`` (its docstring as description): a sub-command
    of ``commands`` where given, else a parser of its own."""
    keywords = {"description": module.__doc__, "formatter_class": argparse.RawDescriptionHelpFormatter}
    if commands is None:
        parser = argparse.ArgumentParser(prog=f"python -m experiments {name}", **keywords)
    else:
        parser = commands.add_parser(name, help=_summary(module), **keywords)
    module.add_arguments(parser)
    parser.set_defaults(run=module.run)
    return parser


def study_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one study's options."""
    return _command_parser(importlib.import_module(STUDIES[name]), name)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-command per study, plus ``quick`` and ``pages``."""
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    quick = commands.add_parser("quick", help="every study's quick preset and one REPORT.md")
    quick.add_argument("--tiny", action="store_true", help="the seconds-long smoke presets instead")
    quick.add_argument("--out", type=Path, help=f"output root (default: a fresh {RESULTS_ROOT}/<date-time>/, "
                                                f"{RESULTS_ROOT}/latest pointing at it)")
    quick.add_argument("--overwrite", action="store_true", help="write into an --out that already holds files")
    quick.add_argument("--studies", nargs="+", choices=tuple(STUDIES), default=list(STUDIES))
    quick.add_argument("--device", help="passed to every study (default cpu; e.g. cuda)")
    quick.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                       help="studies run at once, each in its own single-threaded process (default: 2 "
                            "where there are 2 cores; 1 runs them one after the other, in this process, "
                            "with their progress bars)")
    quick.set_defaults(run=run_quick)
    _command_parser(pages, "pages", commands)
    for name, module in STUDIES.items():
        _command_parser(importlib.import_module(module), name, commands)
    return parser


def run_study(name: str, preset: str, extra: List[str], out: Path) -> float:
    """Run one study's preset into ``out / name``; returns its seconds."""
    study_args = study_parser(name).parse_args([preset, *extra, "--out", str(out / name)])
    torch.set_default_dtype(torch.float32)  # each study sets what it needs
    start = time.perf_counter()
    study_args.run(study_args)
    return time.perf_counter() - start


def _run_study_logged(name: str, preset: str, extra: List[str], out: Path, log: Path, progress_dir: Path) -> float:
    """:func:`run_study` in a worker process: its output into ``log``, its progress into ``progress_dir``."""
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle), \
            progress.recording(progress_dir, name):
        return run_study(name, preset, extra, out)


# ------------------------------------------------------------ the output directory
def fresh_run_dir(root: Path, now: Optional[datetime.datetime] = None) -> Path:
    """A new ``root/<YYYYmmdd-HHMMSS>/`` (``-2``, ``-3``, ... appended when that one exists)."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    candidate, number = root / stamp, 1
    while candidate.exists():
        number += 1
        candidate = root / f"{stamp}-{number}"
    candidate.mkdir(parents=True)
    return candidate


def point_latest(root: Path, run_dir: Path) -> None:
    """``root/latest``: a relative symlink to ``run_dir`` (a text file naming it where links fail)."""
    latest = root / "latest"
    if latest.is_dir() and not latest.is_symlink():
        print(f"{latest} is a directory: left as it is", file=sys.stderr)
        return
    temporary = root / f".latest.{os.getpid()}"
    try:
        temporary.symlink_to(run_dir.name, target_is_directory=True)
    except OSError:
        temporary.write_text(run_dir.name + "\n")
    os.replace(temporary, latest)


def choose_out(args: argparse.Namespace) -> Path:
    """A fresh run directory that ``latest`` points at, or ``--out``: refused when it holds files, unless
    ``--overwrite``, which clears what this run writes again (the studies' folders and logs)."""
    out = args.out
    if out is None:
        out = fresh_run_dir(RESULTS_ROOT)
        point_latest(RESULTS_ROOT, out)
        return out
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not args.overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise SystemExit(f"--out {out} already holds files ({shown}): pass --overwrite to write over them, "
                         f"or leave --out off for a fresh {RESULTS_ROOT}/<date-time>/")
    for name in args.studies:
        shutil.rmtree(out / name, ignore_errors=True)
        (out / "logs" / f"{name}.log").unlink(missing_ok=True)
    shutil.rmtree(out / "logs" / "progress", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def public_command(argv: List[str]) -> str:
    """The command of ``argv`` without the output options (``--out DIR``, ``--overwrite``)."""
    output = [i for i, word in enumerate(argv) if word in ("--out", "--overwrite") or word.startswith("--out=")]
    dropped = set(output) | {i + 1 for i in output if argv[i] == "--out"}
    kept = [word for i, word in enumerate(argv) if i not in dropped]
    return " ".join(["python -m experiments", *map(shlex.quote, kept)])


def hardware(device: Optional[str]) -> dict:
    """The machine a run used: cores, the torch device and, on CUDA, the GPU's name."""
    device = device or "cpu"
    cuda = common.resolve_device(device).type == "cuda"
    return {"cpu_count": os.cpu_count(), "device": device, "cuda": cuda,
            "gpu": torch.cuda.get_device_name(torch.device(device)) if cuda else None,
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}


def write_run_record(out: Path, **fields) -> None:
    """``out/run.json``: the fields given, with the date."""
    common.write_json(out / "run.json", {"date": datetime.datetime.now().isoformat(timespec="seconds"), **fields})


# ------------------------------------------------------------ quick
def run_quick(args: argparse.Namespace) -> None:
    """Run the chosen studies (``--jobs`` at once), then write the report."""
    common.check_jobs(args.jobs)
    machine = hardware(args.device)
    preset = "--tiny" if args.tiny else "--quick"
    names = sorted(args.studies, key=lambda name: TYPICAL_QUICK_SECONDS.get(name, 0), reverse=True)  # longest first
    device = ["--device", args.device] if args.device else []
    extras = {name: ([] if args.tiny else QUICK_OVERVIEW.get(name, [])) + device for name in names}
    commands = {name: " ".join([f"python -m experiments {name}", preset, *extras[name]]) for name in names}
    out = choose_out(args)
    print(f"results go to {out}/", flush=True)
    record = dict(layout="quick", command=args.command_line, preset=preset.lstrip("-"), studies=list(args.studies),
                  study_commands=commands, jobs=args.jobs, **machine)
    write_run_record(out, **record)
    start = time.perf_counter()
    seconds = (_run_in_process(names, preset, extras, out) if args.jobs == 1
               else _run_in_workers(names, preset, extras, out, args.jobs))
    wall = time.perf_counter() - start
    write_run_record(out, **record, wall_seconds=wall, seconds=seconds)
    report = write_report(out, list(args.studies), seconds, commands, preset, wall, args.jobs)
    print(f"\nreport: {report}")


def _run_in_process(names: List[str], preset: str, extras: Dict[str, List[str]], out: Path) -> Dict[str, float]:
    """The studies one after the other in this process, with their progress bars."""
    seconds = {}
    for name in names:
        print(f"\n=== {name} ({preset})", flush=True)
        seconds[name] = run_study(name, preset, extras[name], out)
    return seconds


def _run_in_workers(names: List[str], preset: str, extras: Dict[str, List[str]], out: Path,
                    jobs: int) -> Dict[str, float]:
    """The studies ``jobs`` at a time in spawned workers, with a status line every :data:`STATUS_EVERY_SECONDS`."""
    logs, progress_dir = out / "logs", out / "logs" / "progress"
    progress_dir.mkdir(parents=True, exist_ok=True)
    print(f"running {len(names)} studies, {jobs} at a time; their output goes to {logs}/", flush=True)
    seconds: Dict[str, float] = {}
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # no forked torch / OpenMP state
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_run_study_logged, name, preset, extras[name], out, logs / f"{name}.log",
                               progress_dir): name for name in names}
        pending, next_status = set(futures), start + STATUS_EVERY_SECONDS
        try:
            while pending:
                done, pending = wait(pending, timeout=max(next_status - time.perf_counter(), 0.0),
                                     return_when=FIRST_COMPLETED)
                for future in done:
                    name = futures[future]
                    if future.exception() is not None:
                        print(f"  {name} failed: see {logs / name}.log", file=sys.stderr, flush=True)
                    seconds[name] = future.result()
                    print(f"  {name} done in {seconds[name]:.0f} s ({time.perf_counter() - start:.0f} s so far)",
                          flush=True)
                if pending and time.perf_counter() >= next_status:
                    print(progress.status_line(progress_dir, names, seconds, time.perf_counter() - start, jobs,
                                               TYPICAL_QUICK_SECONDS), flush=True)
                    next_status += STATUS_EVERY_SECONDS
        except BaseException:
            for future in pending:  # the studies not started yet do not start
                future.cancel()
            raise
    return seconds


# ------------------------------------------------------------ the report
def write_report(out: Path, studies: List[str], seconds: Dict[str, float], commands: Dict[str, str],
                 preset: str, wall: float, jobs: int = 1) -> Path:
    """``out/REPORT.md``: the verdicts, then per study its command, run time, table and plots (relative links)."""
    tiny = " --tiny" if preset == "--tiny" else ""
    parallel = (f", {jobs} studies at a time (their own times add up to {sum(seconds.values()):.0f} s)"
                if jobs > 1 else "")
    lines = ["# structngd: study report", "",
             f"`python -m experiments quick{tiny}`; {wall:.0f} s wall clock{parallel}. "
             f"Each section links the study's files under `{out}`.", "", *verdict_section(out, studies)]
    for name in studies:
        lines += _study_section(out, name, commands[name], seconds[name])
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def verdict_section(out: Path, studies: List[str]) -> List[str]:
    """``## Verdict``: one bullet per study, its verdict sentences (or a line saying it wrote none)."""
    lines = ["## Verdict", ""]
    for name in studies:
        verdict = pages.read_verdict(out / name)
        if verdict:
            lines.append(f"- **{name}**: {' '.join(verdict)}")
        elif (out / name / "table.md").exists():
            lines.append(f"- **{name}**: wrote no verdict; see [its table]({name}/table.md).")
        else:
            lines.append(f"- **{name}**: wrote no verdict and no table.")
    return lines + [""]


def _study_section(out: Path, name: str, command: str, seconds: float) -> List[str]:
    """A study's section of the report: command, time, files, table and plots."""
    folder = out / name
    lines = [f"## {name}: {_summary(importlib.import_module(STUDIES[name]))}", ""]
    lines += [f"`{command}` ({seconds:.0f} s). Files: "
              + ", ".join(f"[{p.name}]({name}/{p.name})" for p in sorted(folder.iterdir()) if p.is_file()), ""]
    table = folder / "table.md"
    if table.exists():
        lines += [line.replace("# ", "### ", 1) if line.startswith("#") else line
                  for line in table.read_text().splitlines()] + [""]
    return lines + [f"![{p.stem}]({name}/{p.name})" for p in sorted(folder.glob("*.png"))] + [""]


#: the modules of the ``experiments`` extra (import name -> distribution name)
EXTRA_MODULES = {"matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn", "mnist1d": "mnist1d",
                 "cma": "cma"}


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m experiments ...``; a study's own command records its command and hardware in ``<out>/run.json``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = public_command(argv)
    missing = [dist for module, dist in EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing and args.study != "pages":
        print(f"{parser.prog}: the studies need the experiments extra (missing: {', '.join(missing)}); "
              'install it from the repository root with: pip install -e ".[experiments]"', file=sys.stderr)
        return 2
    start = time.perf_counter()
    args.run(args)
    if args.study in STUDIES and getattr(args, "out", None) is not None and args.out.is_dir():
        write_run_record(args.out, layout="study", command=args.command_line, studies=[args.study],
                         study_commands={args.study: args.command_line}, wall_seconds=time.perf_counter() - start,
                         **hardware(getattr(args, "device", None)))
    return 0
