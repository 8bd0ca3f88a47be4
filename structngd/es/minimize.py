"""The ask-evaluate-tell loop: :func:`minimize`."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .nes import StructuredNES
from .result import ESResult


def _evaluate(f: Callable, x: Tensor, batch: bool, executor) -> list:
    if batch:
        values = f(x)
        if isinstance(values, Tensor):
            values = values.detach().to("cpu", torch.float64)
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if values.shape[0] != x.shape[0]:
            raise ValueError(f"batch=True: f returned {values.shape[0]} values for {x.shape[0]} points")
        return values
    rows = list(x.unbind(0))
    raw = list(executor.map(f, rows)) if executor is not None else [f(r) for r in rows]
    out = []
    for v in raw:
        try:
            out.append(float(v))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"f must return a scalar for one point, got {v!r} ({err})") from None
    return torch.tensor(out, dtype=torch.float64)


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
    finally:
        if bar is not None:
            bar.close()
    result = es.result
    result.stop_reason.update(extra)
    return result
