"""Helpers shared by the studies: torch set-up, timing, evaluation schedules, curves,
selection, Markdown text, output files and plots."""

from __future__ import annotations

import csv
import json
import math
import platform
import textwrap
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch


# ----------------------------------------------------------------- set-up
def configure_torch(threads: Optional[int] = None, dtype: torch.dtype = torch.float64) -> None:
    """Default dtype and number of intra-op threads (``None`` keeps torch's choice)."""
    torch.set_default_dtype(dtype)
    if threads:
        torch.set_num_threads(threads)


def check_jobs(jobs) -> int:
    """``--jobs``: a positive integer (how many runs or studies go at once), else a clear error."""
    if not isinstance(jobs, int) or jobs < 1:
        raise SystemExit(f"--jobs must be a positive integer, got {jobs!r}")
    return jobs


# --------------------------------------------------------------- timing
class Stopwatch:
    """Accumulates the wall-clock time of the ``with`` blocks it times (``perf_counter``); on a
    CUDA ``device`` it synchronizes at both ends, so queued kernels are counted."""

    def __init__(self, device=None):
        self.seconds = 0.0
        device = torch.device(device) if device is not None else None
        cuda = device is not None and device.type == "cuda"
        self._sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def __enter__(self) -> "Stopwatch":
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start


def fork_rng(device=None):
    """``torch.random.fork_rng`` over the CPU generator and, for a CUDA ``device``, that device's:
    seeds set inside (fixed-noise evaluations) leave the training stream where it was."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index if device.index is not None else torch.cuda.current_device()])


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, with a clear error for a CUDA device that is absent."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available (torch {torch.__version__})")
    return device


def eval_points(iterations: int, count: int = 100) -> List[int]:
    """Iterations at which to evaluate a run, dense at the start: the union of ``count``
    geometrically and ``count`` linearly spaced points in ``[0, iterations]`` (0: before any step)."""
    if count < 2 or iterations <= 1:
        geometric = {iterations}
    else:
        ratio = iterations ** (1.0 / (count - 1))
        geometric = {round(ratio**i) for i in range(count)}
    linear = {round(i * iterations / count) for i in range(count + 1)}
    return sorted({0} | geometric | linear)


def low_rank(dim: int, most: float = math.inf) -> int:
    """The rank / block parameter ``k`` of the low-rank structures at dimension ``dim``:
    ``clamp(round(sqrt(d) / 2), 2, 10)``, lowered to ``most`` where a structure needs a smaller
    one (``block_triangular(k)`` needs ``k < d``, ``hierarchical(k, k)`` ``2 k < d``), and at least 1."""
    return max(1, min(10, max(2, round(math.sqrt(dim) / 2)), most))


# ------------------------------------------------------------- curves
@dataclass
class Curve:
    """One optimization trace: objective ``values`` at ``iterations`` after ``seconds``
    of (timed) work. Values after a divergence are ``nan``."""

    iterations: List[int]
    seconds: List[float]
    values: List[float]

    def first_below(self, threshold: float) -> Tuple[Optional[int], Optional[float]]:
        """``(iteration, seconds)`` of the first value below ``threshold``, or ``(None, None)``."""
        for it, sec, value in zip(self.iterations, self.seconds, self.values):
            if value < threshold:
                return it, sec
        return None, None

    @property
    def final(self) -> float:
        return self.values[-1] if self.values else math.nan

    def append(self, iteration: int, seconds: float, value: float) -> None:
        self.iterations.append(iteration)
        self.seconds.append(seconds)
        self.values.append(value)

    def along(self, axis: str) -> List[float]:
        """The x values of a plot against ``axis``: ``seconds``, else iterations."""
        return self.seconds if axis == "seconds" else self.iterations

    @property
    def total_seconds(self) -> float:
        """Seconds of work up to the last evaluation that was reached (``nan`` for none)."""
        return max((s for s in self.seconds if s == s), default=math.nan)

    def pad_to(self, points: Sequence[int]) -> None:
        """Extend a run that stopped early (diverged) to every evaluation point, with ``nan``."""
        missing = points[len(self.iterations):]
        self.iterations += missing
        self.seconds += [math.nan] * len(missing)
        self.values += [math.nan] * len(missing)


def group_by(items: Iterable[Any], key: Callable[[Any], Any]) -> Dict[Any, list]:
    """``{key(item): [items with that key]}`` in order of first appearance."""
    groups = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return groups


def keep_best(slot: dict, name: Any, candidate: Any, rank: Callable[[Any], Any]) -> None:
    """``slot[name] = candidate`` unless what is there already ranks lower (or equal)."""
    if name not in slot or rank(candidate) < rank(slot[name]):
        slot[name] = candidate


def missing_last(value: Optional[float]) -> float:
    """Sort value with ``None`` (never reached) and ``nan`` (diverged) after every number."""
    return math.inf if value is None or value != value else value


def reach_then_final(reached: Optional[float], curve: Curve) -> Tuple[float, float]:
    """Selection key: the reach (iterations or seconds to a tolerance) first, then the final value."""
    return missing_last(reached), missing_last(curve.final)


def settle_optima(optima: Dict[tuple, dict], reached: Iterable[Tuple[tuple, Curve]]) -> None:
    """Each entry of ``optima`` gets ``best_run``, the lowest finite value of the curves filed
    under its key in ``reached`` (``(key, curve)`` pairs), and ``optimum``, the lower of its
    ``reference`` and ``best_run`` (any iterate bounds the optimum from above)."""
    for key, curve in reached:
        entry = optima[key]
        best = min((v for v in curve.values if v == v), default=math.inf)
        entry["best_run"] = min(entry.get("best_run", math.inf), best)
    for entry in optima.values():
        entry["optimum"] = min(entry["reference"], entry["best_run"])


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """Pointwise mean of curves evaluated at the same iterations (``nan`` propagates)."""
    first = curves[0]
    if any(c.iterations != first.iterations for c in curves):
        raise ValueError("curves must share their evaluation iterations")
    n = len(curves)
    return Curve(
        iterations=list(first.iterations),
        seconds=[sum(col) / n for col in zip(*(c.seconds for c in curves))],
        values=[sum(col) / n for col in zip(*(c.values for c in curves))],
    )


@dataclass(frozen=True)
class LrSetting:
    """One optimizer setting of a method: a learning rate and, for NGD, a trust region ``max_step``."""

    method: str
    lr: float
    max_step: Optional[float] = None

    @property
    def label(self) -> str:
        return setting_text(self.lr, self.max_step)


# ---------------------------------------------------------- formatting
def fmt(x: Optional[float], digits: int = 3) -> str:
    """Compact number: ``3.14``, ``1.2e-05``, ``–`` for ``None``/``nan``, ``inf``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, int):
        return str(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def fmt_ratio(slow: Optional[float], fast: Optional[float], slow_bound: float, fast_bound: float) -> str:
    """Ratio ``slow / fast`` of two times-to-target, with bounds when one was not reached.

    ``None`` means not reached within the run, whose total (iterations or seconds) is the
    matching ``*_bound``: ``>x`` if only ``slow`` missed, ``<x`` if only ``fast`` missed.
    """
    if slow is not None and fast is not None:
        return fmt(slow / fast, 2) if fast > 0 else "–"
    if slow is None and fast is not None and fast > 0:
        return ">" + fmt(slow_bound / fast, 2)
    if fast is None and slow is not None and fast_bound > 0:
        return "<" + fmt(slow / fast_bound, 2)
    return "–"


def reach_text(value: Optional[float], digits: int = 3) -> str:
    """Iterations or seconds to a target: ``not reached`` for ``None``."""
    return "not reached" if value is None else fmt(value, digits)


def error_text(err: Exception, width: int) -> str:
    """``Type: first line of the message`` cut to ``width`` characters, for a run's status."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:width]}"


def notes_section(notes: Sequence[str]) -> List[str]:
    """A report's ``Notes:`` list (no lines without notes)."""
    return ["", "Notes:", ""] + [f"- {note}" for note in notes] if notes else []


def grid_text(values: Iterable[Optional[float]]) -> str:
    """A grid of settings as ``{0.1, 1, none}``."""
    return "{" + ", ".join("none" if v is None else f"{v:g}" for v in values) + "}"


def environment_text(runtime: float) -> str:
    """The software and hardware a report's numbers come from, and the study's runtime."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}; "
            f"study runtime {runtime:.0f} s.")


def setting_text(lr: float, max_step: Optional[float] = None) -> str:
    """A learning rate and its trust region: ``0.5``, or ``0.5, tr 1`` with ``max_step`` 1."""
    return f"{lr:g}" + ("" if max_step is None else f", tr {max_step:g}")


def cond_text(cond: float) -> str:
    """A condition number: ``10``, ``1e4`` (powers of ten from 100 on as ``1eN``)."""
    exponent = math.log10(cond)
    return f"1e{exponent:.0f}" if cond >= 100 and exponent == round(exponent) else f"{cond:g}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------- files
def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON (``nan``/``inf`` become ``null``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(obj), indent=1))


def rounded(values: Iterable[float], digits: int = 4) -> List[float]:
    """``values`` rounded to ``digits`` significant digits (compact JSON curves)."""
    return [float(f"{v:.{digits}g}") for v in values]


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_csv(path: Path, rows: Sequence[Dict[str, object]]) -> None:
    """Write dict rows (all with the keys of the first) as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------- plots
@dataclass
class Line:
    """One line of a plot panel."""

    x: Sequence[float]
    y: Sequence[float]
    color: str
    style: str = "-"
    marker: Optional[str] = None  # e.g. "o": points show even where a line has one


def plot_panels(path: Path, panels: Dict[str, List[Line]], xlabel: str, ylabel: str, title: str,
                legend: Sequence[Tuple[str, str, str]], logy: bool = True, floor: float = 1e-12,
                ncols: Optional[int] = None, xticks: Optional[Sequence[float]] = None) -> None:
    """One panel per key of ``panels``, a shared legend of ``(label, color, style)`` entries
    below them (outside the axes, so it covers no data).

    Values are clipped below at ``floor`` so zeros show on a log scale. The panels fill a grid
    of ``ncols`` columns (default: about square). With ``xticks`` the x axis is logarithmic with
    exactly those ticks, labelled as plain numbers.
    """
    plt = pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator

    ncols = min(ncols or math.ceil(math.sqrt(len(panels))), len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for line in lines:
            y = [max(v, floor) if v == v else math.nan for v in line.y]
            ax.plot(line.x, y, color=line.color, linestyle=line.style, marker=line.marker, markersize=4,
                    linewidth=1.4, alpha=0.9)
        if logy:
            ax.set_yscale("log")
        if xticks is not None:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(list(xticks)))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([f"{t:g}" for t in xticks])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=c, linestyle=s, linewidth=1.8) for _, c, s in legend]
    fig.suptitle(textwrap.fill(title, int(11 * fig.get_figwidth())), fontsize=11)
    save_with_legend(fig, path, handles, [label for label, _, _ in legend])


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_with_legend(fig, path: Path, handles: Sequence, labels: Sequence[str]) -> None:
    """Lay out ``fig``, put the legend of ``handles`` below its panels (outside every axis, in
    as many columns as the figure's width holds) and save it at ``path``, the canvas grown to
    hold the legend."""
    fig.tight_layout()
    entry_inches = 0.8 + 0.07 * max((len(label) for label in labels), default=1)  # line sample + 9 pt text
    columns = max(1, min(len(labels), int(fig.get_figwidth() // entry_inches)))
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=columns, fontsize=9, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
