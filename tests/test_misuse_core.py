"""The core layers under misuse and faults: a refused natural-gradient step leaves every family, gradient
and momentum buffer as it was, nothing non-finite is ever written, state dicts are checked when loaded,
every group reads only its pattern's entries, families follow dtype moves, and the evolution strategies
refuse what is not a number."""

import copy
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from structngd import groups
from structngd.es import StructuredNES, minimize
from structngd.families import Gaussian, KroneckerGaussian, Wishart
from structngd.families.gaussian import GaussianStep
from structngd.optim import NaturalGradient, natural_gradient_step
from structngd.targets import GaussianTarget

from helpers import assert_same

F64 = torch.float64


# ------------------------------------------------------------------ snapshots
def snapshot(families, opt=None):
    """Every parameter, gradient and momentum buffer, cloned."""
    out = {}
    for i, family in enumerate(families):
        for name, p in family.named_parameters():
            out[f"{i}.{name}"] = p.detach().clone()
            if p.grad is not None:
                out[f"{i}.{name}.grad"] = p.grad.clone()
            if opt is not None and "momentum_buffer" in opt.state.get(p, {}):
                out[f"{i}.{name}.momentum"] = opt.state[p]["momentum_buffer"].clone()
    return out


def all_finite(families, opt, grads=True):
    return all(bool(torch.isfinite(v).all()) for k, v in snapshot(families, opt).items()
               if grads or not k.endswith(".grad"))


def quadratic_gradients(family, seed=0):
    """Finite gradients of a smooth loss: ``-E log N(0, I)``-like for Gaussians, a trace for Wishart."""
    family.zero_grad()
    torch.manual_seed(seed)
    if isinstance(family, Wishart):
        loss = family.rsample((4,)).diagonal(dim1=-2, dim2=-1).sum() / 4 - family.entropy()
    else:
        loss = 0.5 * family.rsample((4,)).pow(2).sum() / 4 - family.entropy()
    loss.backward()


# ------------------------------------------------------------------ 1. all or nothing across families
def refused_wishart():
    """A Wishart whose next step (linear df coordinate, a large df gradient) leaves ``(d - 1, inf)``."""
    return Wishart(3, 5.0, df_coordinate="linear", dtype=F64)


@pytest.mark.parametrize("order", ["gaussian first", "wishart first"])
def test_a_refused_wishart_step_leaves_the_gaussian_its_gradients_and_momentum_untouched(order):
    gaussian, wishart = Gaussian(3, "lower_triangular", dtype=F64), refused_wishart()
    families = [gaussian, wishart] if order == "gaussian first" else [wishart, gaussian]
    opt = NaturalGradient(families, lr=0.1, momentum=0.9)
    for family in families:
        quadratic_gradients(family)
    opt.step()  # momentum buffers now exist
    for family in families:
        quadratic_gradients(family, seed=1)
    wishart.df.grad.fill_(1e4)
    before = snapshot(families, opt)
    with pytest.raises(ValueError, match=r"Wishart step would move df .* no parameter was changed"):
        opt.step()
    assert_same(before, snapshot(families, opt))


def test_a_non_finite_gradient_of_the_last_family_stops_the_whole_step():
    families = [Gaussian(3, "dense", dtype=F64), Gaussian(3, "diagonal", dtype=F64), refused_wishart()]
    opt = NaturalGradient(families, lr=0.1, momentum=0.5)
    for family in families:
        quadratic_gradients(family)
    opt.step()
    for family in families:
        quadratic_gradients(family, seed=2)
    wishart = families[-1]
    wishart.factor.grad[1, 1] = float("nan")
    before = snapshot(families, opt)
    with pytest.raises(ValueError, match="param group 2: Wishart.factor.grad has non-finite values"):
        opt.step()
    assert_same(before, snapshot(families, opt))


def test_the_kernel_alone_returns_nothing_and_writes_nothing_when_one_family_is_refused():
    gaussian, wishart = Gaussian(3, dtype=F64), refused_wishart()
    for family in (gaussian, wishart):
        quadratic_gradients(family)
    wishart.df.grad.fill_(1e4)
    buffers = [{"loc": torch.ones(3, dtype=F64), "factor": torch.eye(3, dtype=F64)}, None]
    kept = [{k: v.clone() for k, v in buffers[0].items()}]
    before = snapshot([gaussian, wishart])
    with pytest.raises(ValueError, match="family 1 \\(Wishart\\)"):
        natural_gradient_step([gaussian, wishart], buffers, lr=[0.1, 0.1], momentum=[0.9, 0.9], max_step=[None] * 2,
                              retraction=["h", "h"], part_lrs=[None, None])
    assert_same(before, snapshot([gaussian, wishart]))
    assert_same(kept[0], buffers[0])


# ------------------------------------------------------------------ 2. what is written is checked
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_huge_gradient_on_a_diagonal_factor_is_refused_or_stays_finite(dtype):
    q = Gaussian(3, "diagonal", dtype=dtype)
    opt = NaturalGradient(q, lr=1.0)
    q.loc.grad = torch.zeros(3, dtype=dtype)
    q.factor.grad = torch.full((3,), -1e20, dtype=dtype)
    before = snapshot([q], opt)
    try:
        opt.step()
    except ValueError as err:
        assert "non-finite values into factor" in str(err)
        assert_same(before, snapshot([q], opt))
        assert dtype == torch.float32  # (1 + 1e20/2 + ...)  overflows float32 only
    else:
        assert all_finite([q], opt)


def test_a_float64_direction_that_overflows_a_float32_parameter_is_refused():
    q = Gaussian(3, "diagonal", dtype=torch.float32)
    direction = GaussianStep(torch.full((3,), 1e39, dtype=F64), torch.zeros(3, dtype=F64))  # finite in float64
    before = snapshot([q])
    with pytest.raises(ValueError, match="non-finite values into loc"):
        natural_gradient_step([q], [None], lr=[1.0], momentum=[0.0], max_step=[None], retraction=["h"],
                              part_lrs=[None], directions=[direction])
    assert_same(before, snapshot([q]))


def test_a_direction_of_the_wrong_shape_is_refused_before_anything_is_written():
    q, other = Gaussian(3, dtype=F64), Gaussian(3, "diagonal", dtype=F64)
    quadratic_gradients(other)
    direction = GaussianStep(torch.zeros(1, 3, dtype=F64), torch.zeros(3, 3, dtype=F64))  # broadcasts to (1, 3)
    before = snapshot([other, q])
    with pytest.raises(ValueError, match=r"shape \(1, 3\) for loc"):
        natural_gradient_step([other, q], [None, None], lr=[0.1] * 2, momentum=[0.0] * 2, max_step=[None] * 2,
                              retraction=["h"] * 2, part_lrs=[None] * 2, directions=[None, direction])
    assert_same(before, snapshot([other, q]))


def test_a_scale_that_would_underflow_to_zero_is_refused():
    q = Gaussian(3, parameterization="covariance", scale=1.0, dtype=torch.float32)
    opt = NaturalGradient(q, lr=1.0)
    for p in q.parameters():
        p.grad = torch.zeros_like(p)
    q.scale.grad.fill_(1e4)  # s = sigma g / (2 d): exp(-1667) = 0
    before = snapshot([q], opt)
    with pytest.raises(ValueError, match="scale .* must stay > 0"):
        opt.step()
    assert_same(before, snapshot([q], opt))


def test_a_step_that_underflows_the_factor_to_a_singular_one_is_refused():
    q = Gaussian(3, "diagonal", dtype=torch.float32)
    opt = NaturalGradient(q, lr=1.0, retraction="exp")
    q.loc.grad = torch.zeros(3)
    q.factor.grad = torch.tensor([0.1, 400.0, 0.1])  # M = B g / 2 = 200: exp(-200) is 0 in float32
    before = snapshot([q], opt)
    with pytest.raises(ValueError, match="would make factor singular"):
        opt.step()
    assert_same(before, snapshot([q], opt))


def test_a_singular_factor_written_by_hand_gives_a_value_error_naming_the_family():
    q = Gaussian(3, dtype=F64)
    with torch.no_grad():
        q.factor[2] = q.factor[1]
    opt = NaturalGradient([Gaussian(2, dtype=F64), q], lr=0.1)
    for p in opt.param_groups[0]["params"] + opt.param_groups[1]["params"]:
        p.grad = torch.ones_like(p)
    before = snapshot([g["family"] for g in opt.param_groups], opt)
    with pytest.raises(ValueError, match="param group 1: a factor is singular to working precision"):
        opt.step()
    assert_same(before, snapshot([g["family"] for g in opt.param_groups], opt))


def test_a_momentum_buffer_of_another_shape_is_refused_by_the_kernel():
    q = Gaussian(3, dtype=F64)
    quadratic_gradients(q)
    before = snapshot([q])
    with pytest.raises(ValueError, match=r"momentum buffer of part 'factor' must have shape \(3, 3\), got shape"):
        natural_gradient_step([q], [{"loc": torch.zeros(3, dtype=F64), "factor": torch.zeros(2, 2, dtype=F64)}],
                              lr=[0.1], momentum=[0.9], max_step=[None], retraction=["h"], part_lrs=[None])
    assert_same(before, snapshot([q]))


def test_the_exact_exponential_of_an_overflowing_direction_is_non_finite_not_an_error():
    group = groups.make("heisenberg", 5, k=1)
    assert torch.isnan(group.exp(torch.full(group.shape, 1e308, dtype=F64))).all()


def test_retract_refuses_a_non_finite_value_and_changes_nothing():
    q = Gaussian(3, "diagonal", dtype=torch.float32)
    before = snapshot([q])
    with pytest.raises(ValueError, match="Gaussian: the step would write non-finite values into factor"):
        q.retract((torch.zeros(3), torch.full((3,), -1e20)))
    assert_same(before, snapshot([q]))


class ClippedStep(NamedTuple):
    x: torch.Tensor


class Clipped(nn.Module):
    """A protocol family whose retraction clips the step: an overflowing momentum cannot reach its value."""

    factor_parts = ()

    def __init__(self):
        super().__init__()
        self.x = nn.Parameter(torch.zeros(2))

    def natural_gradient(self):
        return ClippedStep(self.x.grad.clone())

    def retracted(self, step, retraction="h"):
        return {"x": self.x - torch.tanh(step[0])}


def test_an_overflowing_momentum_buffer_is_refused_even_where_the_value_stays_finite():
    family = Clipped()
    opt = NaturalGradient(family, lr=1.0, momentum=0.9)
    family.x.grad = torch.full((2,), 3e38)
    opt.step()  # buffer 3e38: finite
    before = snapshot([family], opt)
    with pytest.raises(ValueError, match="momentum buffer of x would be non-finite"):
        opt.step()  # 0.9 * 3e38 + 3e38 overflows float32
    assert_same(before, snapshot([family], opt))


FAULT_FAMILIES = {
    "dense": lambda dt: Gaussian(3, "dense", dtype=dt),
    "diagonal": lambda dt: Gaussian(3, "diagonal", dtype=dt),
    "lower": lambda dt: Gaussian(3, "lower_triangular", dtype=dt),
    "heisenberg": lambda dt: Gaussian(4, "heisenberg", k=1, dtype=dt),
    "ragged blocks": lambda dt: Gaussian(3, "block_diagonal", block_size=2, ragged=True, dtype=dt),
    "covariance": lambda dt: Gaussian(3, "block_triangular", k=1, parameterization="covariance", dtype=dt),
    "scaled": lambda dt: Gaussian(3, "upper_triangular", parameterization="covariance", scale=0.5, dtype=dt),
    "transposed": lambda dt: Gaussian(3, "block_triangular", k=1, parameterization="covariance", scale=1.0,
                                      transpose=True, dtype=dt),
    "wishart log": lambda dt: Wishart(3, 4.0, dtype=dt),
    "wishart linear": lambda dt: Wishart(3, 4.0, structure="diagonal", df_coordinate="linear", dtype=dt),
    "kronecker": lambda dt: KroneckerGaussian(2, 3, ("dense", "lower_triangular"), dtype=dt),
}


def inject_gradients(families, gen):
    """Random gradients, with NaN, inf or huge entries (1e20 to 1e300) in about a third of the calls."""
    for family in families:
        for p in family.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype)
    fault = int(torch.randint(0, 9, (1,), generator=gen))
    p = list(families[int(torch.randint(0, len(families), (1,), generator=gen))].parameters())[0 if fault % 2 else -1]
    flat = p.grad.view(-1)
    entry = int(torch.randint(0, flat.numel(), (1,), generator=gen))
    if fault == 1:
        flat[entry] = float("nan")
    elif fault == 2:
        flat[entry] = float("inf") * (1 if entry % 2 else -1)
    elif fault in (3, 4):
        flat.mul_(10.0 ** float(torch.randint(20, 300, (1,), generator=gen)))
    return fault


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_random_faults_never_write_a_non_finite_value_and_every_raise_changes_nothing(dtype):
    gen = torch.Generator().manual_seed(11)
    names = list(FAULT_FAMILIES)
    lrs = [0.0, 1e-3, 0.1, 0.5, 1.0, 10.0, 1e10, 1e300]
    steps = raised = 0
    for trial in range(60):
        picked = [names[int(i)] for i in torch.randperm(len(names), generator=gen)[:2]]
        families = [FAULT_FAMILIES[name](dtype) for name in picked]
        pick = lambda options: options[int(torch.randint(0, len(options), (1,), generator=gen))]  # noqa: E731
        opt = NaturalGradient(families, lr=pick(lrs), momentum=pick([0.0, 0.9]), max_step=pick([None, 1.0]),
                              retraction=pick(["h", "exp"]))
        for _ in range(20):
            for group in opt.param_groups:
                group["lr"] = pick(lrs)
            fault = inject_gradients(families, gen)
            before = snapshot(families, opt)
            steps += 1
            try:
                opt.step()
            except ValueError:
                raised += 1
                assert_same(before, snapshot(families, opt))
                continue
            assert all_finite(families, opt), (picked, fault)
            for family in families:
                if isinstance(family, Wishart):
                    assert family.df.item() > family.dim - 1
                if getattr(family, "has_scale", False):
                    assert family.scale.item() > 0
    assert steps == 1200 and 0 < raised < steps


# ------------------------------------------------------------------ 3. state dicts are checked when loaded
def stepped(*args, momentum=0.9, **kwargs):
    q = Gaussian(*args, dtype=F64, **kwargs)
    opt = NaturalGradient(q, lr=0.1, momentum=momentum)
    quadratic_gradients(q)
    opt.step()
    quadratic_gradients(q, seed=3)
    return q, opt


def optimizer_snapshot(q, opt):
    out = snapshot([q], opt)
    out.update({f"group.{k}": torch.tensor(float(v)) for k, v in opt.param_groups[0].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


@pytest.mark.parametrize(
    "target, words",
    [
        (dict(dim=3, structure="lower_triangular"),
         r"group: saved Dense\(dim=3\), this family LowerTriangular\(dim=3\)"),
        (dict(dim=3, structure="upper_triangular"), r"this family UpperTriangular\(dim=3\)"),
        (dict(dim=2), r"Dense\(dim=2\); parameters: saved loc \(3,\), factor \(3, 3\), this family loc \(2,\)"),
        (dict(dim=3, parameterization="covariance"), "parameterization: saved 'precision', this family 'covariance'"),
    ],
)
def test_a_dense_state_is_refused_by_another_family_naming_what_differs(target, words):
    _, source = stepped(3)
    target = dict(target)
    q, opt = stepped(target.pop("dim"), **target)
    before = optimizer_snapshot(q, opt)
    with pytest.raises(ValueError, match="param group 0: the state of another family cannot be loaded.*" + words):
        opt.load_state_dict(source.state_dict())
    assert_same(before, optimizer_snapshot(q, opt))


def test_a_state_without_descriptions_is_still_checked_by_shape():
    _, source = stepped(3)
    state = source.state_dict()
    del state["param_groups"][0]["family_description"]  # an older state dict
    q, opt = stepped(2)
    before = optimizer_snapshot(q, opt)
    with pytest.raises(ValueError, match=r"momentum buffer of shape \(3,\) for a parameter of shape \(2,\)"):
        opt.load_state_dict(state)
    assert_same(before, optimizer_snapshot(q, opt))


@pytest.mark.parametrize("corrupt, words", [
    (lambda s: s["state"][1]["momentum_buffer"].fill_(float("inf")), "non-finite"),
    (lambda s: s["param_groups"][0].update(lr=-1.0), "lr must be"),
    (lambda s: s["param_groups"][0].update(momentum=1.5), "momentum must be"),
    (lambda s: s["state"][0].update(momentum_buffer="zeros"), "momentum buffer of str"),
])
def test_a_corrupt_state_is_refused_with_nothing_changed(corrupt, words):
    _, source = stepped(3)
    state = source.state_dict()
    corrupt(state)
    q, opt = stepped(3)
    before = optimizer_snapshot(q, opt)
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(state)
    assert_same(before, optimizer_snapshot(q, opt))


def test_a_state_of_the_same_family_loads_and_resumes_exactly():
    q1, opt1 = stepped(3, "lower_triangular")
    q2, opt2 = stepped(3, "lower_triangular")
    with torch.no_grad():
        for a, b in zip(q1.parameters(), q2.parameters()):
            b.copy_(a)
            b.grad = a.grad.clone()
    opt2.load_state_dict(opt1.state_dict())
    assert all(g["family"] is q2 for g in opt2.param_groups)
    assert "family_description" not in opt2.param_groups[0]
    opt1.step()
    opt2.step()
    assert_same(snapshot([q1], opt1), snapshot([q2], opt2))


def es_state(es):
    """The whole state of a search as comparable tensors."""
    out = {}
    for k, v in es.state_dict().items():
        if isinstance(v, torch.Tensor):
            out[k] = v.clone()
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = torch.tensor(float(v), dtype=F64)
    out["generator"] = es.generator.get_state()
    return out


def es_run(seed=0, **kwargs):
    es = StructuredNES(torch.ones(4), 0.5, popsize=6, seed=seed, **kwargs)
    for _ in range(3):
        x = es.ask()
        es.tell(x.pow(2).sum(-1))
    return es


@pytest.mark.parametrize("corrupt, words", [
    (lambda s: s.update(factor=torch.eye(3, dtype=F64)), r"'factor' must be a tensor of shape \(4, 4\)"),
    (lambda s: s.update(mean=[0.0] * 4), "'mean' must be a tensor"),
    (lambda s: s.pop("history"), r"misses \['history'\]"),
    (lambda s: s.update(generator=torch.zeros(3)), "does not fit"),
    (lambda s: s.update(popsize=1.5), "popsize"),
    (lambda s: s.update(sigma=-1.0), "sigma"),
    (lambda s: s.update(history=[1, 2]), "does not fit"),
    (lambda s: s.update(pending=(torch.zeros(5, 4), torch.zeros(5, 4))), "pending"),
])
def test_a_corrupt_search_state_is_refused_before_anything_is_set(corrupt, words):
    state = es_run(seed=1).state_dict()
    corrupt(state)
    es = es_run(seed=2)
    before = es_state(es)
    with pytest.raises(ValueError, match=words):
        es.load_state_dict(state)
    assert_same(before, es_state(es))


def test_a_search_state_of_another_group_is_refused_and_a_valid_one_resumes_exactly():
    es = es_run(seed=2)
    before = es_state(es)
    with pytest.raises(ValueError, match="cannot be loaded"):
        es.load_state_dict(es_run(structure="diagonal").state_dict())
    assert_same(before, es_state(es))
    source = es_run(seed=1)
    es.load_state_dict(source.state_dict())
    for search in (source, es):
        search.tell(search.ask().pow(2).sum(-1))
    assert_same(es_state(source), es_state(es))


def test_a_restart_whose_x0_fails_leaves_the_search_as_it_was():
    calls = []

    def x0():
        calls.append(1)
        return torch.ones(3 if len(calls) == 1 else 2)  # the restart's mean has the wrong size

    es = StructuredNES(x0, 0.5, popsize=6, seed=0, restarts=1, tolfun=1e300)  # tolfun fires at the second tell
    es.tell(es.ask().pow(2).sum(-1))
    f = es.ask().pow(2).sum(-1)
    before, records = es_state(es), (len(es.history), len(es._run_best), es.family)
    with pytest.raises(ValueError, match="x0\\(\\) returned a vector of size 2"):
        es.tell(f)
    assert_same(before, es_state(es))
    assert (len(es.history), len(es._run_best), es.family) == records and es.pending is not None


def test_a_tell_that_fails_after_the_step_restores_the_search_distribution(monkeypatch):
    from structngd.es import cumulation

    es = es_run(seed=4)
    f = es.ask().pow(2).sum(-1)
    before = es_state(es)

    def overflowing(*args):
        raise OverflowError("math range error")

    monkeypatch.setattr(cumulation, "volume_shrink", overflowing)
    with pytest.raises(OverflowError):
        es.tell(f)
    assert_same(before, es_state(es))
    monkeypatch.undo()
    es.tell(f)
    twin = es_run(seed=4)
    twin.tell(twin.ask().pow(2).sum(-1))
    assert_same(es_state(twin), es_state(es))


@pytest.mark.parametrize("mean, precision, words", [
    (torch.zeros(3), -torch.eye(3), "symmetric positive-definite"),
    (torch.zeros(3), torch.eye(2), r"shapes \(3,\) and \(2, 2\)"),
    (torch.full((2,), float("nan")), torch.eye(2), "finite mean"),
])
def test_a_gaussian_target_refuses_what_is_no_gaussian(mean, precision, words):
    with pytest.raises(ValueError, match=words):
        GaussianTarget(mean, precision)


# ------------------------------------------------------------------ 4. every group reads only its pattern
PATTERN_GROUPS = [
    ("lower_triangular", 4, {}),
    ("upper_triangular", 4, {}),
    ("block_diagonal", 5, dict(block_size=2, ragged=True)),
    ("block_diagonal", 4, dict(block_size=2)),
    ("block_triangular", 5, dict(k=2)),
    ("heisenberg", 6, dict(k=2, k2=1)),
    ("hierarchical", 6, dict(k1=1, k2=2)),
    ("dense", 3, {}),
    ("diagonal", 3, {}),
]


def dirty(group, a, fill):
    """``a`` with ``fill`` in every storage slot off the pattern (none for most groups)."""
    off = group.restrict(group.to_dense(torch.ones_like(a))) == 0
    return torch.where(off, torch.full_like(a, fill), a)


def group_operations(group, a, x):
    m = 0.1 * group.project(torch.randn(group.dim, group.dim, generator=torch.Generator().manual_seed(3), dtype=F64))
    return {
        "to_dense": group.to_dense(a), "matvec": group.matvec(a, x), "tmatvec": group.tmatvec(a, x),
        "solve": group.solve(a, x), "tsolve": group.tsolve(a, x), "logdet": group.logdet(a),
        "mul left": group.mul(a, m), "mul right": group.mul(m, a), "h": group.h(a - group.identity(F64)),
        "exp": group.exp(0.1 * a), "rows": group.row_sq_norms(a), "columns": group.col_sq_norms(a),
        "diagonal": group.diagonal(a), "pullback": group.pullback(a, a),
        "gram": group.gram(a) if group.gram(a) is not None else torch.zeros(()),
    }


@pytest.mark.parametrize("fill", [7.5, float("nan")])
@pytest.mark.parametrize("name, dim, options", PATTERN_GROUPS)
def test_every_group_operation_ignores_the_storage_slots_off_its_pattern(name, dim, options, fill):
    group = groups.make(name, dim, **options)
    gen = torch.Generator().manual_seed(0)
    a = group.random(gen, dtype=F64)
    x = torch.randn(5, dim, generator=gen, dtype=F64)
    clean = group_operations(group, a, x)
    assert_same(clean, group_operations(group, dirty(group, a, fill), x))
    for k in ("mul left", "mul right", "h", "exp"):  # compact results hold zeros off the pattern
        assert_same({k: clean[k]}, {k: dirty(group, clean[k], 0.0)})


@pytest.mark.parametrize("name, dim, options", PATTERN_GROUPS[:3])
def test_gradients_vanish_off_the_pattern(name, dim, options):
    group = groups.make(name, dim, **options)
    a = group.random(torch.Generator().manual_seed(1), dtype=F64).requires_grad_()
    x = torch.randn(3, dim, dtype=F64)
    (group.matvec(a, x).sum() + group.tmatvec(a, x).pow(2).sum() + group.solve(a, x).sum() + group.logdet(a)
     + group.to_dense(a).sum() + group.row_sq_norms(a).sum()).backward()
    assert torch.equal(dirty(group, a.grad, 0.0), a.grad)


@pytest.mark.parametrize("structure", ["lower_triangular", "upper_triangular"])
def test_a_gaussian_trained_with_adam_keeps_one_structured_matrix(structure):
    torch.manual_seed(0)
    target = GaussianTarget.random(4, generator=torch.Generator().manual_seed(0))
    q = Gaussian(4, structure, dtype=F64)
    with torch.no_grad():
        q.factor.add_(torch.randn(4, 4, dtype=F64))  # a user's write off the triangle, too
    tri = torch.tril if structure == "lower_triangular" else torch.triu
    off = q.factor.detach() - tri(q.factor.detach())
    start = float(target.kl(q).detach())
    adam = torch.optim.Adam(q.parameters(), lr=0.05)
    for _ in range(200):
        adam.zero_grad()
        target.kl(q).backward()
        adam.step()
    assert torch.equal(q.factor.detach() - tri(q.factor.detach()), off)  # no gradient reaches those slots
    b = tri(q.factor.detach())
    mvn = torch.distributions.MultivariateNormal(q.loc.detach(), precision_matrix=b @ b.mT)
    z = q.sample((64,))
    torch.testing.assert_close(q.log_prob(z).detach(), mvn.log_prob(z), rtol=0, atol=1e-9)
    torch.testing.assert_close(q.precision().detach(), b @ b.mT, rtol=0, atol=0)
    assert float(target.kl(q).detach()) < start


@pytest.mark.parametrize("structure", ["lower_triangular", "upper_triangular"])
def test_a_pyro_guide_trained_with_adam_scores_its_own_samples_in_closed_form(structure):
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO

    from structngd.pyro import AutoStructuredNormal

    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        data = torch.tensor([0.3, -1.2, 2.0])

        def model():
            z = pyro.sample("z", dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1))
            pyro.sample("x", dist.Normal(z.cumsum(-1), 0.5).to_event(1), obs=data)

        guide = AutoStructuredNormal(model, structure=structure)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        for _ in range(300):
            svi.step()
        loc, factor = guide.loc.detach(), guide.factor.detach()
        b = torch.tril(factor) if structure == "lower_triangular" else torch.triu(factor)
        covariance = torch.linalg.inv(b @ b.mT)
        closed = torch.distributions.MultivariateNormal(loc, covariance_matrix=covariance)
        posterior = guide.get_posterior()
        z = posterior.sample((100,))
        torch.testing.assert_close(posterior.log_prob(z).detach(), closed.log_prob(z), rtol=0, atol=1e-8)
    finally:
        torch.set_default_dtype(default)
        pyro.clear_param_store()


# ------------------------------------------------------------------ 5. dtype and device moves
@pytest.mark.parametrize("structure", ["dense", "lower_triangular", "block_triangular"])
def test_a_family_moved_to_float32_after_momentum_steps_is_followed(structure):
    options = dict(k=1) if structure == "block_triangular" else {}
    q = Gaussian(3, structure, dtype=F64, **options)
    opt = NaturalGradient(q, lr=0.1, momentum=0.9)
    for seed in range(3):
        quadratic_gradients(q, seed)
        opt.step()
    q.to(torch.float32)
    twin = copy.deepcopy(q)  # built in float32, its buffers cast by hand
    twin_opt = NaturalGradient(twin, lr=0.1, momentum=0.9)
    for p, t in zip(q.parameters(), twin.parameters()):
        twin_opt.state[t]["momentum_buffer"] = opt.state[p]["momentum_buffer"].float()
    quadratic_gradients(q, 5)
    for p, t in zip(q.parameters(), twin.parameters()):
        t.grad = p.grad.clone()
    opt.step()
    twin_opt.step()
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.float32 for p in q.parameters())
    assert_same(snapshot([twin], twin_opt), snapshot([q], opt))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("structure, options", [("dense", {}), ("upper_triangular", {}), ("diagonal", {}),
                                                ("block_diagonal", dict(block_size=2, ragged=True)),
                                                ("heisenberg", dict(k=1))])
def test_half_precision_gaussians_work_where_the_math_allows(dtype, structure, options):
    precision = torch.tensor([[2.0, 0.5, 0.0], [0.5, 2.0, 0.1], [0.0, 0.1, 1.0]])
    init = precision if structure in ("dense", "upper_triangular") else precision.diagonal()
    q = Gaussian(3, structure, precision=init, dtype=dtype, **options)
    exact = Gaussian(3, structure, precision=init, dtype=F64, **options)
    tol = 0.05 if dtype == torch.bfloat16 else 5e-3
    z = exact.sample((8,))
    torch.testing.assert_close(q.log_prob(z.to(dtype)).double(), exact.log_prob(z), rtol=tol, atol=tol * 4)
    torch.testing.assert_close(q.entropy().double(), exact.entropy(), rtol=tol, atol=tol)
    for retraction in ("h", "exp"):
        opt = NaturalGradient(q, lr=0.1, retraction=retraction)
        quadratic_gradients(q)
        opt.step()
        assert all_finite([q], opt)
    with pytest.raises(ValueError, match="to_torch needs float32 or float64"):
        q.to_torch()
    covariant = Gaussian(3, structure, covariance=init, parameterization="covariance", dtype=dtype, **options)
    exact = Gaussian(3, structure, covariance=init, parameterization="covariance", dtype=F64, **options)
    torch.testing.assert_close(covariant.precision().double(), exact.precision(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_wisharts_are_refused_at_construction_and_at_use(dtype):
    with pytest.raises(ValueError, match="Wishart needs float32 or float64"):
        Wishart(3, 5.0, dtype=dtype)
    with pytest.raises(ValueError, match="Wishart needs float32 or float64"):
        Wishart(3, torch.tensor(5.0, dtype=dtype))
    moved = Wishart(3, 5.0).to(dtype)
    for use in (lambda: moved.rsample((2,)), lambda: moved.log_prob(torch.eye(3, dtype=dtype))):
        with pytest.raises(ValueError, match="Wishart needs float32 or float64"):
            use()


# ------------------------------------------------------------------ 6. evolution strategies: input validation
def told(fitness_of, seed=0):
    es = StructuredNES(torch.ones(3), 0.5, popsize=6, seed=seed)
    for _ in range(4):
        x = es.ask()
        es.tell(fitness_of(x.pow(2).sum(-1)))
    return es_state(es)


@pytest.mark.parametrize("form", [lambda f: f.tolist(), lambda f: tuple(f.tolist()), lambda f: f.numpy(),
                                  lambda f: [np.float64(v) for v in f.tolist()], lambda f: list(f.unbind(0)),
                                  lambda f: (v for v in f.tolist())])
def test_fitness_as_a_list_tuple_array_or_tensor_gives_the_same_run(form):
    assert_same(told(lambda f: f), told(form))


@pytest.mark.parametrize("bad, words", [
    (lambda f: {i: v for i, v in enumerate(f.tolist())}, "got a dict"),
    (lambda f: set(f.tolist()), "got a set"),
    (lambda f: [complex(v, 1) for v in f.tolist()], "real numbers, got"),
    (lambda f: f.numpy().astype(complex), "dtype complex128"),
    (lambda f: f.to(torch.complex128), "dtype torch.complex128"),
    (lambda f: [str(v) for v in f.tolist()], "real numbers, got '"),
    (lambda f: np.array([str(v) for v in f.tolist()]), "numpy array of dtype <U"),
    (lambda f: [True] * len(f), "real numbers, got True"),
    (lambda f: "0.1 0.2", "got a str"),
])
def test_fitness_that_is_not_a_sequence_of_real_numbers_is_refused_and_changes_nothing(bad, words):
    es = StructuredNES(torch.ones(3), 0.5, popsize=6, seed=0)
    f = es.ask().pow(2).sum(-1)
    before = es_state(es)
    with pytest.raises(ValueError, match=words):
        es.tell(bad(f))
    assert_same(before, es_state(es))
    es.tell(f)  # the population still waits for its fitness


@pytest.mark.parametrize("make", [
    lambda: StructuredNES(torch.ones(3), 0.5, mirrored="no"),
    lambda: StructuredNES(torch.ones(3), 0.5, transpose="no"),
    lambda: Gaussian(3, parameterization="covariance", transpose="no"),
    lambda: groups.make("block_diagonal", 4, block_size=2, ragged="no"),
])
def test_flags_must_be_bools(make):
    with pytest.raises(ValueError, match="must be True or False, got 'no'"):
        make()


def test_numpy_scalars_are_accepted_for_numbers_and_give_the_same_run():
    plain = minimize(lambda x: float(x.pow(2).sum()), [1.0, 2.0, 3.0], 0.5, structure="block_triangular", k=1,
                     popsize=6, budget=60, seed=3, target=0.25, max_iterations=8, progress=False)
    numpy = minimize(lambda x: np.float64(x.pow(2).sum()), np.array([1.0, 2.0, 3.0]), np.float32(0.5),
                     structure="block_triangular", k=np.int64(1), popsize=np.int64(6), budget=np.int64(60),
                     seed=np.int64(3), target=np.float32(0.25), max_iterations=np.int64(8), progress=False)
    assert plain.evaluations == numpy.evaluations and plain.f == numpy.f
    assert torch.equal(plain.x, numpy.x)
    assert repr(groups.make("heisenberg", 5, k=np.int64(1))) == "Heisenberg(dim=5, k=1, k2=1)"
    assert repr(groups.make("hierarchical", np.int64(5), k1=np.int64(1), k2=np.int64(2))) == \
        "Hierarchical(dim=5, k1=1, k2=2)"
    assert repr(groups.make("block_diagonal", 4, block_size=np.int64(2))) == "BlockDiagonal(dim=4, block_size=2)"
    assert Wishart(3, np.float32(4.0)).df.item() == 4.0


@pytest.mark.parametrize("make", [
    lambda: StructuredNES(torch.ones(5), 0.5, structure="heisenberg", k=1, kk2=1),
    lambda: Gaussian(5, "heisenberg", k=1, kk2=1),
    lambda: Wishart(5, 6.0, structure="heisenberg", k=1, kk2=1),
])
def test_a_misspelt_group_option_is_an_error(make):
    with pytest.raises(ValueError, match="kk2"):
        make()


def test_group_options_beside_a_group_instance_are_an_error():
    group = groups.make("block_triangular", 4, k=1)
    with pytest.raises(ValueError, match="apply to a structure name"):
        StructuredNES(torch.ones(4), 0.5, structure=group, k=2)
    with pytest.raises(ValueError, match="apply to a structure name"):
        Gaussian(4, group, k=2)
    q = KroneckerGaussian(4, 4, (group, "block_triangular"), k=2)  # the options go to the named side
    assert q.out_group.k == 2 and q.in_group is group


class Failing:
    """A cost that raises ``error`` at its ``after``-th call."""

    def __init__(self, after, error):
        self.calls, self.after, self.error, self.seen = 0, after, error, []

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.after:
            raise self.error
        value = float(x.pow(2).sum())
        self.seen.append(value)
        return value


def test_an_interrupted_run_returns_what_it_computed():
    f = Failing(after=27, error=KeyboardInterrupt())
    result = minimize(f, torch.ones(3), 0.5, popsize=6, seed=0, progress=False)
    assert result.stop_reason == {"interrupted": "KeyboardInterrupt"}
    assert result.evaluations == 24 and result.iterations == 4
    assert result.f == min(f.seen[:24])


@pytest.mark.parametrize("batch", [False, True])
def test_a_cost_that_raises_keeps_the_run_so_far_on_the_exception(batch):
    calls = []

    def f(x):
        calls.append(x)
        if len(calls) == (4 if batch else 21):
            raise RuntimeError("simulator crashed")
        return x.pow(2).sum(-1) if batch else float(x.pow(2).sum())

    with pytest.raises(RuntimeError, match="simulator crashed") as info:
        minimize(f, torch.ones(3), 0.5, popsize=6, seed=0, batch=batch, progress=False)
    partial = info.value.partial_result
    assert partial.evaluations == 18 and partial.iterations == 3
    assert partial.stop_reason == {"interrupted": "RuntimeError"}
    assert any("partial_result" in note for note in info.value.__notes__)


@pytest.mark.parametrize("batch, cost, words", [
    (False, lambda x: complex(1, 1), "real scalar"),
    (False, lambda x: "1.0", "real scalar"),
    (False, lambda x: True, "real scalar"),
    (True, lambda x: {i: 1.0 for i in range(x.shape[0])}, "got a dict"),
    (True, lambda x: x.sum(-1).to(torch.complex128), "complex128"),
])
def test_a_cost_that_is_not_real_is_refused(batch, cost, words):
    with pytest.raises(ValueError, match=words) as info:
        minimize(cost, torch.ones(3), 0.5, popsize=6, seed=0, batch=batch, progress=False)
    assert info.value.partial_result.evaluations == 0


def test_a_nan_target_and_a_float_seed_are_refused():
    with pytest.raises(ValueError, match="target"):
        StructuredNES(torch.ones(3), 0.5, target=float("nan"))
    with pytest.raises(ValueError, match="seed"):
        StructuredNES(torch.ones(3), 0.5, seed=1.5)
    assert math.isinf(StructuredNES(torch.ones(3), 0.5, target=-math.inf).target)
