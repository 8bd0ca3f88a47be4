"""Helpers shared by the studies: torch set-up, evaluation schedules, curve summaries,
Markdown tables, output files, plots and progress bars."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is an optional dependency
    tqdm = None


# ----------------------------------------------------------------- set-up
def configure_torch(threads: Optional[int] = None, dtype: torch.dtype = torch.float64) -> None:
    """Default dtype and number of intra-op threads (``None`` keeps torch's choice)."""
    torch.set_default_dtype(dtype)
    if threads:
        torch.set_num_threads(threads)


PRESET_NAMES = ("tiny", "quick", "full")


def add_preset_arguments(parser, minutes: str) -> None:
    """``--tiny`` (seconds), ``--quick`` (the default) and ``--full`` (``minutes``: how long)."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="smoke test (seconds)")
    mode.add_argument("--quick", action="store_true", help="the default: a few minutes on 2 cores")
    mode.add_argument("--full", action="store_true", help=f"the README's tables ({minutes})")


def preset_name(args) -> str:
    """The preset chosen on the command line (``quick`` unless ``--tiny`` or ``--full``)."""
    for name in ("tiny", "full"):
        if getattr(args, name, False):
            return name
    return "quick"


def resolve_preset(presets: dict, args, skip: Iterable[str] = ()):
    """The preset chosen on the command line with every option given there
    (``args.<field>`` not ``None``; lists become tuples) except the fields in ``skip``. A
    ``device`` field is checked with :func:`resolve_device` (a clear error for missing CUDA)."""
    preset = presets[preset_name(args)]
    overrides = {}
    for name in preset.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None and name not in skip:
            overrides[name] = tuple(value) if isinstance(value, list) else value
    settings = replace(preset, **overrides)
    if "device" in preset.__dataclass_fields__:
        resolve_device(settings.device)
    return settings


def check_jobs(jobs) -> int:
    """``--jobs``: a positive integer (how many runs or studies go at once), else a clear error."""
    if not isinstance(jobs, int) or jobs < 1:
        raise SystemExit(f"--jobs must be a positive integer, got {jobs!r}")
    return jobs


def parse_optional_float(text: str) -> Optional[float]:
    """``argparse`` type for a float that may be ``none`` (no value)."""
    return None if text.lower() in ("none", "off", "inf") else float(text)


# --------------------------------------------------------------- timing
class Stopwatch:
    """Accumulates the wall-clock time of the ``with`` blocks it times (``perf_counter``); on a
    CUDA ``device`` it synchronizes at both ends, so queued kernels are counted."""

    def __init__(self, device=None):
        self.seconds = 0.0
        device = torch.device(device) if device is not None else None
        self._sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else None

    def __enter__(self) -> "Stopwatch":
        if self._sync:
            self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._sync:
            self._sync()
        self.seconds += time.perf_counter() - self._start


def fork_rng(device=None):
    """``torch.random.fork_rng`` over the CPU generator and, for a CUDA ``device``, that device's:
    seeds set inside (fixed-noise evaluations) leave the training stream where it was."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device.index if device.index is not None else torch.cuda.current_device()])
    return torch.random.fork_rng(devices=[])


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
    """Iterations at which to evaluate a run: dense at the start, uniform later.

    The union of about ``count`` geometrically and ``count`` linearly spaced points in
    ``[0, iterations]`` (0 is the initial point, before any step).
    """
    geometric = {round(x) for x in _geomspace(1, iterations, count)}
    linear = {round(i * iterations / count) for i in range(count + 1)}
    return sorted({0} | geometric | linear)


def _geomspace(start: float, stop: float, count: int) -> List[float]:
    if count < 2 or stop <= start:
        return [stop]
    ratio = (stop / start) ** (1.0 / (count - 1))
    return [start * ratio**i for i in range(count)]


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


def missing_last(value: Optional[float]) -> float:
    """Sort value with ``None`` (never reached) and ``nan`` (diverged) after every number."""
    return math.inf if value is None or value != value else value


def reach_then_final(reached: Optional[float], curve: Curve) -> Tuple[float, float]:
    """Selection key: the reach (iterations or seconds to a tolerance) first, then the final value."""
    return missing_last(reached), missing_last(curve.final)


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


def plot_panels(
    path: Path,
    panels: Dict[str, List[Line]],
    xlabel: str,
    ylabel: str,
    title: str,
    legend: Sequence[Tuple[str, str, str]],
    logy: bool = True,
    floor: float = 1e-12,
    ncols: Optional[int] = None,
) -> None:
    """One panel per key of ``panels``, a shared legend of ``(label, color, style)`` entries.

    Values are clipped below at ``floor`` so zeros show on a log scale. The panels fill a
    grid of ``ncols`` columns (default: about square).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(ncols or math.ceil(math.sqrt(len(panels))), len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 2.2, 3.4 * nrows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for line in lines:
            y = [max(v, floor) if v == v else math.nan for v in line.y]
            ax.plot(line.x, y, color=line.color, linestyle=line.style, linewidth=1.4, alpha=0.9)
        if logy:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=c, linestyle=s, linewidth=1.8) for _, c, s in legend]
    fig.legend(handles, [label for label, _, _ in legend], loc="center right", fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------- progress
def progress(total: int, desc: str):
    """A tqdm progress bar (a silent stand-in without tqdm); use ``update()``/``close()``."""
    if tqdm is not None:
        return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
