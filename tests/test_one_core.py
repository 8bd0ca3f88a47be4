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
