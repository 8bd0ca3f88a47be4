"""structngd.kron: KFAC and EKFAC against Fisher blocks computed independently by autograd.

Per-example gradients come from ``torch.func`` (``vmap`` of ``grad`` of the per-example loss),
never from the library's hooks; Fisher blocks are built from them in the column-major
``vec`` convention (``(A ⊗ G) vec(X) = vec(G X A^T)``).
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from structngd.kron import EKFAC, KFAC, LocalKFAC

from helpers import DEVICES


def mlp(seed=0, sizes=(4, 5, 3), dtype=torch.float64):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def cnn(seed=0, dtype=torch.float64, stride=1, dilation=1, padding=1):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(4),
    ).to(dtype)


def per_example_grads(model, x, y):
    """``{param name: (N, *shape)}`` gradients of the per-example cross-entropy."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def weight_matrix_grads(grads, prefix):
    """Per-example ``(N, d_out, d_in)`` with the bias as the last column."""
    w, b = grads[prefix + ".weight"], grads[prefix + ".bias"]
    return torch.cat([w.reshape(w.shape[0], w.shape[1], -1), b.unsqueeze(-1)], dim=-1)


def vec(m):
    """Column-major vec of the trailing two dims."""
    return m.mT.reshape(*m.shape[:-2], -1)


def exact_fisher(gw):
    v = vec(gw)
    return v.mT @ v / v.shape[0]


def run_step(pre, model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()


def data(n=64, shape=(4,), classes=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


# ------------------------------------------------------------ the factors
def test_kfac_factors_are_the_mean_outer_products_of_inputs_and_output_gradients():
    model = mlp()
    x, y = data()
    pre = KFAC(model, factor_decay=0.0, update_every=1)
    run_step(pre, model, x, y)
    # independent: inputs by a forward pass, output gradients of per-example losses by autograd
    h = torch.tanh(model[0](x))
    outs = [model[0](x), model[2](h)]
    ins = [x, h]
    for k, (name, inp) in enumerate(zip(["0", "2"], ins)):
        a_bar = torch.cat([inp, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        torch.testing.assert_close(pre.state[name]["A"], a_bar.T @ a_bar / len(x), rtol=1e-12, atol=1e-12)
    s1 = model[0](x).detach().requires_grad_(True)
    s2 = model[2](torch.tanh(s1))
    per_example = F.cross_entropy(s2, y, reduction="none")
    g1, g2 = torch.autograd.grad(per_example.sum(), [s1, s2])
    for name, g in [("0", g1), ("2", g2)]:
        torch.testing.assert_close(pre.state[name]["G"], g.T @ g / len(x), rtol=1e-12, atol=1e-12)
    del outs


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_one_example_fisher_is_exactly_kronecker(layer_kind):
    """With one example (one output location for the dense layer) ``F = vec dW vec dW^T = A ⊗ G``."""
    model = mlp() if layer_kind == "linear" else cnn(padding=0)
    x, y = data(n=1, shape=(4,) if layer_kind == "linear" else (2, 3, 3))
    model(x)  # materialize the lazy layer
    pre = KFAC(model, factor_decay=0.0, update_every=1)
    run_step(pre, model, x, y)
    grads = per_example_grads(model, x, y)
    name = "0"  # the 3x3 conv on a 3x3 input without padding has T = 1 output location
    fisher = exact_fisher(weight_matrix_grads(grads, name))
    torch.testing.assert_close(pre.fisher_block(name), fisher, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stride,dilation,padding", [(1, 1, 1), (2, 1, 0), (1, 2, 2), (2, 1, "valid"), (1, 1, "same")])
def test_kfc_rows_reproduce_per_example_conv_gradients(stride, dilation, padding):
    """``sum_t g_{n,t} a_bar_{n,t}^T`` from the captured rows equals autograd's per-example gradient."""
    model = cnn(stride=1 if padding == "same" else stride, dilation=dilation, padding=padding)
    x, y = data(n=5, shape=(2, 7, 7))
    model(x)  # materialize the lazy layer
    pre = EKFAC(model, factor_decay=0.0, update_every=1)
    captured = {}
    pre.capture.on_rows = lambda layer, a, g: captured.setdefault(layer.name, (a, g))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    a, g = captured["0"]
    rebuilt = torch.einsum("nto,nti->noi", g, a)  # rows carry the batch-size scale
    grads = per_example_grads(model, x, y)
    torch.testing.assert_close(rebuilt.to(torch.float64), weight_matrix_grads(grads, "0"), rtol=1e-6, atol=1e-6)


def test_kfac_preconditioned_gradient_is_the_damped_kronecker_solve():
    model = mlp(sizes=(4, 6, 5, 3))
    x, y = data(n=32)
    damping = 1e-2
    pre = KFAC(model, damping=damping, factor_decay=0.0, update_every=1)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = {layer.name: layer.grad_matrix().clone() for layer in pre.layers}
    pre.step()
    for layer in pre.layers:
        a, g = pre.state[layer.name]["A"], pre.state[layer.name]["G"]
        pi = math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
        dense = torch.kron(a + pi * math.sqrt(damping) * torch.eye(a.shape[0], dtype=a.dtype),
                           g + math.sqrt(damping) / pi * torch.eye(g.shape[0], dtype=g.dtype))
        expected = torch.linalg.solve(dense, vec(raw[layer.name]))
        torch.testing.assert_close(vec(layer.grad_matrix()), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dim", [7, 128, 256])
def test_damped_inverse_is_the_inverse_at_every_size(dim):
    """Sizes that are multiples of 128 take the padded Cholesky on the CPU: same inverse."""
    from structngd.kron.kfac import damped_inverse

    g = torch.Generator().manual_seed(dim)
    x = torch.randn(dim + 3, dim, generator=g, dtype=torch.float64)
    inverse = damped_inverse(x.T @ x, 0.1)
    assert inverse.shape == (dim, dim)
    eye = torch.eye(dim, dtype=torch.float64)
    torch.testing.assert_close(inverse @ (x.T @ x + 0.1 * eye), eye, rtol=0, atol=1e-10)


def test_kfac_with_vanishing_damping_solves_with_a_kron_g():
    """On the hidden layer (the softmax layer's ``G`` is singular: its output gradients sum
    to zero over the classes, so only the damped solve exists there)."""
    model = mlp(sizes=(3, 4, 2))
    x, y = data(n=200, shape=(3,), classes=2)
    pre = KFAC(model, damping=1e-24, factor_decay=0.0, update_every=1)  # sqrt(damping) << eig(G) ~ 4e-6
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = pre.layers[0].grad_matrix().clone()
    pre.step()
    a, g = pre.state["0"]["A"], pre.state["0"]["G"]
    expected = torch.linalg.solve(torch.kron(a, g), vec(raw))
    torch.testing.assert_close(vec(pre.layers[0].grad_matrix()), expected, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ EKFAC
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_ekfac_is_never_farther_from_the_fisher_than_kfac(seed, device):
    """George et al.'s theorem on random networks and data (Linear and Conv2d layers)."""
    model = cnn(seed=seed) if seed % 2 else mlp(seed=seed, sizes=(4, 6, 5, 3))
    x, y = data(n=48, shape=(2, 5, 5) if seed % 2 else (4,), classes=4 if seed % 2 else 3, seed=seed + 10)
    model(x)
    model, x, y = model.to(device), x.to(device), y.to(device)
    kfac = KFAC(model, factor_decay=0.0, update_every=1)
    run_step(kfac, model, x, y)
    kfac.remove_hooks()
    ekfac = EKFAC(model, factor_decay=0.0, update_every=1)
    run_step(ekfac, model, x, y)
    grads = per_example_grads(model, x, y)
    for layer in ekfac.layers:
        fisher = exact_fisher(weight_matrix_grads(grads, layer.name))
        err_kfac = torch.linalg.matrix_norm(fisher - kfac.fisher_block(layer.name))
        err_ekfac = torch.linalg.matrix_norm(fisher - ekfac.fisher_block(layer.name))
        assert err_ekfac <= err_kfac * (1 + 1e-12), (layer.name, err_ekfac, err_kfac)
        # s* is the diagonal of the Fisher in the eigenbasis, so perturbing it can only hurt
        state = ekfac.state[layer.name]
        basis = torch.kron(state["U_A"], state["U_G"])
        torch.testing.assert_close(vec(state["s"]), (basis.mT @ fisher @ basis).diagonal(), rtol=1e-9, atol=1e-12)
        if layer.name.startswith("0") or seed % 2 == 0:
            assert err_ekfac < err_kfac  # strictly better on these (non-Kronecker) Fisher blocks


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_ekfac_scale_every_refits_the_scaling_on_its_period_only(fisher):
    """With ``factor_decay = 0``, at a scaling step ``s`` is the exact diagonal of that batch's
    Fisher in the eigenbasis; between scaling steps ``s`` stays as it was, and the gradient is
    preconditioned with it (the parameters never move, so per-example gradients are exact)."""
    model, twin, damping = mlp(sizes=(4, 6, 3)), mlp(sizes=(4, 6, 3)), 1e-2  # twin: no hooks, for vmap
    pre = EKFAC(model, factor_decay=0.0, update_every=4, scale_every=3, damping=damping, fisher=fisher)
    previous = {}
    for t in range(9):
        x, y = data(n=32, seed=100 + t)
        model.zero_grad()
        torch.manual_seed(t)
        out = model(x)
        if fisher == "true":
            pre.sample_fisher(out)
            torch.manual_seed(t)
            y_fisher = torch.distributions.Categorical(logits=out.detach()).sample()
        else:
            y_fisher = y
        scaling = t % 4 == 0 or t % 3 == 0
        assert pre.is_scaling_step == scaling
        F.cross_entropy(out, y).backward()
        raw = {layer.name: layer.grad_matrix().clone() for layer in pre.layers}
        pre.step()
        grads = per_example_grads(twin, x, y_fisher)
        for layer in pre.layers:
            state = pre.state[layer.name]
            if scaling:
                basis = torch.kron(state["U_A"], state["U_G"])
                fisher_block = exact_fisher(weight_matrix_grads(grads, layer.name))
                torch.testing.assert_close(vec(state["s"]), (basis.mT @ fisher_block @ basis).diagonal(),
                                           rtol=1e-9, atol=1e-12)
            else:
                assert torch.equal(state["s"], previous[layer.name])
            u_a, u_g = state["U_A"], state["U_G"]
            expected = u_g @ ((u_g.mT @ raw[layer.name] @ u_a) / (state["s"] + damping)) @ u_a.mT
            torch.testing.assert_close(layer.grad_matrix(), expected, rtol=1e-10, atol=1e-12)
            previous[layer.name] = state["s"].clone()
    with pytest.raises(ValueError, match="scale_every"):
        EKFAC(model, scale_every=0)


# ---------------------------------------------------------------- workflow
def test_gradient_accumulation_matches_the_full_batch():
    model = mlp()
    x, y = data(n=40)
    full = KFAC(model, factor_decay=0.0, update_every=1)
    run_step(full, model, x, y)
    expected = {layer.name: layer.grad_matrix().clone() for layer in full.layers}
    full.remove_hooks()
    pre = KFAC(model, factor_decay=0.0, update_every=1, accumulation_steps=2)
    model.zero_grad()
    for xs, ys in [(x[:20], y[:20]), (x[20:], y[20:])]:
        (F.cross_entropy(model(xs), ys) / 2).backward()
    pre.step()
    for layer in pre.layers:
        torch.testing.assert_close(layer.grad_matrix(), expected[layer.name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls,options", [(KFAC, {}), (EKFAC, {}), (EKFAC, {"scale_every": 2}), (LocalKFAC, {})])
def test_state_dict_resumes_bit_for_bit(cls, options):
    x, y = data(n=32)

    def train(pre, model, opt, steps):
        for t in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x[t % 4 * 8 : t % 4 * 8 + 8]), y[t % 4 * 8 : t % 4 * 8 + 8]).backward()
            pre.step()
            opt.step()

    model = mlp(sizes=(4, 8, 3))
    pre, opt = cls(model, update_every=3, **options), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(pre, model, opt, 7)
    saved = copy.deepcopy((pre.state_dict(), opt.state_dict(), model.state_dict()))
    train(pre, model, opt, 5)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = mlp(sizes=(4, 8, 3), seed=99)
    model2.load_state_dict(saved[2])
    pre2, opt2 = cls(model2, update_every=3, **options), torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    pre2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    train(pre2, model2, opt2, 5)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_true_fisher_uses_sampled_labels_only():
    model = mlp()
    x, y = data(n=64)
    pre = KFAC(model, fisher="true", factor_decay=0.0, update_every=1)
    torch.manual_seed(5)
    out = model(x)
    pre.sample_fisher(out)
    F.cross_entropy(out, y).backward()
    pre.step()
    torch.manual_seed(5)
    sampled = torch.distributions.Categorical(logits=out.detach()).sample()
    s2 = model[2](torch.tanh(model[0](x))).detach().requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(s2, sampled, reduction="sum"), s2)
    torch.testing.assert_close(pre.state["2"]["G"], g2.T @ g2 / len(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="fisher='true'"):
        KFAC(mlp()).sample_fisher(out)


def test_unsupported_layers_are_listed_in_one_warning():
    torch.manual_seed(0)
    frozen = nn.Linear(4, 4)
    frozen.weight.requires_grad_(False)
    seq = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(4), nn.LayerNorm(4), frozen, nn.Linear(4, 3))
    seq(torch.randn(1, 2, 5, 5))  # materialize the lazy layer
    model = nn.Module()
    model.seq, model.lazy, model.shared, model.tied = seq, nn.LazyLinear(3), nn.Linear(4, 4), nn.Linear(4, 4)
    model.tied.weight = model.shared.weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre = KFAC(model)
    messages = [str(w.message) for w in caught if "leaves these modules" in str(w.message)]
    assert len(messages) == 1
    for part in ["seq.0: groups=2", "seq.3: unsupported layer type LayerNorm", "seq.4: frozen weight",
                 "lazy: uninitialized lazy module", "shared: weight shared with ['tied']"]:
        assert part in messages[0], part
    assert [layer.name for layer in pre.layers] == ["seq.2", "seq.5"]


def test_bad_hyperparameters_and_misuse_are_clear_errors():
    model = mlp()
    for kwargs, match in [
        ({"damping": 0.0}, "damping"),
        ({"damping": float("nan")}, "damping"),
        ({"factor_decay": 1.0}, "factor_decay"),
        ({"update_every": 0}, "update_every"),
        ({"fisher": "exact"}, "fisher"),
        ({"accumulation_steps": 1.5}, "accumulation_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            KFAC(model, **kwargs)
    with pytest.raises(ValueError, match="no supported layer"):
        KFAC(nn.Sequential(nn.Tanh()))
    pre = KFAC(model)
    with pytest.raises(RuntimeError, match="no backward pass"):
        pre.step()
    x, y = data(n=8)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = model[2].weight.grad.clone()
    with pytest.raises(ValueError, match="non-finite"):
        pre.step()
    assert torch.equal(model[2].weight.grad, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [KFAC, EKFAC, LocalKFAC])
def test_training_reduces_the_loss_on_every_device(device, cls):
    model = mlp(sizes=(4, 16, 3), dtype=torch.float32).to(device)
    x, y = data(n=256, dtype=torch.float32)
    x, y = x.to(device), (x[:, 0] > 0).long().to(device) + (x[:, 1] > 0.5).long().to(device)
    pre, opt = cls(model, damping=1e-2, update_every=5), torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -------------------------------------------------------------- LocalKFAC
LOCAL_STRUCTURES = [("dense", {}), ("diagonal", {}), ("lower_triangular", {}), ("upper_triangular", {}),
                    ("block_diagonal", {"block_size": 2}), ("block_diagonal", {"block_size": 4}),  # K: 4 + 2
                    ("hierarchical", {"k1": 2, "k2": 1}),
                    ("block_triangular", {"k": 2})]


def local_layer(structure="dense", options=None, d_in=6, d_out=4, dtype=torch.float64, device="cpu", **kwargs):
    model = nn.Sequential(nn.Linear(d_in - 1, d_out)).to(device, dtype)
    pre = LocalKFAC(model, structure=structure, group_options=options, **kwargs)
    return pre, pre.layers[0]


def spd(d, generator, dtype=torch.float64, cond=10.0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (q * torch.logspace(0, math.log10(cond), d, dtype=torch.float64)) @ q.T


def test_local_factor_gradients_are_the_vi_loss_gradients():
    """``X_K = K^T dL/dK`` and ``X_C = C^T dL/dC`` for the Kronecker-Gaussian VI loss
    ``L = tr(A K K^T) tr(G C C^T) / 2 + lambda tr(K K^T) tr(C C^T) / 2 - (d_out log|K K^T| + d_in log|C C^T|) / 2``
    (autograd), so the step is the natural gradient with the group's Fisher weights."""
    g = torch.Generator().manual_seed(0)
    pre, layer = local_layer(damping=0.3, lr_cov=1e-3, momentum=0.0)
    a, gg = spd(6, g), spd(4, g)
    k = torch.eye(6, dtype=torch.float64) + 0.1 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    c = torch.eye(4, dtype=torch.float64) + 0.1 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    state = pre.state[layer.name]
    state.update(A=a, G=gg, K=k.clone(), C=c.clone())
    kk, cc = k.clone().requires_grad_(True), c.clone().requires_grad_(True)
    lam = 0.3
    loss = 0.5 * torch.trace(a @ kk @ kk.T) * torch.trace(gg @ cc @ cc.T) + 0.5 * lam * torch.trace(kk @ kk.T) * torch.trace(cc @ cc.T) \
        - 0.5 * (4 * torch.logdet(kk @ kk.T) + 6 * torch.logdet(cc @ cc.T))
    gk, gc = torch.autograd.grad(loss, [kk, cc])
    pre.blocks[layer.name].refresh(pre.hyperparameters())
    group = pre.groups[layer.name][0]
    # m after one step from zero momentum is project(X) / scale; recover it from the new K
    expected_m_k = group.project(k.T @ gk) / 4
    expected_m_c = group.project(c.T @ gc) / 6
    torch.testing.assert_close(state["m_K"], expected_m_k, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["m_C"], expected_m_c, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["K"], group.mul(k, group.h(-1e-3 * expected_m_k)), rtol=1e-12, atol=1e-12)


def test_local_fixed_point_is_the_inverse_kronecker_product():
    g = torch.Generator().manual_seed(1)
    pre, layer = local_layer(damping=1e-12, lr_cov=0.2, momentum=0.0)
    a, gg = spd(6, g, cond=5.0), spd(4, g, cond=5.0)
    state = pre.state[layer.name]
    for _ in range(400):
        state["A"], state["G"] = a, gg
        pre.blocks[layer.name].refresh(pre.hyperparameters())
    product = torch.kron(*pre.preconditioner_factors(layer.name))
    torch.testing.assert_close(product, torch.linalg.inv(torch.kron(a, gg)), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("structure,options", LOCAL_STRUCTURES)
def test_local_factors_stay_in_their_group_and_spd_over_thousands_of_noisy_steps(structure, options, dtype, device):
    g = torch.Generator().manual_seed(2)
    pre, layer = local_layer(structure, options, d_in=8, d_out=6, dtype=dtype, damping=1e-3, lr_cov=0.05, device=device)
    state = pre.state[layer.name]
    group_k, group_c = pre.groups[layer.name]
    assert (group_k.name, group_c.name) == (structure, structure)
    a_true, g_true = spd(8, g, cond=100.0), spd(6, g, cond=100.0)
    for step in range(2000):
        x = torch.randn(16, 8, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(a_true).T
        y = torch.randn(16, 6, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(g_true).T
        state["A"], state["G"] = (x.T @ x / 16).to(device, dtype), (y.T @ y / 16).to(device, dtype)
        pre.blocks[layer.name].refresh(pre.hyperparameters())
    for side, group in (("K", group_k), ("C", group_c)):
        dense = group.to_dense(state[side]).double().cpu()
        mask = group.mask(dtype=torch.float64)
        assert torch.equal(dense * (1 - mask), torch.zeros_like(dense)), side  # structure kept
        assert torch.isfinite(dense).all()
        assert torch.linalg.eigvalsh(dense @ dense.T).min() > 0, side  # preconditioner factor SPD
    # and it approximates the damped inverse: KK^T ⊗ CC^T against (A ⊗ G)^{-1} in whitened form
    if structure == "dense" and dtype == torch.float32:
        product = torch.kron(*(f.double().cpu() for f in pre.preconditioner_factors(layer.name)))
        whitened = product @ torch.kron(a_true, g_true)
        eig = torch.linalg.eigvals(whitened).real
        assert eig.min() > 0.5 and eig.max() < 2.0, (eig.min(), eig.max())


def test_local_bad_options_and_small_layers():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="unknown structure"):
        LocalKFAC(model, structure="toeplitz")
    with pytest.raises(ValueError, match="lr_cov"):
        LocalKFAC(model, lr_cov=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        LocalKFAC(model, momentum=1.0)
    with pytest.warns(UserWarning, match=r"use 'dense': 0.C \(dim 2\)"):
        pre = LocalKFAC(model, structure="block_triangular", group_options={"k": 3})
    assert pre.structures["0"] == ("block_triangular", "dense")  # d_in = 3 + bias = 4 > k, d_out = 2


class _FakeScaler:
    """The part of ``torch.amp.GradScaler`` the preconditioners read."""

    def __init__(self, scale):
        self.scale = scale

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale


@pytest.mark.parametrize("cls", [KFAC, EKFAC, LocalKFAC])
def test_grad_scaler_scale_is_divided_out_of_the_statistics(cls):
    x, y = data(n=32)
    model = mlp()
    reference = cls(model, update_every=1)
    run_step(reference, model, x, y)
    expected = [p.grad.clone() for p in model.parameters()]
    reference.remove_hooks()
    model = mlp()
    pre = cls(model, update_every=1, grad_scaler=_FakeScaler(1024.0))
    model.zero_grad()
    (1024.0 * F.cross_entropy(model(x), y)).backward()
    for p in model.parameters():  # what scaler.unscale_(optimizer) does before pre.step()
        p.grad /= 1024.0
    pre.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, LocalKFAC])
def test_autocast_bfloat16_and_bfloat16_models_train(cls):
    x, y = data(n=256, dtype=torch.float32)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    for bf16_model in (False, True):
        model = mlp(sizes=(4, 16, 3), dtype=torch.bfloat16 if bf16_model else torch.float32)
        pre, opt = cls(model, damping=1e-2, update_every=5), torch.optim.SGD(model.parameters(), lr=0.2)
        losses = []
        for _ in range(60):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not bf16_model):
                loss = F.cross_entropy(model(x.to(model[0].weight.dtype)).float(), y)
            loss.backward()
            pre.step()
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses)
        assert losses[-1] < 0.6 * losses[0], (bf16_model, losses[0], losses[-1])
        if cls is LocalKFAC and bf16_model:
            assert pre.state["0"]["K"].dtype == torch.bfloat16  # preconditions in bfloat16


@pytest.mark.parametrize("structure,options", LOCAL_STRUCTURES)
def test_local_preconditioned_gradient_is_cc_t_grad_kk_t(structure, options):
    """The O(dk) application of sparse groups equals the dense ``C C^T dW K K^T``."""
    g = torch.Generator().manual_seed(3)
    pre, layer = local_layer(structure, options, d_in=8, d_out=6, lr_cov=0.05)
    state = pre.state[layer.name]
    for _ in range(5):  # move K and C away from the identity
        state["A"], state["G"] = spd(8, g), spd(6, g)
        pre.blocks[layer.name].refresh(pre.hyperparameters())
    grad = torch.randn(6, 8, generator=g, dtype=torch.float64)
    kk, cc = pre.preconditioner_factors(layer.name)
    torch.testing.assert_close(pre.blocks[layer.name].precondition(grad, pre.hyperparameters()), cc @ grad @ kk, rtol=1e-12, atol=1e-12)


def test_bernoulli_true_fisher_sums_pixels_per_example():
    """G from sampled binary outputs: per-example gradients of the summed pixel log-likelihood."""
    model = mlp(sizes=(4, 8, 5))
    x, _ = data(n=64)
    pre = KFAC(model, fisher="true", factor_decay=0.0, update_every=1)
    torch.manual_seed(3)
    out = model(x)
    pre.sample_fisher(out, "bernoulli")
    out.sum().backward()
    pre.step()
    torch.manual_seed(3)
    sampled = torch.bernoulli(torch.sigmoid(out.detach()))
    s2 = model[2](torch.tanh(model[0](x))).detach().requires_grad_(True)
    (g2,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(s2, sampled, reduction="sum"), s2)
    torch.testing.assert_close(pre.state["2"]["G"], g2.T @ g2 / len(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="likelihood"):
        pre.sample_fisher(model(x), "poisson")


def test_categorical_true_fisher_refuses_logits_that_are_not_n_by_c():
    """Sequence logits ``(N, T, V)`` would be read with dim 1 as the classes: a ValueError, nothing captured."""
    model = nn.Sequential(nn.Linear(4, 5))
    pre = KFAC(model, fisher="true", update_every=1)
    out = model(torch.randn(3, 5, 4))  # (N, T, V) with T = V: silently wrong if accepted
    with pytest.raises(ValueError, match=r"\(N, C\) logits.*flatten"):
        pre.sample_fisher(out)
    assert pre.capture.g_sum["0"] is None
    pre.sample_fisher(out.flatten(0, -2))  # as a loss over the flattened tokens sees them
    assert pre.capture.g_sum["0"] is not None


@pytest.mark.parametrize("cls", [KFAC, EKFAC, LocalKFAC])
def test_kl_clip_bounds_the_predicted_kl_change(cls):
    """With kl_clip, lr^2 sum <p, g> equals kl_clip when it would exceed it, else p is unchanged."""
    def preconditioned(**kw):
        model = mlp(sizes=(4, 8, 3))
        x, y = data(n=32)
        pre = cls(model, update_every=1, **kw)
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        pre.step()
        return grads, [p.grad.clone() for p in model.parameters()]

    grads, free = preconditioned()
    vg = sum(float((p * g).sum()) for p, g in zip(free, grads))
    assert vg > 0
    lr = 0.5
    _, clipped = preconditioned(kl_clip=1e-3 * lr**2 * vg, optimizer_lr=lr)
    nu = math.sqrt(1e-3)
    for c, f in zip(clipped, free):
        torch.testing.assert_close(c, nu * f, rtol=1e-10, atol=1e-12)
    _, loose = preconditioned(kl_clip=10 * lr**2 * vg, optimizer_lr=lr)
    for c, f in zip(loose, free):
        assert torch.equal(c, f)
    with pytest.raises(ValueError, match="optimizer_lr"):
        cls(mlp(), kl_clip=1e-3)
    with pytest.raises(ValueError, match="kl_clip"):
        cls(mlp(), kl_clip=-1.0, optimizer_lr=0.1)
    with pytest.warns(DeprecationWarning, match="optimizer_lr"):
        old = cls(mlp(), kl_clip=1e-3, lr=0.25)
    assert old.optimizer_lr == 0.25


def test_ekfac_eigh_falls_back_to_float64_and_rejects_non_finite_factors(monkeypatch):
    """A float32 eigh that does not converge is redone in float64 (with a warning), giving the
    float64 eigenbasis; a non-finite factor is a ValueError naming it."""
    from structngd.kron import ekfac as ekfac_module

    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(3))
    factor = x.T @ x / 50
    real_eigh = torch.linalg.eigh

    def failing_in_float32(matrix):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    with pytest.warns(RuntimeWarning, match="recomputed in float64"):
        values, vectors = ekfac_module.symmetric_eigh(factor, "layer.A")
    assert values.dtype == vectors.dtype == torch.float32
    expected_values, expected_vectors = real_eigh(factor.double())
    torch.testing.assert_close(values, expected_values.float())
    torch.testing.assert_close((vectors * values) @ vectors.mT, factor, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(torch.linalg, "eigh", real_eigh)
    broken = factor.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer.A holds non-finite"):
        ekfac_module.symmetric_eigh(broken, "layer.A")


def _two_layer_run(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    pre = {
        "kfac": lambda: KFAC(model, update_every=1, factor_decay=0.5),
        "ekfac": lambda: EKFAC(model, update_every=2, factor_decay=0.5),
        "local": lambda: LocalKFAC(model, update_every=1, factor_decay=0.5),
        "local_diagonal": lambda: LocalKFAC(model, "diagonal", update_every=1),
    }[kind]()
    def backward():  # a new batch each time, so every step moves the statistics
        x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    for _ in range(2):
        backward()
        pre.step()
    backward()
    return model, pre


@pytest.mark.parametrize("failure", ["refresh", "precondition"])
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "local", "local_diagonal"])
def test_a_step_that_fails_in_the_last_layer_leaves_every_layer_and_gradient_as_before(kind, failure):
    """All or nothing: the first layer's block has already refreshed (LocalKFAC writes its
    factors in place) when the last layer's refresh raises or its preconditioned gradient is
    non-finite; the step must put every block back and write no gradient, and the retried
    step equals the step of a twin that never failed."""
    model, pre = _two_layer_run(kind)
    if kind == "ekfac":  # a basis change at this step (update_every=2)
        assert pre.is_update_step
    states = {name: {k: v.clone() for k, v in s.items()} for name, s in pre.state.items()}
    grads = [p.grad.clone() for p in model.parameters()]
    last = pre.blocks["2"]
    if failure == "refresh":
        def broken(hp):
            raise ValueError("a factor is not positive-definite")
        last.refresh = broken
        message = "positive-definite"
    else:
        original = last.precondition
        last.precondition = lambda grad, hp: original(grad, hp) * math.inf
        message = "non-finite"
    with pytest.raises(ValueError, match=message):
        pre.step()
    assert pre.steps == 2
    assert set(pre.state) == set(states)
    for name, saved in states.items():
        assert set(pre.state[name]) == set(saved), name
        for key, value in saved.items():
            assert torch.equal(pre.state[name][key], value), (name, key)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    vars(last).pop("refresh", None), vars(last).pop("precondition", None)  # the block's own methods
    pre.step()
    twin_model, twin = _two_layer_run(kind)
    twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p.grad, q.grad)
    for name, state in twin.state.items():
        for key, value in state.items():
            assert torch.equal(pre.state[name][key], value), (name, key)
