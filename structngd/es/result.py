"""Run records of the evolution strategies: :class:`ESHistory` and :class:`ESResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from torch import Tensor

#: the per-iteration columns of :class:`ESHistory`
COLUMNS = ("iteration", "evaluations", "best_f", "f_best", "f_median", "sigma", "popsize", "restart")


class ESHistory:
    """One row per generation: cumulative iteration and evaluation counts, best value so far (``best_f``),
    the generation's best and median finite value, ``sigma``, the population size and the restart index;
    columns are plain Python lists (``history["sigma"]``, ``history.sigma``), :meth:`plot` draws them."""

    def __init__(self, data: Optional[Dict[str, List]] = None):
        self.data: Dict[str, List] = {name: list((data or {}).get(name, [])) for name in COLUMNS}

    def append(self, **row) -> None:
        for name in COLUMNS:
            self.data[name].append(row[name])

    def __len__(self) -> int:
        return len(self.data["iteration"])

    def __getitem__(self, name: str) -> List:
        return self.data[name]

    def __getattr__(self, name: str):
        if name != "data" and name in COLUMNS:
            return self.data[name]
        raise AttributeError(name)

    def as_dict(self) -> Dict[str, List]:
        return {name: list(values) for name, values in self.data.items()}

    def copy(self) -> "ESHistory":
        return ESHistory(self.as_dict())

    def __repr__(self) -> str:
        if not len(self):
            return "ESHistory(empty)"
        return (f"ESHistory({len(self)} iterations, {self.data['evaluations'][-1]} evaluations, "
                f"best f {self.data['best_f'][-1]:.6g})")

    def plot(self, ax=None, x: str = "evaluations", fopt: float = 0.0, label: Optional[str] = None):
        """Best value so far minus ``fopt`` (log scale) and ``sigma`` against ``x`` (``"evaluations"`` or
        ``"iteration"``), into ``ax`` or a new figure; returns the axes. Needs matplotlib."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:  # pragma: no cover - optional dependency
            raise ImportError("ESHistory.plot needs matplotlib (pip install matplotlib)") from err
        if x not in ("evaluations", "iteration"):
            raise ValueError(f"x must be 'evaluations' or 'iteration', got {x!r}")
        if ax is None:
            _, ax = plt.subplots()
        xs = self.data[x]
        gap = [max(v - fopt, 1e-300) for v in self.data["best_f"]]
        (line,) = ax.semilogy(xs, gap, label=(label or "f") + " - fopt (best so far)")
        ax.semilogy(xs, self.data["sigma"], linestyle="--", color=line.get_color(), label=(label or "") + " sigma")
        ax.set_xlabel(x)
        ax.legend()
        return ax


@dataclass
class ESResult:
    """Outcome of an evolution-strategy run.

    Attributes:
        x: best point evaluated (a ``(d,)`` tensor); f: its value (``inf`` if no finite value was seen).
        evaluations, iterations: function evaluations and generations, all restarts included.
        stop_reason: the active stop criteria, pycma style (``{"ftarget": 1e-8}``); history: the :class:`ESHistory`.
        mean, sigma: the final mean and global step size of the search distribution.
        restarts: restarts performed; nonfinite: evaluations that returned NaN or an infinity.
    """

    x: Tensor
    f: float
    evaluations: int
    iterations: int
    stop_reason: Dict[str, object]
    history: ESHistory = field(default_factory=ESHistory, repr=False)
    mean: Optional[Tensor] = field(default=None, repr=False)
    sigma: Optional[float] = None
    restarts: int = 0
    nonfinite: int = 0

    def plot(self, ax=None, **kwargs):
        """Shortcut for ``self.history.plot``."""
        return self.history.plot(ax=ax, **kwargs)


__all__ = ["ESHistory", "ESResult", "COLUMNS"]
