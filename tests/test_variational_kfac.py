"""VariationalKFAC: the sampled weights' moments, the conjugate Bayesian linear regression, the mean step as
LocalKFAC's preconditioned gradient plus weight decay, factors kept in their group, a classifier trained with
the defaults, exact resumption and all-or-nothing steps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import rel
from torch import nn

from structngd.kron.variational import VariationalKFAC


def mlp(dtype=torch.float64, seed=0, sizes=(3, 4, 2)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])).to(dtype)


def classification_data(n=16, d=3, classes=2, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(classes, (n,), generator=g)


def train_step(opt, model, x, y, samples=1):
    for _ in range(samples):
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def everything(opt, model):
    """Weights, every block tensor and the mean momenta, cloned."""
    out = {f"param {n}": p.detach().clone() for n, p in model.named_parameters()}
    for name, block in opt.blocks.items():
        out.update({f"{name} {k}": v.clone() for k, v in block.state.items()})
    out.update({f"momentum {k}": v.clone() for k, v in opt.momenta.items()})
    return out


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def randomize_factors(opt, seed=3):
    g = torch.Generator().manual_seed(seed)
    for block in opt.blocks.values():
        for side, group in block.sides():
            block.state[side] = group.random(g, dtype=block.dtype, scale=0.5)
        block._cache_products()


# ----------------------------------------------------------------------------- 1. moments
@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_sampled_weights_have_the_posterior_moments(structure):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    ess = 4.0
    opt = VariationalKFAC(model, ess=ess, structure=structure)
    randomize_factors(opt)
    kk, cc = opt.preconditioner.preconditioner_factors("")
    covariance = torch.kron(kk, cc) / ess  # column-major vec(W) of the folded (2, 4) matrix
    mean = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
    q = opt.posterior("")
    assert torch.equal(q.loc, mean) and rel(q.covariance(), covariance) < 1e-14
    draws = 40000
    samples = torch.empty(draws, 8, dtype=torch.float64)
    with torch.no_grad():
        for i in opt.sample_weights(draws):
            samples[i] = torch.cat([model.weight, model.bias[:, None]], 1).mT.reshape(-1)
    assert torch.equal(torch.cat([model.weight, model.bias[:, None]], 1), mean)  # M is back
    std = covariance.diagonal().sqrt()
    # MC: the standardized mean error is ~ N(0, 1/draws) per entry, the covariance's ~ 1/sqrt(draws)
    assert ((samples.mean(0) - mean.mT.reshape(-1)) / std).abs().max() < 5 / draws**0.5
    empirical = torch.cov(samples.T) / torch.outer(std, std)
    assert (empirical - covariance / torch.outer(std, std)).abs().max() < 6 / draws**0.5


# ------------------------------------------------------------------- 2. conjugate regression
def test_bayesian_linear_regression_reaches_the_closed_form_posterior():
    """With G set exactly to 1 / sigma^2 (a sampled-label pass whose per-example output gradients are
    +-1/sigma), A = X^T X / N at any weights, and mirrored samples (the linear gradient's noise cancels),
    the fixed point is the conjugate posterior N(Lambda^{-1} X^T y / sigma^2, Lambda^{-1}),
    Lambda = X^T X / sigma^2 + lambda_p I (bias included)."""
    dt, n, p, sigma, prior = torch.float64, 200, 4, 0.5, 2.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, generator=g, dtype=dt)
    y = x @ torch.randn(p, 1, generator=g, dtype=dt) + 0.3 + sigma * torch.randn(n, 1, generator=g, dtype=dt)
    torch.manual_seed(0)
    model = nn.Linear(p, 1).to(dt)
    opt = VariationalKFAC(model, ess=n, lr=1.0, momentum=0.0, prior_precision=prior, fisher="true", mirrored=True,
                          mc_samples=2, lr_cov=0.5, damping=0.0, kl_clip=None)  # exact NGD: the posterior
    signs = torch.ones(n, 1, dtype=dt)
    signs[::2] = -1
    for _ in range(150):
        for _ in range(opt.mc_samples):
            with opt.sampled_params(train=True):
                out = model(x)
                with opt.preconditioner.capture.sampled_label_pass():
                    torch.autograd.grad((out * signs / sigma).mean(), list(model.parameters()), retain_graph=True)
                (((out - y) ** 2).mean() / (2 * sigma**2)).backward()
        opt.step()
        opt.zero_grad()
    xb = torch.cat([x, torch.ones(n, 1, dtype=dt)], 1)
    precision = xb.T @ xb / sigma**2 + prior * torch.eye(p + 1, dtype=dt)
    q = opt.posterior("")
    assert rel(q.loc.squeeze(0), torch.linalg.solve(precision, xb.T @ y / sigma**2).squeeze(1)) < 1e-10
    assert rel(q.covariance(), torch.linalg.inv(precision)) < 1e-10


# -------------------------------------------------------------------------- 3. mean step
@pytest.mark.parametrize("structure", ["dense", "diagonal"])
@pytest.mark.parametrize("kl_clip", [None, 1e-3])
def test_mean_step_is_the_clipped_preconditioned_gradient_plus_weight_decay(structure, kl_clip):
    """``b <- momentum b + nu P(g + (lambda_p / ess) M)``, ``nu = min(1, sqrt(kl / (lr^2 sum_l <P(.), .>)))``."""
    model = mlp()
    x, y = classification_data()
    lr, momentum, ess, prior = 0.3, 0.5, 50.0, 2.0
    opt = VariationalKFAC(model, ess=ess, lr=lr, momentum=momentum, prior_precision=prior, structure=structure,
                          kl_clip=kl_clip)
    decay, buffers, scales = prior / ess, {}, []
    for _ in range(2):
        means = {layer.name: layer.weight_matrix().clone() for layer in opt.layers}
        for _ in range(2):
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
        grads = {layer.name: layer.grad_matrix().clone() / 2 + decay * means[layer.name] for layer in opt.layers}
        opt.step()
        directions = {}
        for layer in opt.layers:
            kk, cc = opt.preconditioner.preconditioner_factors(layer.name)  # after this step's refresh
            directions[layer.name] = cc @ grads[layer.name] @ kk
        size = lr**2 * sum(float((directions[n] * grads[n]).sum()) for n in directions)
        nu = 1.0 if kl_clip is None else min(1.0, (kl_clip / size) ** 0.5)
        scales.append(nu)
        for layer in opt.layers:
            direction = nu * directions[layer.name]
            if layer.name in buffers:
                direction = direction + momentum * buffers[layer.name]
            buffers[layer.name] = direction
            assert rel(layer.weight_matrix(), means[layer.name] - lr * direction) < 1e-12
        opt.zero_grad()
    assert (min(scales) < 0.5) == (kl_clip is not None)  # the clip acts where it is on


# ------------------------------------------------------------------ 4. structure and SPD
def check_factors(opt):
    for block in opt.blocks.values():
        for side, group in block.sides():
            f = block.state[side]
            assert f.shape == tuple(group.shape) and f.dtype == block.dtype and torch.isfinite(f).all()
            dense = group.to_dense(f.double())
            assert (dense * (1 - group.mask(torch.float64))).abs().max() == 0  # structural zeros exactly zero
            assert torch.linalg.eigvalsh(dense @ dense.mT).min() > 0


def run_long(structure, factor_dtype, steps, options=None):
    model = mlp(torch.float32, sizes=(6, 5, 3))
    x, y = classification_data(32, 6, 3, torch.float32)
    opt = VariationalKFAC(model, ess=32, structure=structure, factor_dtype=factor_dtype, group_options=options)
    for _ in range(steps):
        train_step(opt, model, x, y)
    check_factors(opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_factors_stay_in_their_group_bfloat16():
    run_long("lower_triangular", torch.bfloat16, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("structure, dtype, options", [
    ("diagonal", torch.float32, None), ("diagonal", torch.bfloat16, None),
    ("block_diagonal", torch.bfloat16, {"block_size": 2}), ("lower_triangular", torch.float32, None),
])
def test_factors_stay_in_their_group_for_10000_steps(structure, dtype, options):
    run_long(structure, dtype, 10000, options)


# ------------------------------------------------------------------------ 5. a classifier
def test_classifier_with_default_settings():
    """Digits, a 64-64-10 tanh MLP, 30 epochs of batch 100 for both: the posterior predictive's test NLL is
    within 2x MAP-by-Adam's (0.17 against 0.09 at prior precision 1) and its entropy is far higher on
    uniform-noise images than MAP's, and than its own on test digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1000], perm[1000:]
    ood = torch.rand(500, 64, generator=torch.Generator().manual_seed(1))

    def batches():
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            order = train[torch.randperm(1000, generator=g)]
            yield from order.split(100)

    def entropy(p):
        return -(p * p.clamp_min(1e-30).log()).sum(1).mean().item()

    net = mlp(torch.float32, seed=1, sizes=(64, 64, 10))
    adam = torch.optim.Adam(net.parameters(), lr=1e-2)
    for b in batches():
        adam.zero_grad()
        F.cross_entropy(net(x[b]), y[b]).backward()
        adam.step()
    model = mlp(torch.float32, seed=1, sizes=(64, 64, 10))
    opt = VariationalKFAC(model, ess=len(train))
    torch.manual_seed(2)
    for b in batches():
        train_step(opt, model, x[b], y[b])
    with torch.no_grad():
        nll_map, entropy_map = F.cross_entropy(net(x[test]), y[test]).item(), entropy(F.softmax(net(ood), -1))
        predictive = torch.stack([F.softmax(model(x[test]), -1) for _ in opt.sample_weights(16)]).mean(0)
        nll_vi, entropy_in = F.nll_loss(predictive.log(), y[test]).item(), entropy(predictive)
        entropy_ood = entropy(torch.stack([F.softmax(model(ood), -1) for _ in opt.sample_weights(16)]).mean(0))
    assert nll_vi < 2 * nll_map and (predictive.argmax(1) == y[test]).float().mean() > 0.93
    assert entropy_ood > 2 * entropy_map and entropy_ood > 2 * entropy_in


@pytest.mark.parametrize("kl_clip", [None, 1e-3])
def test_default_kl_clip_keeps_a_memorized_batch_bounded(kl_clip):
    """32 random points, a 64-64-64-10 ReLU MLP, ess 60000, diagonal factors: once the batch is memorized its
    empirical Fisher vanishes, the preconditioner grows to about 1 / damping and the sampled weights' gradients
    get steps of ~100x their size. Unclipped the weights reach 1e5 and a step is refused as non-finite; with
    the default clip they stay of order 1."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = VariationalKFAC(model, ess=60000, structure="diagonal", kl_clip=kl_clip)
    refused = False
    for _ in range(400):
        try:
            train_step(opt, model, x, y)
        except ValueError:
            refused = True
            break
    largest = max(float(p.detach().abs().max()) for p in model.parameters())
    if kl_clip is None:
        assert refused or largest > 1e4
    else:
        assert not refused and largest < 10 and all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------ 6. state dicts
def test_state_dict_resumes_bit_for_bit():
    model = mlp()
    x, y = classification_data()
    options = dict(ess=16, lr=0.1, update_every=2, mc_samples=2, structure="lower_triangular")
    opt = VariationalKFAC(model, **options)
    for _ in range(3):
        train_step(opt, model, x, y, 2)
    saved, twin, rng = opt.state_dict(), copy.deepcopy(model), torch.get_rng_state()
    for _ in range(3):
        train_step(opt, model, x, y, 2)
    resumed = VariationalKFAC(twin, **options)
    resumed.load_state_dict(saved)
    torch.set_rng_state(rng)
    for _ in range(3):
        train_step(resumed, twin, x, y, 2)
    assert_equal(everything(opt, model), everything(resumed, twin))
    assert resumed.steps == opt.steps == 6


# ---------------------------------------------------------------------------- 7. safety
def test_non_finite_gradient_changes_nothing():
    model = mlp()
    x, y = classification_data()
    opt = VariationalKFAC(model, ess=16, lr=0.1)
    for _ in range(2):
        train_step(opt, model, x, y)
    before = everything(opt, model)
    with opt.sampled_params(train=True):
        F.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert_equal(before, everything(opt, model))


def test_overflowing_mean_step_changes_nothing():
    """The failure comes after LocalKFAC's refresh: the factors are put back too."""
    model = mlp(torch.float32)
    x, y = classification_data(dtype=torch.float32)
    opt = VariationalKFAC(model, ess=16, lr=0.1)
    train_step(opt, model, x, y)
    before = everything(opt, model)
    opt.param_groups[0]["lr"] = 1e300
    with opt.sampled_params(train=True):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert_equal(before, everything(opt, model))


def test_misuse_raises_clear_errors():
    model = mlp()
    x, y = classification_data()
    for bad, match in [(dict(ess=0), "ess"), (dict(ess=10, prior_precision=-1.0), "prior_precision"),
                       (dict(ess=10, mc_samples=0), "mc_samples"),
                       (dict(ess=10, prior_precision=0.0, damping=0.0), "damping"),
                       (dict(ess=10, kl_clip=0.0), "kl_clip"), (dict(ess=10, kl_clip=-1e-3), "kl_clip")]:
        with pytest.raises(ValueError, match=match):
            VariationalKFAC(mlp(), **bad)
    opt = VariationalKFAC(model, ess=16)
    with pytest.raises(RuntimeError, match="sampled backward"):
        opt.step()
    with opt.sampled_params():
        with pytest.raises(RuntimeError, match="nest"):
            with opt.sampled_params():
                pass
    with pytest.raises(ValueError, match="layers are"):
        opt.posterior("nope")


def test_unsupported_parameters_need_a_fallback():
    def model_with_norm():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()

    with pytest.raises(ValueError, match=r"1\.weight"):
        VariationalKFAC(model_with_norm(), ess=16)
    model = model_with_norm()
    x, y = classification_data()
    opt = VariationalKFAC(model, ess=16, fallback=lambda ps: torch.optim.SGD(ps, lr=0.5), mc_samples=2)
    norm_weight = model[1].weight.detach().clone()
    grads = []
    for _ in range(2):
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x), y).backward()
            grads.append(model[1].weight.grad.clone())
    opt.step()
    assert rel(model[1].weight, norm_weight - 0.5 * grads[-1] / 2) < 1e-12  # SGD on the sample mean
