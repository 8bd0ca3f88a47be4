"""Tests for layer 2, ``structngd.families.Wishart`` (DESIGN.md "Layer 2", MATH.md §4).

The family is ``W(n, V)`` with mean ``Psi = n V = B B^T``, ``B`` in a group; local
coordinates ``n = d - 1 + (n_t - d + 1) e^delta`` (or ``n_t + delta``), ``B = B_t h(M)``.
Every check is against an independent float64 reference: the local maps written out
with dense matrices, the Fisher as the autograd Hessian of the Wishart log-partition
``A(theta)``, ``theta = ((n - d - 1)/2, -V^{-1}/2)``, chained through the maps (MATH §4
test 1), Monte Carlo score outer products of ``torch.distributions.Wishart.log_prob``,
the trigamma function from ``mpmath``, the closed-form conjugate posterior
``W(n0 + N, (V0^{-1} + sum x x^T)^{-1})`` and the Wishart moments.
"""

from __future__ import annotations

import copy
import io
import math

import mpmath
import pytest
import torch

from structngd.families import Wishart
from structngd.groups import make
from structngd.optim import NaturalGradient
from helpers import compact_basis, config_id, gen, rel

f64 = torch.float64

CONFIGS = [
    ("dense", 3, {}),
    ("diagonal", 4, {}),
    ("lower_triangular", 4, {}),
    ("upper_triangular", 4, {}),
    ("block_diagonal", 4, {"block_size": 2}),
    ("block_triangular", 5, {"k": 2}),
    ("heisenberg", 5, {"k": 1, "k2": 2}),
    ("hierarchical", 6, {"k1": 2, "k2": 2}),
]
FULL = ["dense", "lower_triangular", "upper_triangular"]  # E[W] can be any SPD matrix


IDS = [config_id(c) for c in CONFIGS]


def random_wishart(cfg, seed=0, df_excess=1.7, scale=0.5, df_coordinate="log"):
    """A Wishart with ``n = d - 1 + df_excess`` and a random generic factor in the group."""
    name, d, opts = cfg
    q = Wishart(d, d - 1 + df_excess, name, dtype=f64, df_coordinate=df_coordinate, **opts)
    with torch.no_grad():
        q.factor.copy_(1.5 * q.group.random(generator=gen(seed), dtype=f64, scale=scale))
    return q


def trigamma_mp(x):
    return float(mpmath.psi(1, mpmath.mpf(float(x))))


def df_fisher_mp(n, d):
    """``F_nn = psi_d'(n/2)/4 - d/(2n)`` with mpmath's trigamma (40 digits)."""
    mpmath.mp.dps = 40
    n = mpmath.mpf(float(n))
    return float(sum(mpmath.psi(1, n / 2 - mpmath.mpf(i) / 2) for i in range(d)) / 4 - d / (2 * n))


class LocalMaps:
    """Dense reference of ``phi``: eta = (delta, m) -> (n, Psi) around (n_t, B_t)."""

    def __init__(self, q: Wishart):
        self.group, self.d = q.group, q.dim
        self.log = q.df_coordinate == "log"
        self.n_t = q.df.detach().clone()
        self.c = self.n_t - self.d + 1
        self.bt = q.group.to_dense(q.factor.detach()).clone()
        self.slots, self.positions = compact_basis(q.group)
        self.p = 1 + len(self.slots)
        self.eye = torch.eye(self.d, dtype=f64)

    def m_dense(self, mvec):
        flat = torch.zeros(self.group.numel(), dtype=f64).index_put((torch.tensor(self.slots),), mvec)
        return self.group.to_dense(flat.reshape(self.group.shape))

    def n(self, eta):
        return (self.d - 1) + self.c * torch.exp(eta[0]) if self.log else self.n_t + eta[0]

    def b(self, eta):
        md = self.m_dense(eta[1:])
        return self.bt @ (self.eye + md + 0.5 * md @ md)

    def psi(self, eta):
        b = self.b(eta)
        return b @ b.mT

    def theta(self, eta):
        """Natural parameters ``((n - d - 1)/2, -V^{-1}/2)``, ``V^{-1} = n Psi^{-1}``, flattened."""
        n = self.n(eta)
        t2 = -0.5 * n * torch.linalg.inv(self.psi(eta))
        return torch.cat([((n - self.d - 1) / 2).reshape(1), t2.reshape(-1)])

    def log_partition(self, theta):
        d = self.d
        n = 2 * theta[0] + d + 1
        t2 = theta[1:].reshape(d, d)
        return -0.5 * n * torch.logdet(-2 * t2) + 0.5 * n * d * math.log(2) + torch.mvlgamma(0.5 * n, d)

    def fisher_autograd(self):
        """``J^T (d^2 A / d theta^2) J`` (MATH §4 test 1)."""
        eta0 = torch.zeros(self.p, dtype=f64)
        jac = torch.autograd.functional.jacobian(self.theta, eta0)
        hess = torch.autograd.functional.hessian(self.log_partition, self.theta(eta0))
        return jac.mT @ hess @ jac

    def fisher_closed_form(self):
        """diag(c^2 F_nn or F_nn, n_t * Gram) with Gram_ab = 1/2 <E_a + E_a^T, E_b + E_b^T> (MATH §1.3, §4)."""
        f = torch.zeros(self.p, self.p, dtype=f64)
        fnn = df_fisher_mp(self.n_t, self.d)
        f[0, 0] = fnn * (self.c.item() ** 2 if self.log else 1.0)
        e = torch.zeros(len(self.slots), self.d, self.d, dtype=f64)
        for k, (i, j) in enumerate(self.positions):
            e[k, i, j] = 1.0
        s = e + e.mT
        f[1:, 1:] = self.n_t * 0.5 * torch.einsum("aij,bij->ab", s, s)
        return f


# ------------------------------------------------------------------ conjugate model
class Conjugate:
    """x_i ~ N(0, W^-1), prior W(n0, V0); posterior W(n0 + N, (V0^-1 + sum x x^T)^-1)."""

    def __init__(self, d, num=30, seed=0):
        g = gen(seed)
        q_, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=f64))
        w_true = (q_ * torch.logspace(0, 1, d, dtype=f64)) @ q_.mT
        x = torch.linalg.solve_triangular(
            torch.linalg.cholesky(w_true).mT, torch.randn(d, num, generator=g, dtype=f64), upper=True
        ).mT  # rows ~ N(0, W_true^-1)
        a = torch.randn(d, d, generator=g, dtype=f64)
        self.v0 = a @ a.mT / d + 0.5 * torch.eye(d, dtype=f64)
        self.d, self.num, self.x = d, num, x
        self.n0 = d + 1.0
        self.p = torch.linalg.inv(self.v0) + x.mT @ x  # V_post^-1
        self.n_post = self.n0 + num
        self.v_post = torch.linalg.inv(self.p)
        self.mean_post = self.n_post * self.v_post

    def kl(self, q: Wishart):
        """``KL(q || posterior) = -ELBO + log evidence``, closed form in (n, Psi) via E log|W|, E W, H."""
        d, n_p = self.d, self.n_post
        log_det_vp = -torch.logdet(self.p)
        expected_log_p = (
            0.5 * (n_p - d - 1) * q.expected_logdet()
            - 0.5 * torch.trace(self.p @ q.mean)
            - 0.5 * n_p * d * math.log(2)
            - 0.5 * n_p * log_det_vp
            - torch.mvlgamma(torch.tensor(0.5 * n_p, dtype=f64), d)
        )
        return -q.entropy() - expected_log_p

    def log_joint(self, w):
        """``log p(x | W) + log p(W)`` up to a constant, for a batch ``(s, d, d)``."""
        a = self.num + self.n0 - self.d - 1
        return 0.5 * a * torch.logdet(w) - 0.5 * (self.p * w).sum((-2, -1))


def _run(q, problem, lr, steps, momentum=0.0):
    opt = NaturalGradient(q, lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        problem.kl(q).backward()
        opt.step()
    return q


# ----------------------------------------------------- 1. Fisher at eta0 (MATH §4 test 1)
def test_df_fisher_matches_mpmath_trigamma():
    """F_nn from the family equals psi_d'(n/2)/4 - d/(2n) with 40-digit trigamma, small to huge n."""
    worst = 0.0
    for d in (1, 3, 6):
        for excess in (1e-3, 0.4, 1.7, 12.0, 58.5, 1e3, 1e6, 1e12):
            n = d - 1 + excess
            q = Wishart(d, n, dtype=f64)
            got = q.df_fisher().item()
            expected = df_fisher_mp(n, d)
            assert got > 0
            worst = max(worst, abs(got - expected) / expected)
    assert worst < 1e-13, worst


@pytest.mark.parametrize("df_coordinate", ["log", "linear"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_local_fisher_is_closed_form_by_autograd(cfg, df_coordinate):
    """J^T Hess(A) J = diag(c^2 F_nn, n w): block-diagonal, no n-M cross term."""
    q = random_wishart(cfg, seed=11, df_excess=1.7, df_coordinate=df_coordinate)
    maps = LocalMaps(q)
    f = maps.fisher_autograd()
    expected = maps.fisher_closed_form()
    scale = expected.abs().max().item()
    # the M block and the cross terms: exact up to rounding
    assert (f[1:, 1:] - expected[1:, 1:]).abs().max().item() < 1e-12 * scale
    assert f[0, 1:].abs().max().item() < 1e-12 * scale
    # the n entry: the autograd Hessian of mvlgamma goes through torch.polygamma(1, .),
    # itself only ~1e-9 accurate at these arguments (measured against mpmath below)
    assert abs(f[0, 0].item() - expected[0, 0].item()) < 1e-8 * expected[0, 0].item()
    # the closed form used by the family's step
    c = (q.df - q.dim + 1).item() if df_coordinate == "log" else 1.0
    assert abs(q.df_fisher().item() * c**2 - expected[0, 0].item()) < 1e-14 * expected[0, 0].item()


def test_local_fisher_nn_entry_to_1e12_where_torch_trigamma_is_accurate():
    """At n = 70 (polygamma arguments >= 34, where torch's trigamma is float64-accurate) the
    autograd Hessian matches the closed form to 1e-12 in every entry."""
    q = random_wishart(("lower_triangular", 3, {}), seed=12, df_excess=68.0)
    maps = LocalMaps(q)
    f, expected = maps.fisher_autograd(), maps.fisher_closed_form()
    assert rel(f, expected) < 1e-12
    assert abs(f[0, 0].item() / expected[0, 0].item() - 1) < 1e-11


@pytest.mark.parametrize("cfg", [("dense", 3, {}), ("lower_triangular", 3, {}), ("block_triangular", 4, {"k": 1})],
                         ids=config_id)
def test_local_fisher_equals_monte_carlo_score_outer_products(cfg):
    """E[s s^T] over samples, s = grad_eta log q (torch.distributions.Wishart.log_prob through the
    dense maps): agrees with the closed form within 5 standard errors estimated from the samples."""
    q = random_wishart(cfg, seed=13, df_excess=2.5)
    maps = LocalMaps(q)
    torch.manual_seed(14)
    num = 40_000
    w = q.sample((num,))

    def log_q(eta):
        v = maps.psi(eta) / maps.n(eta)
        return torch.distributions.Wishart(df=maps.n(eta), covariance_matrix=0.5 * (v + v.mT)).log_prob(w)

    score = torch.func.jacfwd(log_q)(torch.zeros(maps.p, dtype=f64))  # (num, p)
    # the score has mean zero
    z_mean = score.mean(0).abs() / (score.std(0) / math.sqrt(num))
    assert z_mean.max().item() < 5.0
    prods = score.unsqueeze(-1) * score.unsqueeze(-2)
    f_mc = prods.mean(0)
    se = prods.std(0) / math.sqrt(num)
    expected = maps.fisher_closed_form()
    z = (f_mc - expected).abs() / (se + 1e-12)
    assert z.max().item() < 5.0, z.max().item()
    # the comparison has power: the standard errors are small against the entries
    assert (se.diagonal() / expected.diagonal()).max().item() < 0.05


# --------------------------------------------- natural gradient and retraction = dense maps
def smooth_loss(n, psi, seed=7):
    """A random smooth L(n, Psi), coupled in n and Psi."""
    d = psi.shape[-1]
    g = gen(seed)
    c = torch.randn(d, d, generator=g, dtype=f64)
    e = torch.randn(d, d, generator=g, dtype=f64)
    e = e @ e.mT / d
    return (
        0.3 * n
        + 0.05 * (n - d) ** 2
        + torch.trace((c + c.mT) @ psi) / 4
        - 0.3 * torch.logdet(psi) * (1 + 0.1 * n)
        + 0.2 * torch.trace(e @ torch.linalg.inv(psi))
        + 0.02 * n * torch.trace(psi)
    )


@pytest.mark.parametrize("df_coordinate", ["log", "linear"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_natural_gradient_and_retraction_match_dense_maps(cfg, df_coordinate):
    q = random_wishart(cfg, seed=21, df_excess=2.3, df_coordinate=df_coordinate)
    maps = LocalMaps(q)
    f = maps.fisher_closed_form()
    eta0 = torch.zeros(maps.p, dtype=f64, requires_grad=True)
    (grad_eta,) = torch.autograd.grad(smooth_loss(maps.n(eta0), maps.psi(eta0)), eta0)
    sol = torch.linalg.pinv(f, hermitian=True, rtol=1e-10) @ grad_eta
    assert (f @ sol - grad_eta).abs().max().item() < 1e-10 * grad_eta.abs().max().item()

    smooth_loss(q.df, q.mean).backward()  # Euclidean gradients of tau = (n, B)
    g_df, g_factor = q.df.grad.clone(), q.factor.grad.clone()
    delta, m = q.natural_gradient()
    assert delta.shape == q.df.shape == () and m.shape == tuple(q.group.shape)
    assert abs(delta.item() - sol[0].item()) < 1e-12 * max(1.0, abs(sol[0].item()))
    assert rel(q.group.to_dense(m), maps.m_dense(sol[1:])) < 1e-12
    mask = q.group.mask(dtype=f64).bool()
    assert torch.all(q.group.to_dense(m)[~mask] == 0)
    assert torch.equal(q.df.grad, g_df) and torch.equal(q.factor.grad, g_factor)  # only read

    lr = 0.3
    eta1 = -lr * sol
    q.retract((delta, m), lr)
    assert abs(q.df.item() - maps.n(eta1).item()) < 1e-12 * q.df.item()
    assert rel(q.group.to_dense(q.factor), maps.b(eta1)) < 1e-12
    assert torch.all(q.group.to_dense(q.factor)[~mask] == 0)


def test_step_closed_form_of_math_section_4():
    """n <- d-1 + c exp(-lr g_n/(c F_nn)); B <- B h(-lr/n C⊙κ(B^T g_B)) = B h(-lr/n Pi(B^T g_Psi B))."""
    d, lr = 4, 0.4
    q = random_wishart(("lower_triangular", d, {}), seed=31, df_excess=0.8)
    g_psi = torch.randn(d, d, generator=gen(32), dtype=f64)
    g_psi = g_psi + g_psi.mT
    g_n = 0.7
    n0, b0 = q.df.item(), q.group.to_dense(q.factor.detach()).clone()
    (torch.trace(g_psi @ q.mean) + g_n * q.df).backward()
    NaturalGradient(q, lr=lr).step()
    c = n0 - d + 1
    assert abs(q.df.item() - (d - 1 + c * math.exp(-lr * g_n / (c * df_fisher_mp(n0, d))))) < 1e-13 * n0
    x = b0.mT @ g_psi @ b0  # dL/dB = 2 g_Psi B, so B^T g_B = 2 X; Pi(X) = C⊙κ(2X) (MATH §1.4)
    pi = torch.tril(2 * x, -1) + torch.diag(x.diagonal())
    mm = -lr / n0 * pi
    eye = torch.eye(d, dtype=f64)
    assert rel(q.group.to_dense(q.factor), b0 @ (eye + mm + 0.5 * mm @ mm)) < 1e-12


# ------------------------------------------------ 2. conjugate posterior (MATH §4 test 2)
@pytest.fixture(scope="module")
def problem():
    return Conjugate(4, num=30, seed=101)


@pytest.mark.parametrize("structure", FULL)
def test_conjugate_posterior_reached_with_log_coordinate_lr1(structure, problem):
    d = problem.d
    q = Wishart(d, d + 0.5, structure, dtype=f64)  # far from the posterior: n_post = 35
    kl0 = problem.kl(q).item()
    _run(q, problem, lr=1.0, steps=45)
    assert abs(q.df.item() - problem.n_post) < 1e-8
    assert (q.mean - problem.mean_post).abs().max().item() < 1e-8
    assert rel(q.mean, problem.mean_post) < 1e-10
    assert kl0 > 1.0 and abs(problem.kl(q).item()) < 1e-12


@pytest.mark.parametrize("structure", ["dense", "lower_triangular"])
def test_conjugate_posterior_reached_with_lr_half(structure, problem):
    """MATH §4: beta = 0.5, 300 steps reach n and E[W] (observed there to 1e-15)."""
    q = Wishart(problem.d, problem.d + 0.5, structure, dtype=f64)
    _run(q, problem, lr=0.5, steps=300)
    assert abs(q.df.item() - problem.n_post) < 1e-8
    assert (q.mean - problem.mean_post).abs().max().item() < 1e-8


def test_log_coordinate_step_on_n_is_not_one_step_exact_but_follows_its_map(problem):
    """On the conjugate problem g_n = (n - n_post) F_nn(n) exactly, so one lr=1 log step maps
    x = c/c_post to x exp(1/x - 1): a second-order contraction, exact only at x = 1."""
    d = problem.d
    c_post = problem.n_post - d + 1
    for start in (d + 0.5, 20.0, 50.0):
        q = Wishart(d, start, "dense", dtype=f64)
        problem.kl(q).backward()
        fnn = q.df_fisher().item()
        assert abs(q.df.grad.item() - (start - problem.n_post) * fnn) < 1e-12 * abs(start - problem.n_post) * fnn
        NaturalGradient(q, lr=1.0).step()
        x = (start - d + 1) / c_post
        expected = d - 1 + c_post * x * math.exp(1 / x - 1)
        assert abs(q.df.item() - expected) < 1e-12 * expected
        assert abs(q.df.item() - problem.n_post) > 1e-3


def test_linear_coordinate_one_full_step_solves_n(problem):
    """With n = n_t + delta, one lr=1 step puts n at n_post exactly (from any n and Psi);
    started near the posterior mean, the run then converges like the log variant."""
    d = problem.d
    for start in (d - 0.5, 12.0, 80.0):
        q = Wishart(d, start, "lower_triangular", df_coordinate="linear", dtype=f64)
        problem.kl(q).backward()
        NaturalGradient(q, lr=1.0).step()
        assert abs(q.df.item() - problem.n_post) < 1e-12 * problem.n_post
    q = Wishart(d, 0.5 * problem.n_post, "dense", mean=1.5 * problem.mean_post, df_coordinate="linear", dtype=f64)
    _run(q, problem, lr=1.0, steps=30)
    assert abs(q.df.item() - problem.n_post) < 1e-8
    assert (q.mean - problem.mean_post).abs().max().item() < 1e-8


def test_restricted_structures_reach_the_constrained_optimum(problem):
    """Diagonal / block-diagonal B: n -> n_post and Psi -> n_post blockdiag(P)^-1 (the optimum of
    tr(P Psi)/2 - n_post log|Psi|/2 over that pattern); other structures: gradients vanish on their
    pattern and the KL lies between the dense and the diagonal optimum."""
    d, p, n_post = problem.d, problem.p, problem.n_post
    q = _run(Wishart(d, d + 0.5, "diagonal", dtype=f64), problem, lr=1.0, steps=45)
    assert abs(q.df.item() - n_post) < 1e-8
    assert (q.mean - n_post * torch.diag(1 / p.diagonal())).abs().max().item() < 1e-8
    kl_diag = problem.kl(q).item()
    q = _run(Wishart(d, d + 0.5, "block_diagonal", block_size=2, dtype=f64), problem, lr=1.0, steps=45)
    expected = torch.block_diag(*(n_post * torch.linalg.inv(p[i : i + 2, i : i + 2]) for i in (0, 2)))
    assert abs(q.df.item() - n_post) < 1e-8
    assert (q.mean - expected).abs().max().item() < 1e-8
    kl_block = problem.kl(q).item()
    q = _run(Wishart(d, d + 0.5, "block_triangular", k=1, dtype=f64), problem, lr=1.0, steps=60)
    q.zero_grad()
    kl_bt = problem.kl(q)
    kl_bt.backward()
    assert abs(q.df.grad.item()) < 1e-10 and q.factor.grad.abs().max().item() < 1e-8
    assert 1e-6 < kl_block < kl_diag and 1e-6 < kl_bt.item() < kl_diag


# --------------------------------------------------------------- 3. sample moments
@pytest.mark.parametrize("cfg", [("dense", 3, {}), ("upper_triangular", 4, {}), ("block_triangular", 4, {"k": 1})],
                         ids=config_id)
def test_rsample_moments(cfg):
    """E W = n V, Cov(W_ij, W_kl) = n (V_ik V_jl + V_il V_jk) (so Var W_ij = n (V_ij^2 + V_ii V_jj)),
    within 5 standard errors: sqrt(Var/S) for the mean, the sample std of the centred products
    over sqrt(S) for the covariance."""
    q = random_wishart(cfg, seed=41, df_excess=1.3)
    d, n = q.dim, q.df.item()
    v = (q.mean / n).detach()
    num = 200_000
    torch.manual_seed(42)
    w = q.sample((num,))
    assert w.shape == (num, d, d) and w.dtype == f64 and not w.requires_grad
    assert torch.equal(w, w.mT)
    assert (torch.linalg.cholesky_ex(w)[1] == 0).all()
    var = n * (v**2 + v.diagonal().unsqueeze(-1) * v.diagonal().unsqueeze(-2))
    assert rel(q.variance(), var) < 1e-13
    z_mean = (w.mean(0) - n * v).abs() / (var / num).sqrt()
    assert z_mean.max().item() < 5.0, z_mean.max().item()
    r = (w - n * v).reshape(num, d * d)
    prods = r.unsqueeze(-1) * r.unsqueeze(-2)
    emp, se = prods.mean(0), prods.std(0) / math.sqrt(num)
    cov = n * (torch.einsum("ik,jl->ijkl", v, v) + torch.einsum("il,jk->ijkl", v, v)).reshape(d * d, d * d)
    z_cov = (emp - cov).abs() / se
    assert z_cov.max().item() < 5.0, z_cov.max().item()
    assert (se.diagonal() / cov.diagonal()).max().item() < 0.05  # the test has power
    assert rel(emp.diagonal().reshape(d, d), var) < 0.05


def test_rsample_gradients_are_unbiased():
    """Reparameterization gradients (Bartlett with implicitly reparameterized chi2) of
    E[log|W| + tr(C W)] w.r.t. (n, B) agree with autograd of the closed form (torch.digamma,
    log|Psi|, tr(C Psi)) within 5 standard errors."""
    q = random_wishart(("lower_triangular", 3, {}), seed=51, df_excess=1.4)
    d = q.dim
    c = torch.randn(d, d, generator=gen(52), dtype=f64)
    c = c + c.mT
    n, b = q.df, q.factor
    closed = (
        torch.digamma((n - torch.arange(d, dtype=f64)) / 2).sum()
        + d * math.log(2)
        + torch.logdet(q.mean)
        - d * torch.log(n)
        + torch.trace(c @ q.mean)
    )
    g_n, g_b = torch.autograd.grad(closed, (n, b))
    expected = torch.cat([g_n.reshape(1), g_b[torch.tril_indices(d, d).unbind()]])
    torch.manual_seed(53)
    rows = []
    for _ in range(40):
        w = q.rsample((2000,))
        f = (torch.logdet(w) + (c * w).sum((-2, -1))).mean()
        gn, gb = torch.autograd.grad(f, (n, b))
        rows.append(torch.cat([gn.reshape(1), gb[torch.tril_indices(d, d).unbind()]]))
    rows = torch.stack(rows)
    z = (rows.mean(0) - expected).abs() / (rows.std(0) / math.sqrt(len(rows)))
    assert z.max().item() < 5.0, z
    assert (rows.std(0) / math.sqrt(len(rows))).max().item() < 0.05 * expected.abs().max().item()


# --------------------------------------------------- distribution methods vs torch
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_log_prob_entropy_mean_match_torch(cfg):
    q = random_wishart(cfg, seed=61, df_excess=0.9)
    d = q.dim
    ref = q.to_torch()
    assert isinstance(ref, torch.distributions.Wishart)
    torch.manual_seed(62)
    for shape in [(), (5,), (2, 3)]:
        w = q.sample(shape)
        assert w.shape == shape + (d, d)
        lp = q.log_prob(w)
        assert lp.shape == shape
        assert (lp - ref.log_prob(w)).abs().max().item() < 1e-10
    assert abs(q.entropy().item() - ref.entropy().item()) < 1e-10
    assert rel(q.mean, ref.mean) < 1e-13
    assert rel(q.scale(), ref.covariance_matrix) < 1e-13
    assert rel(q.variance(), ref.variance) < 1e-12
    assert rel(q.mean_inverse() @ q.mean, torch.eye(d, dtype=f64)) < 1e-12
    # E log|W| against mpmath digamma
    mpmath.mp.dps = 30
    n = q.df.item()
    psi_d = float(sum(mpmath.psi(0, mpmath.mpf(n) / 2 - mpmath.mpf(i) / 2) for i in range(d)))
    expected = psi_d + d * math.log(2) + torch.logdet(ref.covariance_matrix).item()
    assert abs(q.expected_logdet().item() - expected) < 1e-12 * max(1.0, abs(expected))
    # the parameters are (df, factor) and df.grad is d/dn at fixed mean
    assert [name for name, _ in q.named_parameters()] == ["df", "factor"]


def test_expected_logdet_gradient_uses_accurate_trigamma():
    """d/dn E log|W| at fixed Psi = psi_d'(n/2)/2 - d/n, to 1e-14 against mpmath."""
    for d, n in [(3, 2.2), (4, 5.5), (2, 40.0)]:
        q = Wishart(d, n, dtype=f64)
        q.expected_logdet().backward()
        expected = sum(trigamma_mp(n / 2 - i / 2) for i in range(d)) / 2 - d / n
        assert abs(q.df.grad.item() - expected) < 1e-14 * max(1.0, abs(expected))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_constructor_initial_mean_and_scale(cfg):
    name, d, opts = cfg
    q = Wishart(d, d + 2.0, name, dtype=f64, **opts)
    assert q.structure == name and q.df.dtype == f64 and q.df.shape == ()
    assert rel(q.scale(), torch.eye(d, dtype=f64)) < 1e-15  # default V = I
    q = Wishart(d, d + 2.0, name, mean=3.0, dtype=f64, **opts)
    assert rel(q.mean, 3 * torch.eye(d, dtype=f64)) < 1e-15
    v = torch.linspace(0.5, 3.0, d, dtype=f64)
    q = Wishart(d, torch.tensor(d + 2.0, dtype=f64), name, scale=v, **opts)
    assert q.factor.dtype == f64
    assert rel(q.mean, (d + 2.0) * torch.diag(v)) < 1e-15
    mask = q.group.mask(dtype=f64).bool()
    assert torch.all(q.group.to_dense(q.factor.detach())[~mask] == 0)


@pytest.mark.parametrize("structure", FULL)
def test_constructor_dense_mean(structure, problem):
    q = Wishart(problem.d, problem.n_post, structure, mean=problem.mean_post.clone(), dtype=f64)
    assert rel(q.mean, problem.mean_post) < 1e-13
    q = Wishart(problem.d, problem.n_post, structure, scale=problem.v_post.clone(), dtype=f64)
    assert rel(q.mean, problem.mean_post) < 1e-13


# ------------------------------------------------ 4. SPD and structure over noisy steps
NOISY = [c for c in CONFIGS if c[0] != "dense"]


def _check_valid(q, mask):
    n, d = q.df.item(), q.dim
    assert math.isfinite(n) and n > d - 1
    assert torch.linalg.cholesky_ex(q.mean)[1].item() == 0
    assert torch.all(q.group.to_dense(q.factor)[~mask] == 0)
    return n - d + 1


def _kl_at_posterior_df(problem, q):
    """KL(q || posterior) with q's n replaced by n_post: the E[W] part of the fit."""
    other = copy.deepcopy(q)
    with torch.no_grad():
        other.df.fill_(problem.n_post)
    return problem.kl(other).item()


@pytest.mark.parametrize("cfg", NOISY, ids=[config_id(c) for c in NOISY])
def test_spd_df_and_structure_kept_over_1000_noisy_steps(cfg):
    """Exact conjugate gradients plus large noise in the local coordinates (std 2 per step for
    the log coordinate of n, so n - d + 1 swings over four decades; a Frobenius norm ~0.2 in
    M, before the lr), lr = 0.2, 1000 steps: after every step n > d - 1, E[W] SPD (Cholesky
    succeeds) and the entries off the pattern are exactly 0; E[W] still moved towards the
    optimum (KL with n set to n_post decreased)."""
    name, d, opts = cfg
    problem = Conjugate(d, num=20, seed=200 + d)
    q = Wishart(d, d - 0.5, name, dtype=f64, **opts)
    mask = q.group.mask(dtype=f64).bool()
    kl0 = _kl_at_posterior_df(problem, q)
    opt = NaturalGradient(q, lr=0.2)
    g = gen(201)
    excess = []
    for _ in range(1000):
        opt.zero_grad()
        problem.kl(q).backward()
        with torch.no_grad():
            c = q.df - d + 1
            q.df.grad.add_(10.0 * c * q.df_fisher() * torch.randn((), generator=g, dtype=f64))
            z = torch.randn(d, d, generator=g, dtype=f64)
            b_inv_t = torch.linalg.inv(q.group.to_dense(q.factor)).mT
            q.factor.grad.add_(q.group.restrict(q.df * b_inv_t @ (z + z.mT)) * 0.05)
        opt.step()
        excess.append(_check_valid(q, mask))
    assert min(excess) < 0.5 and max(excess) > 1e3  # n swung from near d - 1 to far above
    kl = _kl_at_posterior_df(problem, q)
    assert math.isfinite(kl) and kl < kl0


@pytest.mark.parametrize("cfg", [("lower_triangular", 4, {}), ("hierarchical", 6, {"k1": 2, "k2": 2})], ids=config_id)
def test_monte_carlo_gradients_keep_spd_and_structure_over_1000_steps(cfg):
    """One-sample reparameterization gradients (estimate_gradients through rsample) of the
    conjugate negative ELBO, lr = 0.05, 1000 steps: valid after every step, KL decreased."""
    name, d, opts = cfg
    problem = Conjugate(d, num=20, seed=300 + d)
    q = Wishart(d, d + 1.0, name, dtype=f64, **opts)
    mask = q.group.mask(dtype=f64).bool()
    kl0 = problem.kl(q).item()
    opt = NaturalGradient(q, lr=0.05)
    torch.manual_seed(301)
    for _ in range(1000):
        opt.zero_grad()
        q.estimate_gradients(problem.log_joint, num_samples=1)
        opt.step()
        _check_valid(q, mask)
    kl = problem.kl(q).item()
    assert math.isfinite(kl) and kl < 0.1 * kl0


# -------------------------------------------------- 5. errors change nothing; state dicts
def snapshot(q):
    return q.df.detach().clone(), q.factor.detach().clone()


def unchanged(before, q):
    return torch.equal(before[0], q.df) and torch.equal(before[1], q.factor)


def test_constructor_errors():
    d = 4
    for bad_df in (d - 1, d - 1.5, 0.0, -2.0, float("nan"), float("inf"), True, "5", torch.ones(2) * 6):
        with pytest.raises(ValueError):
            Wishart(d, bad_df)
    Wishart(d, d - 1 + 1e-6)  # anything above d - 1 is allowed
    spd = Conjugate(d, seed=3).mean_post
    not_spd = spd.clone()
    not_spd[0, 0] = -1.0
    not_sym = spd.clone()
    not_sym[0, 1] += 0.1
    for kwargs in (
        dict(mean=not_spd),
        dict(mean=not_sym),
        dict(mean=-spd),
        dict(mean=spd[:-1, :-1]),
        dict(mean=torch.ones(d + 1)),
        dict(mean=torch.tensor([1.0, -1.0, 1.0, 1.0])),
        dict(mean=0.0),
        dict(mean=float("nan")),
        dict(scale=torch.zeros(d, d)),
        dict(mean=1.0, scale=1.0),
        dict(df_coordinate="exp"),
    ):
        with pytest.raises(ValueError):
            Wishart(d, d + 1.0, "dense", **kwargs)
    for name, opts in [("diagonal", {}), ("block_diagonal", {"block_size": 2}), ("block_triangular", {"k": 1})]:
        with pytest.raises(ValueError):
            Wishart(d, d + 1.0, name, mean=spd, **opts)
    with pytest.raises(ValueError):
        Wishart(d, d + 1.0, "no_such_structure")
    with pytest.raises(ValueError):
        Wishart(d, d + 1.0, "block_diagonal", block_size=3)
    group = make("lower_triangular", d)
    assert Wishart(d, d + 1.0, group).group is group
    with pytest.raises(ValueError):
        Wishart(d + 1, d + 2.0, group)


def test_log_prob_and_estimator_errors():
    q = Wishart(3, 4.0, dtype=f64)
    for bad in (torch.eye(4, dtype=f64), torch.ones(3, dtype=f64), torch.ones(2, 3, 4, dtype=f64)):
        with pytest.raises(ValueError):
            q.log_prob(bad)
    with pytest.raises(ValueError):
        q.log_prob(-torch.eye(3, dtype=f64))
    with pytest.raises(ValueError):
        q.estimate_gradients(lambda w: torch.logdet(w), num_samples=0)


def test_bad_gradients_raise_and_change_nothing():
    q = random_wishart(("block_diagonal", 4, {"block_size": 2}), seed=71)
    before = snapshot(q)
    opt = NaturalGradient(q, lr=0.5)
    with pytest.raises(ValueError, match="no gradient"):
        opt.step()
    q.df.grad = torch.tensor(0.3, dtype=f64)
    with pytest.raises(ValueError, match="factor has no gradient"):
        opt.step()
    q.factor.grad = torch.zeros_like(q.factor)
    q.factor.grad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    q.factor.grad = torch.zeros_like(q.factor)
    q.df.grad = torch.tensor(float("inf"), dtype=f64)
    with pytest.raises(ValueError, match="df.grad has non-finite"):
        opt.step()
    assert unchanged(before, q)
    # a step that would leave n > d - 1 (linear coordinate) or overflow n (log coordinate)
    lin = random_wishart(("lower_triangular", 3, {}), seed=72, df_coordinate="linear")
    for fam, g_n in ((lin, 1e3), (q, -1e6)):
        fam.df.grad = torch.tensor(g_n, dtype=f64)
        fam.factor.grad = torch.randn(fam.factor.shape, generator=gen(73), dtype=f64)
        before = snapshot(fam)
        with pytest.raises(ValueError, match="no parameter was changed"):
            NaturalGradient(fam, lr=1.0).step()
        assert unchanged(before, fam)
    # zero gradient or zero lr: nothing moves
    q.df.grad = torch.tensor(0.0, dtype=f64)
    q.factor.grad = torch.zeros_like(q.factor)
    before = snapshot(q)
    NaturalGradient(q, lr=0.7).step()
    assert unchanged(before, q)
    q.df.grad = torch.tensor(0.4, dtype=f64)
    q.factor.grad = torch.randn(q.factor.shape, generator=gen(74), dtype=f64)
    NaturalGradient(q, lr=0.0).step()
    assert unchanged(before, q)


def _families(problem, seed=0):
    return [
        random_wishart(("lower_triangular", problem.d, {}), seed=seed),
        random_wishart(("block_diagonal", problem.d, {"block_size": 2}), seed=seed + 1),
    ]


def _train(opt, families, problem, steps):
    for _ in range(steps):
        opt.zero_grad()
        sum(problem.kl(q) for q in families).backward()
        opt.step()


def test_state_dict_round_trip_with_momentum_is_bit_identical(problem):
    hyper = dict(lr=0.2, momentum=0.7)
    straight = _families(problem)
    _train(NaturalGradient(straight, **hyper), straight, problem, 20)

    first = _families(problem)
    opt1 = NaturalGradient(first, **hyper)
    _train(opt1, first, problem, 10)
    buffer = io.BytesIO()
    torch.save({"optimizer": opt1.state_dict(), "families": [q.state_dict() for q in first]}, buffer)
    assert len(opt1.state_dict()["state"]) == 4  # df and factor of both families
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = _families(problem, seed=50)
    for q, sd in zip(resumed, checkpoint["families"]):
        q.load_state_dict(sd)
    opt2 = NaturalGradient(resumed, lr=0.9, momentum=0.1)
    opt2.load_state_dict(checkpoint["optimizer"])
    assert opt2.param_groups[0]["lr"] == 0.2 and opt2.param_groups[0]["momentum"] == 0.7
    assert [g["family"] for g in opt2.param_groups] == resumed
    _train(opt2, resumed, problem, 10)
    for a, b in zip(straight, resumed):
        assert torch.equal(a.df, b.df) and torch.equal(a.factor, b.factor)
    # the families moved, and a deep copy is an independent family
    assert not torch.equal(straight[0].df, _families(problem)[0].df)
    clone = copy.deepcopy(resumed[0])
    assert torch.equal(clone.df, resumed[0].df) and clone.df is not resumed[0].df
