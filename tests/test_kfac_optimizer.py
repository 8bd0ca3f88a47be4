"""KFACOptimizer: the quadratic-model step, Levenberg-Marquardt damping, safety and resumption.

The Gauss-Newton matrix ``G = J^T H_L J`` is built densely and independently: ``J`` by
``torch.autograd.functional.jacobian`` of the flattened outputs in the flattened parameters, ``H_L`` by
``torch.autograd.functional.hessian`` of the loss in the outputs.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from structngd.kron import KFACOptimizer


def tiny(seed=0, dtype=torch.float64, norm=True):
    """3 -> 4 -> 3 with a LayerNorm (parameters the preconditioner leaves to the plain gradient)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 4), nn.Tanh()] + ([nn.LayerNorm(4)] if norm else []) + [nn.Linear(4, 3)]
    return nn.Sequential(*layers).to(dtype)


def data(n=16, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def closure_for(opt, model, x, y, loss="cross_entropy"):
    def closure():
        opt.zero_grad()
        out = model(x)
        value = F.cross_entropy(out, y) if loss == "cross_entropy" else F.mse_loss(out, y)
        value.backward()
        return value, out

    return closure


def dense_ggn(model, x, y, loss="cross_entropy"):
    """``J^T H_L J`` over the flattened parameters (``model.parameters()`` order), and the gradient."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflatten(flat):
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = flat[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    def outputs(flat):
        return functional_call(model, unflatten(flat), (x,)).reshape(-1)

    def loss_of(z):
        z = z.reshape(x.shape[0], -1)
        return F.cross_entropy(z, y) if loss == "cross_entropy" else F.mse_loss(z, y)

    jac = jacobian(outputs, theta)
    h = hessian(loss_of, outputs(theta))
    grad = torch.autograd.grad(loss_of(outputs(theta.requires_grad_())), theta)[0]
    return jac.T @ h @ jac, grad.detach()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_vector_product_is_the_dense_gauss_newton_product(loss):
    model = tiny()
    x, y = data()
    if loss == "mse":
        y = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    opt = KFACOptimizer(model, loss=loss)
    closure_for(opt, model, x, y, loss)()
    out = model(x)
    g = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in model.parameters()]
    w = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in model.parameters()]
    ggn, _ = dense_ggn(model, x, y, loss)
    product = flat(opt.ggn_vector_product(v, out))
    assert torch.allclose(product, ggn @ flat(v), rtol=0, atol=1e-10)
    gram = opt.ggn_gram([v, w], out)
    expected = torch.stack([flat(v), flat(w)]) @ ggn @ torch.stack([flat(v), flat(w)]).T
    assert torch.allclose(gram, expected, rtol=0, atol=1e-10)


def test_alpha_and_mu_minimize_the_exact_quadratic_model():
    model = tiny()
    x, y = data()
    eta = 1e-2
    opt = KFACOptimizer(model, adapt_damping=False, damping=0.1, weight_decay=eta)
    closure = closure_for(opt, model, x, y)
    opt.step(closure)  # delta_0 is now the first update
    before = [p.detach().clone() for p in model.parameters()]
    previous = flat([opt.state[p]["previous_update"] for p in model.parameters()])
    ggn, raw = dense_ggn(model, x, y)
    opt.step(closure)
    grad = raw + eta * flat(before)
    covered = {id(p) for layer in opt.preconditioner.layers for p in layer.parameters}
    # Delta: -F_hat^{-1} grad (the preconditioned .grad) on the layers, -grad on the LayerNorm
    direction, i = [], 0
    for p in model.parameters():
        n = p.numel()
        direction.append(-p.grad.reshape(-1) if id(p) in covered else -grad[i:i + n])
        i += n
    direction = torch.cat(direction)
    basis = torch.stack([direction, previous])
    quad = basis @ (ggn + (0.1 + eta) * torch.eye(len(grad), dtype=torch.float64)) @ basis.T
    linear = basis @ grad
    alpha, mu = torch.linalg.solve(quad, -linear).tolist()
    assert opt.last["alpha"] == pytest.approx(alpha, rel=1e-9)
    assert opt.last["mu"] == pytest.approx(mu, rel=1e-9)
    moved = flat([p.detach() for p in model.parameters()]) - flat(before)
    assert torch.allclose(moved, alpha * direction + mu * previous, rtol=0, atol=1e-12)

    def model_value(a, m):
        c = torch.tensor([a, m], dtype=torch.float64)
        return float(linear @ c + 0.5 * c @ quad @ c)

    assert opt.last["model"] == pytest.approx(model_value(alpha, mu), rel=1e-9)
    for da, dm in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3), (0.1, -0.1), (-0.2, 0.3)]:
        assert model_value(alpha, mu) <= model_value(alpha + da, mu + dm)
    assert model_value(alpha, mu) < 0


def test_fixed_lr_and_momentum_are_the_coefficients():
    model = tiny()
    x, y = data()
    opt = KFACOptimizer(model, lr=0.3, momentum=0.5, adapt_damping=False)
    closure = closure_for(opt, model, x, y)
    opt.step(closure)
    first = [opt.state[p]["previous_update"].clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    covered = {id(p) for layer in opt.preconditioner.layers for p in layer.parameters}
    for p, old, d0 in zip(model.parameters(), before, first):
        if id(p) in covered:
            assert torch.allclose(p.detach() - old, -0.3 * p.grad + 0.5 * d0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("target, factor", [(0.1, "up"), (0.5, "same"), (0.9, "down"), (-3.0, "up"), (2.0, "down")])
def test_levenberg_marquardt_moves_lambda_by_exactly_omega(target, factor):
    """The closure's second call (at ``theta + delta``) returns a loss that makes ``rho`` equal ``target``."""
    model = tiny(norm=False)
    x, y = data()
    opt = KFACOptimizer(model, damping=0.05, adapt_every=3)
    assert opt.omega == (19 / 20) ** 3
    calls = []

    def closure():
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        calls.append(float(loss))
        if len(calls) % 2 == 0 and opt.steps % 3 == 2:  # the re-evaluation of an adaptation step
            shift = target * opt.last["undamped_model"] - (calls[-1] - calls[-2])
            return loss + shift, out
        return loss, out

    for _ in range(2):
        opt.step(closure)
        assert opt.damping == 0.05 and "rho" not in opt.last
    opt.step(closure)
    assert opt.last["rho"] == pytest.approx(target, rel=1e-6)
    expected = {"up": 0.05 / opt.omega, "same": 0.05, "down": 0.05 * opt.omega}[factor]
    assert opt.damping == expected


def test_lambda_is_clamped_to_its_range():
    opt = KFACOptimizer(tiny(), damping=1e-3, min_damping=1e-3, max_damping=2e-3)
    assert opt.adapted_damping(1e-3, 0.9) == 1e-3
    assert opt.adapted_damping(1.9e-3, -1.0) == 2e-3
    assert opt.adapted_damping(1.5e-3, math.nan) == 1.5e-3


def everything(opt, model):
    """Parameters, preconditioner tensors, previous updates, damping and step counts (cloned)."""
    return (
        [p.detach().clone() for p in model.parameters()],
        copy.deepcopy(opt.preconditioner.state_dict()),
        [opt.state[p]["previous_update"].clone() for p in model.parameters() if "previous_update" in opt.state[p]],
        opt.damping, opt.steps, opt.preconditioner.steps,
    )


def assert_same(a, b):
    assert len(a[0]) == len(b[0]) and all(torch.equal(u, v) for u, v in zip(a[0], b[0]))
    for name, layer in a[1]["layers"].items():
        assert layer.keys() == b[1]["layers"][name].keys()
        assert all(torch.equal(t, b[1]["layers"][name][k]) for k, t in layer.items())
    assert len(a[2]) == len(b[2]) and all(torch.equal(u, v) for u, v in zip(a[2], b[2]))
    assert a[3:] == b[3:]


def batches(t):
    x, y = data(n=32)
    return x[t % 4 * 8:t % 4 * 8 + 8], y[t % 4 * 8:t % 4 * 8 + 8]


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "local"])
def test_state_dict_resumes_bit_for_bit(curvature):
    def train(opt, model, steps, start):
        for t in range(start, start + steps):
            opt.step(closure_for(opt, model, *batches(t)))

    options = dict(curvature=curvature, adapt_every=2, update_every=2, weight_decay=1e-3)
    model = tiny()
    opt = KFACOptimizer(model, **options)
    train(opt, model, 6, 0)
    reference = [p.detach().clone() for p in model.parameters()]

    model = tiny()
    opt = KFACOptimizer(model, **options)
    train(opt, model, 3, 0)
    saved = copy.deepcopy((opt.state_dict(), model.state_dict()))
    model2 = tiny(seed=7)
    model2.load_state_dict(saved[1])
    opt2 = KFACOptimizer(model2, **options)
    opt2.load_state_dict(saved[0])
    assert opt2.damping == opt.damping and opt2.steps == 3
    train(opt2, model2, 3, 3)
    assert all(torch.equal(p.detach(), r) for p, r in zip(model2.parameters(), reference))


@pytest.mark.parametrize("failure", ["nan_loss", "inf_gradient", "nan_re_evaluation"])
def test_a_failed_step_changes_nothing(failure):
    options = dict(adapt_every=2, update_every=1)
    model, reference = tiny(), tiny()
    opt, ref_opt = KFACOptimizer(model, **options), KFACOptimizer(reference, **options)
    opt.step(closure_for(opt, model, *batches(0)))
    ref_opt.step(closure_for(ref_opt, reference, *batches(0)))
    before = everything(opt, model)
    x, y = batches(1)
    calls = []

    def broken():
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        calls.append(1)
        if failure == "nan_loss":
            return loss * math.nan, out
        if failure == "inf_gradient":
            model[0].weight.grad[0, 0] = math.inf
        if failure == "nan_re_evaluation" and len(calls) == 2:
            return loss + math.nan, out
        return loss, out

    with pytest.raises(ValueError, match="non-finite|nan"):
        opt.step(broken)
    assert_same(everything(opt, model), before)
    # and the next step is the step the uninterrupted run takes
    opt.step(closure_for(opt, model, x, y))
    ref_opt.step(closure_for(ref_opt, reference, x, y))
    assert_same(everything(opt, model), everything(ref_opt, reference))


def test_defaults_beat_adam_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    losses = {}
    for name in ("kfac", "adam"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        opt = KFACOptimizer(model) if name == "kfac" else torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            batch = torch.randint(len(x), (128,), generator=g)
            closure = closure_for(opt, model, x[batch], y[batch])
            if name == "kfac":
                assert math.isfinite(float(opt.step(closure)))
            else:
                closure()
                opt.step()
        with torch.no_grad():
            losses[name] = F.cross_entropy(model(x), y).item()
    assert losses["kfac"] < 0.1 * losses["adam"], losses


@pytest.mark.parametrize("options, message", [
    (dict(lr=-1.0), "lr"), (dict(lr=0.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(damping=0.0), "damping"),
    (dict(weight_decay=-1e-3), "weight_decay"), (dict(curvature="shampoo"), "curvature"), (dict(loss="nll"), "loss"),
    (dict(adapt_every=0), "adapt_every"), (dict(omega=1.0), "omega"), (dict(omega=0.0), "omega"),
    (dict(adapt_damping=1), "adapt_damping"), (dict(damping=1e-6), "min_damping"),
    (dict(min_damping=-1.0), "min_damping"), (dict(kl_clip=1e-3), "kl_clip"), (dict(update_every=0), "update_every"),
])
def test_bad_arguments_raise_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        KFACOptimizer(tiny(), **options)


def test_bad_closures_raise_value_errors():
    model = tiny()
    x, y = data()
    opt = KFACOptimizer(model)
    with pytest.raises(ValueError, match="closure"):
        opt.step(None)

    def loss_only():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"\(loss, outputs\)"):
        opt.step(loss_only)

    def other_outputs():
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        return loss, out.detach()

    with pytest.raises(ValueError, match="outputs"):
        opt.step(other_outputs)
