"""Tests for layer 2, ``structngd.families.Gaussian`` (DESIGN.md "Layer 2", MATH.md §1.3, §2).

Every check compares the family against an independent dense float64 reference: the
local maps ``mu = mu_t + B_t^{-T} delta``, ``B = B_t h(M)`` are written out here with
dense matrices, the Fisher of the local coordinates is built by autograd from the exact
Gaussian Fisher formula, and the closed-form conjugate / Bayesian-learning-rule facts of
MATH.md §2.5 are recomputed with dense linear algebra.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from structngd.families import Gaussian
from structngd.groups import make
from structngd.optim import NaturalGradient
from structngd.targets import GaussianTarget
from helpers import compact_basis, config_id, gen, rel

f64 = torch.float64



# --------------------------------------------------------------------------- configs
CONFIGS = [
    ("dense", 6, {}),
    ("diagonal", 6, {}),
    ("lower_triangular", 6, {}),
    ("upper_triangular", 7, {}),
    ("block_diagonal", 6, {"block_size": 2}),
    ("block_diagonal", 6, {"block_size": 3}),
    ("block_triangular", 7, {"k": 2}),
    ("heisenberg", 8, {"k": 2, "k2": 2}),
    ("heisenberg", 7, {"k": 1, "k2": 2}),
    ("hierarchical", 8, {"k1": 2, "k2": 2}),
]
FULL = ["dense", "lower_triangular", "upper_triangular"]  # can represent any SPD precision


IDS = [config_id(c) for c in CONFIGS]


def random_gaussian(cfg, seed=0, scale=0.3, factor_scale=1.0):
    """A Gaussian with a random mean and a random (generic) factor in the group."""
    name, d, opts = cfg
    q = Gaussian(d, name, dtype=f64, **opts)
    with torch.no_grad():
        q.loc.copy_(torch.randn(d, generator=gen(seed), dtype=f64))
        q.factor.copy_(factor_scale * q.group.random(generator=gen(seed + 1), dtype=f64, scale=scale))
    return q


def compact_from_vector(group, slots, vec):
    flat = torch.zeros(group.numel(), dtype=vec.dtype)
    flat = flat.index_put((torch.tensor(slots),), vec)
    return flat.reshape(group.shape)


def gaussian_fisher_matrix(jac_mu, jac_s, s):
    """Pull back ``F(mu., S.) = mu.^T S mu. + 1/2 tr(S^-1 S. S^-1 S.)`` through Jacobians.

    ``jac_mu``: (d, n), ``jac_s``: (d, d, n) derivatives of mu and S w.r.t. n coordinates.
    """
    s_inv = torch.linalg.inv(s)
    a = torch.einsum("ij,jkn->nik", s_inv, jac_s)  # S^-1 dS_n
    f_s = 0.5 * torch.einsum("aij,bji->ab", a, a)
    f_mu = jac_mu.mT @ s @ jac_mu
    return f_mu + f_s


class LocalMaps:
    """Dense reference of ``phi``: eta = (delta, m) -> (mu, S) around (mu_t, B_t)."""

    def __init__(self, group, mu_t, b_t):
        self.group, self.d = group, group.dim
        self.mu_t = mu_t.detach().clone()
        self.bt = group.to_dense(b_t.detach()).clone()
        self.slots, self.positions = compact_basis(group)
        self.n = self.d + len(self.slots)
        self.eye = torch.eye(self.d, dtype=f64)

    def m_dense(self, mvec):
        return self.group.to_dense(compact_from_vector(self.group, self.slots, mvec))

    def mu(self, eta):
        return self.mu_t + torch.linalg.solve(self.bt.mT, eta[: self.d])

    def b(self, eta):
        md = self.m_dense(eta[self.d :])
        return self.bt @ (self.eye + md + 0.5 * md @ md)

    def s(self, eta):
        b = self.b(eta)
        return b @ b.mT

    def fisher(self):
        eta0 = torch.zeros(self.n, dtype=f64)
        jac_mu = torch.autograd.functional.jacobian(self.mu, eta0)
        jac_s = torch.autograd.functional.jacobian(self.s, eta0)
        return gaussian_fisher_matrix(jac_mu, jac_s, self.s(eta0))

    def expected_fisher(self):
        """diag(I_d, Gram) with Gram_cd = 1/2 <E_c + E_c^T, E_d + E_d^T>."""
        f = torch.zeros(self.n, self.n, dtype=f64)
        f[: self.d, : self.d] = torch.eye(self.d, dtype=f64)
        e = torch.zeros(len(self.slots), self.d, self.d, dtype=f64)
        for c, (i, j) in enumerate(self.positions):
            e[c, i, j] = 1.0
        sym = e + e.mT
        f[self.d :, self.d :] = 0.5 * torch.einsum("aij,bij->ab", sym, sym)
        return f


def smooth_loss(mu, s, seed=7):
    """A random smooth L(mu, S): linear + quadratic in mu, linear in S, log det and tr(E S^-1)."""
    d = mu.shape[-1]
    g = gen(seed)
    a = torch.randn(d, generator=g, dtype=f64)
    c = torch.randn(d, d, generator=g, dtype=f64)
    c = c @ c.mT / d + torch.eye(d, dtype=f64)
    dm = torch.randn(d, d, generator=g, dtype=f64)
    e = torch.randn(d, d, generator=g, dtype=f64)
    e = e @ e.mT / d
    return (
        a @ mu
        + 0.5 * mu @ c @ mu
        + torch.trace((dm + dm.mT) @ s) / 4
        - 0.3 * torch.logdet(s)
        + 0.2 * torch.trace(e @ torch.linalg.inv(s))
    )


# ------------------------------------------------- 1. Fisher in local coordinates at eta0
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_local_fisher_is_closed_form_by_autograd(cfg):
    q = random_gaussian(cfg, seed=11, scale=0.5)
    maps = LocalMaps(q.group, q.loc, q.factor)
    f = maps.fisher()
    d = maps.d
    assert f.shape == (maps.n, maps.n)
    expected = maps.expected_fisher()
    assert (f - expected).abs().max().item() < 1e-10
    # explicitly: identity on delta, no cross terms, weights 2 (diagonal) and 1 (off-diagonal)
    assert (f[:d, :d] - torch.eye(d, dtype=f64)).abs().max().item() < 1e-10
    assert f[:d, d:].abs().max().item() < 1e-10
    mask = q.group.mask(dtype=f64).bool()
    index = {pos: c for c, pos in enumerate(maps.positions)}
    for c, (i, j) in enumerate(maps.positions):
        w = f[d + c, d + c].item()
        if i == j:
            assert abs(w - 2.0) < 1e-10, ((i, j), w)
        else:
            assert abs(w - 1.0) < 1e-10, ((i, j), w)  # free entry, or one half of a tied pair
        for c2, (i2, j2) in enumerate(maps.positions):
            if c2 == c:
                continue
            cross = f[d + c, d + c2].item()
            tied = (i2, j2) == (j, i)
            assert abs(cross - (1.0 if tied else 0.0)) < 1e-10, ((i, j), (i2, j2), cross)
        if i != j and not mask[j, i]:  # a free entry: decoupled from everything
            assert f[d + c].abs().sum().item() == pytest.approx(1.0, abs=1e-9)
        if i != j and mask[j, i]:
            assert (j, i) in index


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_natural_gradient_is_pinv_fisher_times_local_gradient(cfg):
    q = random_gaussian(cfg, seed=21, scale=0.5)
    maps = LocalMaps(q.group, q.loc, q.factor)
    d = maps.d
    f = maps.fisher()

    # gradient in local coordinates, by autograd through the dense maps
    eta0 = torch.zeros(maps.n, dtype=f64, requires_grad=True)
    (grad_eta,) = torch.autograd.grad(smooth_loss(maps.mu(eta0), maps.s(eta0)), eta0)
    sol = torch.linalg.pinv(f, hermitian=True, rtol=1e-8) @ grad_eta
    assert (f @ sol - grad_eta).abs().max().item() < 1e-10 * grad_eta.abs().max().item()

    # Euclidean gradients of the same loss through the family's parameters
    b = q.group.to_dense(q.factor)
    smooth_loss(q.loc, b @ b.mT).backward()
    delta, m = q.natural_gradient()
    assert delta.shape == (d,) and m.shape == tuple(q.group.shape)
    assert rel(delta, sol[:d]) < 1e-10
    m_expected = maps.m_dense(sol[d:])
    assert rel(q.group.to_dense(m), m_expected) < 1e-10
    # the algebra element keeps the structure and is symmetric on the dense blocks
    mask = q.group.mask(dtype=f64).bool()
    assert torch.all(q.group.to_dense(m)[~mask] == 0)

    # the retraction is phi(eta0 - lr * natural gradient), by the dense maps
    lr = 0.3
    eta1 = -lr * sol
    q.retract((delta, m), lr)
    assert rel(q.loc, maps.mu(eta1)) < 1e-10
    assert rel(q.group.to_dense(q.factor), maps.b(eta1)) < 1e-10
    assert torch.all(q.group.to_dense(q.factor)[~mask] == 0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_natural_gradient_closed_form(cfg):
    """delta = B^-1 g_mu; M = C ⊙ κ(B^T g_B): sym/2 on dense blocks & diagonal, full on free entries."""
    q = random_gaussian(cfg, seed=31, scale=0.5)
    d = q.dim
    g_mu = torch.randn(d, generator=gen(32), dtype=f64)
    g_b = q.group.restrict(torch.randn(d, d, generator=gen(33), dtype=f64))
    q.loc.grad, q.factor.grad = g_mu.clone(), g_b.clone()
    delta, m = q.natural_gradient()
    bd = q.group.to_dense(q.factor.detach())
    assert rel(delta, torch.linalg.solve(bd, g_mu)) < 1e-12
    x = bd.mT @ q.group.to_dense(g_b)
    mask = q.group.mask(dtype=f64).bool()
    expected = torch.zeros(d, d, dtype=f64)
    for i in range(d):
        for j in range(d):
            if not mask[i, j]:
                continue
            if i == j:
                expected[i, j] = 0.5 * x[i, i]
            elif mask[j, i]:
                expected[i, j] = 0.25 * (x[i, j] + x[j, i])
            else:
                expected[i, j] = x[i, j]
    assert rel(q.group.to_dense(m), expected) < 1e-12
    # the gradients are only read
    assert torch.equal(q.loc.grad, g_mu) and torch.equal(q.factor.grad, g_b)


# ------------------------------------------------------ 2. exact-gradient convergence
def _run_exact(target, cfg, lr=0.5, steps=400, seed=0):
    name, d, opts = cfg
    q = Gaussian(d, name, dtype=f64, **opts)
    with torch.no_grad():
        q.loc.copy_(torch.randn(d, generator=gen(seed), dtype=f64))
    opt = NaturalGradient(q, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        target.kl(q).backward()
        opt.step()
    return q


@pytest.fixture(scope="module")
def target6():
    return GaussianTarget.random(6, condition=30.0, generator=gen(101))


@pytest.mark.parametrize("structure", FULL)
def test_exact_gradients_reach_the_posterior(structure, target6):
    q = _run_exact(target6, (structure, 6, {}))
    assert rel(q.loc, target6.mean) < 1e-6
    assert rel(q.precision(), target6.precision) < 1e-6
    assert abs(target6.kl(q).item()) < 1e-10


def test_exact_gradients_diagonal_reaches_mean_field(target6):
    q = _run_exact(target6, ("diagonal", 6, {}))
    p = target6.precision
    assert rel(q.loc, target6.mean) < 1e-6
    assert rel(q.precision(), torch.diag(p.diagonal())) < 1e-6
    assert target6.kl(q).item() == pytest.approx(target6.mean_field_kl().item(), rel=1e-10)


_RESTRICTED = [c for c in CONFIGS if c[0] not in FULL + ["diagonal"]]


@pytest.mark.parametrize("cfg", _RESTRICTED, ids=[config_id(c) for c in _RESTRICTED])
def test_exact_gradients_restricted_structures_between_diagonal_and_dense(cfg):
    name, d, opts = cfg
    target = GaussianTarget.random(d, condition=30.0, generator=gen(200 + d))
    kl_dense = target.kl(_run_exact(target, ("dense", d, {}))).item()
    kl_diag = target.kl(_run_exact(target, ("diagonal", d, {}))).item()
    q = _run_exact(target, cfg)
    kl = target.kl(q).item()
    assert abs(kl_dense) < 1e-10
    assert kl_diag == pytest.approx(target.mean_field_kl().item(), rel=1e-10)
    assert kl_dense - 1e-12 <= kl <= kl_diag + 1e-12, (kl_dense, kl, kl_diag)
    # the fixed point is the constrained KL optimum: Euclidean gradient zero on the pattern
    q.zero_grad()
    target.kl(q).backward()
    assert q.loc.grad.abs().max().item() < 1e-8
    assert q.factor.grad.abs().max().item() < 1e-8
    assert rel(q.loc, target.mean) < 1e-8  # every structure here fits the mean exactly


@pytest.mark.parametrize("estimator", ["price", "delta"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_price_and_delta_are_exact_for_quadratic_targets(cfg, estimator):
    name, d, opts = cfg
    target = GaussianTarget.random(d, condition=30.0, generator=gen(300 + d))
    q = random_gaussian(cfg, seed=41)
    target.kl(q).backward()
    g_loc, g_factor = q.loc.grad.clone(), q.factor.grad.clone()
    q.zero_grad()
    assert q.loc.grad is None and q.factor.grad is None
    q.estimate_gradients(target.log_prob, num_samples=2, estimator=estimator)
    assert rel(q.loc.grad, g_loc) < 1e-10
    assert q.factor.grad.shape == g_factor.shape
    assert rel(q.factor.grad, g_factor) < 1e-10
    # gradients accumulate like backward()
    q.estimate_gradients(target.log_prob, num_samples=2, estimator=estimator)
    assert rel(q.loc.grad, 2 * g_loc) < 1e-10
    assert rel(q.factor.grad, 2 * g_factor) < 1e-10


# --------------------------------------------------------- 3. conjugate facts (MATH §2.5)
@pytest.mark.parametrize("structure", FULL)
def test_conjugate_step_from_the_posterior_precision_is_exact(structure):
    d = 6
    target = GaussianTarget.random(d, condition=30.0, generator=gen(401))
    p = target.precision
    mu0 = torch.randn(d, generator=gen(402), dtype=f64) * 3
    q = Gaussian(d, structure, loc=mu0, precision=p)
    assert q.loc.dtype == f64
    assert rel(q.precision(), p) < 1e-13
    opt = NaturalGradient(q, lr=1.0)
    target.kl(q).backward()
    opt.step()
    assert rel(q.loc, target.mean) < 1e-12
    assert rel(q.precision(), p) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_full_step_matches_phi_eigenvalue_formula(seed):
    d = 6
    target = GaussianTarget.random(d, condition=30.0, generator=gen(500 + seed))
    p, m = target.precision, target.mean
    q = random_gaussian(("dense", d, {}), seed=510 + seed, scale=0.8)
    b0 = q.factor.detach().clone()
    mu0 = q.loc.detach().clone()
    s0 = b0 @ b0.mT
    assert rel(s0, p) > 0.1
    target.kl(q).backward()
    NaturalGradient(q, lr=1.0).step()
    # mean: mu1 = mu0 - S0^-1 P (mu0 - m)
    assert rel(q.loc, mu0 - torch.linalg.solve(s0, p @ (mu0 - m))) < 1e-12
    # precision: eigenvalues q of Q = B0^-1 P B0^-T map to phi(q) = (1 + (q-1)/2 + (q-1)^2/8)^2
    qmat = torch.linalg.solve(b0, torch.linalg.solve(b0, p).mT)
    evals, evecs = torch.linalg.eigh(0.5 * (qmat + qmat.mT))
    phi = (1 + (evals - 1) / 2 + (evals - 1) ** 2 / 8) ** 2
    s1_expected = b0 @ evecs @ torch.diag(phi) @ evecs.mT @ b0.mT
    s1 = q.precision()
    assert rel(s1, s1_expected) < 1e-9
    # S1 - P is positive semi-definite (full steps overshoot), and not zero
    gap = torch.linalg.eigvalsh(0.5 * ((s1 - p) + (s1 - p).mT))
    assert gap.min().item() > -1e-10 * p.norm().item()
    assert gap.max().item() > 1e-6


# ------------------------------------------------- 4. Bayesian learning rule, first order
@pytest.mark.parametrize("structure", FULL)
def test_bayesian_learning_rule_to_first_order(structure):
    d = 6
    target = GaussianTarget.random(d, condition=30.0, generator=gen(601))
    p, m = target.precision, target.mean
    q0 = random_gaussian((structure, d, {}), seed=602, scale=0.5)
    s = q0.precision().detach()
    mu = q0.loc.detach().clone()
    g_mu = p @ (mu - m)  # exact dL/dmu
    first = p - s  # 2 dL/dSigma
    errs, rems = [], []
    for lr in [2e-3, 1e-3, 5e-4]:
        q = copy.deepcopy(q0)
        target.kl(q).backward()
        assert rel(q.loc.grad, g_mu) < 1e-12
        NaturalGradient(q, lr=lr).step()
        s_lr = q.precision().detach()
        errs.append(((s_lr - s) / lr - first).norm().item())
        rems.append((s_lr - (s + lr * first)).norm().item())
        # the mean step uses the old precision, exactly
        assert rel(q.loc - mu, -lr * torch.linalg.solve(s, g_mu)) < 1e-10
    assert errs[-1] < 0.05 * first.norm().item()
    for a, b in zip(errs, errs[1:]):
        assert 1.8 < a / b < 2.2, errs
    for a, b in zip(rems, rems[1:]):
        assert 3.6 < a / b < 4.4, rems


# ------------------------------------------------------------ 6. Monte Carlo estimators
def logistic_problem(d, n=40, seed=700):
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=f64)
    w_true = torch.randn(d, generator=g, dtype=f64)
    y = (torch.rand(n, generator=g, dtype=f64) < torch.sigmoid(x @ w_true)).to(f64)
    alpha = 1.0

    def log_density(w):
        logits = w @ x.mT
        return (y * logits - torch.nn.functional.softplus(logits)).sum(-1) - 0.5 * alpha * w.pow(2).sum(-1)

    return log_density


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_reparam_and_price_agree_in_expectation(cfg):
    name, d, opts = cfg
    log_density = logistic_problem(d)
    q = random_gaussian(cfg, seed=71, scale=0.3, factor_scale=2.0)  # precision ~ 4 I
    with torch.no_grad():
        q.loc.mul_(0.5)
    slots, _ = compact_basis(q.group)
    batches, per_batch = 30, 500
    torch.manual_seed(72)
    stats = {}
    for est in ("reparam", "price"):
        rows = []
        for _ in range(batches):
            q.zero_grad()
            value = q.estimate_gradients(log_density, num_samples=per_batch, estimator=est)
            assert value.dim() == 0 and not value.requires_grad
            rows.append(torch.cat([value.reshape(1), q.loc.grad, q.factor.grad.reshape(-1)[slots]]))
        rows = torch.stack(rows)
        stats[est] = (rows.mean(0), rows.std(0) / math.sqrt(batches))
    (mr, sr), (mp, sp) = stats["reparam"], stats["price"]
    se = (sr**2 + sp**2).sqrt()
    z = (mr - mp).abs() / se
    assert z.max().item() < 6.0, z
    # the comparison has power: the standard error is small against the gradient itself
    assert se[1:].norm().item() < 0.05 * mp[1:].norm().item()
    # and the Hessian part matters (the estimators do not coincide for this target)
    assert (mr - mp).abs().max().item() > 0


# ---------------------------------------------------------- 7. distribution methods
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_log_prob_entropy_match_torch_and_dense_formula(cfg):
    q = random_gaussian(cfg, seed=81, scale=0.5)
    d = q.dim
    ref = q.to_torch()
    assert isinstance(ref, torch.distributions.MultivariateNormal)
    for shape in [(d,), (5, d), (2, 3, d)]:
        z = torch.randn(shape, generator=gen(82), dtype=f64) * 2
        lp = q.log_prob(z)
        assert lp.shape == shape[:-1]
        assert (lp - ref.log_prob(z)).abs().max().item() < 1e-10
        # independent dense formula
        bd = q.group.to_dense(q.factor.detach())
        s = bd @ bd.mT
        r = z - q.loc.detach()
        dense = -0.5 * (r @ s * r).sum(-1) + 0.5 * torch.logdet(s) - 0.5 * d * math.log(2 * math.pi)
        assert (lp - dense).abs().max().item() < 1e-10
    assert abs(q.entropy().item() - ref.entropy().item()) < 1e-10
    bd = q.group.to_dense(q.factor.detach())
    cov = torch.linalg.inv(bd @ bd.mT)
    assert abs(q.entropy().item() - 0.5 * torch.logdet(2 * math.pi * math.e * cov).item()) < 1e-10
    assert torch.equal(q.mean, q.loc)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_precision_and_covariance(cfg):
    q = random_gaussian(cfg, seed=91, scale=0.5)
    d = q.dim
    bd = q.group.to_dense(q.factor.detach())
    s, c = q.precision(), q.covariance()
    assert s.shape == (d, d) and c.shape == (d, d)
    assert rel(s, bd @ bd.mT) < 1e-14
    assert (c @ s - torch.eye(d, dtype=f64)).abs().max().item() < 1e-10
    assert (s @ c - torch.eye(d, dtype=f64)).abs().max().item() < 1e-10
    assert (c - c.mT).abs().max().item() < 1e-12
    assert torch.linalg.eigvalsh(c).min().item() > 0
    assert rel(q.to_torch().covariance_matrix, c) < 1e-10


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_rsample_moments(cfg):
    q = random_gaussian(cfg, seed=101, scale=0.5)
    d = q.dim
    n = 100_000
    torch.manual_seed(102)
    with torch.no_grad():
        z = q.rsample((n,))
    assert z.shape == (n, d) and z.dtype == f64
    cov = q.covariance().detach()
    mean = z.mean(0)
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((mean - q.loc.detach()).abs() / se_mean).max().item() < 5.0
    r = z - q.loc.detach()
    emp = r.mT @ r / n
    var = cov.diagonal()
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert ((emp - cov).abs() / se_cov).max().item() < 5.0


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_sample_shape_and_reparameterization(cfg):
    q = random_gaussian(cfg, seed=111)
    d = q.dim
    assert q.rsample().shape == (d,)
    assert q.rsample((7,)).shape == (7, d)
    assert q.rsample(torch.Size([2, 3])).shape == (2, 3, d)
    assert q.sample((4,)).shape == (4, d)
    assert not q.sample((4,)).requires_grad
    assert q.log_prob(q.rsample((2, 3))).shape == (2, 3)
    # z = mu + B^-T eps: dz/dmu = I, so the sum over 4 samples has loc.grad = 4
    q.rsample((4,)).sum().backward()
    assert torch.allclose(q.loc.grad, torch.full((d,), 4.0, dtype=f64), rtol=0, atol=1e-12)
    assert q.factor.grad is not None and torch.isfinite(q.factor.grad).all()
    assert q.factor.grad.abs().sum() > 0
    # the same eps through the dense formula
    torch.manual_seed(5)
    z = q.rsample((3,)).detach()
    torch.manual_seed(5)
    eps = torch.randn(3, d, dtype=f64)
    bd = q.group.to_dense(q.factor.detach())
    assert rel(z, q.loc.detach() + torch.linalg.solve(bd.mT, eps.mT).mT) < 1e-12


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_constructor_initial_precision(cfg):
    name, d, opts = cfg
    q = Gaussian(d, name, dtype=f64, **opts)
    assert q.structure == name
    assert torch.equal(q.loc, torch.zeros(d, dtype=f64))
    assert torch.equal(q.precision(), torch.eye(d, dtype=f64))
    q = Gaussian(d, name, dtype=f64, precision=4.0, **opts)
    assert rel(q.precision(), 4 * torch.eye(d, dtype=f64)) < 1e-15
    v = torch.linspace(0.5, 3.0, d, dtype=f64)
    q = Gaussian(d, name, precision=v, loc=torch.ones(d, dtype=f64), **opts)
    assert q.loc.dtype == f64 and q.factor.dtype == f64
    assert rel(q.precision(), torch.diag(v)) < 1e-15
    mask = q.group.mask(dtype=f64).bool()
    assert torch.all(q.group.to_dense(q.factor.detach())[~mask] == 0)
    assert set(dict(q.named_parameters())) == {"loc", "factor"}


@pytest.mark.parametrize("structure", FULL)
def test_constructor_dense_precision(structure):
    d = 6
    p = GaussianTarget.random(d, condition=30.0, generator=gen(121)).precision
    q = Gaussian(d, structure, precision=p, dtype=f64)
    assert rel(q.precision(), p) < 1e-13
    mask = q.group.mask(dtype=f64).bool()
    assert torch.all(q.group.to_dense(q.factor.detach())[~mask] == 0)


def test_constructor_errors():
    d = 6
    p = GaussianTarget.random(d, generator=gen(131)).precision
    with pytest.raises(ValueError):
        Gaussian(d, "dense", loc=torch.zeros(d + 1))
    with pytest.raises(ValueError):
        Gaussian(d, "dense", loc=torch.zeros(2, d))
    with pytest.raises(ValueError):
        Gaussian(d, "dense", loc=torch.full((d,), float("nan")))
    not_spd = p.clone()
    not_spd[0, 0] = -1.0
    with pytest.raises(ValueError):
        Gaussian(d, "dense", precision=not_spd)
    with pytest.raises(ValueError):
        Gaussian(d, "lower_triangular", precision=-p)
    with pytest.raises(ValueError):
        Gaussian(d, "dense", precision=p[:-1, :-1])
    with pytest.raises(ValueError):
        Gaussian(d, "diagonal", precision=torch.tensor([1.0, -1.0, 1, 1, 1, 1]))
    with pytest.raises(ValueError):
        Gaussian(d, "dense", precision=0.0)
    with pytest.raises(ValueError):
        Gaussian(d, "dense", precision=torch.ones(d + 1))
    for name, opts in [
        ("diagonal", {}),
        ("block_diagonal", {"block_size": 2}),
        ("block_triangular", {"k": 2}),
        ("heisenberg", {"k": 1, "k2": 2}),
        ("hierarchical", {"k1": 2, "k2": 2}),
    ]:
        with pytest.raises(ValueError):
            Gaussian(d, name, precision=p, **opts)
    with pytest.raises(ValueError):
        Gaussian(d, "no_such_structure")
    with pytest.raises(ValueError):
        Gaussian(d, "block_diagonal", block_size=4)
    with pytest.raises(ValueError):
        Gaussian(d, "block_triangular", k=d)
    with pytest.raises(ValueError):
        Gaussian(d, "dense", estimator="nope")
    q = Gaussian(d, "dense")
    with pytest.raises(ValueError):
        q.estimate_gradients(lambda w: -w.pow(2).sum(-1), estimator="nope")
    with pytest.raises(ValueError):
        q.estimate_gradients(lambda w: -w.pow(2).sum(-1), num_samples=0)


def test_constructor_accepts_a_group_instance():
    group = make("block_triangular", 7, k=2)
    q = Gaussian(7, group, dtype=f64)
    assert q.group is group
    with pytest.raises(ValueError):
        Gaussian(8, group)


def test_natural_gradient_requires_gradients():
    q = Gaussian(4, "dense", dtype=f64)
    with pytest.raises(ValueError):
        q.natural_gradient()
    q.loc.grad = torch.zeros(4, dtype=f64)
    with pytest.raises(ValueError):
        q.natural_gradient()
    q.factor.grad = torch.full((4, 4), float("inf"), dtype=f64)
    with pytest.raises(ValueError):
        q.natural_gradient()


# ------------------------------------------------- covariance parameterization (Sigma = sigma^2 A A^T)
COV_CONFIGS = [
    ("dense", 5, {}),
    ("diagonal", 5, {}),
    ("lower_triangular", 5, {}),
    ("block_diagonal", 6, {"block_size": 3}),
    ("block_triangular", 6, {"k": 2}),
    ("heisenberg", 7, {"k": 1, "k2": 2}),
]
COV_IDS = [config_id(c) for c in COV_CONFIGS]


def random_covariance_gaussian(cfg, transpose, scale, seed=0):
    name, d, opts = cfg
    q = Gaussian(d, name, dtype=f64, parameterization="covariance", scale=scale, transpose=transpose, **opts)
    with torch.no_grad():
        q.loc.copy_(torch.randn(d, generator=gen(seed), dtype=f64))
        q.factor.copy_(q.group.random(generator=gen(seed + 1), dtype=f64, scale=0.5))
    return q


class CovarianceMaps:
    """Dense reference: eta = (delta, m[, s]) -> (mu, S) with ``mu = mu_t + sigma_t A_t delta``,
    ``A = A_t h(M)`` (``A = (h(N) B_t)^T`` with transpose) and ``sigma = sigma_t exp(s)``."""

    def __init__(self, q):
        self.q, self.group, self.d = q, q.group, q.dim
        self.mu_t = q.loc.detach().clone()
        self.bt = q.group.to_dense(q.factor.detach()).clone()
        self.sigma_t = float(q.sigma().detach())
        self.slots, self.positions = compact_basis(q.group)
        self.nm = len(self.slots)
        self.n = self.d + self.nm + (1 if q.has_scale else 0)
        self.eye = torch.eye(self.d, dtype=f64)

    def m_dense(self, mvec):
        return self.group.to_dense(compact_from_vector(self.group, self.slots, mvec))

    def a(self, eta):
        md = self.m_dense(eta[self.d : self.d + self.nm])
        h = self.eye + md + 0.5 * md @ md
        return (h @ self.bt).mT if self.q.transpose else self.bt @ h

    def sigma(self, eta):
        return self.sigma_t * torch.exp(eta[-1]) if self.q.has_scale else torch.tensor(1.0, dtype=f64)

    def mu(self, eta):
        a_t = self.bt.mT if self.q.transpose else self.bt
        return self.mu_t + self.sigma_t * a_t @ eta[: self.d]

    def s(self, eta):
        a = self.sigma(eta) * self.a(eta)
        return torch.linalg.inv(a @ a.mT)

    def jacobians(self):
        eta0 = torch.zeros(self.n, dtype=f64)
        return (torch.autograd.functional.jacobian(self.mu, eta0),
                torch.autograd.functional.jacobian(self.s, eta0), self.s(eta0))

    def fisher(self):
        jac_mu, jac_s, s = self.jacobians()
        return gaussian_fisher_matrix(jac_mu, jac_s, s)


def _eta(maps, step):
    vec = [step[0], step[1].reshape(-1)[torch.tensor(maps.slots)]]
    if maps.q.has_scale:
        vec.append(step[2].reshape(1))
    return torch.cat(vec)


@pytest.mark.parametrize("cfg", COV_CONFIGS, ids=COV_IDS)
@pytest.mark.parametrize("transpose", [False, True])
def test_covariance_local_fisher_is_closed_form_by_autograd(cfg, transpose):
    """Covariance factor: the same Fisher weights as the precision factor (I on delta, 2 on
    diagonal entries, 1 on free entries, 1 between tied pairs), and ``2 d`` on the scale."""
    q = random_covariance_gaussian(cfg, transpose, scale=None, seed=3)
    maps = CovarianceMaps(q)
    f = maps.fisher()
    expected = LocalMaps(q.group, q.loc, q.factor).expected_fisher()
    assert (f - expected).abs().max().item() < 1e-10
    scaled = CovarianceMaps(random_covariance_gaussian(cfg, transpose, scale=0.7, seed=3))
    f = scaled.fisher()
    assert f[-1, -1].item() == pytest.approx(2 * q.dim, rel=1e-10)
    assert f[-1, : q.dim].abs().max().item() < 1e-10


@pytest.mark.parametrize("cfg", COV_CONFIGS, ids=COV_IDS)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_covariance_natural_gradient_is_pinv_fisher_times_local_gradient(cfg, transpose, scale):
    q = random_covariance_gaussian(cfg, transpose, scale=scale, seed=5)
    maps = CovarianceMaps(q)
    d = q.dim
    f = maps.fisher()
    eta0 = torch.zeros(maps.n, dtype=f64, requires_grad=True)
    (grad_eta,) = torch.autograd.grad(smooth_loss(maps.mu(eta0), maps.s(eta0)), eta0)
    sol = torch.linalg.pinv(f, hermitian=True, rtol=1e-8) @ grad_eta

    q.zero_grad()
    smooth_loss(q.loc, q.precision()).backward()
    step = q.natural_gradient()
    assert len(step) == (3 if scale else 2)
    ours = _eta(maps, step)
    if scale is None:
        assert rel(ours, sol) < 1e-9
    else:  # the trace of M and s are one direction: compare the tangent they induce
        jac_mu, jac_s, _ = maps.jacobians()
        assert rel(jac_mu @ ours, jac_mu @ sol) < 1e-9
        assert rel(torch.einsum("ijn,n->ij", jac_s, ours), torch.einsum("ijn,n->ij", jac_s, sol)) < 1e-9
        weights, eye = q.compact_constants()
        assert abs(float((step.factor * eye).sum())) < 1e-12  # M is trace-free

    # the same natural gradient from the local gradient computed elsewhere: the pattern entries
    # of the (symmetric) full-matrix dL/dM are the gradients of the entry coordinates
    g = grad_eta.detach()
    local = [g[:d], compact_from_vector(q.group, maps.slots, g[d : d + maps.nm])]
    if scale is not None:
        local.append(g[-1])
    via_local = q.natural_gradient(local_gradient=tuple(local))
    for a, b in zip(via_local, step):
        assert rel(a, b) < 1e-9

    # the retraction is phi(eta0 - lr * natural gradient)
    lr = 0.3
    eta1 = -lr * ours
    q.retract(step, lr)
    assert rel(q.loc, maps.mu(eta1)) < 1e-10
    a_new = q.group.to_dense(q.factor)
    a_new = a_new.mT if transpose else a_new
    assert rel(float(q.sigma().detach()) * a_new, maps.sigma(eta1) * maps.a(eta1)) < 1e-10


@pytest.mark.parametrize("cfg", COV_CONFIGS, ids=COV_IDS)
@pytest.mark.parametrize("transpose", [False, True])
def test_covariance_log_prob_entropy_and_samples_match_torch(cfg, transpose):
    q = random_covariance_gaussian(cfg, transpose, scale=0.8, seed=9)
    ref = torch.distributions.MultivariateNormal(q.loc.detach(), covariance_matrix=q.covariance().detach())
    z = torch.randn(5, q.dim, generator=gen(1), dtype=f64)
    assert rel(q.log_prob(z).detach(), ref.log_prob(z)) < 1e-10
    assert rel(q.entropy().detach(), ref.entropy()) < 1e-10
    assert rel(q.precision().detach(), torch.linalg.inv(q.covariance().detach())) < 1e-9
    a = q.group.to_dense(q.factor.detach())
    a = 0.8 * (a.mT if transpose else a)
    assert rel(q.from_noise(z).detach(), q.loc.detach() + z @ a.mT) < 1e-12


def test_covariance_constructor_errors():
    with pytest.raises(ValueError, match="parameterization"):
        Gaussian(3, parameterization="cholesky")
    with pytest.raises(ValueError, match="covariance"):
        Gaussian(3, scale=1.0)
    with pytest.raises(ValueError, match="covariance"):
        Gaussian(3, parameterization="covariance", precision=1.0)
    with pytest.raises(ValueError, match="scale"):
        Gaussian(3, parameterization="covariance", scale=-1.0)
    q = Gaussian(3, parameterization="covariance", covariance=torch.tensor([1.0, 4.0, 9.0], dtype=f64), dtype=f64)
    assert rel(q.covariance().detach(), torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=f64))) < 1e-14
    with pytest.raises(ValueError, match="reparam"):
        q.estimate_gradients(lambda w: -(w * w).sum(-1), estimator="price")
    with pytest.raises(ValueError, match="local_gradient"):
        Gaussian(3, parameterization="covariance", scale=1.0).natural_gradient(
            local_gradient=(torch.zeros(3), torch.zeros(3, 3))
        )
