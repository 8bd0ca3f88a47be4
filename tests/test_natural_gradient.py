"""Tests for layer 3, ``structngd.optim.NaturalGradient`` (DESIGN.md "Layer 3", MATH.md §2.2, §2.5).

The optimizer's steps are compared with the family's own documented step
``mu <- mu - lr S^-1 g_mu``, ``B <- B h(-lr M)`` recomputed with dense float64 algebra,
and its torch.optim contract (state dicts, schedulers, closures, several families,
atomic failure) is checked. The long test runs 10,000 noisy steps per structure and
dtype and asserts that the precision stays SPD and the factor keeps its pattern exactly.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from structngd.families import Gaussian
from structngd.optim import NaturalGradient
from structngd.targets import GaussianTarget
from helpers import gen, rel

f64 = torch.float64




STRUCTURES = [
    ("dense", {}),
    ("diagonal", {}),
    ("lower_triangular", {}),
    ("upper_triangular", {}),
    ("block_diagonal", {"block_size": 2}),
    ("block_triangular", {"k": 2}),
    ("heisenberg", {"k": 1, "k2": 2}),
    ("hierarchical", {"k1": 2, "k2": 2}),
]


def random_gaussian(d, name="dense", seed=0, **opts):
    q = Gaussian(d, name, dtype=f64, **opts)
    with torch.no_grad():
        q.loc.copy_(torch.randn(d, generator=gen(seed), dtype=f64))
        q.factor.copy_(q.group.random(generator=gen(seed + 1), dtype=f64, scale=0.4))
    return q


def snapshot(*families):
    return [p.detach().clone() for q in families for p in q.parameters()]


def unchanged(before, *families):
    after = [p.detach() for q in families for p in q.parameters()]
    return all(torch.equal(a, b) for a, b in zip(before, after))


def expected_mean_step(q, lr):
    """mu - lr S^-1 g_mu by a dense solve (the mean step uses the current precision)."""
    b = q.group.to_dense(q.factor.detach())
    return q.loc.detach() - lr * torch.linalg.solve(b @ b.mT, q.loc.grad)


# ------------------------------------------------- 5. SPD and structure over 10,000 steps
class DenseIndex:
    """Gather/scatter indices between the families' concatenated compact factors and a
    stack of dense d x d matrices, read once from ``to_dense`` of unit compact vectors.

    They replace per-family ``to_dense`` / ``restrict`` calls (a dozen small ops each for
    the block groups) by one ``index_put`` and one gather per step.
    """

    def __init__(self, families, dtype):
        d = families[0].dim
        src, dst, sizes, shapes = [], [], [], []
        offset = 0
        for k, q in enumerate(families):
            n = q.group.numel()
            eye = torch.eye(n, dtype=f64).reshape((n,) + tuple(q.group.shape))
            dense = q.group.to_dense(eye).reshape(n, d * d)
            mask = q.group.mask(dtype=f64).reshape(-1).bool()
            for c in range(n):
                nz = dense[c].nonzero().flatten()
                if len(nz) == 1 and mask[nz[0]]:
                    src.append(offset + c)
                    dst.append(k * d * d + int(nz[0]))
            offset += n
            sizes.append(n)
            shapes.append(tuple(q.group.shape))
        self.n, self.d = len(families), d
        self.src, self.dst = torch.tensor(src), torch.tensor(dst)
        self.sizes, self.shapes = sizes, shapes
        self.dtype = dtype

    def to_dense(self, factors):
        flat = torch.cat([f.reshape(-1) for f in factors])
        out = flat.new_zeros(self.n * self.d * self.d)
        out[self.dst] = flat[self.src]
        return out.reshape(self.n, self.d, self.d)

    def restrict(self, dense):
        flat = dense.new_zeros(sum(self.sizes))
        flat[self.src] = dense.reshape(-1)[self.dst]
        return [part.reshape(shape) for part, shape in zip(flat.split(self.sizes), self.shapes)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_spd_and_structure_kept_over_10000_noisy_steps(dtype):
    """All structures side by side (one optimizer, batched dense gradient arithmetic).

    Gradients are Bonnet/Price gradients with a noisy, mostly indefinite Hessian
    ``H = P + N`` (MATH §2.5 test 4): ``g_mu = P (mu - m) + noise`` and
    ``dL/dB = -B^-T (B^-1 H B^-T - I)`` restricted to the pattern. The naive update
    ``S <- (1 - lr) S + lr H`` with the same Hessians loses definiteness.
    """
    d, steps, chunk, lr = 6, 10_000, 100, 0.05
    g = gen(5)
    target = GaussianTarget.random(d, condition=10.0, generator=g, dtype=dtype)
    p, m = target.precision, target.mean
    qs = [Gaussian(d, name, dtype=dtype, **opts) for name, opts in STRUCTURES]
    index = DenseIndex(qs, dtype)
    dense0 = index.to_dense([q.factor.detach() for q in qs])
    for k, q in enumerate(qs):  # the index maps agree with the library's own
        assert torch.equal(dense0[k], q.group.to_dense(q.factor.detach()))
        probe = torch.randn(d, d, generator=gen(k), dtype=dtype)
        assert torch.equal(index.restrict(probe.expand(len(qs), d, d))[k], q.group.restrict(probe))
    masks = [q.group.mask(dtype=dtype).bool() for q in qs]
    kl0 = [target.kl(q).item() for q in qs]
    opt = NaturalGradient(qs, lr=lr)
    n = len(qs)
    naive = torch.eye(d, dtype=f64)
    naive_lost_definiteness = False
    indefinite = 0
    with torch.no_grad():
        for start in range(0, steps, chunk):
            noise = torch.randn(chunk, n, d, d, generator=g, dtype=dtype)
            hess = p + noise + noise.mT  # ||N|| ~ ||P||
            indefinite += int((torch.linalg.eigvalsh(hess[:, 0].to(f64))[:, 0] < 0).sum())
            loc_noise = 3.0 * torch.randn(chunk, n, d, generator=g, dtype=dtype)
            for i in range(chunk):
                c = torch.linalg.inv(index.to_dense([q.factor for q in qs])).mT  # B^-T
                factor_grads = index.restrict(c - c @ (c.mT @ (hess[i] @ c)))
                loc_grads = torch.addmm(loc_noise[i], torch.stack([q.loc for q in qs]) - m, p)
                for q, gf, gl in zip(qs, factor_grads, loc_grads):
                    q.factor.grad, q.loc.grad = gf, gl
                opt.step()
                if not naive_lost_definiteness:
                    naive = (1 - lr) * naive + lr * hess[i, 0].to(f64)
                    naive_lost_definiteness = torch.linalg.cholesky_ex(naive)[1].item() != 0
            for q, mask, (name, _) in zip(qs, masks, STRUCTURES):
                s = q.precision().to(f64)
                _, info = torch.linalg.cholesky_ex(s)
                assert info.item() == 0, f"{name}: precision not SPD after {start + chunk} steps"
                assert torch.all(q.group.to_dense(q.factor)[~mask] == 0), f"{name}: pattern lost"
    assert indefinite > steps // 2  # the Hessian estimates really are indefinite
    assert naive_lost_definiteness
    for q, k0, (name, _) in zip(qs, kl0, STRUCTURES):
        assert q.loc.dtype == dtype and q.factor.dtype == dtype
        assert torch.isfinite(q.loc).all() and torch.isfinite(q.factor).all(), name
        kl = target.kl(q).item()
        assert math.isfinite(kl) and kl < k0, (name, k0, kl)  # noisy, but it moved towards p


# ------------------------------------------------------------------- step semantics
def test_step_is_the_documented_update():
    d = 6
    target = GaussianTarget.random(d, condition=30.0, generator=gen(1))
    q = random_gaussian(d, "block_triangular", seed=2, k=2)
    target.kl(q).backward()
    mu_expected = expected_mean_step(q, 0.3)
    ref = copy.deepcopy(q)  # (deepcopy does not copy .grad)
    ref.loc.grad, ref.factor.grad = q.loc.grad.clone(), q.factor.grad.clone()
    delta, m = ref.natural_gradient()
    b = ref.group.to_dense(ref.factor.detach())
    md = ref.group.to_dense(m)
    eye = torch.eye(d, dtype=f64)
    b_expected = b @ (eye - 0.3 * md + 0.5 * 0.09 * md @ md)
    opt = NaturalGradient(q, lr=0.3)
    assert opt.step() is None
    assert rel(q.loc, mu_expected) < 1e-12
    assert rel(q.group.to_dense(q.factor), b_expected) < 1e-12


def test_zero_gradient_and_zero_lr_leave_parameters_unchanged():
    q = random_gaussian(6, "heisenberg", seed=3, k=1, k2=2)
    q.loc.grad = torch.zeros_like(q.loc)
    q.factor.grad = torch.zeros_like(q.factor)
    before = snapshot(q)
    NaturalGradient(q, lr=0.7).step()
    assert unchanged(before, q)
    q.loc.grad = torch.randn(6, generator=gen(4), dtype=f64)
    q.factor.grad = torch.randn(q.factor.shape, generator=gen(5), dtype=f64)
    NaturalGradient(q, lr=0.0).step()
    assert unchanged(before, q)


def test_momentum_follows_documented_recursion():
    """With momentum beta the step uses buf <- beta buf + nat (in local coordinates)."""
    d, beta, lr = 6, 0.9, 0.2
    target = GaussianTarget.random(d, condition=30.0, generator=gen(6))
    q = random_gaussian(d, "lower_triangular", seed=7)
    ref = copy.deepcopy(q)
    opt = NaturalGradient(q, lr=lr, momentum=beta)
    bufs = None
    for _ in range(3):
        for fam in (q, ref):
            fam.zero_grad()
            target.kl(fam).backward()
        nat = ref.natural_gradient()
        bufs = nat if bufs is None else tuple(beta * b + n for b, n in zip(bufs, nat))
        ref.retract(bufs, lr)
        opt.step()
        assert rel(q.loc, ref.loc) < 1e-12
        assert rel(q.factor, ref.factor) < 1e-12
    assert set(opt.state[q.loc]) == {"momentum_buffer"}
    assert rel(opt.state[q.loc]["momentum_buffer"], bufs[0]) < 1e-12
    assert rel(opt.state[q.factor]["momentum_buffer"], bufs[1]) < 1e-12


# ------------------------------------------------------------------ state dicts
def _families(seed=10):
    return [
        random_gaussian(6, "dense", seed=seed),
        random_gaussian(6, "hierarchical", seed=seed + 2, k1=2, k2=2),
    ]


def _train(opt, families, target, steps):
    for _ in range(steps):
        opt.zero_grad()
        sum(target.kl(q) for q in families).backward()
        opt.step()


def test_state_dict_round_trip_with_momentum_is_bit_identical():
    target = GaussianTarget.random(6, condition=30.0, generator=gen(11))
    hyper = dict(lr=0.1, momentum=0.8)

    straight = _families()
    opt = NaturalGradient(straight, **hyper)
    _train(opt, straight, target, 20)

    first = _families()
    opt1 = NaturalGradient(first, **hyper)
    _train(opt1, first, target, 10)
    buffer = io.BytesIO()
    torch.save(
        {"optimizer": opt1.state_dict(), "families": [q.state_dict() for q in first]}, buffer
    )
    state = opt1.state_dict()
    assert all("family" not in group for group in state["param_groups"])
    assert len(state["state"]) == 4  # loc and factor of both families have a buffer

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = _families(seed=99)  # different values, overwritten by the checkpoint
    for q, sd in zip(resumed, checkpoint["families"]):
        q.load_state_dict(sd)
    opt2 = NaturalGradient(resumed, lr=0.5, momentum=0.1)  # hyper-parameters come back too
    opt2.load_state_dict(checkpoint["optimizer"])
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["momentum"] == 0.8
    assert [g["family"] for g in opt2.param_groups] == resumed
    _train(opt2, resumed, target, 10)

    for a, b in zip(straight, resumed):
        assert torch.equal(a.loc, b.loc)
        assert torch.equal(a.factor, b.factor)

    # without the optimizer state (momentum buffers) the run differs
    fresh = _families(seed=99)
    for q, sd in zip(fresh, checkpoint["families"]):
        q.load_state_dict(sd)
    _train(NaturalGradient(fresh, **hyper), fresh, target, 10)
    assert not torch.equal(fresh[0].loc, straight[0].loc)


def test_load_state_dict_rejects_wrong_number_of_groups():
    opt = NaturalGradient(_families(), lr=0.1)
    other = NaturalGradient(random_gaussian(6), lr=0.1)
    with pytest.raises(ValueError):
        other.load_state_dict(opt.state_dict())


# --------------------------------------------------------------- scheduler / closure
def test_lr_scheduler_changes_the_step_size():
    target = GaussianTarget.random(6, condition=30.0, generator=gen(12))
    q = random_gaussian(6, "upper_triangular", seed=13)
    opt = NaturalGradient(q, lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    used = []
    for _ in range(5):
        opt.zero_grad()
        target.kl(q).backward()
        lr = opt.param_groups[0]["lr"]
        used.append(lr)
        expected = expected_mean_step(q, lr)
        opt.step()
        sched.step()
        assert rel(q.loc, expected) < 1e-12
    assert used == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])
    assert sched.get_last_lr() == pytest.approx([0.1])  # epoch 5: 0.4 * 0.5 ** 2


def test_closure_is_called_and_its_loss_returned():
    target = GaussianTarget.random(6, condition=30.0, generator=gen(14))
    q = random_gaussian(6, "block_diagonal", seed=15, block_size=3)
    ref = copy.deepcopy(q)
    opt = NaturalGradient(q, lr=0.2)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = target.kl(q)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True]
    assert torch.is_tensor(loss) and loss.item() == pytest.approx(target.kl(ref).item(), rel=1e-14)
    target.kl(ref).backward()
    NaturalGradient(ref, lr=0.2).step()
    assert torch.equal(q.loc, ref.loc) and torch.equal(q.factor, ref.factor)


def test_zero_grad():
    target = GaussianTarget.random(6, condition=30.0, generator=gen(16))
    q = random_gaussian(6, "diagonal", seed=17)
    opt = NaturalGradient(q, lr=0.2)
    target.kl(q).backward()
    opt.zero_grad()
    assert q.loc.grad is None and q.factor.grad is None
    before = snapshot(q)
    with pytest.raises(ValueError):
        opt.step()
    assert unchanged(before, q)
    target.kl(q).backward()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(q.loc.grad, torch.zeros_like(q.loc))
    assert torch.equal(q.factor.grad, torch.zeros_like(q.factor))
    opt.step()
    assert unchanged(before, q)


# ------------------------------------------------------------ several families
def test_several_families_with_their_own_learning_rates():
    target = GaussianTarget.random(6, condition=30.0, generator=gen(18))
    q1 = random_gaussian(6, "dense", seed=19)
    q2 = random_gaussian(6, "block_triangular", seed=21, k=2)
    q3 = random_gaussian(6, "diagonal", seed=23)
    opt = NaturalGradient([{"family": q1, "lr": 0.1}, {"family": q2}], lr=0.3)
    opt.add_param_group({"family": q3, "lr": 0.05})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.3, 0.05]
    assert [g["family"] for g in opt.param_groups] == [q1, q2, q3]
    refs = [copy.deepcopy(q) for q in (q1, q2, q3)]
    for q in (q1, q2, q3):
        target.kl(q).backward()
    expected_means = [expected_mean_step(q, lr) for q, lr in zip((q1, q2, q3), (0.1, 0.3, 0.05))]
    opt.step()
    for q, ref, lr, mu in zip((q1, q2, q3), refs, (0.1, 0.3, 0.05), expected_means):
        target.kl(ref).backward()
        ref.retract(ref.natural_gradient(), lr)
        assert rel(q.loc, mu) < 1e-12
        assert torch.equal(q.loc, ref.loc) and torch.equal(q.factor, ref.factor)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_missing_gradient_raises_and_changes_nothing(momentum):
    target = GaussianTarget.random(6, condition=30.0, generator=gen(24))
    q1 = random_gaussian(6, "dense", seed=25)
    q2 = random_gaussian(6, "heisenberg", seed=27, k=1, k2=2)
    opt = NaturalGradient([q1, q2], lr=0.3, momentum=momentum)
    target.kl(q1).backward()  # q2 has no gradient
    before = snapshot(q1, q2)
    with pytest.raises(ValueError, match="group 1"):
        opt.step()
    assert unchanged(before, q1, q2)
    assert len(opt.state) == 0
    # only the factor's gradient missing
    q2.loc.grad = torch.zeros(6, dtype=f64)
    with pytest.raises(ValueError):
        opt.step()
    assert unchanged(before, q1, q2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["loc", "factor"])
@pytest.mark.parametrize("position", [0, 1])
def test_non_finite_gradient_raises_and_changes_nothing(bad, where, position):
    target = GaussianTarget.random(6, condition=30.0, generator=gen(28))
    qs = [random_gaussian(6, "lower_triangular", seed=29), random_gaussian(6, "block_diagonal", seed=31, block_size=2)]
    opt = NaturalGradient(qs, lr=0.3, momentum=0.5)
    for q in qs:
        target.kl(q).backward()
    getattr(qs[position], where).grad.view(-1)[0] = bad
    before = snapshot(*qs)
    with pytest.raises(ValueError):
        opt.step()
    assert unchanged(before, *qs)
    assert len(opt.state) == 0


def test_singular_factor_gives_non_finite_natural_gradient_error():
    target = GaussianTarget.random(6, condition=30.0, generator=gen(32))
    good = random_gaussian(6, "dense", seed=33)
    bad = Gaussian(6, "diagonal", dtype=f64)
    with torch.no_grad():
        bad.factor[2] = 0.0
    opt = NaturalGradient([good, bad], lr=0.3)
    target.kl(good).backward()
    bad.loc.grad = torch.ones(6, dtype=f64)
    bad.factor.grad = torch.ones(6, dtype=f64)
    before = snapshot(good, bad)
    with pytest.raises(ValueError):
        opt.step()
    assert unchanged(before, good, bad)


# ------------------------------------------------------------------- trust region
def test_max_step_shrinks_large_steps_only():
    target = GaussianTarget.random(6, condition=30.0, generator=gen(34))
    q = random_gaussian(6, "dense", seed=35)
    target.kl(q).backward()
    ref = copy.deepcopy(q)
    ref.loc.grad, ref.factor.grad = q.loc.grad.clone(), q.factor.grad.clone()
    delta, m = ref.natural_gradient()
    lr = 0.5
    size = lr * torch.linalg.vector_norm(m).item()
    max_step = 0.25 * size
    NaturalGradient(q, lr=lr, max_step=max_step).step()
    ref.retract((delta, m), lr * max_step / size)
    assert rel(q.loc, ref.loc) < 1e-12 and rel(q.factor, ref.factor) < 1e-12
    # a trust region larger than the step changes nothing
    q2 = copy.deepcopy(ref)
    q3 = copy.deepcopy(ref)
    for fam in (q2, q3):
        target.kl(fam).backward()
    NaturalGradient(q2, lr=0.01, max_step=1e6).step()
    NaturalGradient(q3, lr=0.01).step()
    assert torch.equal(q2.loc, q3.loc) and torch.equal(q2.factor, q3.factor)


# ------------------------------------------------------------------- bad arguments
def test_bad_hyperparameters_raise():
    q = Gaussian(4, "dense")
    for lr in [-0.1, float("nan"), float("inf")]:
        with pytest.raises(ValueError):
            NaturalGradient(q, lr=lr)
    for momentum in [1.0, 1.5, -0.1]:
        with pytest.raises(ValueError):
            NaturalGradient(q, lr=0.1, momentum=momentum)
    for max_step in [0.0, -1.0, float("inf")]:
        with pytest.raises(ValueError):
            NaturalGradient(q, lr=0.1, max_step=max_step)
    with pytest.raises(ValueError):
        NaturalGradient([], lr=0.1)
    with pytest.raises((TypeError, ValueError)):
        NaturalGradient(torch.nn.Linear(3, 3), lr=0.1)
    with pytest.raises((TypeError, ValueError)):
        NaturalGradient([torch.zeros(3, requires_grad=True)], lr=0.1)
    with pytest.raises((TypeError, ValueError)):
        NaturalGradient([{"family": torch.nn.Linear(3, 3)}], lr=0.1)
    with pytest.raises(ValueError):
        NaturalGradient([{"family": q, "lr": -1.0}])
    opt = NaturalGradient(q, lr=0.1)
    with pytest.raises(ValueError):
        opt.add_param_group({"family": Gaussian(4, "diagonal"), "momentum": 1.0})
    # a bad value set later is caught at step() time, before anything moves
    q.loc.grad = torch.ones(4)
    q.factor.grad = torch.ones(4, 4)
    opt.param_groups[0]["lr"] = -1.0
    before = snapshot(q)
    with pytest.raises(ValueError):
        opt.step()
    assert unchanged(before, q)


def test_optimizer_is_a_torch_optimizer_over_family_parameters():
    q = random_gaussian(6, "hierarchical", seed=40, k1=2, k2=2)
    opt = NaturalGradient(q, lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["family"] is q
    assert [id(p) for p in group["params"]] == [id(p) for p in q.parameters()]
    assert group["momentum"] == 0.0 and group["max_step"] is None


# ------------------------------------------------------------ the functional kernel
def test_a_step_refused_by_one_family_moves_no_family():
    """All or nothing: a Wishart step that would leave ``n > d - 1`` is refused after the
    Gaussian's step was formed; neither family nor any momentum buffer changes."""
    from structngd.families import Wishart

    q = random_gaussian(4, "dense", seed=3)
    w = Wishart(3, df=3.5, structure="dense", df_coordinate="linear", dtype=f64)
    GaussianTarget(torch.zeros(4, dtype=f64), torch.eye(4, dtype=f64)).kl(q).backward()
    w.df.grad = torch.tensor(1e6, dtype=f64)  # a huge linear step on n: refused
    w.factor.grad = torch.zeros_like(w.factor)
    opt = NaturalGradient([q, w], lr=1.0, momentum=0.5)
    before = snapshot(q, w)
    with pytest.raises(ValueError, match="param group 1.*no parameter was changed"):
        opt.step()
    assert unchanged(before, q, w)
    assert len(opt.state) == 0


def test_a_step_that_would_write_non_finite_values_is_refused():
    """A finite gradient can still overflow the step (float32, diagonal factor, lr 1)."""
    q = Gaussian(3, "diagonal", dtype=torch.float32)
    q.loc.grad = torch.zeros(3)
    q.factor.grad = torch.tensor([-1e20, 0.0, 0.0])
    before = snapshot(q)
    with pytest.raises(ValueError, match="non-finite values into factor"):
        NaturalGradient(q, lr=1.0).step()
    assert unchanged(before, q)


def test_part_learning_rates_scale_each_part():
    q = random_gaussian(5, "lower_triangular", seed=5)
    ref = copy.deepcopy(q)
    GaussianTarget(torch.ones(5, dtype=f64), 2 * torch.eye(5, dtype=f64)).kl(q).backward()
    ref.loc.grad, ref.factor.grad = q.loc.grad.clone(), q.factor.grad.clone()
    delta, m = ref.natural_gradient()
    NaturalGradient(q, lr=0.5, part_lrs={"loc": 0.2}).step()
    with torch.no_grad():
        ref.loc.sub_(0.1 * ref.group.tsolve(ref.factor, delta))
        ref.factor.copy_(ref.group.mul(ref.factor, ref.group.h(-0.5 * m)))
    assert rel(q.loc, ref.loc) < 1e-14 and rel(q.factor, ref.factor) < 1e-14


@pytest.mark.parametrize("name,opts", [("dense", {}), ("block_triangular", {"k": 2})])
def test_exp_retraction_is_the_exact_exponential(name, opts):
    """With ``retraction="exp"`` the factor moves by ``B exp(-lr M)`` (scipy's dense ``expm``)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    q = random_gaussian(6, name, seed=7, **opts)
    GaussianTarget(torch.zeros(6, dtype=f64), 3 * torch.eye(6, dtype=f64)).kl(q).backward()
    _, m = q.natural_gradient()
    b = q.group.to_dense(q.factor.detach()).clone()
    NaturalGradient(q, lr=0.7, retraction="exp").step()
    expected = b @ torch.from_numpy(scipy_linalg.expm(-0.7 * q.group.to_dense(m).numpy()))
    assert rel(q.group.to_dense(q.factor), expected) < 1e-12


def test_kernel_takes_directions_computed_elsewhere():
    """``natural_gradient_step`` with given directions does not read ``.grad`` at all."""
    from structngd.families.gaussian import GaussianStep
    from structngd.optim import natural_gradient_step

    q = random_gaussian(4, "diagonal", seed=9)
    ref = copy.deepcopy(q)
    step = GaussianStep(torch.ones(4, dtype=f64), 0.1 * torch.ones(4, dtype=f64))
    buffers = natural_gradient_step(
        [q], [None], lr=[0.3], momentum=[0.0], max_step=[None], retraction=["h"], part_lrs=[None], directions=[step]
    )
    assert buffers == [None] and q.loc.grad is None
    ref.retract(step, 0.3)
    assert torch.equal(q.loc, ref.loc) and torch.equal(q.factor, ref.factor)


def test_bad_retraction_and_part_lrs_raise():
    q = random_gaussian(3)
    with pytest.raises(ValueError, match="retraction"):
        NaturalGradient(q, retraction="cayley")
    with pytest.raises(ValueError, match="part 'loc'"):
        NaturalGradient(q, part_lrs={"loc": -1.0})
