"""Tests for ``structngd.families.KroneckerGaussian`` (MATH.md §6.2) and the Kronecker estimator.

Every check is against an independent dense float64 reference: the local maps
``M = M_t + C_t Delta K_t^T``, ``K = K_t h(M_K)``, ``C = C_t h(M_C)`` are written out here with
dense matrices over the column-major ``vec(W)`` (``Cov vec(W) = (K K^T) ⊗ (C C^T)``), the
Fisher of the local coordinates is the Hessian of ``KL(q_eta0 || q_eta)`` at ``eta0`` by
autograd, and densities come from ``torch.distributions.MultivariateNormal``.
"""

from __future__ import annotations

import pytest
import torch

from structngd.families import KroneckerGaussian
from structngd.families.estimators import kronecker_factor_gradients
from helpers import compact_basis, gen, rel

f64 = torch.float64

# (structure, options, d_out, d_in): dense and two sparse structures, and a mixed pair
CONFIGS = [
    ("dense", {}, 3, 4),
    ("block_diagonal", {"block_size": 2}, 4, 4),
    ("hierarchical", {"k1": 1, "k2": 1}, 3, 4),
    (("lower_triangular", "diagonal"), {}, 3, 4),
]
IDS = ["dense", "block_diagonal2", "hierarchical11", "lower_triangular+diagonal"]


def random_family(cfg, seed=0, scale=0.4, dtype=f64):
    structure, options, d_out, d_in = cfg
    q = KroneckerGaussian(d_out, d_in, structure, dtype=dtype, **options)
    with torch.no_grad():
        q.loc.copy_(torch.randn(d_out, d_in, generator=gen(seed), dtype=f64).to(dtype))
        q.in_factor.copy_(q.in_group.random(generator=gen(seed + 1), dtype=f64, scale=scale).to(dtype))
        q.out_factor.copy_(q.out_group.random(generator=gen(seed + 2), dtype=f64, scale=scale).to(dtype))
    return q


def vec(m):
    """Column-major vec of the trailing two dims."""
    return m.mT.reshape(*m.shape[:-2], -1)


class LocalMaps:
    """Dense reference of eta = (Delta, m_K, m_C) -> (vec mean, covariance) around (M_t, K_t, C_t)."""

    def __init__(self, q):
        self.d_out, self.d_in = q.d_out, q.d_in
        self.m_t = q.loc.detach().clone()
        self.k_t = q.in_group.to_dense(q.in_factor.detach()).clone()
        self.c_t = q.out_group.to_dense(q.out_factor.detach()).clone()
        self.in_slots, self.in_pos = compact_basis(q.in_group)
        self.out_slots, self.out_pos = compact_basis(q.out_group)
        self.n_mean = self.d_out * self.d_in
        self.n_in, self.n_out = len(self.in_slots), len(self.out_slots)
        self.n = self.n_mean + self.n_in + self.n_out

    def split(self, eta):
        a, b = self.n_mean, self.n_mean + self.n_in
        return eta[:a].reshape(self.d_in, self.d_out).mT, eta[a:b], eta[b:]

    @staticmethod
    def dense_m(positions, coords, d):
        m = torch.zeros(d, d, dtype=coords.dtype)
        for c, (i, j) in enumerate(positions):
            m = m + coords[c] * torch.nn.functional.one_hot(torch.tensor(i * d + j), d * d).to(f64).reshape(d, d)
        return m

    @staticmethod
    def h(m):
        return torch.eye(m.shape[0], dtype=m.dtype) + m + 0.5 * m @ m

    def factors(self, eta):
        delta, mk, mc = self.split(eta)
        k = self.k_t @ self.h(self.dense_m(self.in_pos, mk, self.d_in))
        c = self.c_t @ self.h(self.dense_m(self.out_pos, mc, self.d_out))
        return self.m_t + self.c_t @ delta @ self.k_t.mT, k, c

    def moments(self, eta):
        mean, k, c = self.factors(eta)
        return vec(mean), torch.kron(k @ k.mT, c @ c.mT)

    def kl_from_eta0(self, eta):
        mu0, s0 = self.moments(torch.zeros(self.n, dtype=f64))
        mu1, s1 = self.moments(eta)
        diff = mu1 - mu0
        return 0.5 * (
            torch.trace(torch.linalg.solve(s1, s0))
            + diff @ torch.linalg.solve(s1, diff)
            - len(mu0)
            + torch.logdet(s1)
            - torch.logdet(s0)
        )

    def fisher(self):
        return torch.autograd.functional.hessian(self.kl_from_eta0, torch.zeros(self.n, dtype=f64))

    def closed_form(self):
        """diag(I, d_out W_K, d_in W_C) with the cross block 1/2 tr(S_K) tr(S_C) (MATH §6.2)."""
        def sym_basis(positions, d):
            e = torch.zeros(len(positions), d, d, dtype=f64)
            for c, (i, j) in enumerate(positions):
                e[c, i, j] = 1.0
            return e + e.mT

        sk, sc = sym_basis(self.in_pos, self.d_in), sym_basis(self.out_pos, self.d_out)
        f = torch.zeros(self.n, self.n, dtype=f64)
        a, b = self.n_mean, self.n_mean + self.n_in
        f[:a, :a] = torch.eye(a, dtype=f64)
        f[a:b, a:b] = self.d_out * 0.5 * torch.einsum("aij,bij->ab", sk, sk)
        f[b:, b:] = self.d_in * 0.5 * torch.einsum("aij,bij->ab", sc, sc)
        cross = 0.5 * torch.einsum("aii->a", sk)[:, None] * torch.einsum("aii->a", sc)[None, :]
        f[a:b, b:], f[b:, a:b] = cross, cross.mT
        return f


def smooth_loss(mean, k, c, seed=5):
    """A random smooth loss of the mean and the covariance ``(K K^T) ⊗ (C C^T)``."""
    d_out, d_in = mean.shape
    g = gen(seed)
    a = torch.randn(d_out, d_in, generator=g, dtype=f64)
    p = torch.randn(d_in * d_out, d_in * d_out, generator=g, dtype=f64)
    p = p @ p.mT / (d_in * d_out) + torch.eye(d_in * d_out, dtype=f64)
    e = torch.randn(d_in * d_out, d_in * d_out, generator=g, dtype=f64)
    sigma = torch.kron(k @ k.mT, c @ c.mT)
    v = vec(mean)
    return (
        (a * mean).sum()
        + 0.5 * v @ p @ v
        + 0.5 * torch.trace(p @ sigma)
        + 0.1 * torch.trace(e @ sigma)
        - 0.4 * torch.logdet(sigma)
    )


# ---------------------------------------------------------------- 1. Fisher at eta0
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_local_fisher_is_the_closed_form_with_its_scale_cross_block(cfg):
    q = random_family(cfg, seed=3)
    maps = LocalMaps(q)
    f = maps.fisher()
    expected = maps.closed_form()
    assert (f - expected).abs().max().item() < 1e-10
    a, b = maps.n_mean, maps.n_mean + maps.n_in
    assert (f[:a, :a] - torch.eye(a, dtype=f64)).abs().max().item() < 1e-10  # whitened mean
    assert f[:a, a:].abs().max().item() < 1e-10  # mean and factors decouple
    for c, (i, j) in enumerate(maps.in_pos):  # weights d_out * (2 diagonal, 1 off-diagonal)
        assert f[a + c, a + c].item() == pytest.approx(q.d_out * (2.0 if i == j else 1.0), abs=1e-10)
    for c, (i, j) in enumerate(maps.out_pos):
        assert f[b + c, b + c].item() == pytest.approx(q.d_in * (2.0 if i == j else 1.0), abs=1e-10)
    # the scale redundancy: (t I, -t I) has zero Fisher, and only trace directions couple
    direction = torch.zeros(maps.n, dtype=f64)
    for c, (i, j) in enumerate(maps.in_pos):
        direction[a + c] = float(i == j)
    for c, (i, j) in enumerate(maps.out_pos):
        direction[b + c] = -float(i == j)
    assert (direction @ f @ direction).abs().item() < 1e-10
    assert f[a:b, b:].abs().max().item() == pytest.approx(2.0, abs=1e-10)  # 1/2 * 2 * 2 on diagonal pairs


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_natural_gradient_is_the_block_diagonal_fisher_solve_and_retracts_by_the_maps(cfg):
    q = random_family(cfg, seed=7)
    maps = LocalMaps(q)
    f = maps.fisher()
    eta0 = torch.zeros(maps.n, dtype=f64, requires_grad=True)
    (grad_eta,) = torch.autograd.grad(smooth_loss(*maps.factors(eta0)), eta0)
    a, b = maps.n_mean, maps.n_mean + maps.n_in
    # block-coordinate natural gradient (the factors' cross block dropped, as in INGD / SINGD)
    blocks = [slice(0, a), slice(a, b), slice(b, maps.n)]
    sol = torch.cat([torch.linalg.pinv(f[s, s], hermitian=True, rtol=1e-8) @ grad_eta[s] for s in blocks])

    smooth_loss(q.loc, q.in_group.to_dense(q.in_factor), q.out_group.to_dense(q.out_factor)).backward()
    step = q.natural_gradient()
    assert step._fields == ("loc", "in_factor", "out_factor")
    delta, mk, mc = maps.split(sol)
    assert rel(step.loc, delta) < 1e-10
    assert rel(q.in_group.to_dense(step.in_factor), maps.dense_m(maps.in_pos, mk, q.d_in)) < 1e-10
    assert rel(q.out_group.to_dense(step.out_factor), maps.dense_m(maps.out_pos, mc, q.d_out)) < 1e-10

    lr = 0.3
    mean, k, c = maps.factors(-lr * sol.detach())
    q.retract(step, lr)
    assert rel(q.loc, mean) < 1e-10
    assert rel(q.in_group.to_dense(q.in_factor), k) < 1e-10
    assert rel(q.out_group.to_dense(q.out_factor), c) < 1e-10
    # the mean moved by the preconditioned gradient C C^T g K K^T
    assert rel(maps.m_t - mean, lr * maps.c_t @ maps.c_t.mT @ q.loc.grad @ maps.k_t @ maps.k_t.mT) < 1e-10


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_kronecker_estimator_is_the_vi_loss_gradient_and_feeds_the_natural_gradient(cfg):
    """``X_K = K^T dL/dK``, ``X_C = C^T dL/dC`` for ``L = tr(A K K^T) tr(G C C^T) / 2 +
    lambda tr(K K^T) tr(C C^T) / 2 - (d_out log|K K^T| + d_in log|C C^T|) / 2`` (autograd), and the
    family's natural gradient from them equals the one from the Euclidean gradients."""
    q = random_family(cfg, seed=11)
    g = gen(12)
    x = torch.randn(20, q.d_in, generator=g, dtype=f64)
    y = torch.randn(20, q.d_out, generator=g, dtype=f64)
    a_stat, g_stat, lam = x.T @ x / 20, y.T @ y / 20, 0.3

    def vi_loss(k, c):
        return (
            0.5 * torch.trace(a_stat @ k @ k.T) * torch.trace(g_stat @ c @ c.T)
            + 0.5 * lam * torch.trace(k @ k.T) * torch.trace(c @ c.T)
            - 0.5 * (q.d_out * torch.logdet(k @ k.T) + q.d_in * torch.logdet(c @ c.T))
        )

    # dense leaves: the full-matrix gradients dL/dK, dL/dC
    k = q.in_group.to_dense(q.in_factor.detach()).clone().requires_grad_(True)
    c = q.out_group.to_dense(q.out_factor.detach()).clone().requires_grad_(True)
    gk, gc = torch.autograd.grad(vi_loss(k, c), [k, c])
    with torch.no_grad():
        x_k, x_c = kronecker_factor_gradients(
            q.in_group, q.out_group, q.in_factor, q.out_factor, a_stat, g_stat, lam
        )
    assert rel(x_k, q.in_group.restrict(k.detach().T @ gk)) < 1e-10  # the pattern entries of K^T dL/dK
    assert rel(x_c, q.out_group.restrict(c.detach().T @ gc)) < 1e-10
    for x in (k.detach().T @ gk, c.detach().T @ gc):  # symmetric, so its pattern entries say everything
        assert (x - x.mT).abs().max() < 1e-10
    # through the compact parameters: the natural gradient from .grad equals the one from (X_K, X_C)
    vi_loss(q.in_group.to_dense(q.in_factor), q.out_group.to_dense(q.out_factor)).backward()
    q.loc.grad = torch.zeros_like(q.loc)
    expected = q.natural_gradient()
    zero = torch.zeros_like(q.loc)
    from_local = q.natural_gradient(local_gradient=(zero, x_k, x_c))
    assert rel(from_local.in_factor, expected.in_factor) < 1e-10
    assert rel(from_local.out_factor, expected.out_factor) < 1e-10
    # the dense local gradients give the same natural gradient
    dense = q.natural_gradient(local_gradient=(zero, k.detach().T @ gk, c.detach().T @ gc))
    assert rel(dense.in_factor, expected.in_factor) < 1e-10
    assert rel(dense.out_factor, expected.out_factor) < 1e-10


# ------------------------------------------------------------- 2. the distribution
def dense_family(seed=0, d_out=2, d_in=3):
    return random_family(("dense", {}, d_out, d_in), seed=seed, scale=0.6)


def test_log_prob_and_entropy_match_torch_multivariate_normal():
    q = dense_family(seed=21)
    reference = torch.distributions.MultivariateNormal(
        vec(q.loc.detach()), covariance_matrix=torch.kron(
            q.in_factor.detach() @ q.in_factor.detach().mT, q.out_factor.detach() @ q.out_factor.detach().mT
        )
    )
    w = torch.randn(7, q.d_out, q.d_in, generator=gen(22), dtype=f64) * 2.0
    with torch.no_grad():
        assert rel(q.log_prob(w), reference.log_prob(vec(w))) < 1e-12
        assert abs(float(q.entropy() - reference.entropy())) < 1e-12
        torq = q.to_torch()
        assert rel(torq.covariance_matrix, reference.covariance_matrix) < 1e-12
        assert rel(torq.log_prob(vec(w)), reference.log_prob(vec(w))) < 1e-12


@pytest.mark.parametrize("cfg", CONFIGS[1:], ids=IDS[1:])
def test_log_prob_of_sparse_structures_matches_torch(cfg):
    q = random_family(cfg, seed=23)
    w = torch.randn(5, q.d_out, q.d_in, generator=gen(24), dtype=f64)
    with torch.no_grad():
        assert rel(q.log_prob(w), q.to_torch().log_prob(vec(w))) < 1e-11
        assert abs(float(q.entropy() - q.to_torch().entropy())) < 1e-11


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_log_prob_and_entropy_in_half_precision_follow_float64(cfg, dtype):
    """``slogdet`` has no half / bfloat16 kernel: the log-determinants run in float32, so a
    bfloat16 family still has a log-density and an entropy (to its own rounding)."""
    q64 = random_family(cfg, seed=31)
    q16 = random_family(cfg, seed=31, dtype=dtype)
    w = torch.randn(5, q64.d_out, q64.d_in, generator=gen(32), dtype=f64)
    with torch.no_grad():
        entropy, log_prob = q16.entropy(), q16.log_prob(w.to(dtype))
        assert entropy.dtype == log_prob.dtype == dtype
        tol = 0.02 if dtype == torch.bfloat16 else 3e-3
        assert abs(float(entropy) - float(q64.entropy())) <= tol * abs(float(q64.entropy())) + tol
        assert rel(log_prob.double(), q64.log_prob(w)) < 5 * tol


def test_samples_have_the_matrix_normal_mean_and_covariance():
    q = dense_family(seed=25)
    torch.manual_seed(26)
    with torch.no_grad():
        w = q.sample((200_000,))
        assert w.shape == (200_000, q.d_out, q.d_in)
        v = vec(w)
        cov = torch.cov(v.T)
        expected = q.to_torch().covariance_matrix
        assert (v.mean(0) - vec(q.loc)).abs().max() < 0.02
        assert (cov - expected).abs().max() < 0.03 * expected.abs().max()
    # reparameterized: gradients reach the mean and both factors
    q.rsample((3,)).sum().backward()
    assert all(p.grad is not None for p in q.parameters())


def test_view_shares_tensors_and_steps_only_the_factors():
    q = random_family(CONFIGS[2], seed=27)
    k, c = q.in_factor.detach().clone(), q.out_factor.detach().clone()
    view = KroneckerGaussian.view(q.in_group, q.out_group, k, c)
    assert not view.has_loc and [n for n, _ in view.named_parameters()] == ["in_factor", "out_factor"]
    x_k = torch.eye(q.d_in, dtype=f64) * 0.5
    x_c = torch.eye(q.d_out, dtype=f64) * 0.25
    step = view.natural_gradient(local_gradient=(x_k, x_c))
    assert step._fields == ("in_factor", "out_factor")
    before = k.clone()
    view.retract(step, lr=0.1)
    assert view.in_factor is k and not torch.equal(k, before)  # written in place
    with pytest.raises(ValueError, match="2 parts"):
        view.natural_gradient(local_gradient=(x_k,))


def test_exp_retraction_uses_the_exact_exponential():
    q = random_family(CONFIGS[0], seed=29)
    g = gen(30)
    n_k = torch.randn(q.d_in, q.d_in, generator=g, dtype=f64)
    n_c = torch.randn(q.d_out, q.d_out, generator=g, dtype=f64)
    step = (torch.randn(q.d_out, q.d_in, generator=g, dtype=f64), 0.1 * (n_k + n_k.T), 0.1 * (n_c + n_c.T))
    new = q.retracted(step, "exp")
    k, c = q.in_factor.detach(), q.out_factor.detach()
    assert rel(new["in_factor"], k @ torch.linalg.matrix_exp(-step[1])) < 1e-12
    assert rel(new["out_factor"], c @ torch.linalg.matrix_exp(-step[2])) < 1e-12
    assert rel(new["loc"], q.loc.detach() - c @ step[0] @ k.T) < 1e-12


def test_constructor_errors_and_missing_gradients():
    with pytest.raises(ValueError, match="loc"):
        KroneckerGaussian(2, 3, loc=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="in_factor"):
        KroneckerGaussian(2, 3, "diagonal", in_factor=torch.ones(4))
    with pytest.raises(ValueError, match="unknown structure"):
        KroneckerGaussian(2, 3, "toeplitz")
    q = KroneckerGaussian(2, 3, ("diagonal", "dense"), dtype=f64)
    assert q.structure == ("diagonal", "dense")
    with pytest.raises(ValueError, match="no gradient"):
        q.natural_gradient()


# ------------------------------------------------- 3. structure and SPD over many steps
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "structure,options",
    [("dense", {}), ("block_diagonal", {"block_size": 2, "ragged": True}), ("lower_triangular", {})],
)
def test_factors_keep_structure_and_stay_spd_over_ten_thousand_noisy_steps(structure, options, dtype):
    """Products only (estimator, natural gradient, ``h`` retraction) in low precision (the slower
    hierarchical group runs 2000 such steps through LocalKFAC in ``test_kron.py``)."""
    d_out, d_in = 3, 4
    family = KroneckerGaussian(d_out, d_in, structure, dtype=dtype, **options)
    q = KroneckerGaussian.view(family.in_group, family.out_group, family.in_factor, family.out_factor)
    g = gen(31)
    # noisy curvature statistics, drawn up front: the loop is products only
    x = torch.randn(10_000, 6, d_in, generator=g) * torch.linspace(0.5, 2.0, d_in)
    y = torch.randn(10_000, 6, d_out, generator=g) * torch.linspace(0.5, 2.0, d_out)
    a_all = (x.mT @ x / 6).to(dtype)
    g_all = (y.mT @ y / 6).to(dtype)
    with torch.no_grad():
        for t in range(10_000):
            x_k, x_c = kronecker_factor_gradients(
                q.in_group, q.out_group, q.in_factor, q.out_factor, a_all[t], g_all[t], 1e-3
            )
            q.retract(q.natural_gradient(local_gradient=(x_k, x_c)), lr=0.05)
    for group, factor in ((q.in_group, q.in_factor), (q.out_group, q.out_factor)):
        assert factor.dtype == dtype
        dense = group.to_dense(factor.detach()).double()
        mask = group.mask(dtype=f64)
        assert torch.equal(dense * (1 - mask), torch.zeros_like(dense))  # structure kept exactly
        assert torch.isfinite(dense).all()
        assert torch.linalg.eigvalsh(dense @ dense.T).min() > 0  # K K^T and C C^T SPD
