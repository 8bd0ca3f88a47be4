"""structngd.pyro: the structured autoguide and the NGD optimizer inside Pyro's SVI.

Facts checked: on conjugate Bayesian linear regression the fitted guide is the closed-form
posterior (to 1e-8 with the Price estimator; within a Monte Carlo tolerance derived from
the number of particles with reparameterization gradients); the guide behaves like
Pyro's own autoguides (Predictive, median, quantiles, constrained sites, param store);
bad configurations raise and change nothing; checkpoints resume bit for bit.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, init_to_mean

from models.linear import BayesianLinearRegression, BayesianLogisticRegression
from structngd.pyro import NGD, AutoStructuredNormal, StructuredNormal
from structngd.pyro.distribution import StructuredAffine

DENSE_CAPABLE = ["dense", "lower_triangular", "upper_triangular"]


pytestmark = pytest.mark.usefixtures("fresh_pyro")


def blr_problem(n=50, p=4, seed=0, subsample_size=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)[:p]
    y = x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return BayesianLinearRegression(1.0, 0.5, subsample_size=subsample_size), x, y


def noise_param_model(x, y):
    """Linear regression whose noise scale is a plain ``pyro.param`` (initially 2)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0).to_event(1))
    noise = pyro.param("noise", torch.tensor(2.0, dtype=x.dtype), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), noise), obs=y)


def fit(model, guide, optim, args, steps, particles=1):
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)
    svi = SVI(model, guide, optim, elbo)
    return [svi.step(*args) for _ in range(steps)]


def whitened(precision, reference_precision):
    """``L^{-1} S L^{-T}`` with ``L = chol(reference)``: the identity iff ``S`` equals it."""
    chol = torch.linalg.cholesky(reference_precision)
    half = torch.linalg.solve_triangular(chol, precision, upper=False)
    return torch.linalg.solve_triangular(chol, half.mT, upper=False)


# ------------------------------------------------------------ closed-form posteriors
@pytest.mark.parametrize("structure", DENSE_CAPABLE)
def test_price_estimator_reaches_the_exact_posterior(structure):
    model, x, y = blr_problem()
    mean, cov = model.posterior(x, y)
    guide = AutoStructuredNormal(model, structure)
    losses = fit(model, guide, NGD(lr=0.5, estimator="price"), (x, y), 80)
    post = guide.get_posterior()
    torch.testing.assert_close(post.mean, mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(post.covariance_matrix, cov, rtol=0, atol=1e-8)
    # and the ELBO at the optimum is the log evidence (the KL to the posterior is zero)
    with torch.no_grad():
        elbo = -Trace_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, x, y)
    assert abs(elbo - model.log_evidence(x, y).item()) < 1e-8
    assert math.isfinite(losses[-1])


def test_price_estimator_diagonal_reaches_the_mean_field_optimum():
    """Mean-field optimum of a Gaussian posterior: the exact mean, precision ``diag(P)``."""
    model, x, y = blr_problem()
    mean, cov = model.posterior(x, y)
    guide = AutoStructuredNormal(model, "diagonal")
    fit(model, guide, NGD(lr=0.5, estimator="price"), (x, y), 80)
    post = guide.get_posterior()
    torch.testing.assert_close(post.mean, mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(post.precision_matrix, torch.diag(torch.linalg.inv(cov).diagonal()), rtol=0, atol=1e-8)


def test_reparam_estimator_within_derived_monte_carlo_tolerance():
    """Reparameterization gradients with ``N`` particles and step ``beta``.

    Near the optimum the iteration is linear: ``mu' - mu* = (1 - beta)(mu - mu*) - beta S^{-1} xi``
    with ``Cov(S^{-1} xi) = Sigma / N``, so ``mu`` fluctuates with covariance
    ``beta / (2 - beta) Sigma / N``; the whitened precision ``W = L^{-1} S L^{-T}`` averages
    per-step estimates ``eps eps^T`` (entry variances 2/N on, 1/N off the diagonal) with
    weight ``beta``, so its entries fluctuate with variance ``beta / (2 - beta)`` times those.
    The test allows 5 standard deviations.
    """
    model, x, y = blr_problem()
    mean, cov = model.posterior(x, y)
    beta, particles = 0.05, 16
    guide = AutoStructuredNormal(model, "dense")
    fit(model, guide, NGD(lr=beta), (x, y), 600, particles=particles)
    post = guide.get_posterior()
    ar = beta / (2 - beta) / particles
    mean_tol = 5 * (ar * cov.diagonal()).sqrt()
    assert ((post.mean.detach() - mean).abs() <= mean_tol).all(), (post.mean - mean, mean_tol)
    w = whitened(post.precision_matrix.detach(), torch.linalg.inv(cov))
    eye = torch.eye(4, dtype=w.dtype)
    w_tol = 5 * (ar * (1 + eye)).sqrt()
    assert ((w - eye).abs() <= w_tol).all(), (w, w_tol)


def test_subsampled_price_gradients_are_unbiased_for_the_full_data_gradients():
    """With a subsampled plate Pyro rescales the likelihood by ``n / m``, so the Price
    gradients averaged over subsamples equal the full-data ones (5 standard errors)."""
    model, x, y = blr_problem(subsample_size=10)
    full = BayesianLinearRegression(1.0, 0.5)

    def price(m, draws):
        guide = AutoStructuredNormal(m, "dense", init_loc_fn=init_to_mean, init_scale=0.3)
        guide(x, y)  # a training pass: the guide records the model's arguments
        loc, factor = guide.family.loc, guide.family.factor
        out = []
        for _ in range(draws):
            guide.price_gradients()
            out.append(torch.cat([loc.grad.reshape(-1), factor.grad.reshape(-1)]))
        return torch.stack(out)

    exact = price(full, 1)[0]  # quadratic model: one mirrored pair is exact
    pyro.clear_param_store()
    draws = price(model, 2000)
    err = (draws.mean(0) - exact).abs()
    se = draws.std(0) / math.sqrt(len(draws))
    assert (err <= 5 * se + 1e-9).all(), (err, se)
    assert draws.std(0).max() > 1.0  # the subsample noise is real (the check is not vacuous)


def test_subsampled_svi_with_decreasing_steps_reaches_the_posterior():
    model, x, y = blr_problem(subsample_size=10)
    mean, cov = BayesianLinearRegression(1.0, 0.5).posterior(x, y)
    guide = AutoStructuredNormal(model, "dense")
    ngd = NGD(lr=0.5, estimator="price", num_pairs=2)
    svi = SVI(model, guide, ngd, Trace_ELBO())
    for t in range(600):
        ngd.lr = 0.5 / (1 + t / 10)
        svi.step(x, y)
    post = guide.get_posterior()
    w = whitened(post.precision_matrix.detach(), torch.linalg.inv(cov))
    assert (w - torch.eye(4, dtype=w.dtype)).abs().max() < 0.2
    z = torch.linalg.solve(torch.linalg.cholesky(cov), post.mean.detach() - mean)  # in posterior sds
    assert z.abs().max() < 0.5  # it starts ~100 posterior sds away


def test_vectorized_particles_and_fallback_for_other_parameters():
    """A learned noise scale (a plain ``pyro.param``) goes to the fallback optimizer."""

    model = noise_param_model
    _, x, y = blr_problem()
    guide = AutoStructuredNormal(model, "block_triangular", k=2)
    ngd = NGD(lr=0.2, fallback=pyro.optim.Adam({"lr": 0.05}))
    losses = fit(model, guide, ngd, (x, y), 300, particles=8)
    assert losses[-1] < losses[0]
    noise = pyro.param("noise").item()
    assert 0.35 < noise < 0.7, noise  # data noise is 0.5
    mask = guide.group.mask(dtype=guide.factor.dtype)
    dense = guide.group.to_dense(guide.factor.detach())
    assert torch.equal(dense * (1 - mask), torch.zeros_like(dense))  # structure kept
    assert set(ngd.get_state()["fallback"]) == {"noise"}


def test_logistic_regression_price_beats_its_initial_elbo_and_stays_spd():
    torch.manual_seed(0)
    x = torch.randn(80, 3, dtype=torch.float64)
    y = (x[:, 0] - x[:, 1] + 0.3 * torch.randn(80, dtype=torch.float64) > 0).to(torch.float64)
    model = BayesianLogisticRegression(1.0)
    guide = AutoStructuredNormal(model, "lower_triangular")
    losses = fit(model, guide, NGD(lr=0.5, estimator="price", max_step=1.0), (x, y), 40)
    assert min(losses[-5:]) < losses[0] - 5
    assert torch.linalg.eigvalsh(guide.get_posterior().precision_matrix).min() > 0


# -------------------------------------------------------- autoguide behaviours
def constrained_model(x, y=None):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    probs = pyro.sample("probs", dist.Dirichlet(torch.ones(3)))
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        mean = (x * w).sum(-1) + probs[..., :1]
        return pyro.sample("y", dist.Normal(mean, scale), obs=y)


@pytest.mark.parametrize("structure,options", [("dense", {}), ("diagonal", {}), ("heisenberg", {"k": 2}), ("hierarchical", {"k1": 1, "k2": 2})])
def test_predictive_median_quantiles_on_constrained_sites(structure, options):
    x = torch.randn(20, 2)
    y = x @ torch.tensor([1.0, -1.0]) + 0.3 * torch.randn(20)
    guide = AutoStructuredNormal(constrained_model, structure, **options)
    fit(constrained_model, guide, NGD(lr=0.05, max_step=1.0), (x, y), 20, particles=4)
    assert guide.latent_dim == 1 + 2 + 2  # the simplex has 2 unconstrained coordinates

    samples = Predictive(constrained_model, guide=guide, num_samples=7)(x)
    reference = Predictive(constrained_model, guide=AutoMultivariateNormal(constrained_model), num_samples=7)(x, y)
    assert {k: v.shape for k, v in samples.items()} == {k: v.shape for k, v in reference.items()}
    assert samples["probs"].shape[0] == 7 and samples["probs"].shape[-1] == 3 and samples["y"].shape == (7, 20)
    assert (samples["scale"] > 0).all()
    torch.testing.assert_close(samples["probs"].sum(-1), torch.ones(samples["probs"].shape[:-1]))

    median = guide.median(x)
    quantiles = guide.quantiles([0.1, 0.5, 0.9], x)
    assert median["scale"] > 0 and torch.allclose(median["probs"].sum(), torch.tensor(1.0))
    for name in ("scale", "w"):
        torch.testing.assert_close(quantiles[name][1], median[name])
        assert (quantiles[name][0] < quantiles[name][2]).all()
    # quantiles of the unconstrained latent are those of its Gaussian marginal
    post = guide.get_posterior()
    sd = post.covariance_matrix.diagonal().sqrt()
    lo = torch.log(quantiles["scale"][0])  # scale = exp(z_0)
    torch.testing.assert_close(lo, post.mean[0] + sd[0] * dist.Normal(0.0, 1.0).icdf(torch.tensor(0.1)))


def test_posterior_distribution_and_transform_agree():
    guide = AutoStructuredNormal(constrained_model, "block_triangular", k=2, init_scale=0.5)
    guide(torch.randn(5, 2))
    with torch.no_grad():
        guide.factor.add_(0.1 * torch.randn_like(guide.factor))
    post = guide.get_posterior()
    assert isinstance(post, StructuredNormal)
    torch.testing.assert_close(torch.linalg.inv(post.precision_matrix), post.covariance_matrix)
    torch.testing.assert_close(post.variance, post.covariance_matrix.diagonal())
    z = post.sample((6,))
    reference = torch.distributions.MultivariateNormal(post.mean, precision_matrix=post.precision_matrix)
    torch.testing.assert_close(post.log_prob(z), reference.log_prob(z))
    transformed = dist.TransformedDistribution(guide.get_base_dist(), guide.get_transform())
    assert isinstance(guide.get_transform(), StructuredAffine)
    torch.testing.assert_close(transformed.log_prob(z), post.log_prob(z))
    torch.testing.assert_close(guide.get_transform().inv(guide.get_transform()(z)), z)


def test_antithetic_draws_come_in_mirrored_pairs_with_exact_moments():
    guide = AutoStructuredNormal(constrained_model, "dense", init_scale=0.5, antithetic=True)
    guide(torch.randn(5, 2))
    post = guide.get_posterior()
    z = post.rsample((2, 3)).reshape(6, -1) - post.mean
    torch.testing.assert_close(z[:3], -z[3:])
    many = post.sample((200000,))
    torch.testing.assert_close(many.mean(0), post.mean, atol=5e-3, rtol=0)
    torch.testing.assert_close(torch.cov(many.T), post.covariance_matrix, atol=5e-3, rtol=0)


def test_param_store_save_load_and_checkpoint_resume_bit_for_bit(tmp_path):
    model, x, y = blr_problem()

    def make():
        guide = AutoStructuredNormal(model, "lower_triangular")
        ngd = NGD(lr=0.1, momentum=0.5)
        return guide, ngd, SVI(model, guide, ngd, Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1))

    guide, ngd, svi = make()
    for _ in range(5):
        svi.step(x, y)
    pyro.get_param_store().save(tmp_path / "params.pt")
    ngd.save(str(tmp_path / "optim.pt"))
    rng = torch.get_rng_state()
    continued = [svi.step(x, y) for _ in range(5)]
    final = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    pyro.clear_param_store()
    guide, ngd, svi = make()
    guide(x, y)  # set the new guide up (this draws random numbers) before restoring the RNG
    pyro.get_param_store().load(tmp_path / "params.pt")
    ngd.load(str(tmp_path / "optim.pt"))
    torch.set_rng_state(rng)
    resumed = [svi.step(x, y) for _ in range(5)]
    assert resumed == continued
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value, final[name]), name


# ------------------------------------------------------------------ errors
def test_unknown_guide_without_fallback_raises_and_changes_nothing():
    model, x, y = blr_problem()
    guide = AutoNormal(model)
    svi = SVI(model, guide, NGD(fallback=False), Trace_ELBO())
    with pytest.raises(ValueError, match="no structured guide owns"):
        svi.step(x, y)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.raises(ValueError):
        svi.step(x, y)
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value, before[name])


class PoisonedELBO(Trace_ELBO):
    """Trace_ELBO whose gradient of one parameter is made non-finite."""

    def __init__(self, target, **kwargs):
        super().__init__(**kwargs)
        self.target = target

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = super().loss_and_grads(model, guide, *args, **kwargs)
        pyro.get_param_store()._params[self.target].grad.view(-1)[0] = float("nan")
        return loss


@pytest.mark.parametrize("target", ["AutoStructuredNormal.factor", "noise"])
def test_non_finite_gradient_raises_and_changes_nothing(target):
    model = noise_param_model
    _, x, y = blr_problem()
    guide = AutoStructuredNormal(model, "dense")
    fit(model, guide, NGD(lr=0.1), (x, y), 2)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    svi = SVI(model, guide, NGD(lr=0.1), PoisonedELBO(target))
    with pytest.raises(ValueError, match="non-finite"):
        svi.step(x, y)
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value, before[name]), name


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="lr"):
        NGD(lr=-1.0)
    with pytest.raises(ValueError, match="estimator"):
        NGD(estimator="score")
    with pytest.raises(ValueError, match="num_pairs"):
        NGD(num_pairs=0)
    with pytest.raises(ValueError, match="momentum"):
        NGD(momentum=1.0)
    with pytest.raises(TypeError, match="fallback"):
        NGD(fallback="adam")
    with pytest.raises(ValueError, match="unknown structure"):
        AutoStructuredNormal(constrained_model, "banded")
    with pytest.raises(ValueError, match="init_scale"):
        AutoStructuredNormal(constrained_model, init_scale=0.0)
    guide = AutoStructuredNormal(constrained_model, "block_triangular", k=9)
    with pytest.raises(ValueError, match="k"):
        guide(torch.randn(5, 2), torch.randn(5))  # k must be smaller than the latent dimension (5)
    ngd = NGD(lr=0.1)
    ngd.lr = float("nan")
    model, x, y = blr_problem()
    svi = SVI(model, AutoStructuredNormal(model), ngd, Trace_ELBO())
    with pytest.raises(ValueError, match="lr"):
        svi.step(x, y)
    with pytest.raises(ValueError, match="get_state"):
        ngd.set_state({"AutoStructuredNormal.loc": {}})


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_guide_list_and_jit_elbo():
    """Inside ``AutoGuideList`` NGD takes the structured part and the fallback the rest;
    under ``JitTrace_ELBO`` NGD still recognises its guide (``fallback=False`` would raise)."""
    from pyro import poutine
    from pyro.infer import JitTrace_ELBO
    from pyro.infer.autoguide import AutoDelta, AutoGuideList

    model, x, y = blr_problem()
    mean, cov = model.posterior(x, y)

    def noisy_model(x, y):
        scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal((x * w).sum(-1), scale), obs=y)

    guide = AutoGuideList(noisy_model)
    guide.append(AutoStructuredNormal(poutine.block(noisy_model, expose=["w"]), "lower_triangular"))
    guide.append(AutoDelta(poutine.block(noisy_model, expose=["scale"])))
    ngd = NGD(lr=0.2, fallback=pyro.optim.Adam({"lr": 0.05}))
    fit(noisy_model, guide, ngd, (x, y), 300, particles=8)
    state = ngd.get_state()
    assert list(state["natural_gradient"]) == ["AutoGuideList.0.loc"]
    assert list(state["fallback"]) == ["AutoGuideList.1.scale"]
    assert 0.35 < guide.median(x, y)["scale"] < 0.7  # data noise 0.5

    pyro.clear_param_store()
    jit_guide = AutoStructuredNormal(model, "dense")
    svi = SVI(model, jit_guide, NGD(lr=0.5, estimator="price", fallback=False), JitTrace_ELBO(ignore_jit_warnings=True))
    for _ in range(60):
        svi.step(x, y)
    torch.testing.assert_close(jit_guide.get_posterior().mean, mean, rtol=0, atol=1e-8)
