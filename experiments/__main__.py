"""Dispatcher: ``python -m experiments <study> [options]``.

Adding a study is one line in :data:`STUDIES`: its name and the module that defines
``add_arguments(parser)`` (its command-line options) and ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: study name -> module defining ``add_arguments(parser)`` and ``run(args)``
STUDIES = {
    "gaussian": "experiments.gaussian",
    "vi": "experiments.vi",
    "dl": "experiments.dl",
    "es": "experiments.es",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-command per study."""
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
