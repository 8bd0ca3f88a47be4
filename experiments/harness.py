"""The skeleton every study shares.

A :class:`Study` holds a study's presets and its own pieces (what it computes, its report, its
verdict, its data files and plots); it builds the study's command line from the settings
dataclass (:mod:`experiments.cli`) and runs it: resolve the settings, configure torch, compute,
write the outputs, print the report. Every study writes into ``--out``

* ``table.md``: its title, a verdict paragraph (what won, by how much, against which baseline,
  whether the study's targets hold), then its own report; also printed;
* ``verdict.json``: ``{"study": name, "lines": [...]}``, the verdict's sentences;
* its own data files and plots.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import cli, common
from .common import Curve, fmt


@dataclass(frozen=True)
class Study:
    """One study. ``compute(settings)`` returns its results; ``report(results, settings,
    runtime)`` the Markdown below the verdict; ``verdict(results, settings)`` the verdict's
    sentences; ``write`` and ``plot`` ``(results, settings, out)`` the paths they wrote."""

    name: str
    title: str
    presets: Dict[str, Any]
    full_time: str  # how long ``--full`` takes, for its help
    dtype: torch.dtype
    compute: Callable[[Any], Any]
    report: Callable[[Any, Any, float], str]
    verdict: Callable[[Any, Any], List[str]]
    write: Callable[[Any, Any, Path], List[Path]]
    plot: Callable[[Any, Any, Path], List[Path]]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The study's options: the presets, ``--out`` and one option per settings field."""
        cli.add_preset_arguments(parser, self.full_time)
        out = Path("results") / self.name
        parser.add_argument("--out", type=Path, default=out, help=f"output directory [default: {out}]")
        cli.add_settings_arguments(parser, type(self.presets["quick"]), self.presets["quick"])

    def resolve_settings(self, args: argparse.Namespace) -> Any:
        """The chosen preset with every option given on the command line."""
        return cli.resolve(self.presets[cli.preset_name(args)], args)

    def run(self, args: argparse.Namespace) -> None:
        """Run the study, write the outputs and print the report."""
        settings = self.resolve_settings(args)
        common.configure_torch(settings.threads, self.dtype)
        start = time.perf_counter()
        results = self.compute(settings)
        lines = self.verdict(results, settings)
        report = compose_report(self.title, lines, self.report(results, settings, time.perf_counter() - start))
        paths = write_report(args.out, self.name, report, lines)
        paths += self.write(results, settings, args.out) + self.plot(results, settings, args.out)
        print(report)
        print(f"total runtime {time.perf_counter() - start:.0f} s; wrote:")
        for path in paths:
            print(f"  {path}")


# ------------------------------------------------- studies against optima
@dataclass
class OptimaResults:
    """The results of a study whose runs are measured against known optima (gaussian, wishart):
    every run, the optimum per problem, the best setting per method and the table's rows."""

    runs: list
    optima: dict
    best: Dict[Any, Dict[str, "Best"]]
    rows: List[dict] = field(default_factory=list)

    @classmethod
    def compute(cls, settings: Any, run_all: Callable, attach_gaps: Callable, best_results: Callable,
                summary_rows: Callable) -> "OptimaResults":
        """``run_all(settings)``, the gaps to the optima, ``best_results(runs, settings)`` and
        ``summary_rows(results, settings)``."""
        runs, optima = run_all(settings)
        attach_gaps(runs, optima)
        results = cls(runs, optima, best_results(runs, settings))
        results.rows = summary_rows(results, settings)
        return results


@dataclass
class Best:
    """The best setting of one method on one problem: its runs and their seed-averaged curves."""

    config: common.LrSetting
    value: Curve  # the objective
    gap: Curve  # to the optimum
    reached: Tuple[Optional[int], Optional[float]]  # iterations and seconds to ``gap < tol``
    runs: list


def best_settings(runs: Sequence[Any], problem_of: Callable, value_of: Callable,
                  tol: float) -> Dict[Any, Dict[str, Best]]:
    """``{problem: {method: Best}}`` over runs with a ``config`` and a ``gap`` curve: the
    setting reaching ``gap < tol`` in the fewest iterations, else the smallest final gap."""
    best: Dict[Any, Dict[str, Best]] = defaultdict(dict)
    for (problem, config), members in common.group_by(runs, lambda r: (problem_of(r), r.config)).items():
        gap = common.mean_curve([r.gap for r in members])
        result = Best(config, common.mean_curve([value_of(r) for r in members]), gap, gap.first_below(tol), members)
        common.keep_best(best[problem], config.method, result, lambda b: common.reach_then_final(b.reached[0], b.gap))
    return best


def compose_report(title: str, verdict: Sequence[str], body: str) -> str:
    """``# title``, the verdict paragraph, then the study's own report."""
    return f"# {title}\n\n**Verdict.** {' '.join(verdict)}\n\n{body}"


def write_report(out: Path, name: str, report: str, verdict: Sequence[str]) -> List[Path]:
    """``table.md`` and ``verdict.json`` in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(report)
    common.write_json(out / "verdict.json", {"study": name, "lines": list(verdict)})
    return [out / "table.md", out / "verdict.json"]


# ------------------------------------------------------------ verdicts
def times_text(ratio: float) -> str:
    """A speed-up ``baseline / ours``: ``2.5x faster`` above 1, ``1.3x slower`` below."""
    return f"{fmt(ratio, 2)}x faster" if ratio >= 1 else f"{fmt(1 / ratio, 2)}x slower"


def median_ratio(pairs: Sequence[Tuple[Optional[float], Optional[float]]]) -> Optional[float]:
    """The median of ``baseline / ours`` over the pairs ``(ours, baseline)`` where both are
    positive numbers (``None``: not reached); ``None`` when there is no such pair."""
    ratios = [b / o for o, b in pairs if o is not None and b is not None and o > 0 and b > 0]
    return statistics.median(ratios) if ratios else None


def head_to_head(pairs: Sequence[Tuple[Optional[float], Optional[float]]], ours: str, baseline: str,
                 what: str, cells: str, unit: str,
                 finals: Optional[Sequence[Tuple[float, float]]] = None) -> str:
    """One sentence on the ``(ours, baseline)`` costs of ``cells`` to reach ``what`` (``None``:
    not reached): who got there first how often, and the median speed-up (in ``unit``) where
    both did. ``finals``: the cells' ``(ours, baseline)`` final values (lower is better), to say
    who ended lower where neither reached ``what``."""
    first = sum(o is not None and (b is None or o < b) for o, b in pairs)
    behind = sum(b is not None and (o is None or b < o) for o, b in pairs)
    missed = [i for i, (o, b) in enumerate(pairs) if o is None and b is None]
    ties = len(pairs) - first - behind - len(missed)
    counts = [f"{ours} reached {what} first in {first} of {len(pairs)} {cells}", f"{baseline} in {behind}"]
    counts += [f"tied in {ties}"] * bool(ties)
    if missed:
        lower = sum(finals[i][0] < finals[i][1] for i in missed) if finals else None
        counts.append(f"neither in {len(missed)}" + ("" if lower is None else f" ({ours} ended lower in {lower})"))
    ratio = median_ratio(pairs)
    speed = f"; where both did, {ours} was {times_text(ratio)} in {unit} (median)" if ratio else ""
    return ", ".join(counts) + speed + "."
