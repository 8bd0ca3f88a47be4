"""Tests for ``structngd.es`` (DESIGN.md "Layer 4c", MATH.md §5).

The xNES and SNES references below are straightforward re-implementations of the published
algorithms (covariance factor ``A``, utilities from their formula, ``scipy.linalg.expm``),
written here without the library; they draw the same standard normals as the strategy
(``torch.randn((popsize, d), generator=...)`` from the same seed).
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.overrides import TorchFunctionMode

from structngd.es import StructuredNES, minimize, rank_order, recombination_weights, utilities
from structngd.groups import make

F64 = torch.float64


# ----------------------------------------------------------------------------- problems
def sphere(x):
    return (x * x).sum(-1)


def ellipsoid(x, cond=1e4):
    d = x.shape[-1]
    c = cond ** (torch.arange(d, dtype=x.dtype) / max(d - 1, 1))
    return (c * x * x).sum(-1)


def rotation(d, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


def run(es, f, generations):
    for _ in range(generations):
        x = es.ask()
        es.tell(f(x))
        if es.stop():
            break
    return es


def solve(f, d, x0=None, sigma0=1.0, seed=0, target=1e-8, budget=100000, **kw):
    x0 = torch.ones(d, dtype=F64) if x0 is None else x0
    es = StructuredNES(x0, sigma0, seed=seed, target=target, budget=budget, **kw)
    while not es.stop():
        es.tell(f(es.ask()))
    return es


# ----------------------------------------------------------------------------- (2) utilities
def test_utilities():
    for lam in (2, 3, 5, 10, 15, 37):
        u = utilities(lam)
        assert abs(float(u.sum())) < 1e-15
        assert (u[1:] <= u[:-1]).all()  # monotone: better rank, larger utility
        w = recombination_weights(lam)
        assert torch.allclose(w, u + 1 / lam, atol=1e-15) and (w >= 0).all()
        raw = [max(0.0, math.log(lam / 2 + 1) - math.log(r)) for r in range(1, lam + 1)]
        assert torch.allclose(u, torch.tensor(raw, dtype=F64) / sum(raw) - 1 / lam, atol=1e-15)
    assert round(float(utilities(10)[0]), 4) == 0.3295
    with pytest.raises(ValueError):
        utilities(1)


def test_rank_order_nonfinite():
    f = torch.tensor([3.0, float("nan"), -1.0, float("inf"), 3.0, float("-inf"), 0.0])
    order, bad = rank_order(f)
    assert bad == 3
    assert order.tolist() == [2, 6, 0, 4, 1, 3, 5]  # finite ascending (stable), then non-finite by index


# ----------------------------------------------------------------------------- (1) exact xNES / SNES
def _reference_utilities(lam):
    raw = np.array([max(0.0, np.log(lam / 2 + 1) - np.log(r)) for r in range(1, lam + 1)])
    return raw / raw.sum() - 1 / lam


def _rotated_ellipsoid_np(d):
    r = rotation(d, seed=3).numpy()
    c = 1e3 ** (np.arange(d) / (d - 1))
    return lambda x: ((x @ r.T) ** 2 * c).sum(-1)


def test_dense_xnes_is_exactly_xnes():
    d, seed, gens = 6, 11, 100
    f = _rotated_ellipsoid_np(d)
    lam = 4 + int(np.floor(3 * np.log(d)))
    eta = 3 * (3 + np.log(d)) / (5 * d * np.sqrt(d))
    u = _reference_utilities(lam)
    x0 = np.linspace(-1, 2, d)
    # reference xNES (Glasmachers et al. 2010) with A = sigma B
    gen = torch.Generator().manual_seed(seed)
    mu, sigma, bmat = x0.copy(), 0.7, np.eye(d)
    es = StructuredNES(torch.tensor(x0), 0.7, structure="dense", rates="xnes", seed=seed, tolx=None, tolfun=None)
    assert es.popsize == lam and es.rates["eta_B"] == pytest.approx(eta, rel=1e-15)
    worst = 0.0
    for _ in range(gens):
        z = torch.randn((lam, d), generator=gen, dtype=F64).numpy()
        x = mu + sigma * z @ bmat.T
        zs = z[np.argsort(f(x), kind="stable")]
        g_delta = u @ zs
        g_m = sum(u[k] * (np.outer(zs[k], zs[k]) - np.eye(d)) for k in range(lam))
        g_sigma = np.trace(g_m) / d
        g_b = g_m - g_sigma * np.eye(d)
        mu = mu + sigma * bmat @ g_delta
        sigma = sigma * np.exp(eta / 2 * g_sigma)
        bmat = bmat @ scipy.linalg.expm(eta / 2 * g_b)

        xs = es.ask()
        np.testing.assert_allclose(xs.numpy(), x, rtol=1e-10, atol=1e-12)
        es.tell(f(xs.numpy()))
        a_ref, a = sigma * bmat, es.covariance_factor().numpy()
        worst = max(
            worst,
            np.abs(es.mean.numpy() - mu).max() / np.abs(mu).max(),
            np.abs(a - a_ref).max() / np.abs(a_ref).max(),
        )
    assert worst < 1e-10
    assert abs(np.linalg.det(es.group.to_dense(es.factor).numpy()) - 1) < 1e-12  # det B = 1
    assert es.sigma < 0.7  # it made progress: the step size shrank


def test_diagonal_xnes_is_snes():
    d, seed, gens = 7, 5, 100
    c = 1e2 ** (np.arange(d) / (d - 1))
    f = lambda x: (c * x**2).sum(-1)  # noqa: E731
    lam = 4 + int(np.floor(3 * np.log(d)))
    eta_sigma = (3 + np.log(d)) / (5 * np.sqrt(d))
    u = _reference_utilities(lam)
    gen = torch.Generator().manual_seed(seed)
    mu, s = np.full(d, 2.0), np.full(d, 0.5)  # SNES: per-coordinate standard deviations
    es = StructuredNES(torch.tensor(mu), 0.5, structure="diagonal", rates="xnes", seed=seed, tolx=None, tolfun=None)
    for _ in range(gens):
        z = torch.randn((lam, d), generator=gen, dtype=F64).numpy()
        zs = z[np.argsort(f(mu + s * z), kind="stable")]
        mu = mu + s * (u @ zs)
        s = s * np.exp(eta_sigma / 2 * (u @ (zs**2 - 1)))
        es.tell(f(es.ask().numpy()))
    np.testing.assert_allclose(es.mean.numpy(), mu, rtol=1e-10)
    np.testing.assert_allclose(es.stds().numpy(), s, rtol=1e-10)


@pytest.mark.parametrize(
    "structure,opts",
    [
        ("dense", {}),
        ("lower_triangular", {}),
        ("diagonal", {}),
        ("block_diagonal", {"block_size": 3}),
        ("block_diagonal", {"block_size": 4, "ragged": True}),
        ("block_triangular", {"k": 2}),
        ("heisenberg", {"k": 1, "k2": 2}),
        ("hierarchical", {"k1": 2, "k2": 1}),
    ],
)
@pytest.mark.parametrize("transpose", [False, True])
def test_structured_step_equals_dense_formula(structure, opts, transpose):
    """One generation: A <- A h(eta_B/2 Pi_hat(G_B)) with Pi_hat from the group's dense
    ``project`` (MATH.md §1.4: Pi_hat(X) = project(2 X)) equals the O(nnz) pattern code.
    With ``transpose`` A = B^T has the transposed pattern: Pi_hat_{B^T}(X) = Pi_hat_B(X)^T (§2.4)."""
    d, seed = 6, 2
    group = make(structure, d, **opts)
    es = StructuredNES(torch.zeros(d), 1.0, structure=structure, rates="xnes", retraction="h", seed=seed,
                       transpose=transpose, **opts)
    es.factor = group.random(torch.Generator().manual_seed(0), dtype=F64)  # generic current B
    b0, mu0, s0 = es.covariance_factor().clone(), es.mean.clone(), es.sigma
    x = es.ask()
    fx = ellipsoid(x @ rotation(d).T)
    z = torch.linalg.solve(b0, ((x - mu0) / s0).T).T
    zs = z[torch.argsort(fx, stable=True)]
    u = utilities(es.popsize)
    g_m = sum(u[k] * (torch.outer(zs[k], zs[k]) - torch.eye(d, dtype=F64)) for k in range(es.popsize))
    g_sigma = torch.trace(g_m) / d
    g_b = g_m - g_sigma * torch.eye(d, dtype=F64)
    eta = es.rates["eta_B"]
    m = group.to_dense(group.project(2 * g_b)) * (eta / 2)
    m = m.mT if transpose else m
    b_ref = b0 @ (torch.eye(d, dtype=F64) + m + m @ m / 2)
    es.tell(fx)
    b = es.covariance_factor() / es.sigma
    assert torch.allclose(b, b_ref, rtol=1e-12, atol=1e-13)
    assert es.sigma == pytest.approx(s0 * math.exp(es.rates["eta_sigma"] / 2 * float(g_sigma)), rel=1e-13)
    assert torch.allclose(es.mean, mu0 + s0 * b0 @ (u @ zs), rtol=1e-12, atol=1e-13)


def test_xnes_convergence_budget():
    """MATH.md §5 test 4: rotated ellipsoid d = 8, cond 1e3, from mu = 1, A = I, to 1e-10;
    h-retraction dense / lower-triangular within 1.5x of exact xNES."""
    d = 8
    r = rotation(d, seed=3)
    f = lambda x: ellipsoid(x @ r.T, cond=1e3)  # noqa: E731
    evals = {}
    for structure, retraction in [("dense", "exp"), ("dense", "h"), ("lower_triangular", "h")]:
        es = solve(f, d, target=1e-10, structure=structure, rates="xnes", retraction=retraction, seed=1)
        assert es.best_f <= 1e-10
        evals[structure, retraction] = es.evaluations
    assert evals["dense", "exp"] < 9000
    assert max(evals.values()) < 1.5 * evals["dense", "exp"]


# ----------------------------------------------------------------------------- (3) invariances
@pytest.mark.parametrize("rates", ["default", "xnes"])
def test_rank_invariance(rates):
    d = 5
    runs = []
    # strictly increasing transforms (exp(f) itself would overflow to inf here)
    for g in (lambda v: v, torch.log, lambda v: torch.exp(torch.sqrt(v)) + v**3):
        es = StructuredNES(torch.ones(d), 0.5, rates=rates, seed=3)
        run(es, lambda x: g(ellipsoid(x)), 60)
        runs.append(es)
    a = runs[0]
    for b in runs[1:]:
        assert a.iterations == b.iterations == 60 and b.nonfinite == 0
        assert torch.equal(a.mean, b.mean) and torch.equal(a.factor, b.factor) and a.sigma == b.sigma
        assert torch.equal(a.best_x, b.best_x)


def test_affine_invariance_rotated_ellipsoid():
    d, seeds = 8, range(3)
    r = rotation(d, seed=5)
    axis = [solve(ellipsoid, d, seed=s).evaluations for s in seeds]
    f_rot = lambda x: ellipsoid(x @ r.T)  # noqa: E731
    x0_rot = r.T @ torch.ones(d, dtype=F64)  # the same start point in rotated coordinates
    rotated = [solve(f_rot, d, x0=x0_rot, seed=s).evaluations for s in seeds]
    ratio = np.mean(rotated) / np.mean(axis)
    assert 0.8 < ratio < 1.25, (axis, rotated)
    # the diagonal structure is not rotation invariant: much slower on the rotated problem
    diag_rot = solve(f_rot, d, x0=x0_rot, structure="diagonal", budget=3 * max(rotated)).evaluations
    assert diag_rot > 1.5 * np.mean(rotated)


# ----------------------------------------------------------------------------- (5) step size
@pytest.mark.parametrize(
    "rates,d,x0,growth", [("default", 5, 100.0, 1e3), ("default", 20, 30.0, 1e2), ("xnes", 2, 10.0, 30)]
)
def test_sigma_grows_far_and_shrinks_near_optimum(rates, d, x0, growth):
    # (textbook xNES, with eta_sigma = eta_B, adapts sigma slowly: from 1e-4 at distance 100
    # it lets B collapse on the line of its first steps and stalls; see the module notes)
    sigma0 = 1e-4 if rates == "default" else 1e-3
    es = solve(sphere, d, x0=torch.full((d,), x0, dtype=F64), sigma0=sigma0, rates=rates, seed=0, target=1e-8)
    sig = np.array(es.history["sigma"])
    assert es.best_f <= 1e-8
    assert sig.max() > growth * sigma0  # grew by orders of magnitude while far away
    assert sig[-1] < 1e-3 * sig.max()  # and shrank near the optimum
    assert np.argmax(sig) < len(sig) - 10


# ----------------------------------------------------------------------------- (6) structures
@pytest.mark.parametrize(
    "structure,opts",
    [
        ("lower_triangular", {}),
        ("block_triangular", {"k": 2}),
        ("heisenberg", {"k": 2, "k2": 2}),
        ("diagonal", {}),
        ("block_diagonal", {"block_size": 2}),
    ],
)
@pytest.mark.parametrize("rates", ["default", "xnes"])
@pytest.mark.parametrize("transpose", [False, True])
def test_structure_zeros_stay_zero(structure, opts, rates, transpose):
    d = 8
    r = rotation(d, seed=1)
    es = StructuredNES(torch.ones(d), 1.0, structure=structure, rates=rates, seed=0, transpose=transpose, **opts)
    run(es, lambda x: ellipsoid(x @ r.T, cond=1e3), 40)
    dense = es.group.to_dense(es.factor)
    mask = es.group.mask(F64).bool()
    assert torch.equal(dense[~mask], torch.zeros_like(dense[~mask]))  # exactly zero off the pattern
    if structure == "lower_triangular":
        assert torch.equal(torch.triu(es.factor, 1), torch.zeros_like(es.factor))
    assert torch.isfinite(es.factor).all() and (dense[mask] != 0).sum() >= d


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    "structure,opts",
    [("block_triangular", {"k": 4}), ("heisenberg", {"k": 2, "k2": 2}), ("diagonal", {})],
)
@pytest.mark.parametrize("rates,transpose", [("default", False), ("xnes", False), ("default", True)])
def test_low_rank_structures_never_form_dxd(structure, opts, rates, transpose):
    d = 2000
    es = StructuredNES(torch.ones(d), 0.5, structure=structure, rates=rates, seed=0, transpose=transpose, **opts)
    f = lambda x: ellipsoid(x, cond=1e2)  # noqa: E731
    with _LargestTensor() as probe:
        for _ in range(2):
            x = es.ask()
            es.tell(f(x))
    assert x.shape == (es.popsize, d) and torch.isfinite(x).all()
    assert torch.isfinite(es.factor).all() and torch.isfinite(es.mean).all() and math.isfinite(es.sigma)
    assert probe.largest <= max(es.popsize * d, es.group.numel()) + d  # O(d k), never d x d
    assert probe.largest < d * d / 20
    assert es.stds().shape == (d,) and torch.isfinite(es.stds()).all()


def test_structured_default_rates_converge():
    d = 8
    r = rotation(d, seed=2)
    f = lambda x: ellipsoid(x @ r.T, cond=1e3)  # noqa: E731
    for structure, opts in [("block_triangular", {"k": 2}), ("heisenberg", {"k": 1, "k2": 1}),
                            ("lower_triangular", {}), ("diagonal", {})]:
        es = solve(ellipsoid if structure == "diagonal" else f, d, structure=structure, budget=60000, **opts)
        assert es.best_f <= 1e-8, (structure, es.stop())


# ----------------------------------------------------------------------------- (7) bad inputs
def test_nonfinite_fitness():
    d = 4

    def f(x):
        v = sphere(x)
        return torch.where(x[:, 0] > 1.5, torch.full_like(v, float("nan")), v)

    es = StructuredNES(torch.full((d,), 1.0), 1.0, seed=0, target=1e-8, budget=20000)
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        while not es.stop():
            es.tell(f(es.ask()))
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1  # warned once
    assert es.nonfinite > 0 and es.result.nonfinite == es.nonfinite
    assert es.best_f <= 1e-8 and math.isfinite(es.result.f)
    # all-inf population: nothing finite to rank, the state stays finite
    es = StructuredNES(torch.zeros(d), 1.0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es.tell(torch.full((es.popsize,), float("inf")) if es.ask() is not None else None)
    assert es.best_f == math.inf and torch.isfinite(es.mean).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="x0"):
        StructuredNES(torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="x0"):
        StructuredNES([0.0, float("nan")], 1.0)
    with pytest.raises(ValueError, match="sigma0"):
        StructuredNES(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="sigma0"):
        StructuredNES(torch.zeros(3), float("inf"))
    with pytest.raises(ValueError, match="unknown structure"):
        StructuredNES(torch.zeros(3), 1.0, structure="banana")
    with pytest.raises(ValueError, match="k"):
        StructuredNES(torch.zeros(3), 1.0, structure="block_triangular", k=5)
    with pytest.raises(ValueError, match="bad options"):
        StructuredNES(torch.zeros(3), 1.0, structure="dense", k=1)
    with pytest.raises(ValueError, match="rates"):
        StructuredNES(torch.zeros(3), 1.0, rates="banana")
    with pytest.raises(ValueError, match="unknown rate"):
        StructuredNES(torch.zeros(3), 1.0, rates={"base": "xnes", "c1": 0.1})
    with pytest.raises(ValueError, match="popsize"):
        StructuredNES(torch.zeros(3), 1.0, popsize=1)
    with pytest.raises(ValueError, match="retraction"):
        StructuredNES(torch.zeros(3), 1.0, retraction="cayley")
    with pytest.raises(ValueError, match="budget"):
        StructuredNES(torch.zeros(3), 1.0, budget=-5)
    es = StructuredNES(torch.zeros(3), 1.0, popsize=6, seed=0)
    with pytest.raises(RuntimeError, match="ask"):
        es.tell(torch.zeros(6))
    es.ask()
    with pytest.raises(RuntimeError, match="twice"):
        es.ask()
    with pytest.raises(ValueError, match="length popsize=6"):
        es.tell(torch.zeros(5))
    with pytest.raises(ValueError, match="length popsize=6"):
        es.tell(torch.zeros(6, 1))
    with pytest.raises(ValueError, match="numbers"):
        es.tell(["a"] * 6)
    es.tell([1.0, 2, np.float64(3), torch.tensor(4.0), 5, 6])  # mixed scalars are fine
    with pytest.raises(ValueError, match="cannot be loaded"):
        StructuredNES(torch.zeros(4), 1.0).load_state_dict(es.state_dict())
    with pytest.raises(ValueError, match="exclusive"):
        minimize(sphere, torch.zeros(3), 1.0, batch=True, executor=ThreadPoolExecutor(1), progress=False)
    with pytest.raises(ValueError, match="scalar"):
        minimize(lambda x: x, torch.zeros(3), 1.0, progress=False, budget=10)


# ----------------------------------------------------------------------------- (8) state
@pytest.mark.parametrize("mid_ask", [False, True])
@pytest.mark.parametrize("structure,opts,rates", [("dense", {}, "default"), ("block_triangular", {"k": 2}, "xnes")])
def test_state_dict_resumes_identically(mid_ask, structure, opts, rates):
    d = 6
    f = lambda x: ellipsoid(x @ rotation(d).T)  # noqa: E731
    kw = dict(structure=structure, rates=rates, seed=4, mirrored=True, **opts)
    es = StructuredNES(torch.ones(d), 1.0, **kw)
    run(es, f, 15)
    if mid_ask:
        pending = es.ask()
    buf = io.BytesIO()
    torch.save(es.state_dict(), buf)
    snapshot = copy.deepcopy(es.state_dict())
    if mid_ask:
        es.tell(f(pending))
    run(es, f, 15)

    other = StructuredNES(torch.zeros(d), 3.0, **{**kw, "seed": 99})
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=False))
    if mid_ask:
        again = other.pending
        assert torch.equal(again, pending)
        with pytest.raises(RuntimeError, match="twice"):
            other.ask()
        other.tell(f(again))
    run(other, f, 15)
    assert torch.equal(other.mean, es.mean) and torch.equal(other.factor, es.factor)
    assert other.sigma == es.sigma and other.evaluations == es.evaluations
    assert other.history.as_dict() == es.history.as_dict()
    assert torch.equal(other.ask(), es.ask())  # same RNG stream
    assert snapshot["iterations"] == 15


# ----------------------------------------------------------------------------- (9) minimize
def test_minimize_batch_executor_and_target():
    d = 6
    batch = minimize(sphere, torch.full((d,), 2.0), 1.0, batch=True, target=1e-8, seed=7, progress=False)
    assert batch.f <= 1e-8 and "ftarget" in batch.stop_reason
    assert batch.evaluations == batch.history["evaluations"][-1] and len(batch.history) == batch.iterations
    assert float(sphere(batch.x)) == pytest.approx(batch.f)

    pointwise = minimize(lambda x: float(sphere(x)), torch.full((d,), 2.0), 1.0, target=1e-8, seed=7, progress=False)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pooled = minimize(lambda x: float(sphere(x)), torch.full((d,), 2.0), 1.0, executor=pool, target=1e-8, seed=7,
                          progress=False)
    for r in (pointwise, pooled):
        assert r.evaluations == batch.evaluations and torch.equal(r.x, batch.x)

    budget = minimize(sphere, torch.full((d,), 2.0), 1.0, batch=True, budget=200, seed=7, progress=False)
    assert budget.stop_reason == {"maxfevals": 200} and 200 <= budget.evaluations < 200 + budget.history["popsize"][-1]

    calls = []
    cb = minimize(sphere, torch.full((d,), 2.0), 1.0, batch=True, seed=7, progress=False,
                  callback=lambda es: calls.append(es.iterations) or es.iterations >= 5)
    assert cb.iterations == 5 and cb.stop_reason.get("callback") and calls == [1, 2, 3, 4, 5]


def test_minimize_progress_and_plot():
    pytest.importorskip("tqdm")
    r = minimize(sphere, torch.ones(3), 1.0, batch=True, budget=300, seed=0, progress=True)
    assert r.evaluations >= 300
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    ax = r.plot()
    assert len(ax.get_lines()) == 2


def test_restarts_ipop_and_tolerances():
    d = 2

    def rastrigin(x):
        return 10 * d + (x * x - 10 * torch.cos(2 * math.pi * x)).sum(-1)

    es = StructuredNES(torch.full((d,), 3.0), 0.1, seed=1, restarts=2, budget=50000)
    while not es.stop():
        es.tell(rastrigin(es.ask()))
    pops = sorted(set(es.history["popsize"]))
    assert es.restarts_done == 2 and pops == [6, 12, 24]
    assert [e["reasons"] for e in es.restart_log] and all(
        set(e["reasons"]) <= {"tolx", "tolfun", "tolstagnation", "tolflatfitness", "tolupsigma"} for e in es.restart_log
    )
    assert es.stop() and not set(es.stop()) & {"maxfevals"}
    # flat fitness stops (no restarts left)
    es = StructuredNES(torch.zeros(3), 1.0, seed=0)
    run(es, lambda x: torch.zeros(len(x)), 10)
    assert "tolflatfitness" in es.stop()
    # max_iterations
    es = StructuredNES(torch.zeros(3), 1.0, seed=0, max_iterations=4)
    run(es, sphere, 10)
    assert es.stop() == {"maxiter": 4}


def test_mirrored_sampling():
    assert StructuredNES(torch.zeros(4), 1.0).mirrored  # the default rates sample mirrored pairs
    assert not StructuredNES(torch.zeros(500), 1.0, structure="diagonal").mirrored  # ... below d = 500
    assert not StructuredNES(torch.zeros(4), 1.0, rates="xnes").mirrored  # xNES stays xNES
    assert not StructuredNES(torch.zeros(4), 1.0, mirrored=False).mirrored
    es = StructuredNES(torch.zeros(4), 1.0, seed=0, popsize=7, mirrored=True)
    assert es.popsize == 8
    x = es.ask()
    assert torch.allclose(x[:4], -x[4:])
    es.tell(sphere(x))
    es = solve(sphere, 5, mirrored=True, seed=2)
    assert es.best_f <= 1e-8


@pytest.mark.parametrize("dim,base", [(10, 0.5), (499, 0.5), (500, 1.0), (1000, 1.0)])
def test_default_step_size_damping_is_half_of_cma_below_500_dimensions(dim, base):
    es = StructuredNES(torch.zeros(dim), 1.0, structure="diagonal")
    mueff, cs = es.mueff, es.rates["cs"]
    assert cs == pytest.approx((mueff + 2) / (dim + mueff + 5))
    cma = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (dim + 1)) - 1) + cs  # Hansen's d_sigma
    assert es.rates["ds"] == pytest.approx(cma - (1 - base), rel=1e-12)
    assert es.mirrored == (base == 0.5)


def test_cma_is_the_default_rates_and_default_an_alias():
    """``rates="cma"`` is the default; ``"default"`` (its former name) gives the same run."""
    f = lambda x: ellipsoid(x @ rotation(5).T)  # noqa: E731
    runs = [StructuredNES(torch.ones(5, dtype=F64), 0.5, seed=3, **kw) for kw in ({}, {"rates": "cma"},
            {"rates": "default"}, {"rates": {"base": "default", "cmu": 0.2}}, {"rates": {"base": "cma", "cmu": 0.2}})]
    for es in runs:
        run(es, f, 20)
        assert es.mode == "cma"
    assert torch.equal(runs[0].mean, runs[1].mean) and torch.equal(runs[0].mean, runs[2].mean)
    assert torch.equal(runs[3].mean, runs[4].mean) and not torch.equal(runs[0].mean, runs[3].mean)
    legacy = runs[0].state_dict()
    legacy["mode"] = "default"
    clone = StructuredNES(torch.ones(5, dtype=F64), 0.5, seed=3)
    clone.load_state_dict(legacy)
    assert torch.equal(clone.mean, runs[0].mean) and clone.sigma == runs[0].sigma


def test_search_distribution_is_a_covariance_gaussian():
    """The strategy's state is a covariance-parameterized layer-2 Gaussian with a scale part:
    its covariance is ``sigma^2 A A^T`` and ``ask`` samples ``mu + sigma A z``."""
    es = StructuredNES(torch.ones(6, dtype=F64), 0.4, structure="block_triangular", k=2, transpose=True, seed=1)
    run(es, sphere, 5)
    q = es.family
    assert q.parameterization == "covariance" and q.has_scale
    a = es.covariance_factor()
    assert torch.allclose(q.covariance(), a @ a.mT, rtol=1e-13, atol=1e-15)
    assert float(q.scale) == es.sigma and torch.equal(q.loc, es.mean)


@pytest.mark.parametrize("structure,opts", [("dense", {}), ("diagonal", {}), ("block_triangular", {"k": 2})])
def test_score_function_gradients_are_the_dense_loss_gradients(structure, opts):
    """Utilities ``u`` stand for the costs ``-u``: ``g_delta = -sum u z``, the pattern entries of
    ``g_M = -sum u (z z^T - I)`` and ``g_s = tr(g_M)``; the kernel's descent step along their
    natural gradient moves the mean towards the better samples."""
    from structngd.families.estimators import score_function_gradients

    d = 6
    group = make(structure, d, **opts)
    z = torch.randn(10, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    u = utilities(10)
    g_delta, g_m, g_s = score_function_gradients(group, z, u)
    dense = -sum(u[k] * (torch.outer(z[k], z[k]) - torch.eye(d, dtype=F64)) for k in range(10))
    assert torch.allclose(g_delta, -(u @ z), rtol=1e-14, atol=1e-15)
    assert torch.allclose(g_m, group.restrict(dense), rtol=1e-13, atol=1e-14)
    assert float(g_s) == pytest.approx(float(torch.trace(dense)), rel=1e-13)
    assert float(g_delta @ z[0]) < 0 < float(g_delta @ z[-1])  # best sample first: descent goes towards it
