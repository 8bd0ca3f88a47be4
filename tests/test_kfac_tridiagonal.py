"""KFAC's block-tridiagonal inverse against dense float64 constructions with ``torch.kron``.

Gradient matrices are ``(d_out, d_in)`` and vectorized column-major, so ``(A ⊗ G) vec(V) = vec(G V A^T)``.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structngd.kron import KFAC
from structngd.kron.tridiagonal import generalized_eigh, inverse_apply, link


def vec(m):
    return m.mT.reshape(-1)


def unvec(v, shape):
    return v.reshape(shape[1], shape[0]).mT


def chain_statistics(d_in=(3, 4, 2), d_out=(2, 3, 4), n=60, seed=0):
    """``A_i``, ``G_i``, ``A_{i,i+1}``, ``G_{i,i+1}`` of correlated per-example rows (a valid joint)."""
    gen = torch.Generator().manual_seed(seed)

    def rows(dims):
        out = [torch.randn(n, dims[0], generator=gen, dtype=torch.float64)]
        for d in dims[1:]:
            mix = torch.randn(out[-1].shape[1], d, generator=gen, dtype=torch.float64)
            out.append(torch.tanh(out[-1] @ mix) + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64))
        return out

    a, g = rows(d_in), rows(d_out)
    second = [[x.T @ y / n for x, y in zip(r, r)] for r in (a, g)]
    cross = [[x.T @ y / n for x, y in zip(r, r[1:])] for r in (a, g)]
    return second[0], second[1], cross[0], cross[1]


def dense_inverse(A, G, Ax, Gx):
    """``Xi^T Lambda Xi`` built with ``torch.kron``."""
    F_ii = [torch.kron(a, g) for a, g in zip(A, G)]
    psi = [torch.kron(ax @ torch.linalg.inv(a), gx @ torch.linalg.inv(g)) for ax, gx, a, g in zip(Ax, Gx, A[1:], G[1:])]
    sigmas = [f - p @ f_next @ p.T for f, p, f_next in zip(F_ii, psi, F_ii[1:])] + [F_ii[-1]]
    sizes = [f.shape[0] for f in F_ii]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    xi, lam = torch.eye(offsets[-1], dtype=torch.float64), torch.zeros(offsets[-1], offsets[-1], dtype=torch.float64)
    for i, s in enumerate(sigmas):
        lam[offsets[i]:offsets[i + 1], offsets[i]:offsets[i + 1]] = torch.linalg.inv(s)
    for i, p in enumerate(psi):
        xi[offsets[i]:offsets[i + 1], offsets[i + 1]:offsets[i + 2]] = -p
    return xi.T @ lam @ xi, offsets


def factored_apply(A, G, Ax, Gx, grads):
    links = [link(a, g, ax, gx, torch.linalg.inv(a2), torch.linalg.inv(g2))
             for a, g, ax, gx, a2, g2 in zip(A, G, Ax, Gx, A[1:], G[1:])]
    return inverse_apply(links, torch.linalg.inv(A[-1]), torch.linalg.inv(G[-1]), grads)


def random_grads(A, G, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(g.shape[0], a.shape[0], generator=gen, dtype=torch.float64) for a, g in zip(A, G)]


def test_generalized_eigh_whitens_a_and_diagonalizes_b():
    A, _, Ax, _ = chain_statistics()
    b = Ax[0] @ torch.linalg.inv(A[1]) @ Ax[0].T
    k, s = generalized_eigh(A[0], b)
    torch.testing.assert_close(k.T @ A[0] @ k, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(k.T @ b @ k, torch.diag(s), rtol=0, atol=1e-12)
    assert (s >= -1e-12).all() and (s < 1).all()  # B = A_{12} A_2^{-1} A_21 <= A_1 for a valid joint


@pytest.mark.parametrize("layers", [2, 3, 4])
def test_factored_application_equals_dense_xi_t_lambda_xi(layers):
    A, G, Ax, Gx = chain_statistics(d_in=(3, 4, 2, 3)[:layers], d_out=(2, 3, 4, 2)[:layers])
    grads = random_grads(A, G)
    dense, offsets = dense_inverse(A, G, Ax, Gx)
    expected = dense @ torch.cat([vec(v) for v in grads])
    for i, (got, v) in enumerate(zip(factored_apply(A, G, Ax, Gx, grads), grads)):
        assert got.shape == v.shape
        torch.testing.assert_close(vec(got), expected[offsets[i]:offsets[i + 1]], rtol=1e-10, atol=1e-10)


def ggm_completion(A, G, Ax, Gx):
    """The matrix with ``A_i ⊗ G_i`` on the diagonal, ``A_{i,i+1} ⊗ G_{i,i+1}`` beside it and, farther out,
    the Gaussian graphical model's ``F_ij = F_{i,i+1} F_{i+1,i+1}^{-1} F_{i+1,j}``."""
    L = len(A)
    blocks = {(i, i): torch.kron(A[i], G[i]) for i in range(L)}
    blocks.update({(i, i + 1): torch.kron(Ax[i], Gx[i]) for i in range(L - 1)})
    for gap in range(2, L):
        for i in range(L - gap):
            j = i + gap
            blocks[i, j] = blocks[i, i + 1] @ torch.linalg.solve(blocks[i + 1, i + 1], blocks[i + 1, j])
    rows = [torch.cat([blocks[i, j] if i <= j else blocks[j, i].T for j in range(L)], 1) for i in range(L)]
    return torch.cat(rows, 0)


@pytest.mark.parametrize("layers", [3, 4])
def test_it_is_the_exact_inverse_of_the_block_tridiagonal_kronecker_approximation(layers):
    A, G, Ax, Gx = chain_statistics(d_in=(3, 4, 2, 3)[:layers], d_out=(2, 3, 4, 2)[:layers], seed=3)
    full = ggm_completion(A, G, Ax, Gx)
    dense, offsets = dense_inverse(A, G, Ax, Gx)
    torch.testing.assert_close(dense @ full, torch.eye(full.shape[0], dtype=torch.float64), rtol=0, atol=1e-9)
    far = dense[offsets[0]:offsets[1], offsets[2]:offsets[3]]  # the inverse is block-tridiagonal
    assert far.abs().max() < 1e-9 * dense.abs().max()
    grads = random_grads(A, G, seed=4)
    expected = torch.linalg.solve(full, torch.cat([vec(v) for v in grads]))
    got = torch.cat([vec(v) for v in factored_apply(A, G, Ax, Gx, grads)])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # and it is not KFAC's block-diagonal inverse: the cross-moments matter
    diagonal = torch.cat([vec(torch.linalg.solve(g, v) @ torch.linalg.inv(a)) for a, g, v in zip(A, G, grads)])
    assert (got - diagonal).norm() > 0.1 * got.norm()


# ------------------------------------------------------------- end to end
def mlp(seed=0, sizes=(4, 5, 6, 3)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).double()


def data(n=32, seed=1, features=4, classes=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def rows_of(model, x, y):
    """Independently: every Linear's inputs ``(a, 1)`` and per-example output gradients."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    ins, outs, h = [], [], x
    for m in model:
        if isinstance(m, nn.Linear):
            ins.append(torch.cat([h, torch.ones(len(x), 1, dtype=x.dtype)], 1))
            h = m(h)
            outs.append(h)
        else:
            h = m(h)
    g = torch.autograd.grad(F.cross_entropy(h, y, reduction="sum"), outs)
    assert len(linears) == len(g)
    return [a.detach() for a in ins], list(g)


def dense_preconditioned(pre, grads, damping):
    """``F_hat^{-1} vec(dW)`` densely from the captured statistics, damped as documented."""
    A, G = [], []
    for name in pre.blocks:
        a, g = pre.state[name]["A"], pre.state[name]["G"]
        pi = math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
        A.append(a + pi * math.sqrt(damping) * torch.eye(a.shape[0], dtype=a.dtype))
        G.append(g + math.sqrt(damping) / pi * torch.eye(g.shape[0], dtype=g.dtype))
    names = list(pre.blocks)[:-1]
    dense, offsets = dense_inverse(A, G, [pre.state[n]["A_next"] for n in names], [pre.state[n]["G_next"] for n in names])
    flat = dense @ torch.cat([vec(v) for v in grads])
    return [unvec(flat[offsets[i]:offsets[i + 1]], v.shape) for i, v in enumerate(grads)]


def test_kfac_block_tridiagonal_on_an_mlp_is_the_dense_construction_from_its_statistics():
    model, damping = mlp(), 0.05
    pre = KFAC(model, inverse="block_tridiagonal", damping=damping, factor_decay=0.5, update_every=1)
    batches = [data(seed=1), data(seed=2)]
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = [layer.grad_matrix().clone() for layer in pre.layers]
        pre.step()
    # the cross-moments are the moving averages of E[a_i a_{i+1}^T], E[g_i g_{i+1}^T] (g per example)
    rows = [rows_of(model, x, y) for x, y in batches]
    names = list(pre.blocks)
    for i, name in enumerate(names[:-1]):
        for key, side in (("A_next", 0), ("G_next", 1)):
            moments = [r[side][i].T @ r[side][i + 1] / len(r[side][i]) for r in rows]
            torch.testing.assert_close(pre.state[name][key], 0.5 * moments[0] + 0.5 * moments[1], rtol=1e-12, atol=1e-12)
    expected = dense_preconditioned(pre, raw, damping)
    block_diagonal = [pre.blocks[n].state["G_inv"] @ v @ pre.blocks[n].state["A_inv"] for n, v in zip(names, raw)]
    for layer, want, diag in zip(pre.layers, expected, block_diagonal):
        torch.testing.assert_close(layer.grad_matrix(), want, rtol=1e-9, atol=1e-11)
        assert (want - diag).norm() > 1e-3 * want.norm()


def test_one_layer_chain_is_the_block_diagonal_kfac():
    x, y = data()
    results = []
    for inverse in ("block_diagonal", "block_tridiagonal"):
        model = mlp(sizes=(4, 3))
        pre = KFAC(model, inverse=inverse, update_every=1)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        results.append(model[0].weight.grad.clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


def train(pre, model, opt, steps, x, y):
    for t in range(steps):
        batch = slice(t % 4 * 8, t % 4 * 8 + 8)
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        pre.step()
        opt.step()


def test_state_dict_resumes_bit_for_bit_and_needs_the_same_inverse():
    x, y = data(n=32)
    model = mlp()
    pre = KFAC(model, inverse="block_tridiagonal", update_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(pre, model, opt, 7, x, y)
    saved = copy.deepcopy((pre.state_dict(), opt.state_dict(), model.state_dict()))
    assert {"A_next", "G_next", "psi_A", "K_G", "scale"} <= set(saved[0]["layers"]["0"])
    train(pre, model, opt, 5, x, y)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = mlp(seed=99)
    model2.load_state_dict(saved[2])
    pre2 = KFAC(model2, inverse="block_tridiagonal", update_every=3)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    pre2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    train(pre2, model2, opt2, 5, x, y)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k
    other = KFAC(mlp(seed=3), update_every=3)
    with pytest.raises(ValueError, match="block-tridiagonal"):
        other.load_state_dict(saved[0])


def test_bad_inverse_and_mismatched_rows_are_clear_errors():
    with pytest.raises(ValueError, match="inverse must be one of"):
        KFAC(mlp(), inverse="tridiagonal")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    pre = KFAC(model, inverse="block_tridiagonal", update_every=1)
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64)
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="same rows per call"):
        pre.step()
    assert pre.steps == 0 and all(not s for s in pre.state.values())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_a_failing_link_leaves_everything_as_before_and_the_retry_matches_a_twin():
    _, y = data()

    def run():
        model = mlp()
        pre = KFAC(model, inverse="block_tridiagonal", update_every=1)
        for seed in (1, 2):
            model.zero_grad()
            F.cross_entropy(model(data(seed=seed)[0]), y).backward()
            if seed == 1:
                pre.step()
        return model, pre

    model, pre = run()
    states = {name: dict(s) for name, s in pre.state.items()}
    grads = [p.grad.clone() for p in model.parameters()]
    second = pre.blocks["2"]
    second.refresh_link = lambda following, hp: (_ for _ in ()).throw(ValueError("not positive-definite"))
    with pytest.raises(ValueError, match="positive-definite"):
        pre.step()
    for name, saved in states.items():
        assert set(pre.state[name]) == set(saved)
        assert all(torch.equal(pre.state[name][k], v) for k, v in saved.items()), name
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    del second.refresh_link
    pre.step()
    twin_model, twin = run()
    twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p.grad, q.grad)
