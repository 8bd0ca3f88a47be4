"""One core for all three uses: a step of each use equals the layer-3 kernel's step of its family.

Each test computes the family's step independently (the family, its estimator and
:func:`structngd.optim.natural_gradient_step` or :class:`structngd.optim.NaturalGradient`)
and compares it with what the use (``kron.LocalKFAC``, ``es.StructuredNES``, ``pyro.NGD``) did.
"""

from __future__ import annotations

import math

import pytest
import torch

# ------------------------------------------------------------------- kron: LocalKFAC
# (LocalKFAC tests go here)
LOCAL_KFAC_CASES = [("dense", {}), ("block_diagonal", {"block_size": 2}), ("hierarchical", {"k1": 2, "k2": 1})]


@pytest.mark.parametrize("structure,opts", LOCAL_KFAC_CASES, ids=[c[0] for c in LOCAL_KFAC_CASES])
def test_local_kfac_update_is_the_kernel_step_of_its_kronecker_gaussian(structure, opts):
    """Three factor updates of a layer of ``kron.LocalKFAC`` (momentum and trust region active)
    equal the layer-3 kernel's steps of a ``KroneckerGaussian`` built here, fed by the Kronecker
    estimator from the layer's statistics ``A``, ``G`` computed here by a forward pass and
    per-example output gradients; the preconditioned gradient is that family's mean
    natural-gradient step ``C Delta K^T = C C^T dW K K^T``."""
    import torch.nn.functional as F
    from torch import nn

    from structngd.families import KroneckerGaussian
    from structngd.families.estimators import kronecker_factor_gradients
    from structngd.kron import LocalKFAC
    from structngd.optim.kernel import natural_gradient_step

    f64 = torch.float64
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).to(f64)  # d_in = 6 (bias column), d_out = 4
    model = nn.Sequential(layer)
    lr_cov, momentum, max_step, damping = 0.4, 0.6, 0.1, 0.05
    pre = LocalKFAC(model, structure=structure, group_options=opts, lr_cov=lr_cov, momentum=momentum,
                    max_step=max_step, damping=damping, update_every=1)
    q = KroneckerGaussian(4, 6, structure, dtype=f64, **opts)
    assert q.structure == pre.structures["0"] == (structure, structure)
    gen = torch.Generator().manual_seed(1)
    buffers, clipped = None, False
    for _ in range(3):
        x = torch.randn(16, 5, generator=gen, dtype=f64)
        y = torch.randint(0, 4, (16,), generator=gen)
        # the statistics, independently: A = E[a a^T] (bias as a constant 1), G = E[g g^T]
        a_bar = torch.cat([x, torch.ones(16, 1, dtype=f64)], 1)
        a_stat = a_bar.T @ a_bar / 16
        out = layer(x).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="none").sum(), out)
        g_stat = g.T @ g / 16
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = torch.cat([layer.weight.grad, layer.bias.grad.unsqueeze(1)], 1).clone()
        pre.step()

        with torch.no_grad():
            x_k, x_c = kronecker_factor_gradients(
                q.in_group, q.out_group, q.in_factor, q.out_factor, a_stat, g_stat, damping
            )
        direction = q.natural_gradient(local_gradient=(torch.zeros_like(q.loc), x_k, x_c))
        clipped |= lr_cov * float(torch.linalg.vector_norm(
            direction.in_factor if buffers is None else momentum * buffers["in_factor"] + direction.in_factor
        )) > max_step
        (buffers,) = natural_gradient_step(
            [q], [buffers], lr=[lr_cov], momentum=[momentum], max_step=[max_step], retraction=["h"],
            part_lrs=[None], directions=[direction],
        )
        state = pre.state["0"]
        torch.testing.assert_close(state["K"], q.in_factor.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["C"], q.out_factor.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["m_K"], buffers["in_factor"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["m_C"], buffers["out_factor"], rtol=1e-10, atol=1e-12)
        # the preconditioned gradient: the mean's natural-gradient step of the moved family
        q.loc.grad = raw
        q.in_factor.grad, q.out_factor.grad = torch.zeros_like(q.in_factor), torch.zeros_like(q.out_factor)
        mean_step = q.natural_gradient()
        expected = q.loc.detach() - q.retracted(mean_step)["loc"]
        got = torch.cat([layer.weight.grad, layer.bias.grad.unsqueeze(1)], 1)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert clipped  # the trust region acted
    assert not torch.equal(q.in_group.to_dense(q.in_factor.detach()), torch.eye(6, dtype=f64))


# ------------------------------------------------------------------- es: StructuredNES
# (StructuredNES tests go here)
ES_CASES = [("dense", {}), ("diagonal", {}), ("block_triangular", {"k": 2})]


@pytest.mark.parametrize("structure,opts", ES_CASES, ids=[c[0] for c in ES_CASES])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("rates", ["xnes", "cma"])
def test_structured_nes_generation_is_the_kernel_step_of_its_gaussian(structure, opts, transpose, rates):
    """One generation of ``es.StructuredNES`` equals the layer-3 kernel's step of a covariance
    Gaussian (with scale part) built here, from the score-function estimator's local gradients
    of the same noise and fitness. ``"cma"``: first generation (the paths start at zero, so
    the rank-one sample is the cumulated first mean step), mean at the recombination weights, scale part at rate 0, the
    factor rescaled to its old volume and ``sigma`` set by CSA afterwards."""
    from structngd.es import StructuredNES, rank_order, recombination_weights, utilities
    from structngd.families import Gaussian
    from structngd.families.estimators import score_function_gradients
    from structngd.optim.kernel import natural_gradient_step

    f64 = torch.float64
    d = 7
    x0 = torch.linspace(-1.0, 2.0, d, dtype=f64)
    es = StructuredNES(x0, 0.6, structure=structure, rates=rates, seed=4, transpose=transpose, mirrored=False, **opts)
    group = es.group
    start = group.random(torch.Generator().manual_seed(2), dtype=f64)
    es.factor = start
    q = Gaussian(d, group, loc=x0, parameterization="covariance", scale=0.6, transpose=transpose, dtype=f64)
    with torch.no_grad():
        q.factor.copy_(start)
    z = torch.randn((es.popsize, d), generator=torch.Generator().manual_seed(4), dtype=f64)
    x = es.ask()
    assert torch.allclose(x, q.from_noise(z).detach(), rtol=1e-14, atol=1e-14)
    fitness = ((x - 0.3) ** 2 * torch.arange(1, d + 1, dtype=f64)).sum(-1)
    es.tell(fitness)

    order, _ = rank_order(fitness)
    zs = z[order]
    u = utilities(es.popsize, dtype=f64)
    r = es.rates
    if rates == "xnes":
        local = score_function_gradients(group, zs, u)
        lrs = {"loc": r["eta_mu"], "factor": r["eta_B"], "scale": r["eta_sigma"]}
        retraction = "exp"
    else:
        w = recombination_weights(es.popsize, dtype=f64)
        cs, cc = r["cs"], r["cc"]
        ps = math.sqrt(cs * (2 - cs) * es.mueff) * (w @ zs)
        chi = math.sqrt(d) * (1 - 1 / (4 * d) + 1 / (21 * d * d))
        hsig = float(ps.norm()) / math.sqrt(1 - (1 - cs) ** 2) / chi < 1.4 + 2 / (d + 1)
        zc = (math.sqrt(cc * (2 - cc) * es.mueff) if hsig else 0.0) * (w @ zs)  # A^{-1} p_c
        zall = torch.cat([zs, zc.unsqueeze(0)])
        coef = torch.cat([r["cmu"] * u, torch.tensor([r["c1"]], dtype=f64)])
        local = score_function_gradients(group, zs, w, shape_z=zall, shape_utilities=coef)
        lrs = {"loc": r["eta_mu"], "factor": 1.0, "scale": 0.0}
        retraction = "h"
    direction = q.natural_gradient(local_gradient=local)
    if rates == "cma" and es._rate_mask is not None:
        direction = direction._replace(factor=direction.factor * es._rate_mask)
    old_logdet = float(group.logdet(q.factor.detach()))
    natural_gradient_step([q], [None], lr=[1.0], momentum=[0.0], max_step=[None], retraction=[retraction],
                          part_lrs=[lrs], directions=[direction])
    factor, sigma = q.factor.detach().clone(), float(q.scale.detach())
    if rates == "cma":
        factor = factor * math.exp(-(float(group.logdet(factor)) - old_logdet) / d)
        sigma = sigma * math.exp(min(1.0, r["cs"] / r["ds"] * (float(ps.norm()) / chi - 1)))
    assert torch.allclose(es.mean, q.loc.detach(), rtol=1e-13, atol=1e-14)
    assert torch.allclose(es.factor, factor, rtol=1e-13, atol=1e-14)
    assert es.sigma == pytest.approx(sigma, rel=1e-13)
    assert not torch.equal(es.factor, start)

# ------------------------------------------------------------------- pyro: NGD
# (NGD tests go here)
def _pyro_blr(n=30, seed=0):
    """A conjugate Bayesian linear regression (prior sd 1, noise sd 0.5) and its data, float64."""
    from models.linear import BayesianLinearRegression

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    return BayesianLinearRegression(1.0, 0.5), x, y


@pytest.fixture
def _fresh_param_store():
    import pyro

    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.usefixtures("_fresh_param_store")
@pytest.mark.parametrize("estimator", ["reparam", "price"])
def test_ngd_step_in_svi_is_the_natural_gradient_step_of_the_guides_family(estimator):
    """Three ``pyro.infer.SVI`` steps with ``pyro.NGD`` (momentum and trust region active) equal
    ``NaturalGradient`` steps of a ``Gaussian`` the test builds from the same start, fed with the same
    gradients computed independently: for ``"reparam"`` the ELBO's gradients from Pyro's
    ``Trace_ELBO`` under the step's seed, for ``"price"`` the family's own Price estimator on the
    model's log joint written out in the test (quadratic, so one mirrored pair is exact whatever the draws)."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    from structngd.families import Gaussian
    from structngd.optim import NaturalGradient
    from structngd.pyro import NGD, AutoStructuredNormal

    model, x, y = _pyro_blr()
    lr, momentum, max_step = 0.4, 0.5, 0.5
    guide = AutoStructuredNormal(model, "lower_triangular", init_scale=0.3)
    ngd = NGD(lr=lr, estimator=estimator, momentum=momentum, max_step=max_step, fallback=False)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, ngd, elbo)
    guide(x, y)  # sets the guide up
    assert isinstance(guide.family, Gaussian) and guide.family.structure == "lower_triangular"
    q = Gaussian(3, "lower_triangular", dtype=torch.float64)
    with torch.no_grad():
        q.loc.copy_(guide.family.loc)
        q.factor.copy_(guide.family.factor)
    reference = NaturalGradient(q, lr=lr, momentum=momentum, max_step=max_step)

    def log_joint(w):  # log p(y, w) up to a constant, batched over the rows of w
        return -0.5 * ((y - w @ x.T) / 0.5).pow(2).sum(-1) - 0.5 * w.pow(2).sum(-1)

    for t in range(3):
        reference.zero_grad()
        if estimator == "reparam":
            pyro.set_rng_seed(t)
            elbo.loss_and_grads(model, guide, x, y)
            family = guide.family
            q.loc.grad, q.factor.grad = family.loc.grad.clone(), family.factor.grad.clone()
            family.loc.grad, family.factor.grad = torch.zeros_like(family.loc), torch.zeros_like(family.factor)
        else:
            q.estimate_gradients(log_joint, num_samples=2, estimator="price")
        if t == 0:  # the trust region acts on the first step
            assert lr * float(torch.linalg.vector_norm(q.natural_gradient().factor)) > max_step
        pyro.set_rng_seed(t)
        svi.step(x, y)
        reference.step()
        torch.testing.assert_close(guide.family.loc.detach(), q.loc.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(guide.family.factor.detach(), q.factor.detach(), rtol=1e-12, atol=1e-12)
    assert guide.family.loc is pyro.param("AutoStructuredNormal.loc").unconstrained()  # the store's own tensor
    assert not torch.equal(q.factor.detach(), q.group.from_diagonal(torch.full((3,), 1 / 0.3, dtype=torch.float64)))


@pytest.mark.usefixtures("_fresh_param_store")
def test_two_guides_with_one_ngd_each_do_not_see_each_others_parameters():
    """Two structured guides in one process (one param store), each with its own ``SVI`` and
    ``NGD(fallback=False)``: each ``NGD`` steps only its own guide (a step of one leaves the
    other bit for bit unchanged, its state names only its guide) and each guide reaches its
    own model's optimum."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    from structngd.pyro import NGD, AutoStructuredNormal

    class GuideA(AutoStructuredNormal):
        pass

    class GuideB(AutoStructuredNormal):
        pass

    (model_a, xa, ya), (model_b, xb, yb) = _pyro_blr(30, 0), _pyro_blr(40, 1)
    guide_a, guide_b = GuideA(model_a, "dense"), GuideB(model_b, "diagonal")
    ngd_a = NGD(lr=0.5, estimator="price", fallback=False)
    ngd_b = NGD(lr=0.5, estimator="price", fallback=False)
    svi_a = SVI(model_a, guide_a, ngd_a, Trace_ELBO())
    svi_b = SVI(model_b, guide_b, ngd_b, Trace_ELBO())

    def values(guide):
        return [t.detach().clone() for t in (guide.family.loc, guide.family.factor)]

    for _ in range(80):
        svi_a.step(xa, ya)
        before_a = values(guide_a)
        svi_b.step(xb, yb)
        assert all(torch.equal(u, v) for u, v in zip(values(guide_a), before_a))
        before_b = values(guide_b)
        svi_a.step(xa, ya)
        assert all(torch.equal(u, v) for u, v in zip(values(guide_b), before_b))
    assert list(ngd_a.get_state()["natural_gradient"]) == ["GuideA.loc"]
    assert list(ngd_b.get_state()["natural_gradient"]) == ["GuideB.loc"]
    assert set(pyro.get_param_store().keys()) == {"GuideA.loc", "GuideA.factor", "GuideB.loc", "GuideB.factor"}
    mean_a, cov_a = model_a.posterior(xa, ya)
    post_a = guide_a.get_posterior()
    torch.testing.assert_close(post_a.mean, mean_a, rtol=0, atol=1e-8)
    torch.testing.assert_close(post_a.covariance_matrix, cov_a, rtol=0, atol=1e-8)
    mean_b, cov_b = model_b.posterior(xb, yb)
    post_b = guide_b.get_posterior()  # diagonal: the mean-field optimum
    torch.testing.assert_close(post_b.mean, mean_b, rtol=0, atol=1e-8)
    torch.testing.assert_close(post_b.precision_matrix, torch.diag(torch.linalg.inv(cov_b).diagonal()), rtol=0, atol=1e-8)


@pytest.mark.usefixtures("_fresh_param_store")
def test_no_module_level_guide_registry_remains():
    """No module of ``structngd.pyro`` holds a container at module level (no list of guides,
    weak or strong), and once its user drops a trained guide, its ``SVI`` and its ``NGD``,
    nothing of the library keeps the guide alive."""
    import gc
    import importlib
    import weakref

    from pyro.infer import SVI, Trace_ELBO

    from structngd.pyro import NGD, AutoStructuredNormal

    containers = (weakref.WeakSet, weakref.WeakKeyDictionary, weakref.WeakValueDictionary, set, list, dict)
    for name in ("structngd.pyro", "structngd.pyro.guide", "structngd.pyro.optim", "structngd.pyro.distribution"):
        module = importlib.import_module(name)
        assert not hasattr(module, "_LIVE_GUIDES") and not hasattr(module, "live_guides")
        held = [key for key, value in vars(module).items() if not key.startswith("__") and isinstance(value, containers)]
        assert held == [], (name, held)

    model, x, y = _pyro_blr()
    guide = AutoStructuredNormal(model, "dense")
    ngd = NGD(lr=0.5, estimator="price", fallback=False)
    svi = SVI(model, guide, ngd, Trace_ELBO())
    for _ in range(2):
        svi.step(x, y)
    ref = weakref.ref(guide)
    del guide, ngd, svi
    gc.collect()
    assert ref() is None
