"""Tests for ``models.BNN``: shapes, latent dimension, vectorized particles, likelihoods."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer import SVI
from pyro.poutine.util import prune_subsample_sites

from models import BNN
from structngd.pyro import AutoStructuredNormal

f64 = torch.float64


def data(n=12, p=3, classes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=f64)
    y = torch.randint(0, classes, (n,), generator=g) if classes else torch.randn(n, generator=g, dtype=f64)
    return x, y


def make(likelihood="gaussian", hidden=(5, 4), **kwargs):
    out = 1 if likelihood == "gaussian" else 3
    return BNN(3, out, hidden=hidden, likelihood=likelihood, **kwargs)


LIKELIHOODS = ["gaussian", "categorical"]


pytestmark = pytest.mark.usefixtures("fresh_pyro")


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_prior_predictive_shapes(likelihood, parallel):
    model = make(likelihood)
    x, _ = data()
    out = Predictive(model, num_samples=7, parallel=parallel, return_sites=None)(x)
    assert out["y"].shape == (7, 12)
    # global sites keep the data plate's singleton slot: (samples, 1, *event)
    assert out["layers.0.weight"].shape == (7, 1, 5, 3)
    assert out["layers.2.bias"].shape == (7, 1, model.sizes[-1])
    ret = Predictive(model, num_samples=7, parallel=parallel, return_sites=["_RETURN"])(x)["_RETURN"]
    assert ret.shape == ((7, 12) if likelihood == "gaussian" else (7, 12, 3))
    if likelihood == "gaussian":
        assert out["sigma"].shape == (7, 1) and (out["sigma"] > 0).all()
    else:
        assert out["y"].dtype == torch.long and out["y"].min() >= 0 and out["y"].max() < 3


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_latent_dim_counts_weights_biases_and_noise(likelihood):
    model = make(likelihood)
    x, y = data(classes=None if likelihood == "gaussian" else 3)
    weights = 3 * 5 + 5 + 5 * 4 + 4 + 4 * model.sizes[-1] + model.sizes[-1]
    expected = weights + (1 if likelihood == "gaussian" else 0)
    guide = AutoStructuredNormal(model, structure="diagonal")
    guide(x, y)
    assert model.num_weights == weights
    assert guide.latent_dim == model.latent_dim == expected


def test_network_matches_manual_mlp():
    model = make("gaussian", hidden=(4,), activation="relu")
    x, _ = data()
    tr = poutine.trace(model).get_trace(x)
    w0, b0 = tr.nodes["layers.0.weight"]["value"], tr.nodes["layers.0.bias"]["value"]
    w1, b1 = tr.nodes["layers.1.weight"]["value"], tr.nodes["layers.1.bias"]["value"]
    manual = (torch.relu(x @ w0.T + b0) @ w1.T + b1).squeeze(-1)
    torch.testing.assert_close(tr.nodes["_RETURN"]["value"], manual)
    torch.testing.assert_close(tr.nodes["y"]["fn"].scale, tr.nodes["sigma"]["value"].expand(12))


def _per_particle_log_joint(model, samples, x, y, num):
    """log p(x, y, latents) for each of ``num`` particles, vectorized and by a loop."""
    with pyro.plate("particles", num, dim=-2):
        conditioned = poutine.condition(model, data=samples)
        tr = poutine.trace(conditioned).get_trace(x, y)
    tr = prune_subsample_sites(tr)
    tr.compute_log_prob()
    vectorized = sum(site["log_prob"].reshape(num, -1).sum(-1) for site in tr.nodes.values() if site["type"] == "sample")
    looped = []
    for i in range(num):
        one = poutine.trace(poutine.condition(model, data={k: v[i, 0] for k, v in samples.items()})).get_trace(x, y)
        looped.append(one.log_prob_sum())
    return vectorized, torch.stack(looped)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_vectorized_particles_match_loop(likelihood):
    model = make(likelihood)
    x, y = data(classes=None if likelihood == "gaussian" else 3)
    samples = Predictive(model, num_samples=6, return_sites=None)(x)
    samples.pop("y")
    vectorized, looped = _per_particle_log_joint(model, samples, x, y, 6)
    assert vectorized.shape == (6,)
    torch.testing.assert_close(vectorized, looped)
    assert len(set(looped.tolist())) == 6  # the particles really differ


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_vectorized_svi_with_structured_ngd(likelihood):
    """Vectorized particles through AutoStructuredNormal + NGD: finite losses that go down."""
    from structngd.pyro import NGD

    model = make(likelihood, hidden=(4,))
    x, y = data(n=30, classes=None if likelihood == "gaussian" else 3)
    guide = AutoStructuredNormal(model, structure="block_triangular", k=2)
    loss = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, NGD(lr=0.1, max_step=1.0), loss)
    losses = [svi.step(x, y) for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])


def test_categorical_probabilities_sum_to_one():
    model = make("categorical")
    x, y = data(classes=3)
    with pyro.plate("particles", 4, dim=-2):
        tr = poutine.trace(model).get_trace(x, y)
    probs = tr.nodes["y"]["fn"].probs
    assert probs.shape == (4, 12, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 12, dtype=f64))
    torch.testing.assert_close(probs, torch.softmax(tr.nodes["_RETURN"]["value"], -1))


def test_subsampling_scales_likelihood():
    model = make("gaussian", subsample_size=4)
    x, y = data()
    tr = poutine.trace(model).get_trace(x, y)
    assert tr.nodes["y"]["value"].shape == (4,)
    assert tr.nodes["y"]["scale"] == pytest.approx(12 / 4)


def test_noise_is_a_constrained_guide_site():
    model = make("gaussian")
    x, y = data()
    guide = AutoStructuredNormal(model, structure="diagonal", init_scale=0.5)
    samples = Predictive(model, guide=guide, num_samples=50, parallel=True, return_sites=["sigma"])(x, y)
    assert samples["sigma"].shape == (50, 1) and (samples["sigma"] > 0).all()
    assert "sigma" in guide.median(x, y)
    trace = poutine.trace(model).get_trace(x, y)
    assert isinstance(trace.nodes["sigma"]["fn"], dist.LogNormal)


@pytest.mark.parametrize(
    "kwargs", [dict(likelihood="poisson"), dict(activation="nope"), dict(prior_scale=0.0), dict(hidden=(0,))]
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        BNN(3, 1, **kwargs)


def test_bad_shapes_raise():
    model = make("gaussian")
    with pytest.raises(ValueError):
        model(torch.randn(5, 2, dtype=f64))
    with pytest.raises(ValueError):
        model(torch.randn(5, 3, dtype=f64), torch.randn(4, dtype=f64))


# ------------------------------------------------------------ heteroscedastic likelihood
def _heteroscedastic(hidden=(5, 4), **kwargs):
    return BNN(3, 2, hidden=hidden, likelihood="heteroscedastic", **kwargs)


def test_heteroscedastic_log_likelihood_is_normal_with_softplus_variance():
    """At given weights: ``log N(y | f_0(x), softplus(f_1(x)) + floor)`` per point, by torch.distributions."""
    from models.bnn import VARIANCE_FLOOR

    model = _heteroscedastic(hidden=(4,), activation="relu")
    x, y = data()
    tr = poutine.trace(model).get_trace(x, y)
    w0, b0 = tr.nodes["layers.0.weight"]["value"], tr.nodes["layers.0.bias"]["value"]
    w1, b1 = tr.nodes["layers.1.weight"]["value"], tr.nodes["layers.1.bias"]["value"]
    out = torch.relu(x @ w0.T + b0) @ w1.T + b1
    variance = torch.log1p(out[:, 1].exp()) + VARIANCE_FLOOR
    expected = torch.distributions.Normal(out[:, 0], variance.sqrt()).log_prob(y)
    torch.testing.assert_close(tr.nodes["y"]["fn"].log_prob(y), expected)
    torch.testing.assert_close(tr.nodes["_RETURN"]["value"], out[:, 0])
    assert "sigma" not in tr.nodes and model.latent_dim == model.num_weights == 3 * 4 + 4 + 4 * 2 + 2


def test_heteroscedastic_vectorized_particles_match_loop():
    model = _heteroscedastic()
    x, y = data()
    samples = Predictive(model, num_samples=6, return_sites=None)(x)
    samples.pop("y")
    assert samples["layers.2.weight"].shape == (6, 1, 2, 4) and samples["layers.2.bias"].shape == (6, 1, 2)
    assert "sigma" not in samples
    vectorized, looped = _per_particle_log_joint(model, samples, x, y, 6)
    assert vectorized.shape == (6,)
    torch.testing.assert_close(vectorized, looped)
    assert len(set(looped.tolist())) == 6
    ret = Predictive(model, num_samples=7, parallel=True, return_sites=["_RETURN", "y"])(x)
    assert ret["_RETURN"].shape == (7, 12) and ret["y"].shape == (7, 12)


def test_heteroscedastic_needs_two_outputs():
    with pytest.raises(ValueError, match="out_features=2"):
        BNN(3, 1, likelihood="heteroscedastic")


def test_data_size_scales_a_minibatch_likelihood():
    """``data_size=N``: a batch of ``B`` points scores ``N / B`` times its log-likelihood."""
    model = make("gaussian")
    x, y = data()
    tr = poutine.trace(model).get_trace(x[:4], y[:4], data_size=12)
    assert tr.nodes["y"]["scale"] == pytest.approx(3.0) and tr.nodes["y"]["value"].shape == (4,)
    with pytest.raises(ValueError, match="data_size"):
        model(x, y, data_size=5)
