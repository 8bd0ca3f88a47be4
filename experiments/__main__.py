"""Dispatcher: ``python -m experiments <study> [options]`` or ``python -m experiments quick``.

Adding a study is one line in :data:`STUDIES`: its name and the module that defines
``add_arguments(parser)`` (its command-line options, including ``--tiny/--quick/--full`` and
``--out``) and ``run(args)``. ``quick`` runs every study's quick preset (``--tiny``: the
seconds-long smoke presets) into ``<out>/<study>/`` and writes ``<out>/REPORT.md`` linking
their tables and plots. The console script ``structngd-experiments`` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

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


def study_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one study's options."""
    module = importlib.import_module(STUDIES[name])
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments {name}", description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    quick.set_defaults(run=run_quick)
    for name, module_name in STUDIES.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or name).strip().splitlines()[0]
        sub = commands.add_parser(
            name, help=summary, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def run_quick(args: argparse.Namespace) -> None:
    """Run the chosen studies one after the other, then write the report."""
    preset = "--tiny" if args.tiny else "--quick"
    seconds: Dict[str, float] = {}
    commands: Dict[str, str] = {}
    for name in args.studies:
        print(f"\n=== {name} ({preset})", flush=True)
        extra = [] if args.tiny else QUICK_OVERVIEW[name]
        commands[name] = " ".join([f"python -m experiments {name}", preset, *extra])
        study_args = study_parser(name).parse_args([preset, *extra, "--out", str(args.out / name)])
        torch.set_default_dtype(torch.float32)  # each study sets what it needs
        start = time.perf_counter()
        study_args.run(study_args)
        seconds[name] = time.perf_counter() - start
    report = write_report(args.out, args.studies, seconds, commands, preset)
    print(f"\nreport: {report}")


def write_report(out: Path, studies: List[str], seconds: Dict[str, float], commands: Dict[str, str],
                 preset: str) -> Path:
    """``out/REPORT.md``: per study its command, run time, table and plots (relative links)."""
    lines = [
        "# structngd: study report",
        "",
        f"`python -m experiments quick{' --tiny' if preset == '--tiny' else ''}`; "
        f"total {sum(seconds.values()):.0f} s. Each section links the study's files under `{out}`.",
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
