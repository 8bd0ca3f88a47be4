"""Tests for ``experiments.bbob`` against the published BBOB 2009 definitions and ``cocoex``.

Without ``cocoex`` the comparison at random points is skipped; the fixed reference values
below were computed with cocoex 2.8.2 (``pip install coco-experiment``) and keep the
instance generation checked anyway.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from experiments import bbob

IDS = sorted(bbob.FUNCTIONS)

# (function, dim, instance, x, cocoex 2.8.2 value)
COCOEX_VALUES = [
    (1, 2, 1, [1.0, 3.18], 98.84614208),
    (2, 5, 2, [2.21, -2.2, -1.6, 2.99, -3.96], 15538587.11055131),
    (8, 10, 3, [2.57, 2.38, -0.26, -1.58, -1.77, -1.96, -0.44, 0.04, 0.43, 3.96], 104524.37123418592),
    (10, 5, 1, [2.34, 0.98, 3.91, -2.28, -2.72], 41555598.49154818),
    (12, 10, 2, [0.9, -3.65, -3.71, 0.12, -0.27, 3.34, 1.03, 0.11, -0.03, -2.02], 393212780.19092435),
    (15, 5, 3, [-3.91, -2.46, 1.54, -2.4, -1.04], 138.09706938239512),
]


@pytest.mark.parametrize("fid,dim,instance,x,value", COCOEX_VALUES)
def test_fixed_cocoex_values(fid, dim, instance, x, value):
    f = bbob.get(fid, dim, instance)
    assert f(np.array(x)) == pytest.approx(value, rel=1e-12)
    assert float(f(torch.tensor(x, dtype=torch.float64))) == pytest.approx(value, rel=1e-12)


def test_against_cocoex_random_points():
    cocoex = pytest.importorskip("cocoex")
    suite = cocoex.Suite("bbob", "instances: 1-5", "dimensions: 2,3,5,10,20,40")
    rng = np.random.default_rng(0)
    for fid in IDS:
        for dim in (2, 3, 5, 10, 20, 40):
            for instance in (1, 2, 5):
                problem = suite.get_problem_by_function_dimension_instance(fid, dim, instance)
                f = bbob.get(fid, dim, instance)
                x = np.concatenate([rng.uniform(-5, 5, (6, dim)), f._xopt[None] + rng.normal(0, 1e-3, (2, dim))])
                ref = np.array([problem(xi) for xi in x])
                mine = f(torch.from_numpy(x)).numpy()
                np.testing.assert_allclose(mine, ref, rtol=1e-12, atol=1e-9, err_msg=f"f{fid} d{dim} i{instance}")
                assert problem(f._xopt) == pytest.approx(f.fopt, abs=1e-9)  # same optimum and f_opt


@pytest.mark.parametrize("fid", IDS)
@pytest.mark.parametrize("dim", [2, 7, 20])
def test_published_formulas(fid, dim):
    f = bbob.get(fid, dim, instance=4)
    # f(xopt) = fopt; fopt in [-1000, 1000] on a 0.01 grid; xopt inside the box
    assert float(f(f.xopt)) == pytest.approx(f.fopt, abs=1e-12)
    assert -1000 <= f.fopt <= 1000 and abs(round(f.fopt * 100) - f.fopt * 100) < 1e-6
    bound = 3.0 if fid == 8 else 4.0
    assert f.xopt.abs().max() <= bound
    # the optimum is the minimum: every other point is worse
    x = f.xopt + 0.1 * torch.randn(50, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64)
    assert (f(x) > f.fopt).all()
    # batch = point by point
    assert torch.allclose(f(x), torch.stack([f(xi) for xi in x]), rtol=1e-13, atol=0)


def test_closed_forms():
    d = 6
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f1 = bbob.get(1, d, 2)
    assert torch.allclose(f1(x), ((x - f1.xopt) ** 2).sum(-1) + f1.fopt)
    f2 = bbob.get(2, d, 2)
    cond = torch.tensor([1e6 ** (i / (d - 1)) for i in range(d)], dtype=torch.float64)
    assert torch.allclose(f2(x), (cond * bbob.t_osz(x - f2.xopt) ** 2).sum(-1) + f2.fopt)
    f8 = bbob.get(8, d, 2)
    z = (x - f8.xopt) + 1  # scale max(1, sqrt(d)/8) = 1 for d < 64
    rosen = sum(100 * (z[:, i] ** 2 - z[:, i + 1]) ** 2 + (z[:, i] - 1) ** 2 for i in range(d - 1))
    assert torch.allclose(f8(x), rosen + f8.fopt)
    # f8's optimum region: z = 1 at xopt
    assert float(f8(f8.xopt)) == pytest.approx(f8.fopt, abs=1e-12)


def test_transforms():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    t = bbob.t_osz(x)
    assert t[2] == 0 and t[4] == pytest.approx(1.0, abs=1e-15)  # log 1 = 0: T_osz(1) = 1
    assert torch.equal(torch.sign(t), torch.sign(x))
    xh = math.log(3.0)
    assert float(t[5]) == pytest.approx(math.exp(xh + 0.049 * (math.sin(10 * xh) + math.sin(7.9 * xh))))
    xh = math.log(2.0)
    assert float(t[0]) == pytest.approx(-math.exp(xh + 0.049 * (math.sin(5.5 * xh) + math.sin(3.1 * xh))))
    a = bbob.t_asy(x, 0.5)
    assert torch.equal(a[x <= 0], x[x <= 0]) and a[0] == x[0]  # first coordinate: exponent 1
    assert float(a[5]) == pytest.approx(3.0 ** (1 + 0.5 * 5 / 5 * math.sqrt(3.0)))
    r = bbob._rotation(12345, 7)
    np.testing.assert_allclose(r.T @ r, np.eye(7), atol=1e-13)


def test_bad_arguments():
    with pytest.raises(ValueError, match="function"):
        bbob.get(3, 5)
    with pytest.raises(ValueError, match="dim"):
        bbob.get(1, 1)
    with pytest.raises(ValueError, match="instance"):
        bbob.get(1, 5, 0)
    with pytest.raises(ValueError, match="size 5"):
        bbob.get(1, 5)(torch.zeros(4))
    assert len(bbob.suite(functions=(1, 10), dims=(2, 3), instances=(1,))) == 4
