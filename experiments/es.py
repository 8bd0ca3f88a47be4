"""Evolution strategies: StructuredNES structures against CMA-ES (pycma) and evotorch on BBOB and at large d.

StructuredNES (dense, diagonal, triangular, rank-k plus diagonal and Heisenberg covariances),
pycma's CMA-ES and sep-CMA and evotorch's XNES and SNES minimise six BBOB functions over several
dimensions and instances: the expected running time (ERT) to f - fopt <= 1e-8, its ratio to CMA-ES's
and runtime ECDFs; a timed large-scale part adds evaluations and seconds to that target at large d.

Outputs in --out (default results/es): table.md, verdict.json, summary.csv, results.json, ecdf.png,
ert_vs_dim.png and large_scale.png. Presets: --tiny (seconds, d = 2), --quick (the default: d up to
10, large-scale d = 200) and --full (d up to 40, 15 instances, large-scale d up to 2000).

Full description: docs/studies.md."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import multiprocessing
import statistics
import time
import warnings
from bisect import bisect_right
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from structngd.es import StructuredNES, default_popsize

from . import bbob, common, harness, progress
from .cli import option
from .common import Line, fmt

FTARGET = 1e-8  #: target precision of the ERT and the success criterion
ECDF_TARGETS = tuple(10.0 ** (2 - 0.2 * i) for i in range(51))  #: COCO's targets 10^{2, 1.8, ..., -8}
SIGMA0 = 2.0
X0_RANGE = 3.0


# ------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """One optimizer: ``kind`` is ``nes`` (StructuredNES), ``cma`` (pycma) or ``evotorch``."""

    key: str
    label: str
    kind: str
    structure: str = "dense"
    options: Tuple[Tuple[str, object], ...] = ()
    low_rank: Optional[str] = None  # "block" / "heisenberg": needs the rank k

    def group_options(self, dim: int) -> Optional[Dict[str, int]]:
        """Group options at dimension ``dim`` (``None``: the structure does not exist there)."""
        k = common.low_rank(dim, most=dim - 1)
        if self.low_rank == "block":
            return {"k": k}
        if self.low_rank == "heisenberg":
            k = min(k, (dim - 1) // 2)
            return {"k": k, "k2": k} if k >= 1 else None
        return {}

    def describe(self, dim: int) -> str:
        """The label with the rank ``k`` at dimension ``dim`` filled in."""
        opts = self.group_options(dim) or {}
        return self.label.replace("(k)", f"({opts['k']})") if "k" in opts else self.label


METHODS = {
    m.key: m
    for m in (
        Method("dense", "dense", "nes"),
        Method("xnes", "xNES (dense, rates=xnes)", "nes", options=(("rates", "xnes"),)),
        Method("lower_triangular", "lower_triangular", "nes", "lower_triangular"),
        Method("diagonal", "diagonal", "nes", "diagonal"),
        Method("snes", "SNES (diagonal, rates=xnes)", "nes", "diagonal", (("rates", "xnes"),)),
        Method("block_triangular", "rank-k+diag (block_triangular(k)^T)", "nes", "block_triangular",
               (("transpose", True),), low_rank="block"),
        Method("heisenberg", "heisenberg(k)", "nes", "heisenberg", low_rank="heisenberg"),
        Method("cma", "CMA-ES (pycma)", "cma"),
        Method("sep_cma", "sep-CMA (pycma CMA_diagonal)", "cma", options=(("CMA_diagonal", True),)),
        Method("evotorch_xnes", "evotorch XNES", "evotorch", options=(("algorithm", "XNES"),)),
        Method("evotorch_snes", "evotorch SNES", "evotorch", options=(("algorithm", "SNES"),)),
    )
}
LARGE_METHODS = ("diagonal", "block_triangular", "cma", "sep_cma")
LARGE_PROBLEMS = ("ellipsoid_sep", "cigar_rank2")
LARGE_LABELS = {"ellipsoid_sep": "separable ellipsoid", "cigar_rank2": "rotated rank-2 cigar"}
#: reference ERTs (d = 10 / 40, x0 ~ U[-3, 3], sigma0 = 2, target 1e-8)
REFERENCE_ERT = {
    ("cma", 1): {10: 1513, 40: 5127},
    ("cma", 2): {10: 4123, 40: 48455},
    ("cma", 8): {10: 5203, 40: 61963},
    ("xnes", 1): {10: 6603, 40: 126501},
    ("xnes", 2): {10: 9418, 40: 172186},
    ("snes", 2): {10: 2941, 40: 13141},
}


def active_methods(settings: "Settings") -> Tuple[List[str], List[str]]:
    """The methods that run, and notes on those left out (evotorch does not import)."""
    wanted = [key for key in settings.methods if METHODS[key].kind == "evotorch"]
    try:
        if wanted:
            import evotorch  # noqa: F401
    except Exception:  # pragma: no cover - optional dependency, any import failure
        return ([key for key in settings.methods if key not in wanted],
                [f"{METHODS[key].label} skipped: evotorch does not import (pip install evotorch)" for key in wanted])
    return list(settings.methods), []


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines one study; built from a preset and the command line."""

    size: str = option(cli=False)
    dims: Tuple[int, ...] = option(help="BBOB dimensions")
    functions: Tuple[int, ...] = option(help="BBOB functions", choices=tuple(bbob.FUNCTIONS))
    instances: Tuple[int, ...] = option(help="BBOB instances")
    seeds: Tuple[int, ...] = option((0,), "seeds (one run per instance and seed)")
    methods: Tuple[str, ...] = option(tuple(METHODS), "methods", choices=tuple(METHODS))
    budget_factor: int = option(10000, "evaluation budget per run / d")
    restarts: int = option(9, "maximal IPOP restarts (StructuredNES, pycma)")
    time_cap: float = option(600.0, "seconds per BBOB run")
    stall: int = option(300, "evotorch: generations without improvement that end a run")
    large_dims: Tuple[int, ...] = option((), "large-scale dimensions (none given: skip the part)", nargs="*")
    large_methods: Tuple[str, ...] = option(LARGE_METHODS, "large-scale methods", choices=tuple(METHODS))
    large_problems: Tuple[str, ...] = option(LARGE_PROBLEMS, "large-scale problems", choices=LARGE_PROBLEMS)
    large_time_cap: float = option(120.0, "seconds per large-scale run")
    large_budget_factor: int = option(2000, "large-scale evaluation budget / d")
    threads: Optional[int] = option(1, "torch threads")
    device: str = option("cpu", "device of StructuredNES, evotorch and their function evaluations (e.g. cuda); "
                         "pycma runs on the CPU", check=common.resolve_device)
    jobs: int = option(1, "BBOB runs at once, each in its own process of --threads threads (the large-scale "
                       "part, timed, always runs alone)", check=common.check_jobs)


PRESETS = {
    "tiny": Settings(size="tiny", dims=(2,), functions=(1, 2), instances=(1,), budget_factor=2000,
                     methods=("dense", "diagonal", "block_triangular", "cma", "sep_cma"), restarts=2,
                     time_cap=10.0),
    "quick": Settings(size="quick", dims=(2, 5, 10), functions=(1, 2, 8, 10), instances=(1, 2, 3),
                      time_cap=60.0, large_dims=(200,), large_time_cap=15.0),
    "full": Settings(size="full", dims=(2, 5, 10, 20, 40), functions=tuple(bbob.FUNCTIONS),
                     instances=tuple(range(1, 16)), large_dims=(500, 1000, 2000)),
}


# ------------------------------------------------------------------ problems
class RankCigar:
    """Rotated rank-k cigar ``f(x) = ||U^T s||^2 + cond ||s - U U^T s||^2``, ``s = x - x*``, with
    ``U`` a random orthonormal ``d x k`` matrix: ``k`` long axes in a steep bowl, so the ideal
    search covariance ``(I - U U^T) / cond + U U^T`` is rank k plus a multiple of the identity.
    O(d k) per point; ``fopt = 0``."""

    def __init__(self, dim: int, k: int = 2, cond: float = 1e6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.k, self.cond, self.fopt = dim, k, cond, 0.0
        self.u, _ = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
        self.xopt = torch.rand(dim, generator=g, dtype=torch.float64) * 8 - 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.u.device != x.device:  # the constants follow the points (e.g. a CUDA search)
            self.u, self.xopt = self.u.to(x.device), self.xopt.to(x.device)
        s = x - self.xopt
        z = s @ self.u
        perp = s - z @ self.u.T
        return (z * z).sum(-1) + self.cond * (perp * perp).sum(-1)


def large_problem(name: str, dim: int, seed: int):
    if name == "ellipsoid_sep":
        return bbob.get(2, dim, 1)
    if name == "cigar_rank2":
        return RankCigar(dim, 2, seed=seed + 1)
    raise ValueError(f"unknown large-scale problem {name!r}")


def x0_sampler(seed: int, function: int, dim: int, instance: int) -> Callable[[], torch.Tensor]:
    """``x0 ~ U[-3, 3]^d``; successive calls (restarts) draw new points, the same for every method."""
    g = torch.Generator().manual_seed(1_000_003 * seed + 10_007 * function + 101 * dim + instance)
    return lambda: (torch.rand(dim, generator=g, dtype=torch.float64) * 2 - 1) * X0_RANGE


# ------------------------------------------------------------------ runs
@dataclass
class Trace:
    """One run: the best ``f - fopt`` after each generation that improved it (with its
    evaluations and seconds), the run's totals, its restarts and why it stopped."""

    evals: List[int] = field(default_factory=list)
    gaps: List[float] = field(default_factory=list)
    seconds_at: List[float] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0
    generations: int = 0
    restarts: int = 0
    stop: str = ""
    status: str = "ok"

    def record(self, evaluations: int, gap: float, seconds: float) -> None:
        self.evaluations = evaluations
        if not self.gaps or gap < self.gaps[-1]:
            self.evals.append(evaluations)
            self.gaps.append(gap)
            self.seconds_at.append(seconds)

    def first_hit(self, target: float) -> Optional[int]:
        """Evaluations when ``f - fopt <= target`` was first reached (``None``: never)."""
        return next((e for e, g in zip(self.evals, self.gaps) if g <= target), None)

    def seconds_to(self, target: float) -> Optional[float]:
        """Seconds when ``f - fopt <= target`` was first reached (``None``: never)."""
        return next((s for s, g in zip(self.seconds_at, self.gaps) if g <= target), None)

    @property
    def final_gap(self) -> float:
        return self.gaps[-1] if self.gaps else math.inf


class _Clock:
    """A run's wall time and the stop rules the drivers share: target, evaluations, time cap."""

    def __init__(self, budget: int, time_cap: float):
        self.budget, self.time_cap = budget, time_cap
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def reason(self, trace: Trace) -> Optional[str]:
        if trace.gaps and trace.gaps[-1] <= FTARGET:
            return "ftarget"
        if trace.evaluations >= self.budget:
            return "maxfevals"
        if self.elapsed() >= self.time_cap:
            return "timecap"
        return None


def run_nes(method: Method, f, fopt: float, x0: Callable, dim: int, seed: int, budget: int, restarts: int,
            time_cap: float, device: str = "cpu") -> Trace:
    """StructuredNES with IPOP restarts, its search state and populations on ``device``."""
    es = StructuredNES(x0, SIGMA0, structure=method.structure, seed=seed, target=fopt + FTARGET, budget=budget,
                       restarts=restarts, device=device, **dict(method.options), **(method.group_options(dim) or {}))
    trace, clock = Trace(), _Clock(budget, time_cap)
    while not es.stop():
        es.tell(f(es.ask()))
        trace.record(es.evaluations, es.best_f - fopt, clock.elapsed())
        if clock.elapsed() >= time_cap:
            trace.stop = "timecap"
            break
    trace.seconds, trace.generations, trace.restarts = clock.elapsed(), es.iterations, es.restarts_done
    trace.stop = trace.stop or ",".join(es.stop())
    return trace


def run_cma(method: Method, f, fopt: float, x0: Callable, dim: int, seed: int, budget: int, restarts: int,
            time_cap: float) -> Trace:
    """pycma (ask/tell) with IPOP restarts: a restartable stop starts again from a new ``x0``
    with twice the population, until the target, the budget or ``restarts``."""
    import cma

    trace, clock = Trace(), _Clock(budget, time_cap)
    popsize, used = default_popsize(dim), 0
    for restart in range(restarts + 1):
        options = {"popsize": popsize, "maxfevals": budget - used, "ftarget": fopt + FTARGET,
                   "seed": 1 + 1000 * seed + restart, "verbose": -9, "verb_log": 0, "verb_disp": 0,
                   **dict(method.options)}
        es = cma.CMAEvolutionStrategy(x0().numpy(), SIGMA0, options)
        while not es.stop():
            xs = es.ask()
            values = f(torch.as_tensor(np.asarray(xs)))
            es.tell(xs, values.tolist())
            trace.generations += 1
            trace.record(used + es.countevals, float(values.min()) - fopt, clock.elapsed())
            if clock.reason(trace) == "timecap":
                break
        used += es.countevals
        trace.restarts = restart
        stop = clock.reason(trace) or ("ftarget" if "ftarget" in es.stop() else None)
        if stop or used >= budget or "maxfevals" in es.stop():
            trace.stop = stop or "maxfevals"
            break
        popsize *= 2
    else:
        trace.stop = "restarts"
    trace.seconds = clock.elapsed()
    return trace


def run_evotorch(method: Method, f, fopt: float, x0: Callable, dim: int, seed: int, budget: int,
                 time_cap: float, stall: int = 300, device: str = "cpu") -> Trace:
    """evotorch's XNES / SNES (no restarts, on ``device``) until the target, the budget, the time
    cap or ``stall`` generations without improvement of the best value."""
    from evotorch import Problem
    from evotorch import algorithms

    logging.getLogger("evotorch").setLevel(logging.WARNING)
    trace, clock = Trace(), _Clock(budget, time_cap)
    best = [math.inf]

    def objective(xs: torch.Tensor) -> torch.Tensor:
        values = f(xs.to(torch.float64))
        best[0] = min(best[0], float(values.min()))
        trace.evaluations += xs.shape[0]
        return values

    problem = Problem("min", objective, solution_length=dim, vectorized=True, dtype=torch.float64,
                      initial_bounds=(-X0_RANGE, X0_RANGE), seed=seed, device=device)
    searcher = getattr(algorithms, dict(method.options)["algorithm"])(problem, stdev_init=SIGMA0, center_init=x0())
    last_improvement = 0
    while not trace.stop:
        previous = trace.final_gap
        searcher.step()
        trace.generations += 1
        trace.record(trace.evaluations, best[0] - fopt, clock.elapsed())
        if trace.gaps[-1] < previous:
            last_improvement = trace.generations
        trace.stop = clock.reason(trace) or ("stall" if trace.generations - last_improvement >= stall else "")
    trace.seconds = clock.elapsed()
    return trace


def run_method(method: Method, f, fopt: float, x0: Callable, dim: int, seed: int, budget: int, restarts: int,
               time_cap: float, settings: Settings) -> Trace:
    """One run; an exception ends it with ``status`` set (and the trace so far)."""
    try:
        if method.kind == "nes":
            return run_nes(method, f, fopt, x0, dim, seed, budget, restarts, time_cap, settings.device)
        if method.kind == "cma":
            return run_cma(method, f, fopt, x0, dim, seed, budget, restarts, time_cap)
        return run_evotorch(method, f, fopt, x0, dim, seed, budget, time_cap, settings.stall, settings.device)
    except (ValueError, RuntimeError, FloatingPointError, np.linalg.LinAlgError) as err:
        return Trace(stop="error", status=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")


@dataclass
class Run:
    """One BBOB run (``function``, ``dim``, ``instance``, ``seed``) of ``method``."""

    method: str
    function: int
    dim: int
    instance: int
    seed: int
    budget: int
    trace: Trace


@dataclass
class LargeRun:
    """One large-scale run of ``method`` on ``problem`` in ``dim`` dimensions."""

    method: str
    problem: str
    dim: int
    seed: int
    trace: Trace


_problem = lru_cache(maxsize=None)(bbob.get)  # one problem per process for all the methods and seeds on it


def run_cell(settings: Settings, key: str, function: int, dim: int, instance: int, seed: int) -> Run:
    """One BBOB run: ``key`` on ``(function, dim, instance)`` with ``seed``. Its draws depend on
    nothing else, so a run is the same in any grid, in any order, in any process."""
    problem = _problem(function, dim, instance)
    budget = settings.budget_factor * dim
    trace = run_method(METHODS[key], problem, problem.fopt, x0_sampler(seed, function, dim, instance), dim,
                       seed, budget, settings.restarts, settings.time_cap, settings)
    return Run(key, function, dim, instance, seed, budget, trace)


def _blas_threads(threads: Optional[int]):
    """numpy's BLAS (pycma) limited to ``threads``, when threadpoolctl is installed: a context
    manager, or a lasting limit when just built."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads) if threads else contextlib.nullcontext()


def _init_worker(threads: Optional[int]) -> None:
    """A ``--jobs`` worker: the study's torch / BLAS threads and dtype, pycma's chatter off."""
    common.configure_torch(threads, torch.float64)
    warnings.simplefilter("ignore")
    _blas_threads(threads)


def run_bbob(settings: Settings, methods: Sequence[str]) -> Tuple[List[Run], List[dict]]:
    """Every BBOB run, in plan order (``settings.jobs`` at once in worker processes when more
    than one); and the (method, dim) pairs whose structure does not exist."""
    plan, skipped = [], []
    for dim, key in itertools.product(settings.dims, methods):
        if METHODS[key].group_options(dim) is None:
            skipped.append({"method": key, "dim": dim, "reason": f"{METHODS[key].label} needs 2k < d"})
            continue
        cells = itertools.product(settings.functions, settings.instances, settings.seeds)
        plan += [(key, function, dim, instance, seed) for function, instance, seed in cells]
    bar = progress.bar(len(plan), "es bbob")
    if settings.jobs == 1:
        runs = []
        for key, function, dim, instance, seed in plan:
            bar.set_postfix_str(f"f{function} d={dim} i{instance} {key}")
            runs.append(run_cell(settings, key, function, dim, instance, seed))
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")  # no forked torch / OpenMP state
        with ProcessPoolExecutor(settings.jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(settings.threads,)) as pool:
            futures = [pool.submit(run_cell, settings, *cell) for cell in plan]
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            runs = [future.result() for future in futures]
    bar.close()
    return runs, skipped


def run_large(settings: Settings) -> List[LargeRun]:
    """The large-scale runs (one seed: the first), each capped at ``large_time_cap`` seconds."""
    plan = list(itertools.product(settings.large_dims, settings.large_problems, settings.large_methods))
    bar = progress.bar(len(plan), "es large")
    runs, seed = [], settings.seeds[0]
    for dim, name, key in plan:
        bar.set_postfix_str(f"{name} d={dim} {key}")
        problem = large_problem(name, dim, seed)
        trace = run_method(METHODS[key], problem, problem.fopt, x0_sampler(seed, 0, dim, 1), dim, seed,
                           settings.large_budget_factor * dim, 0, settings.large_time_cap, settings)
        runs.append(LargeRun(key, name, dim, seed, trace))
        bar.update()
    bar.close()
    return runs


# ------------------------------------------------------------------ summary
def ert(traces: Sequence[Trace], target: float = FTARGET) -> Tuple[float, int]:
    """``(ERT, successes)``: evaluations of every run up to its first hit (all of them for a
    failed run) over the successes; ``inf`` without any success."""
    hits = [t.first_hit(target) for t in traces]
    successes = sum(hit is not None for hit in hits)
    total = sum(t.evaluations if hit is None else hit for t, hit in zip(traces, hits))
    return (total / successes if successes else math.inf), successes


def ert_rows(runs: List[Run], methods: Sequence[str], settings: Settings) -> List[dict]:
    """One row per (method, function, dim): runs, successes, ERT and its ratio to CMA-ES."""
    grouped: Dict[tuple, List[Trace]] = defaultdict(list)
    for r in runs:
        grouped[(r.method, r.function, r.dim)].append(r.trace)
    cma = {(f, d): ert(traces)[0] for (m, f, d), traces in grouped.items() if m == "cma"}
    rows = []
    for dim, function, key in itertools.product(settings.dims, settings.functions, methods):
        traces = grouped.get((key, function, dim))
        if not traces:
            continue
        value, successes = ert(traces)
        ref = cma.get((function, dim), math.nan)
        rows.append({
            "part": "bbob", "method": key, "method_label": METHODS[key].describe(dim),
            "function": function, "function_name": bbob.FUNCTIONS[function], "dim": dim,
            "runs": len(traces), "successes": successes, "ert": value,
            "ert_over_d": value / dim, "ratio_to_cma": value / ref if math.isfinite(ref) else math.nan,
            "median_final_gap": float(np.median([t.final_gap for t in traces])),
            **{total: sum(getattr(t, total) for t in traces) for total in ("evaluations", "restarts", "seconds")},
            "failed": sum(t.status != "ok" for t in traces),
        })
    return rows


def large_rows(runs: List[LargeRun]) -> List[dict]:
    """One row per large-scale run: evaluations / seconds to the target, final gap, ms per generation."""
    return [{
        "part": "large", "method": r.method, "method_label": METHODS[r.method].describe(r.dim),
        "problem": r.problem, "dim": r.dim, "solved": r.trace.first_hit(FTARGET) is not None,
        "evals_to_target": r.trace.first_hit(FTARGET), "seconds_to_target": r.trace.seconds_to(FTARGET),
        "final_gap": r.trace.final_gap, "evaluations": r.trace.evaluations, "seconds": r.trace.seconds,
        "ms_per_generation": 1e3 * r.trace.seconds / max(r.trace.generations, 1), "stop": r.trace.stop,
        "status": r.trace.status,
    } for r in runs]


# ------------------------------------------------------------------ checks
def _cell(rows: List[dict], method: str, function: int, dim: int) -> Optional[dict]:
    return next((r for r in rows if r["method"] == method and r["function"] == function and r["dim"] == dim), None)


def _check(name: str, results: List[Tuple[bool, str]], missing: str) -> dict:
    """A target check: PASS when every ``(ok, text)`` result holds, ``n/a`` (with ``missing``) without any."""
    if not results:
        return {"check": name, "status": "n/a", "detail": missing}
    return {"check": name, "status": "PASS" if all(ok for ok, _ in results) else "FAIL",
            "detail": "; ".join(text for _, text in results)}


def _wall_time_result(large: List[dict], problem: str, dim: int, structured: Sequence[str]):
    """``(ok, text)``: the fastest structured run to 1e-8 on ``problem`` at ``dim`` beat both
    pycma variants (``None`` without runs there)."""
    here = [r for r in large if r["problem"] == problem and r["dim"] == dim]
    if not here:
        return None
    theirs = [r for r in here if r["method"] in ("cma", "sep_cma")]
    best = min((r for r in here if r["method"] in structured and r["solved"]),
               key=lambda r: r["seconds_to_target"], default=None)
    ok = best is not None and not any(r["solved"] and r["seconds_to_target"] <= best["seconds_to_target"]
                                      for r in theirs)
    ours = f"{best['method']} {best['seconds_to_target']:.1f} s" if best else "unsolved"
    pycma = ", ".join(f"{r['method']} " + (f"{r['seconds_to_target']:.1f} s" if r["solved"]
                                           else f"unsolved in {r['seconds']:.0f} s") for r in theirs)
    return ok, f"d={dim}: best structured {ours}; pycma {pycma}"


def target_checks(rows: List[dict], large: List[dict], settings: Settings, methods: Sequence[str]) -> List[dict]:
    """The study's targets, each ``{"check", "status" (PASS / FAIL / n/a), "detail"}``: dense within
    1.3x of CMA-ES's ERT on f1, f2, f8, f10 up to d = 40; diagonal at least as good as SNES on the
    separable f1, f2; diagonal solving f8 through restarts; per large-scale problem, a structured
    variant faster than pycma in wall time at d >= 1000."""
    dense = []
    for dim, function in itertools.product(settings.dims, (1, 2, 8, 10)):
        ours, cma = _cell(rows, "dense", function, dim), _cell(rows, "cma", function, dim)
        if ours is not None and cma is not None and dim <= 40:
            ok = math.isfinite(ours["ert"]) and (not math.isfinite(cma["ert"]) or ours["ratio_to_cma"] <= 1.3)
            dense.append((ok, f"f{function} d={dim} {fmt(ours['ratio_to_cma'], 3)}x"))
    snes_key = "evotorch_snes" if "evotorch_snes" in methods else "snes"
    separable = []
    for dim, function in itertools.product(settings.dims, (1, 2)):
        diag, snes = _cell(rows, "diagonal", function, dim), _cell(rows, snes_key, function, dim)
        if diag is not None and snes is not None:
            ok = diag["ert"] <= snes["ert"] or not math.isfinite(snes["ert"]) and math.isfinite(diag["ert"])
            separable.append((ok, f"f{function} d={dim} {fmt(diag['ert'], 4)} vs {fmt(snes['ert'], 4)}"))
    rosenbrock = [(r["successes"] == r["runs"], f"d={r['dim']} {r['successes']}/{r['runs']} solved, "
                   f"{r['restarts']} restarts") for r in (_cell(rows, "diagonal", 8, d) for d in settings.dims) if r]
    checks = [
        _check("dense ERT <= 1.3 x CMA-ES's on f1 f2 f8 f10, d <= 40", dense, "needs dense and cma on f1/f2/f8/f10"),
        _check(f"diagonal ERT <= SNES's ({METHODS[snes_key].label}) on the separable f1 f2", separable,
               "needs diagonal and SNES on f1/f2"),
        _check("diagonal solves Rosenbrock f8 (every run, restarts allowed)", rosenbrock, "needs diagonal on f8"),
    ]
    structured = [m for m in settings.large_methods if METHODS[m].kind == "nes"]
    for problem in settings.large_problems:
        results = [_wall_time_result(large, problem, dim, structured) for dim in settings.large_dims if dim >= 1000]
        name = f"{LARGE_LABELS[problem]}: a structured variant faster (wall time to 1e-8) than pycma at d >= 1000"
        checks.append(_check(name, [r for r in results if r], "needs the large-scale part at d >= 1000 (full preset)"))
    return checks


def reference_lines(rows: List[dict]) -> List[str]:
    """This run's ERT next to the reference ERTs (where both exist)."""
    out = []
    for (key, function), by_dim in REFERENCE_ERT.items():
        for dim, ref in by_dim.items():
            row = _cell(rows, key, function, dim)
            if row is not None:
                out.append(f"{METHODS[key].label} f{function} d={dim}: {_ert_text(row['ert'])} "
                           f"(reference {ref:,}; {row['successes']}/{row['runs']} solved)")
    return out


# ------------------------------------------------------------------ report
def _ert_text(value: float) -> str:
    return "∞" if not math.isfinite(value) else f"{value:,.0f}"


def ert_cell(row: Optional[dict]) -> str:
    """``ERT (ratio to CMA-ES) successes/runs``; ``∞`` when no run succeeded."""
    if row is None:
        return "–"
    ratio = row["ratio_to_cma"]
    ratio_text = f" ({fmt(ratio, 2)}x)" if math.isfinite(ratio) and row["method"] != "cma" else ""
    return f"{_ert_text(row['ert'])}{ratio_text} {row['successes']}/{row['runs']}"


def markdown_report(results: "Results", settings: Settings, runtime: float) -> str:
    """The target checks, the ERT tables (one per dimension), the large-scale table and notes."""
    rows, large = results.rows, results.large
    lines = [
        f"ERT = evaluations of all runs (each up to its first success) / successes, to f - fopt <= {FTARGET:g}; "
        "`(r x)` = ratio to CMA-ES's ERT (< 1: fewer evaluations than CMA-ES); `s/n` = successful runs / runs; "
        "∞ = no run succeeded.",
        "",
        f"Settings ({settings.size}): dims {list(settings.dims)}, functions {list(settings.functions)}, "
        f"instances {list(settings.instances)}, seeds {list(settings.seeds)}; x0 ~ U[-{X0_RANGE:g}, {X0_RANGE:g}]^d, "
        f"sigma0 = {SIGMA0:g}; budget {settings.budget_factor:g} d evaluations, up to {settings.restarts} IPOP "
        f"restarts (StructuredNES, pycma); time cap {settings.time_cap:g} s per run; population evaluated in one "
        f"batched torch call on {settings.device} (pycma: numpy on the CPU); {settings.jobs} BBOB run(s) at "
        f"once; {common.environment_text(runtime)}",
        "",
        "## Target checks",
        "",
    ]
    lines += [f"- **{c['status']}** {c['check']}: {c['detail']}" for c in results.checks]
    ref = reference_lines(rows)
    if ref:
        lines += ["", "Reference ERTs measured before (same protocol):", ""] + [f"- {r}" for r in ref]
    header = ["method"] + [f"f{f} {bbob.FUNCTIONS[f]}" for f in settings.functions]
    for dim in settings.dims:
        cells = {key: [_cell(rows, key, f, dim) for f in settings.functions] for key in results.methods}
        body = [[METHODS[key].describe(dim)] + [ert_cell(c) for c in row] for key, row in cells.items() if any(row)]
        lines += ["", f"## ERT, d = {dim}", "", common.markdown_table(header, body)]
    if large:
        lines += [
            "", f"## Large scale (time cap {settings.large_time_cap:g} s per run, budget "
            f"{settings.large_budget_factor:g} d evaluations, no restarts)", "",
            "ellipsoid_sep = BBOB f2 (separable, cond 1e6); cigar_rank2 = rotated rank-2 cigar "
            "(rank-2 + identity ideal covariance).", "",
        ]
        header = ["problem", "d", "method", "evals to 1e-8", "s to 1e-8", "final gap", "evals", "s", "ms/gen", "stop"]
        body = [[r["problem"], r["dim"], r["method_label"],
                 f"{r['evals_to_target']:,}" if r["solved"] else "not reached",
                 fmt(r["seconds_to_target"], 3) if r["solved"] else "–",
                 fmt(r["final_gap"], 2), f"{r['evaluations']:,}", fmt(r["seconds"], 3),
                 fmt(r["ms_per_generation"], 3), r["stop"] + ("" if r["status"] == "ok" else f" ({r['status']})")]
                for r in large]
        lines += [common.markdown_table(header, body)]
    notes = run_notes(results.runs, results.skipped, results.notes)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def run_notes(runs: List[Run], skipped: List[dict], extra: List[str]) -> List[str]:
    """``extra``, then the skipped structures, failed runs and runs stopped by the time cap."""
    out = list(extra) + [f"{s['method']} at d={s['dim']} skipped: {s['reason']}" for s in skipped]
    failed = [r for r in runs if r.trace.status != "ok"]
    if failed:
        r = failed[0]
        out.append(f"{len(failed)} run(s) stopped by an error, e.g. {r.method} f{r.function} d={r.dim} "
                   f"instance {r.instance}: {r.trace.status} (all in results.json)")
    capped = sum(r.trace.stop == "timecap" for r in runs)
    if capped:
        out.append(f"{capped} run(s) hit the time cap (counted with their evaluations so far)")
    return out


# ------------------------------------------------------------------ plots
def _color(key: str) -> tuple:
    """A method's color: tab20, by its place in ``METHODS``."""
    import matplotlib

    i = list(METHODS).index(key)
    return matplotlib.colormaps["tab20"]((2 * i) % 20 + (i // 10))


def _style(key: str) -> str:
    return {"nes": "-", "cma": "--", "evotorch": ":"}[METHODS[key].kind]


def _line(key: str, x: Sequence[float], y: Sequence[float], **kwargs) -> Line:
    return Line(x, y, _color(key), _style(key), **kwargs)


def _legend(keys: Sequence[str]) -> List[Tuple[str, tuple, str]]:
    return [(METHODS[k].label, _color(k), _style(k)) for k in keys]


def plot_ecdf(runs: List[Run], methods: Sequence[str], settings: Settings, out: Path) -> Path:
    """Fraction of (function, instance, seed, target) reached vs log10(evaluations / d), per dimension."""
    top = math.log10(settings.budget_factor)
    grid = [i * top / 200 for i in range(201)]
    panels: Dict[str, List[Line]] = {}
    for dim in settings.dims:
        lines = []
        for key in methods:
            hits = [r.trace.first_hit(t) for r in runs if r.method == key and r.dim == dim for t in ECDF_TARGETS]
            if hits:
                logs = sorted(math.log10(h / dim) for h in hits if h is not None)
                lines.append(_line(key, grid, [bisect_right(logs, x) / len(hits) for x in grid]))
        panels[f"d = {dim} ({len(settings.functions)} functions)"] = lines
    path = out / "ecdf.png"
    common.plot_panels(path, panels, xlabel="log10(evaluations / d)",
                       ylabel="fraction of (f, instance, target) reached",
                       title="Runtime ECDF, targets 10^{2..-8} (COCO style)", legend=_legend(methods), logy=False,
                       floor=-1.0)
    return path


def plot_ert(rows: List[dict], methods: Sequence[str], settings: Settings, out: Path) -> Path:
    """ERT / d against d, one panel per function (missing points: no success)."""
    panels: Dict[str, List[Line]] = {}
    for function in settings.functions:
        lines = []
        for key in methods:
            pts = [(r["dim"], r["ert_over_d"]) for r in rows if r["method"] == key and r["function"] == function]
            if pts:
                lines.append(_line(key, [d for d, _ in pts], [v if math.isfinite(v) else math.nan for _, v in pts],
                                   marker="o"))
        panels[f"f{function} {bbob.FUNCTIONS[function]}"] = lines
    path = out / "ert_vs_dim.png"
    common.plot_panels(path, panels, xlabel="dimension d", ylabel="ERT / d (evaluations per dimension)",
                       title=f"ERT to f - fopt <= {FTARGET:g}", legend=_legend(methods), xticks=settings.dims)
    return path


def plot_large(runs: List[LargeRun], out: Path) -> List[Path]:
    """Best f - fopt against seconds, one panel per (problem, d); nothing without large-scale runs."""
    if not runs:
        return []
    panels: Dict[str, List[Line]] = defaultdict(list)
    for r in runs:
        panels[f"{r.problem}, d = {r.dim}"].append(_line(r.method, r.trace.seconds_at, r.trace.gaps))
    path = out / "large_scale.png"
    common.plot_panels(path, dict(panels), xlabel="wall time (s)", ylabel="best f - fopt",
                       title="Large scale: best value against wall time",
                       legend=_legend(list(dict.fromkeys(r.method for r in runs))), ncols=len({r.dim for r in runs}))
    return [path]


def plot_all(results: "Results", settings: Settings, out: Path) -> List[Path]:
    """The ECDFs, ERT against d and, with a large-scale part, its wall-time plot."""
    return [plot_ecdf(results.runs, results.methods, settings, out),
            plot_ert(results.rows, results.methods, settings, out)] + plot_large(results.large_runs, out)


# ------------------------------------------------------------------ outputs
def _run_record(run) -> dict:
    """A :class:`Run` or :class:`LargeRun` as one flat record, its trace's curves rounded."""
    record = asdict(run)
    trace = record.pop("trace")
    return {**record, **trace, "gaps": common.rounded(run.trace.gaps, 6),
            "seconds_at": common.rounded(run.trace.seconds_at)}


def write_outputs(results: "Results", settings: Settings, out: Path) -> List[Path]:
    """``summary.csv`` and ``results.json`` in ``out``; returns their paths."""
    rows = results.rows + results.large
    keys = list(dict.fromkeys(k for r in rows for k in r))
    common.write_csv(out / "summary.csv", [{k: r.get(k, "") for k in keys} for r in rows])
    common.write_json(out / "results.json", {
        "settings": asdict(settings), "methods": {k: METHODS[k].label for k in results.methods},
        "ftarget": FTARGET, "skipped": results.skipped, "checks": results.checks, "ert": results.rows,
        "large": results.large,
        "runs": [_run_record(r) for r in results.runs], "large_runs": [_run_record(r) for r in results.large_runs],
    })
    return [out / "summary.csv", out / "results.json"]


# ------------------------------------------------------------------- study
@dataclass
class Results:
    """What the study computed: the methods that ran (and notes on those left out), every BBOB
    and large-scale run, the ERT and large-scale rows and the target checks."""

    methods: List[str]
    notes: List[str]
    runs: List[Run]
    skipped: List[dict]
    large_runs: List[LargeRun]
    rows: List[dict]
    large: List[dict]
    checks: List[dict]


def compute(settings: Settings) -> Results:
    """Every BBOB run, then the large-scale part; their rows and the target checks."""
    methods, notes = active_methods(settings)
    with warnings.catch_warnings(), _blas_threads(settings.threads):
        warnings.simplefilter("ignore")  # pycma's and evotorch's chatter; failures are recorded per run
        runs, skipped = run_bbob(settings, methods)
        large_runs = run_large(settings) if settings.large_dims else []
    rows, large = ert_rows(runs, methods, settings), large_rows(large_runs)
    checks = target_checks(rows, large, settings, methods)
    return Results(methods, notes, runs, skipped, large_runs, rows, large, checks)


def verdict(results: Results, settings: Settings) -> List[str]:
    """The median ERT ratio to CMA-ES of each StructuredNES method (over the (function, d) cells
    both solved, best first), and the target checks."""
    ratios = []
    for key in results.methods:
        cells = [r["ratio_to_cma"] for r in results.rows if r["method"] == key and math.isfinite(r["ratio_to_cma"])]
        if METHODS[key].kind == "nes" and cells:
            ratios.append((statistics.median(cells), key, len(cells)))
    ratios.sort(key=lambda item: item[0])
    lines = []
    if ratios:
        lines.append("ERT relative to CMA-ES (pycma), median over the (function, d) cells both solved "
                     "(< 1: fewer evaluations): "
                     + ", ".join(f"{METHODS[k].label} {fmt(r, 2)}x ({n} cells)" for r, k, n in ratios) + ".")
    judged = [c for c in results.checks if c["status"] != "n/a"]
    failing = [c["check"] for c in judged if c["status"] == "FAIL"]
    unjudged = len(results.checks) - len(judged)
    lines.append(f"Target checks: {len(judged) - len(failing)} of {len(judged)} judged pass"
                 + (f"; failing: {'; '.join(failing)}" if failing else "")
                 + (f" ({unjudged} not judged: the preset lacks their methods or sizes)." if unjudged else "."))
    return lines


STUDY = harness.Study(
    name="es", title="Evolution strategies: StructuredNES vs CMA-ES on BBOB", presets=PRESETS,
    full_time="about 6 hours; --jobs N divides its BBOB part", dtype=torch.float64, compute=compute,
    report=markdown_report, verdict=verdict, write=write_outputs, plot=plot_all,
)
add_arguments, resolve_settings, run = STUDY.add_arguments, STUDY.resolve_settings, STUDY.run
