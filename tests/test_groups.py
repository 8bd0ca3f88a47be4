"""Tests for layer 1, ``structngd.groups`` (DESIGN.md "Layer 1", MATH.md §1.3, §1.4, §3).

Every check compares the compact-form implementation against an independent dense
reference: the storage pattern of each structure is written out here from its
definition (not read from the library), products / solves / determinants are plain
dense float64 linear algebra, and the natural gradient is recomputed from the Fisher
Gram matrix of the local coordinates at eta0 (MATH.md §1.3).
"""

from __future__ import annotations

import pytest
import torch

from structngd.groups import GROUPS, make
from helpers import config_id, gen, rel

# ----------------------------------------------------------------------------- configs
CONFIGS = [
    ("dense", 6, {}),
    ("dense", 5, {}),
    ("diagonal", 7, {}),
    ("lower_triangular", 6, {}),
    ("upper_triangular", 7, {}),
    ("block_diagonal", 6, {"block_size": 2}),
    ("block_diagonal", 6, {"block_size": 3}),
    ("block_diagonal", 8, {"block_size": 3, "ragged": True}),  # blocks 3, 3, 2
    ("block_diagonal", 7, {"block_size": 3, "ragged": True}),  # blocks 3, 3, 1
    ("block_triangular", 7, {"k": 1}),
    ("block_triangular", 8, {"k": 2}),
    ("heisenberg", 8, {"k": 1, "k2": 2}),
    ("heisenberg", 9, {"k": 2}),
    ("hierarchical", 8, {"k1": 2, "k2": 1}),
    ("hierarchical", 9, {"k1": 2, "k2": 2}),
]


@pytest.fixture(params=CONFIGS, ids=[config_id(c) for c in CONFIGS])
def cfg(request):
    return request.param


@pytest.fixture
def group(cfg):
    name, d, opts = cfg
    return make(name, d, **opts)


@pytest.fixture
def pattern(cfg):
    return expected_pattern(*cfg)


def expected_pattern(name, d, opts):
    """The 0/1 dense pattern of each structure, written from its definition (bool, d x d)."""
    one = torch.ones(d, d, dtype=torch.bool)
    eye = torch.eye(d, dtype=torch.bool)
    p = torch.zeros(d, d, dtype=torch.bool)
    if name == "dense":
        return one
    if name == "diagonal":
        return eye
    if name == "lower_triangular":
        return torch.tril(one)
    if name == "upper_triangular":
        return torch.triu(one)
    if name == "block_diagonal":
        b = opts["block_size"]
        for s in range(0, d, b):
            p[s : s + b, s : s + b] = True
        return p
    if name == "block_triangular":
        k = opts["k"]
        p[:k, :] = True  # dense A (k x k) and coupling C (k x (d-k))
        p[k:, k:] = eye[k:, k:]  # diagonal D
        return p
    if name == "heisenberg":
        k = opts["k"]
        k2 = opts.get("k2", k)
        m = d - k2
        p[:k, :] = True  # A, C1, C2
        p[k:m, k:m] = eye[k:m, k:m]  # diagonal middle block
        p[k:m, m:] = True  # C3
        p[m:, m:] = True  # dense corner E
        return p
    if name == "hierarchical":
        k1, k2 = opts["k1"], opts["k2"]
        m = d - k2
        p[:k1, :] = True  # A, B1, B2
        p[k1:m, k1:m] = eye[k1:m, k1:m]  # diagonal C (and a zero block to the right)
        p[m:, k1:] = True  # D and dense E
        return p
    raise AssertionError(name)


def compact_basis(group, pattern):
    """Unit compact vectors whose dense images are single entries inside the pattern.

    Returns (list of flat compact indices, list of dense (i, j) positions). Storage slots
    whose dense image falls outside the pattern (e.g. the unused triangle of a triangular
    factor stored as d x d) are not coordinates of the group and are left out.
    """
    n = group.numel()
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(group.shape))
    dense = group.to_dense(eye)  # (n, d, d)
    slots, positions = [], []
    for c in range(n):
        nz = dense[c].nonzero().tolist()
        assert len(nz) <= 1, f"compact slot {c} maps to several dense entries {nz}"
        if nz and pattern[nz[0][0], nz[0][1]]:
            assert dense[c][nz[0][0], nz[0][1]] == 1
            slots.append(c)
            positions.append((nz[0][0], nz[0][1]))
    return slots, positions


# ------------------------------------------------------------------ storage / pattern
def test_mask_is_the_structure_pattern(group, pattern):
    mask = group.mask()
    assert mask.dtype == torch.float64
    assert mask.shape == pattern.shape
    assert torch.equal(mask, pattern.to(torch.float64)), (
        f"mask() of {group!r} differs from the pattern of the structure at "
        f"{(mask != pattern.to(torch.float64)).nonzero().tolist()[:6]}"
    )


def test_compact_basis_covers_pattern_exactly(group, pattern):
    slots, positions = compact_basis(group, pattern)
    assert len(set(positions)) == len(positions)
    assert set(positions) == {tuple(ij) for ij in pattern.nonzero().tolist()}


def test_restrict_to_dense_roundtrip(group, pattern):
    g = torch.randn(group.dim, group.dim, generator=gen(1), dtype=torch.float64)
    a = group.restrict(g)
    assert tuple(a.shape) == tuple(group.shape)
    assert torch.equal(group.to_dense(a), torch.where(pattern, g, torch.zeros_like(g)))
    assert torch.equal(group.restrict(group.to_dense(a)), a)
    # batched
    gb = torch.randn(3, group.dim, group.dim, generator=gen(2), dtype=torch.float64)
    ab = group.restrict(gb)
    assert tuple(ab.shape) == (3,) + tuple(group.shape)
    assert torch.equal(group.to_dense(ab), torch.where(pattern, gb, torch.zeros_like(gb)))


def test_random_is_generic_on_pattern_and_canonical(group, pattern):
    b = group.random(generator=gen(3), dtype=torch.float64)
    bd = group.to_dense(b)
    assert torch.all(bd[~pattern] == 0)
    assert torch.all(bd[pattern] != 0), "random() should fill every entry of the pattern"
    assert torch.equal(group.restrict(bd), b), "compact form of random() is not canonical"
    assert torch.isfinite(group.logdet(b))


# ------------------------------------------------------------ 1. dense agreement
def _elements(group, batch_shape=(), seed=0, dtype=torch.float64):
    a = group.random(generator=gen(seed), dtype=dtype, batch_shape=batch_shape, scale=0.5)
    b = group.random(generator=gen(seed + 100), dtype=dtype, batch_shape=batch_shape, scale=0.5)
    return a, b


@pytest.mark.parametrize("batch_shape", [(), (3,)], ids=["single", "batched"])
def test_mul_matches_dense(group, batch_shape):
    a, b = _elements(group, batch_shape)
    ab = group.mul(a, b)
    assert ab.shape == a.shape
    assert rel(group.to_dense(ab), group.to_dense(a) @ group.to_dense(b)) < 1e-10


def _check_vector_ops(group, a, x, tol):
    A = group.to_dense(a).to(torch.float64)
    x64 = x.to(torch.float64)
    if a.dim() == len(group.shape):  # one element, x of shape (..., d)
        exp_mv = x64 @ A.mT
        exp_tmv = x64 @ A
        flat = x64.reshape(-1, group.dim).mT
        exp_solve = torch.linalg.solve(A, flat).mT.reshape(x.shape)
        exp_tsolve = torch.linalg.solve(A.mT, flat).mT.reshape(x.shape)
    else:  # batch of elements, x of shape (*batch, d)
        exp_mv = (A @ x64.unsqueeze(-1)).squeeze(-1)
        exp_tmv = (A.mT @ x64.unsqueeze(-1)).squeeze(-1)
        exp_solve = torch.linalg.solve(A, x64.unsqueeze(-1)).squeeze(-1)
        exp_tsolve = torch.linalg.solve(A.mT, x64.unsqueeze(-1)).squeeze(-1)
    for fn, exp in [
        (group.matvec, exp_mv),
        (group.tmatvec, exp_tmv),
        (group.solve, exp_solve),
        (group.tsolve, exp_tsolve),
    ]:
        got = fn(a, x)
        assert got.shape == x.shape, (fn.__name__, got.shape, x.shape)
        assert got.dtype == x.dtype
        assert rel(got, exp) < tol, (fn.__name__, rel(got, exp))


@pytest.mark.parametrize("xshape", ["d", "nd", "batched"])
def test_vector_ops_match_dense(group, xshape):
    d = group.dim
    if xshape == "batched":
        a, _ = _elements(group, (3,), seed=5)
        x = torch.randn(3, d, generator=gen(6), dtype=torch.float64)
    else:
        a, _ = _elements(group, (), seed=5)
        shape = (d,) if xshape == "d" else (4, d)
        x = torch.randn(shape, generator=gen(6), dtype=torch.float64)
    _check_vector_ops(group, a, x, 1e-10)


def test_vector_ops_multi_batch_x(group):
    """x of shape (2, 4, d) against one element: every vector is transformed."""
    a, _ = _elements(group, (), seed=7)
    x = torch.randn(2, 4, group.dim, generator=gen(8), dtype=torch.float64)
    _check_vector_ops(group, a, x, 1e-10)


@pytest.mark.parametrize("batch_shape", [(), (3,)], ids=["single", "batched"])
def test_gram_is_a_a_transpose_where_the_pattern_holds_it(group, pattern, batch_shape):
    """``gram(A)`` is ``A A^T`` in compact form exactly when the pattern (written out here) holds
    ``A A^T`` of a generic element, and ``None`` otherwise; its padding slots stay zero."""
    a, _ = _elements(group, batch_shape, seed=11)
    dense = group.to_dense(a)
    aat = dense @ dense.mT
    closed = bool((aat[..., ~pattern].abs() < 1e-12).all())
    gram = group.gram(a)
    assert (gram is not None) == closed, f"{group!r}: A A^T in the pattern: {closed}"
    if gram is None:
        return
    assert gram.shape == a.shape
    assert rel(group.to_dense(gram), aat) < 1e-12
    assert torch.equal(group.restrict(group.to_dense(gram)), gram)  # nothing hides in padding
    x = torch.randn(batch_shape + (group.dim,), generator=gen(12), dtype=torch.float64)
    assert rel(group.matvec(gram, x), (aat @ x.unsqueeze(-1)).squeeze(-1)) < 1e-12


def test_solve_inverts_matvec(group):
    a, _ = _elements(group, (), seed=9)
    x = torch.randn(5, group.dim, generator=gen(10), dtype=torch.float64)
    assert rel(group.solve(a, group.matvec(a, x)), x) < 1e-10
    assert rel(group.tsolve(a, group.tmatvec(a, x)), x) < 1e-10
    assert rel(group.matvec(a, group.solve(a, x)), x) < 1e-10


@pytest.mark.parametrize("batch_shape", [(), (3,)], ids=["single", "batched"])
def test_logdet_and_diagonal_match_dense(group, batch_shape):
    a, _ = _elements(group, batch_shape, seed=11)
    A = group.to_dense(a)
    ld = group.logdet(a)
    assert ld.shape == torch.Size(batch_shape)
    assert rel(ld, torch.linalg.slogdet(A)[1]) < 1e-10
    dg = group.diagonal(a)
    assert dg.shape == torch.Size(batch_shape) + (group.dim,)
    assert torch.equal(dg, A.diagonal(dim1=-2, dim2=-1))


def test_logdet_of_negative_diagonal_is_log_abs_det(group):
    v = torch.tensor([(-1.0) ** i * (0.5 + 0.25 * i) for i in range(group.dim)], dtype=torch.float64)
    a = group.from_diagonal(v)
    assert abs(group.logdet(a).item() - v.abs().log().sum().item()) < 1e-12


def test_inverse_is_in_the_group(group, pattern):
    """Closure under inverse (MATH §3): A^{-1} built column by column keeps the pattern."""
    a, _ = _elements(group, (), seed=12)
    inv = group.solve(a, torch.eye(group.dim, dtype=torch.float64)).mT  # rows are A^-1 e_i -> transpose
    A = group.to_dense(a)
    assert rel(inv, torch.linalg.inv(A)) < 1e-10
    if (~pattern).any():
        assert inv[~pattern].abs().max().item() <= 1e-12 * inv.abs().max().item()


# ------------------------------------------------------------------- 2. closure
def test_product_closed_exactly(group, pattern):
    a, b = _elements(group, (), seed=13)
    prod = group.to_dense(a) @ group.to_dense(b)
    assert torch.all(prod[~pattern] == 0)
    assert torch.all(group.to_dense(group.mul(a, b))[~pattern] == 0)


def test_h_of_projection_closed_exactly(group, pattern):
    x = torch.randn(group.dim, group.dim, generator=gen(14), dtype=torch.float64)
    m = group.project(x)
    e = group.to_dense(group.h(m))
    assert torch.all(e[~pattern] == 0)
    md = group.to_dense(m)
    eye = torch.eye(group.dim, dtype=torch.float64)
    assert (e - (eye + md + md @ md / 2)).abs().max().item() < 1e-12


def test_h_equals_polynomial_for_generic_compact_m(group, pattern):
    """h(M) = I + M + M^2/2 for any compact M (not only projected, symmetric-block ones)."""
    m = group.restrict(torch.randn(3, group.dim, group.dim, generator=gen(15), dtype=torch.float64))
    e = group.to_dense(group.h(m))
    md = group.to_dense(m)
    eye = torch.eye(group.dim, dtype=torch.float64)
    assert (e - (eye + md + md @ md / 2)).abs().max().item() < 1e-12
    assert torch.all(e[..., ~pattern] == 0)


def test_expm_is_a_deprecated_alias_of_h(group):
    m = group.restrict(torch.randn(group.dim, group.dim, generator=gen(16), dtype=torch.float64))
    with pytest.warns(DeprecationWarning, match="MatrixGroup.h"):
        old = group.expm(m)
    assert torch.equal(old, group.h(m))


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_exp_is_the_matrix_exponential_and_stays_in_the_group(group, pattern, scale):
    """``exp`` of a projected algebra element equals scipy's dense ``expm`` (independent Padé)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    x = torch.randn(group.dim, group.dim, generator=gen(17), dtype=torch.float64)
    m = scale * group.project(x + x.mT) / group.dim**0.5
    e = group.exp(m)
    ref = torch.from_numpy(scipy_linalg.expm(group.to_dense(m).numpy()))
    assert rel(group.to_dense(e), ref) < 1e-12
    assert torch.equal(group.restrict(group.to_dense(e)), e)  # padding slots stay zero
    assert torch.all(group.to_dense(e)[~pattern] == 0)


def test_inverse_fisher_weights_are_half_on_symmetric_entries_one_on_free(group, pattern):
    """``C``: 1/2 where the entry's transpose is also in the pattern (diagonal, symmetric dense
    blocks), 1 where it is not (free triangular / coupling entries), 0 off the pattern."""
    expected = torch.where(pattern & pattern.T, 0.5, torch.where(pattern, 1.0, 0.0)).double()
    weights = group.inverse_fisher_weights(torch.float64)
    assert torch.equal(group.to_dense(weights), expected)
    x = torch.randn(group.dim, group.dim, generator=gen(18), dtype=torch.float64)
    x = x + x.mT
    assert rel(weights * group.restrict(x), group.project(x)) < 1e-15
    free = int(pattern.sum()) - int((pattern & pattern.T & ~torch.eye(group.dim, dtype=torch.bool)).sum()) // 2
    assert group.algebra_dim == free


def test_outer_is_the_pattern_of_the_weighted_sum(group):
    z = torch.randn(5, group.dim, generator=gen(19), dtype=torch.float64)
    w = torch.randn(5, generator=gen(20), dtype=torch.float64)
    dense = sum(w[k] * torch.outer(z[k], z[k]) for k in range(5))
    assert rel(group.to_dense(group.outer(z, w)), group.to_dense(group.restrict(dense))) < 1e-14
    assert rel(group.outer(z), group.restrict(z.mT @ z)) < 1e-14


def test_congruence_is_the_pattern_of_the_sandwich(group):
    """``congruence(A, M A, alpha, beta) = restrict(A^T (alpha M + beta I) A)`` with the traces
    ``tr(A^T M A)``, ``tr(A^T A)`` of ``congruence_terms``, for symmetric ``M``."""
    a = group.random(gen(22), dtype=torch.float64)
    m = torch.randn(group.dim, group.dim, generator=gen(23), dtype=torch.float64)
    m = m + m.mT
    dense = group.to_dense(a)
    ma, tr_m, tr_i = group.congruence_terms(a, m)
    assert rel(tr_m, torch.trace(dense.mT @ m @ dense)) < 1e-14 and rel(tr_i, torch.trace(dense.mT @ dense)) < 1e-14
    expected = dense.mT @ (0.7 * m + 0.3 * torch.eye(group.dim, dtype=torch.float64)) @ dense
    assert rel(group.congruence(a, ma, 0.7, 0.3), group.restrict(expected)) < 1e-14
    # congruence_statistic keeps all that these read of sum_k z_k z_k^T
    z = torch.randn(7, group.dim, generator=gen(24), dtype=torch.float64)
    full, part = group.congruence_terms(a, z.mT @ z), group.congruence_terms(a, group.congruence_statistic(z))
    assert rel(part[1], full[1]) < 1e-14 and rel(part[2], full[2]) < 1e-14
    assert rel(group.congruence(a, part[0], 0.7, 0.3), group.congruence(a, full[0], 0.7, 0.3)) < 1e-14
    assert rel(group.congruence_statistic(z).diagonal(), (z * z).sum(0)) < 1e-14


def test_row_and_column_square_norms(group):
    a = group.random(gen(21), dtype=torch.float64)
    dense = group.to_dense(a)
    assert rel(group.row_sq_norms(a), (dense @ dense.mT).diagonal()) < 1e-14
    assert rel(group.col_sq_norms(a), (dense.mT @ dense).diagonal()) < 1e-14


def test_long_run_keeps_structure_exactly(group, pattern):
    d = group.dim
    steps = 1000
    g = gen(16)
    xs = torch.randn(steps, d, d, generator=g, dtype=torch.float64)
    xs = 0.5 * (xs + xs.mT)
    b = group.random(generator=gen(160), dtype=torch.float64)
    for t in range(steps):
        b = group.mul(b, group.h(-0.01 * group.project(xs[t])))
    bd = group.to_dense(b)
    assert torch.all(bd[~pattern] == 0)
    assert torch.equal(group.restrict(bd), b)
    ld = group.logdet(b)
    assert torch.isfinite(ld)
    assert rel(ld, torch.linalg.slogdet(bd)[1]) < 1e-8


def test_long_run_matches_dense_recurrence(group, pattern):
    d = group.dim
    steps = 100
    xs = torch.randn(steps, d, d, generator=gen(17), dtype=torch.float64)
    xs = 0.5 * (xs + xs.mT)
    b = group.random(generator=gen(18), dtype=torch.float64)
    ref = group.to_dense(b)
    eye = torch.eye(d, dtype=torch.float64)
    for t in range(steps):
        m = group.project(xs[t])
        b = group.mul(b, group.h(-0.05 * m))
        md = -0.05 * group.to_dense(m)
        ref = ref @ (eye + md + md @ md / 2)
    assert rel(group.to_dense(b), ref) < 1e-10
    assert torch.all(ref[~pattern] == 0)


# ------------------------------------------------------ 3. projection = Fisher oracle
def fisher_oracle(group, pattern, x):
    """pinv(F) g in the compact coordinates (MATH §1.3), returned as a dense matrix."""
    slots, positions = compact_basis(group, pattern)
    d = group.dim
    n = len(positions)
    E = torch.zeros(n, d, d, dtype=torch.float64)
    for c, (i, j) in enumerate(positions):
        E[c, i, j] = 1.0
    S = E + E.mT
    F = 0.5 * torch.einsum("cij,eij->ce", S, S)
    g = torch.einsum("ij,cij->c", x, E)
    nat = torch.linalg.pinv(F, hermitian=True) @ g
    return torch.einsum("c,cij->ij", nat, E), F


def test_project_equals_fisher_oracle(group, pattern):
    for seed in (19, 20):
        x = torch.randn(group.dim, group.dim, generator=gen(seed), dtype=torch.float64)
        expected, _ = fisher_oracle(group, pattern, x)
        got = group.project(x)
        assert tuple(got.shape) == tuple(group.shape)
        assert rel(group.to_dense(got), expected) < 1e-10
        # the compact result is the canonical one (no hidden entries off the pattern)
        assert torch.equal(group.restrict(group.to_dense(got)), got)


def test_project_satisfies_natural_gradient_equation(group, pattern):
    """F n = P_range(F) g coordinate by coordinate: (N + N^T)_ij equals X_ij on free entries
    (transpose not in the algebra) and sym(X)_ij where both (i, j) and (j, i) are."""
    x = torch.randn(group.dim, group.dim, generator=gen(21), dtype=torch.float64)
    n = group.to_dense(group.project(x))
    s = n + n.mT
    both = pattern & pattern.mT
    free = pattern & ~pattern.mT
    assert (s[both] - (0.5 * (x + x.mT))[both]).abs().max().item() < 1e-14
    if free.any():
        assert (s[free] - x[free]).abs().max().item() < 1e-14
    assert torch.all(n[~pattern] == 0)


def test_project_kills_skew_on_dense_blocks(group, pattern):
    x = torch.randn(group.dim, group.dim, generator=gen(22), dtype=torch.float64)
    skew = x - x.mT
    n = group.to_dense(group.project(skew))
    both = pattern & pattern.mT  # entries whose transpose is also in the algebra
    assert n[both].abs().max().item() < 1e-15
    free = pattern & ~pattern.mT
    assert torch.equal(n[free], skew[free])


def test_project_batched_and_linear(group):
    xs = torch.randn(3, group.dim, group.dim, generator=gen(23), dtype=torch.float64)
    pb = group.project(xs)
    assert tuple(pb.shape) == (3,) + tuple(group.shape)
    for i in range(3):
        assert rel(pb[i], group.project(xs[i])) < 1e-15
    lin = group.project(2.0 * xs[0] - 3.0 * xs[1])
    assert rel(lin, 2.0 * pb[0] - 3.0 * pb[1]) < 1e-13


def test_project_identity_and_trace(group):
    d = group.dim
    eye = torch.eye(d, dtype=torch.float64)
    assert torch.equal(group.to_dense(group.project(2.0 * eye)), eye)
    assert torch.equal(group.project(2.0 * eye), group.identity(dtype=torch.float64))
    x = torch.randn(d, d, generator=gen(24), dtype=torch.float64)
    xs = 0.5 * (x + x.mT)
    tr = torch.diagonal(group.to_dense(group.project(2.0 * xs))).sum()
    assert abs(tr.item() - torch.trace(xs).item()) < 1e-12


# ----------------------------------------------------------------- 4. pullback
@pytest.mark.parametrize("batch_shape", [(), (3,)], ids=["single", "batched"])
def test_pullback_matches_dense(group, batch_shape):
    d = group.dim
    b = group.random(generator=gen(25), dtype=torch.float64, batch_shape=batch_shape)
    grad = group.restrict(torch.randn(batch_shape + (d, d), generator=gen(26), dtype=torch.float64))
    got = group.pullback(b, grad)
    expected = group.project(group.to_dense(b).mT @ group.to_dense(grad))
    assert got.shape == expected.shape
    assert (group.to_dense(got) - group.to_dense(expected)).abs().max().item() < 1e-12
    assert torch.equal(group.restrict(group.to_dense(got)), got)


def test_pullback_is_the_local_gradient(group, pattern):
    """Chain rule: for L(B) = <W, B>, the local gradient at M=0 of L(B h(M)) is B^T W on
    the pattern, so pullback must equal the Fisher oracle applied to B^T W."""
    d = group.dim
    b = group.random(generator=gen(27), dtype=torch.float64)
    w = torch.randn(d, d, generator=gen(28), dtype=torch.float64)
    grad = group.restrict(w)  # dL/dB in compact form (only pattern entries are coordinates)
    m = torch.zeros(group.shape, dtype=torch.float64, requires_grad=True)
    loss = (group.to_dense(group.mul(b, group.h(m))) * w).sum()
    (gm,) = torch.autograd.grad(loss, m)
    local = group.to_dense(gm)  # d L / d M on the pattern
    expected, _ = fisher_oracle(group, pattern, local)
    assert rel(group.to_dense(group.pullback(b, grad)), expected) < 1e-10


# --------------------------------------------------------------- 5. construction
def test_identity_and_from_diagonal(group):
    d = group.dim
    eye = group.identity(dtype=torch.float64)
    assert tuple(eye.shape) == tuple(group.shape)
    assert torch.equal(group.to_dense(eye), torch.eye(d, dtype=torch.float64))
    v = torch.arange(1, d + 1, dtype=torch.float64) * 0.7 - 2.0
    a = group.from_diagonal(v)
    assert torch.equal(group.to_dense(a), torch.diag(v))
    assert torch.equal(group.diagonal(a), v)
    vb = torch.randn(3, d, generator=gen(29), dtype=torch.float64)
    ab = group.from_diagonal(vb)
    assert tuple(ab.shape) == (3,) + tuple(group.shape)
    assert torch.equal(group.to_dense(ab), torch.diag_embed(vb))
    # identity is neutral for the product
    a2, _ = _elements(group, (), seed=30)
    assert torch.equal(group.to_dense(group.mul(eye, a2)), group.to_dense(a2))
    assert torch.equal(group.to_dense(group.mul(a2, eye)), group.to_dense(a2))
    assert torch.equal(group.h(torch.zeros_like(a2)), eye)


def test_random_deterministic(group):
    a1 = group.random(generator=gen(31), dtype=torch.float64)
    a2 = group.random(generator=gen(31), dtype=torch.float64)
    a3 = group.random(generator=gen(32), dtype=torch.float64)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)
    b1 = group.random(generator=gen(31), dtype=torch.float64, batch_shape=(2, 3))
    assert tuple(b1.shape) == (2, 3) + tuple(group.shape)
    assert not torch.equal(b1[0, 0], b1[0, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_kept(group, dtype):
    d = group.dim
    dev = torch.device("cpu")
    assert group.identity(dtype=dtype, device=dev).dtype == dtype
    assert group.identity(dtype=dtype, device=dev).device == dev
    assert group.mask(dtype=dtype).dtype == dtype
    a = group.random(generator=gen(33), dtype=dtype, device=dev)
    b = group.random(generator=gen(34), dtype=dtype, device=dev)
    assert a.dtype == dtype and a.device == dev
    x = torch.randn(d, generator=gen(35), dtype=dtype)
    g = torch.randn(d, d, generator=gen(36), dtype=dtype)
    outs = [
        group.from_diagonal(torch.ones(d, dtype=dtype)),
        group.to_dense(a),
        group.restrict(g),
        group.mul(a, b),
        group.h(group.project(g)),
        group.project(g),
        group.pullback(a, group.restrict(g)),
        group.matvec(a, x),
        group.tmatvec(a, x),
        group.solve(a, x),
        group.tsolve(a, x),
        group.logdet(a),
        group.diagonal(a),
    ]
    for i, o in enumerate(outs):
        assert o.dtype == dtype, (i, o.dtype)
        assert o.device == dev


def test_default_dtype_used_when_none(group):
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert group.random(generator=gen(37)).dtype == torch.float64
        assert group.identity().dtype == torch.float64
    finally:
        torch.set_default_dtype(old)
    assert group.identity().dtype == old


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_kept(group):
    dev = torch.device("cuda")
    a = group.random(generator=torch.Generator(device=dev).manual_seed(0), dtype=torch.float64, device=dev)
    x = torch.randn(group.dim, dtype=torch.float64, device=dev)
    assert a.device.type == "cuda"
    assert group.identity(dtype=torch.float64, device=dev).device.type == "cuda"
    for o in (group.mul(a, a), group.solve(a, x), group.tsolve(a, x), group.logdet(a)):
        assert o.device.type == "cuda"
    A = group.to_dense(a)
    assert rel(group.solve(a, x), torch.linalg.solve(A, x)) < 1e-10


# --------------------------------------------------------------------- 6. make()
ALL_NAMES = [
    "dense",
    "diagonal",
    "lower_triangular",
    "upper_triangular",
    "block_diagonal",
    "block_triangular",
    "heisenberg",
    "hierarchical",
]


def test_groups_registry_names():
    assert set(GROUPS) == set(ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_make_builds_every_group(name):
    d = 8
    opts = {
        "block_diagonal": {"block_size": 2},
        "block_triangular": {"k": 2},
        "heisenberg": {"k": 2},
        "hierarchical": {"k1": 2, "k2": 3},
    }.get(name, {})
    g = make(name, d, **opts)
    assert isinstance(g, GROUPS[name])
    assert g.dim == d
    assert g.name == name
    assert torch.equal(g.to_dense(g.identity(dtype=torch.float64)), torch.eye(d, dtype=torch.float64))
    # same structure, same group; make() passes an existing group through
    assert make(name, d, **opts) == g
    assert make(g, d) is g
    with pytest.raises(ValueError):
        make(g, d + 1)


def test_heisenberg_k2_defaults_to_k():
    g = make("heisenberg", 9, k=2)
    assert torch.equal(g.mask().bool(), expected_pattern("heisenberg", 9, {"k": 2, "k2": 2}))


def test_make_unknown_name_lists_allowed():
    with pytest.raises(ValueError) as err:
        make("toeplitz", 5)
    msg = str(err.value)
    assert "toeplitz" in msg
    for name in ALL_NAMES:
        assert name in msg


@pytest.mark.parametrize(
    "name, d, opts, words",
    [
        ("block_triangular", 6, {}, ["k"]),  # missing option
        ("block_diagonal", 6, {}, ["block_size"]),
        ("hierarchical", 6, {"k1": 2}, ["k2"]),
        ("diagonal", 6, {"k": 2}, ["k"]),  # unexpected option
        ("block_triangular", 6, {"kk": 2}, ["k"]),
        ("block_triangular", 6, {"k": 6}, ["k", "6"]),  # k >= d
        ("block_triangular", 6, {"k": 9}, ["k", "6"]),
        ("block_triangular", 6, {"k": 0}, ["k"]),
        ("block_diagonal", 6, {"block_size": 4}, ["block_size", "6"]),  # does not divide d
        ("block_diagonal", 7, {"block_size": 2}, ["block_size", "7"]),
        ("block_diagonal", 6, {"block_size": 0}, ["block_size"]),
        ("heisenberg", 6, {"k": 6}, ["k", "6"]),
        ("heisenberg", 6, {"k": 3}, ["k", "6"]),  # k + k2 (= k) >= d
        ("heisenberg", 6, {"k": 2, "k2": 4}, ["k", "6"]),
        ("hierarchical", 6, {"k1": 3, "k2": 3}, ["k1", "6"]),
        ("hierarchical", 6, {"k1": 4, "k2": 2}, ["k1", "6"]),
        ("hierarchical", 6, {"k1": 2, "k2": 6}, ["k2", "6"]),
    ],
)
def test_make_rejects_impossible_options(name, d, opts, words):
    with pytest.raises(ValueError) as err:
        make(name, d, **opts)
    msg = str(err.value)
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize(
    "name, opts, both",
    [
        ("heisenberg", {"k": 3, "k2": 3}, ("k", "k2")),
        ("heisenberg", {"k": 2, "k2": 4}, ("k", "k2")),
        ("hierarchical", {"k1": 4, "k2": 2}, ("k1", "k2")),
    ],
)
def test_make_sum_constraint_message_names_both_options(name, opts, both):
    """When k + k2 >= d the message should name both options involved."""
    with pytest.raises(ValueError) as err:
        make(name, 6, **opts)
    msg = str(err.value)
    assert "6" in msg, msg
    for w in both:  # e.g. "k + k2 < dim": both names appear as words
        assert w in msg.replace(",", " ").replace("=", " ").split(), (w, msg)


def test_make_rejects_bad_dim():
    with pytest.raises(ValueError):
        make("dense", 0)
    with pytest.raises(ValueError):
        make("diagonal", -3)


# ------------------------------------------------------------ 7. compact storage
def test_storage_is_compact():
    d = 1000
    assert make("diagonal", d).numel() == d
    assert make("block_diagonal", d, block_size=4).numel() == d * 4
    assert make("block_diagonal", d, block_size=10).numel() == d * 10
    for name, opts, k in [
        ("block_triangular", {"k": 5}, 5),
        ("heisenberg", {"k": 5}, 10),
        ("heisenberg", {"k": 3, "k2": 5}, 8),
        ("hierarchical", {"k1": 5, "k2": 5}, 10),
        ("hierarchical", {"k1": 2, "k2": 3}, 5),
    ]:
        n = make(name, d, **opts).numel()
        assert n < 20 * d, (name, n)
        assert n <= 2 * (k + 1) * d, (name, n)
    # exact counts from the block structure
    assert make("block_triangular", d, k=5).numel() == 25 + 5 * (d - 5) + (d - 5)
    k, k2 = 3, 5
    assert make("heisenberg", d, k=k, k2=k2).numel() == (
        k * k + k2 * k2 + (d - k - k2) + k * (d - k) + (d - k - k2) * k2
    )
    k1, k2 = 2, 3
    assert make("hierarchical", d, k1=k1, k2=k2).numel() == (
        k1 * k1 + k2 * k2 + (d - k1 - k2) + k1 * (d - k1) + k2 * (d - k1 - k2)
    )


def test_storage_matches_pattern_size(group, pattern):
    """No group except the triangular ones and a ragged block-diagonal (its last block is
    stored padded to b x b) stores anything beyond its pattern."""
    if group.name in ("lower_triangular", "upper_triangular"):
        assert group.numel() <= group.dim * group.dim
    elif getattr(group, "padding", 0):
        b, r = group.block_size, group.block_size - group.padding
        assert group.numel() == int(pattern.sum()) + b * b - r * r
    else:
        assert group.numel() == int(pattern.sum())
    assert tuple(group.random(generator=gen(38), dtype=torch.float64).shape) == tuple(group.shape)


def test_large_block_triangular_ops_are_exact_and_cheap():
    """d = 2000, k = 4: the compact operations agree with the structure without d x d work."""
    d, k = 2000, 4
    g = make("block_triangular", d, k=k)
    a = g.random(generator=gen(39), dtype=torch.float64)
    x = torch.randn(d, generator=gen(40), dtype=torch.float64)
    # B = [[A, C], [0, D]]: B x and B^-1 x by blocks
    A = g.to_dense(a)[:k, :k]
    C = g.to_dense(a)[:k, k:]
    D = g.diagonal(a)[k:]
    y = g.matvec(a, x)
    assert rel(y[:k], A @ x[:k] + C @ x[k:]) < 1e-12
    assert rel(y[k:], D * x[k:]) < 1e-12
    assert rel(g.solve(a, y), x) < 1e-10
    assert rel(g.logdet(a), torch.linalg.slogdet(A)[1] + D.abs().log().sum()) < 1e-12


def test_block_triangular_induced_covariance():
    """MATH §3: Sigma = U^T U + diag(0_k, D^-2), U = A^-1 [I_k, -C D^-1]."""
    d, k = 8, 2
    g = make("block_triangular", d, k=k)
    b = g.random(generator=gen(41), dtype=torch.float64, scale=0.6)
    B = g.to_dense(b)
    A, C, D = B[:k, :k], B[:k, k:], torch.diagonal(B)[k:]
    U = torch.linalg.solve(A, torch.cat([torch.eye(k, dtype=torch.float64), -C / D], 1))
    extra = torch.diag(torch.cat([torch.zeros(k, dtype=torch.float64), D**-2]))
    sigma = torch.linalg.inv(B @ B.mT)
    assert rel(U.mT @ U + extra, sigma) < 1e-12


# ------------------------------------------------------------------ 8. float32
def test_float32_agreement(group):
    d = group.dim
    a = group.random(generator=gen(42), dtype=torch.float32, scale=0.5)
    b = group.random(generator=gen(43), dtype=torch.float32, scale=0.5)
    A64 = group.to_dense(a).double()
    B64 = group.to_dense(b).double()
    assert rel(group.to_dense(group.mul(a, b)), A64 @ B64) < 1e-4
    for x in (
        torch.randn(d, generator=gen(44), dtype=torch.float32),
        torch.randn(4, d, generator=gen(45), dtype=torch.float32),
    ):
        _check_vector_ops(group, a, x, 1e-4)
    ab = group.random(generator=gen(46), dtype=torch.float32, batch_shape=(3,), scale=0.5)
    _check_vector_ops(group, ab, torch.randn(3, d, generator=gen(47), dtype=torch.float32), 1e-4)
    assert rel(group.logdet(a), torch.linalg.slogdet(A64)[1]) < 1e-4
    assert rel(group.diagonal(a), A64.diagonal()) < 1e-6
    x = torch.randn(d, d, generator=gen(48), dtype=torch.float32)
    assert rel(group.project(x), group.project(x.double())) < 1e-6
    m = group.project(x)
    md = group.to_dense(m).double()
    eye = torch.eye(d, dtype=torch.float64)
    assert rel(group.to_dense(group.h(m)), eye + md + md @ md / 2) < 1e-4
    grad = group.restrict(x)
    assert rel(group.pullback(a, grad), group.pullback(a.double(), grad.double())) < 1e-4
