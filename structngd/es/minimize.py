"""The ask-evaluate-tell loop: :func:`minimize`."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .nes import StructuredNES
from .result import ESResult
from .utilities import as_costs, real_number


def _evaluate(f: Callable, x: Tensor, batch: bool, executor) -> Tensor:
    if batch:
        values = as_costs(f(x)).reshape(-1)
        if values.shape[0] != x.shape[0]:
            raise ValueError(f"batch=True: f returned {values.shape[0]} values for {x.shape[0]} points")
        return values
    rows = list(x.unbind(0))
    raw = list(executor.map(f, rows)) if executor is not None else [f(r) for r in rows]
    return torch.tensor([real_number(v, "f must return a real scalar for one point") for v in raw],
                        dtype=torch.float64)


def minimize(
    f: Callable, x0, sigma0: float, structure="dense", budget: Optional[int] = None, target: Optional[float] = None,
    executor=None, batch: bool = False, progress: bool = True,
    callback: Optional[Callable[[StructuredNES], Optional[bool]]] = None, **options,
) -> ESResult:
    """Minimise ``f`` with a :class:`StructuredNES` and return an :class:`ESResult`.

    Args:
        f: the cost, point by point (``f(x) -> float``, ``x`` a ``(d,)`` tensor), or with ``batch=True`` one
            call on the whole ``(popsize, d)`` population returning ``popsize`` values.
        x0, sigma0, structure: the initial search distribution (see :class:`StructuredNES`).
        budget: maximal number of evaluations (``maxfevals``); ``target``: stop once the best value is
            ``<= target`` (``ftarget``).
        executor: any ``concurrent.futures.Executor``; the population is evaluated with ``executor.map(f, points)``.
        progress: show a tqdm progress bar (silently off when tqdm is not installed).
        callback: called with the strategy after every generation; returning ``True`` stops the run
            (``stop_reason`` then holds ``"callback"``).
        **options: every other :class:`StructuredNES` option (``popsize``, ``seed``, ``rates``, ``restarts``,
            ``tolx``, ``max_iterations``, group options ...).

    ``result.history`` records every generation and ``result.plot()`` draws it.

    No evaluation is lost to an interruption: on ``KeyboardInterrupt`` the run so far comes back as the
    result, with ``stop_reason`` ``{"interrupted": "KeyboardInterrupt"}``; any other exception (from ``f``, the
    executor or the callback) is raised again with the run so far attached as its attribute ``partial_result``
    (an :class:`ESResult`, said in a note of the exception).
    """
    if batch and executor is not None:
        raise ValueError("batch=True and executor are exclusive: pass one of them")
    if not callable(f):
        raise ValueError(f"f must be callable, got {f!r}")
    es = StructuredNES(x0, sigma0, structure=structure, budget=budget, target=target, **options)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=budget, unit="evals", desc="structngd.es", leave=False)
        except ImportError:  # optional dependency
            pass
    extra = {}
    try:
        while not es.stop():
            x = es.ask()
            es.tell(_evaluate(f, x, batch, executor))
            if bar is not None:
                bar.update(es.history["popsize"][-1])
                bar.set_postfix(best=f"{es.best_f:.4g}", sigma=f"{es.sigma:.3g}", refresh=False)
            if callback is not None and callback(es) is True:
                extra["callback"] = True
                break
    except KeyboardInterrupt:
        extra["interrupted"] = "KeyboardInterrupt"
    except Exception as err:
        err.partial_result = _result(es, {"interrupted": type(err).__name__})
        if hasattr(err, "add_note"):  # Python >= 3.11
            err.add_note(f"structngd.es.minimize: the run so far ({es.evaluations} evaluations, best f "
                         f"{es.best_f:.6g}) is this exception's partial_result")
        raise
    finally:
        if bar is not None:
            bar.close()
    return _result(es, extra)


def _result(es: StructuredNES, extra: dict) -> ESResult:
    result = es.result
    result.stop_reason.update(extra)
    return result
