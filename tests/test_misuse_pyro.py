"""structngd.pyro under misuse and faults: no step writes a non-finite value or a singular factor and a
step that raises changes nothing; optimizer states are checked when applied; the Price estimator refuses
models it cannot see whole; guides and NGD are saved and resumed bit for bit; bad arguments get clear
errors; every structure behaves like Pyro's own autoguides."""

import copy
import io
import math
import pickle

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta, AutoGuideList
from pyro.infer.util import zero_grads

from models.linear import BayesianLinearRegression, BayesianLogisticRegression
from structngd import groups
from structngd.pyro import NGD, AutoStructuredNormal

from helpers import assert_same

STRUCTURES = [("dense", {}), ("diagonal", {}), ("lower_triangular", {}), ("upper_triangular", {}),
              ("block_diagonal", {"block_size": 2}), ("block_triangular", {"k": 2}), ("heisenberg", {"k": 2}),
              ("hierarchical", {"k1": 1, "k2": 2})]
IDS = [name for name, _ in STRUCTURES]


pytestmark = pytest.mark.usefixtures("fresh_pyro")


def blr(n=40, p=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.linspace(1.0, -1.0, p, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return BayesianLinearRegression(1.0, 0.5), x, y


def noise_param_model(x, y):
    """Linear regression whose noise scale is a plain ``pyro.param`` (the fallback's)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0).to_event(1))
    noise = pyro.param("noise", torch.tensor(2.0, dtype=x.dtype), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), noise), obs=y)


def elbo(particles=1):
    return Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)


def snapshot(ngd=None):
    """Every param store value and gradient, and every momentum buffer of ``ngd``, cloned."""
    store = pyro.get_param_store()
    out = {f"param {k}": v.detach().clone() for k, v in store.items()}
    out.update({f"grad {k}": v.unconstrained().grad.clone() for k, v in store.items()
                if v.unconstrained().grad is not None})
    for guide, (_, optimizer) in (ngd._optimizers.items() if ngd is not None else ()):
        for p, state in optimizer.state.items():
            out.update({f"{guide._pyro_name} {tuple(p.shape)} {k}": v.clone() for k, v in state.items()})
    return out


def all_finite(snap, grads=True):
    return all(bool(torch.isfinite(v).all()) for k, v in snap.items() if grads or not k.startswith("grad"))


def recorded_svi(model, guide, ngd, loss):
    """``SVI`` whose ELBO records ``snapshot(ngd)`` once the gradients are formed (``svi.before``): what the
    optimizer receives, and what a step that raises must leave."""
    svi = SVI(model, guide, ngd, loss)
    inner = svi.loss_and_grads

    def loss_and_grads(*args, **kwargs):
        value = inner(*args, **kwargs)
        svi.before = snapshot(ngd)
        return value

    svi.loss_and_grads = loss_and_grads
    return svi


def zero_all_grads():
    """What a user does after a step raised: ``SVI`` leaves the gradients for the optimizer to consume."""
    zero_grads({v.unconstrained() for v in pyro.get_param_store().values()})


def refused(svi, ngd, *args, match):
    """The step raises ``ValueError`` matching ``match`` and changes nothing the optimizer received."""
    with pytest.raises(ValueError, match=match):
        svi.step(*args)
    assert_same(svi.before, snapshot(ngd))
    zero_all_grads()


# ------------------------------------------------------- 1. no non-finite value is ever written
@pytest.fixture(scope="module")
def breast_cancer():
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float64)
    return (x - x.mean(0)) / x.std(0), torch.as_tensor(y, dtype=torch.float64)


def test_exact_step_at_lr_1_on_breast_cancer_is_refused_before_it_writes_a_non_finite_value(breast_cancer):
    model = BayesianLogisticRegression(1.0)
    guide = AutoStructuredNormal(model, "dense")
    ngd = NGD(lr=1.0, max_step=None)
    svi = recorded_svi(model, guide, ngd, elbo())
    for step in range(150):
        try:
            svi.step(*breast_cancer)
        except ValueError as err:
            assert "non-finite" in str(err) or "singular" in str(err)
            assert_same(svi.before, snapshot(ngd))
            assert all_finite(svi.before)
            assert step > 5  # it diverges first
            return
        assert all_finite(snapshot(ngd), grads=False), step
    pytest.fail("one particle at lr 1 without a trust region should diverge on breast cancer")


@pytest.mark.parametrize("lr", [0.1, 1.0])
def test_default_trust_region_keeps_breast_cancer_finite_at_lr_0_1_and_1(breast_cancer, lr):
    model = BayesianLogisticRegression(1.0)
    guide = AutoStructuredNormal(model, "dense")
    ngd = NGD(lr=lr)
    assert ngd.max_step == 1.0
    losses = [SVI(model, guide, ngd, elbo(16)).step(*breast_cancer) for _ in range(100)]
    assert all(math.isfinite(v) for v in losses) and all_finite(snapshot(ngd))
    assert np.mean(losses[-10:]) < 70  # from 500; the optimum is about 55.4


def test_conjugate_model_exact_method_and_default_reach_the_posterior_in_the_same_steps():
    """From ``init_scale=0.1`` the default trust region never binds on a conjugate model: the exact method
    (``max_step=None``) and the default take bit-identical steps and reach the closed form."""
    model, x, y = blr()
    mean, cov = model.posterior(x, y)
    runs = []
    for max_step in (None, 1.0):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoStructuredNormal(model, "dense")
        svi = SVI(model, guide, NGD(lr=1.0, estimator="price", max_step=max_step), elbo())
        runs.append([(svi.step(x, y), guide.loc.detach().clone(), guide.factor.detach().clone()) for _ in range(10)])
        post = guide.get_posterior()
        torch.testing.assert_close(post.mean, mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(post.covariance_matrix, cov, rtol=0, atol=1e-10)
    for (la, ma, fa), (lb, mb, fb) in zip(*runs):
        assert la == lb and torch.equal(ma, mb) and torch.equal(fa, fb)


class FaultyELBO(Trace_ELBO):
    """Trace_ELBO whose gradients a seeded generator spoils (NaN, inf, 1e30 scale) now and then."""

    def __init__(self, gen, **kwargs):
        super().__init__(**kwargs)
        self.gen, self.fault = gen, 0

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = super().loss_and_grads(model, guide, *args, **kwargs)
        params = dict(pyro.get_param_store()._params)
        names = sorted(params)
        self.fault = int(torch.randint(0, 6, (1,), generator=self.gen))
        target = params[names[int(torch.randint(0, len(names), (1,), generator=self.gen))]]
        if self.fault == 1:
            target.grad.view(-1)[0] = float("nan")
        elif self.fault == 2:
            target.grad.view(-1)[-1] = float("inf")
        elif self.fault == 3:
            target.grad.mul_(1e30)
        return loss


@pytest.mark.parametrize("estimator", ["reparam", "price"])
def test_random_faults_never_write_a_non_finite_value_and_every_raise_changes_nothing(estimator):
    gen = torch.Generator().manual_seed(3)
    _, x, y = blr()
    guide = AutoStructuredNormal(noise_param_model, "lower_triangular")
    ngd = NGD(lr=0.3, momentum=0.5, estimator=estimator, fallback=pyro.optim.Adam({"lr": 0.01}))
    faulty = FaultyELBO(gen, num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = recorded_svi(noise_param_model, guide, ngd, faulty)
    raised = 0
    for step in range(60):
        ngd.lr = 30.0 if int(torch.randint(0, 8, (1,), generator=gen)) == 0 else 0.3
        try:
            svi.step(x, y)
        except ValueError as err:
            raised += 1
            assert "non-finite" in str(err) or "singular" in str(err), err
            assert_same(svi.before, snapshot(ngd))
            zero_all_grads()
        assert all_finite(snapshot(ngd), grads=False), (step, faulty.fault)
    assert raised >= 3, raised


def test_renyi_elbo_drift_to_a_singular_factor_is_refused_not_written():
    model, x, y = blr(50, 4)
    guide = AutoStructuredNormal(model, "dense")
    ngd = NGD(lr=0.1)
    renyi = RenyiELBO(alpha=0.5, num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = recorded_svi(model, guide, ngd, renyi)
    for _ in range(400):
        try:
            svi.step(x, y)
        except ValueError as err:
            assert "singular" in str(err) or "non-finite" in str(err)
            assert_same(svi.before, snapshot(ngd))
            guide.get_posterior().rsample((4,))  # the factor stays invertible
            return
    pytest.fail("NGD under RenyiELBO is expected to drift to a singular factor (documented)")


# ----------------------------------------------------------------------- 2. state checks
def trained(structure, p=3, momentum=0.5, **options):
    """A guide over a p-feature regression after two NGD steps with momentum: ``(guide, ngd, svi, x, y)``."""
    model, x, y = blr(p=p)
    guide = AutoStructuredNormal(model, structure, **options)
    ngd = NGD(lr=0.2, momentum=momentum, fallback=False)
    svi = recorded_svi(model, guide, ngd, elbo(4))
    for _ in range(2):
        svi.step(x, y)
    return guide, ngd, svi, x, y


@pytest.mark.parametrize("other,p,match", [("lower_triangular", 3, "group"), ("dense", 2, "group")])
def test_a_state_of_another_structure_or_dimension_is_refused(other, p, match):
    _, dense_ngd, _, _, _ = trained("dense")
    state = dense_ngd.get_state()
    pyro.clear_param_store()
    guide, ngd, svi, x, y = trained(other, p=p)
    before, state_before = snapshot(ngd), ngd.get_state()
    with pytest.raises(ValueError, match=match):
        ngd.set_state(state)
    assert_same(before, snapshot(ngd))
    assert repr(ngd.get_state()) == repr(state_before)


def test_a_state_without_its_group_is_checked_by_shape():
    _, dense_ngd, _, _, _ = trained("dense", p=3)
    legacy = {name: entry["optimizer"] for name, entry in dense_ngd.get_state()["natural_gradient"].items()}
    pyro.clear_param_store()
    guide, ngd, svi, x, y = trained("dense", p=2)
    before = snapshot(ngd)
    with pytest.raises(ValueError, match=r"momentum buffer of shape \(3,\) for loc, which has shape \(2,\)"):
        ngd.set_state({"natural_gradient": legacy, "fallback": {}})
    assert_same(before, snapshot(ngd))


def test_a_pending_state_that_does_not_fit_is_refused_at_the_step_and_changes_nothing():
    _, dense_ngd, _, _, _ = trained("dense")
    state = dense_ngd.get_state()
    pyro.clear_param_store()
    model, x, y = blr()
    guide = AutoStructuredNormal(model, "diagonal")
    ngd = NGD(lr=0.2, momentum=0.5, fallback=False)
    ngd.set_state(state)  # no guide of that name is known yet
    pending = ngd.get_state()["natural_gradient"]  # pending states are part of the state
    assert pending.keys() == state["natural_gradient"].keys()
    assert [v["group"] for v in pending.values()] == ["Dense(dim=3)"]
    svi = recorded_svi(model, guide, ngd, elbo())
    guide(x, y)
    refused(svi, ngd, x, y, match="group Dense")


def test_malformed_states_are_refused():
    guide, ngd, svi, x, y = trained("dense")
    name = "AutoStructuredNormal.loc"
    for bad in ({"natural_gradient": {name: {}}, "fallback": {}}, {"natural_gradient": {name: 3}, "fallback": {}}):
        with pytest.raises(ValueError, match="not an entry of NGD.get_state"):
            ngd.set_state(bad)
    with pytest.raises(ValueError, match="get_state"):
        ngd.set_state({"natural_gradient": [], "fallback": {}})


# ------------------------------------------------------------------ 3. Price estimator blind spots
def noisy_model(x, y):
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), scale), obs=y)


def test_price_refuses_a_guide_inside_an_auto_guide_list():
    _, x, y = blr()
    guide = AutoGuideList(noisy_model)
    guide.append(AutoStructuredNormal(poutine.block(noisy_model, expose=["w"]), "dense"))
    guide.append(AutoDelta(poutine.block(noisy_model, expose=["scale"])))
    ngd = NGD(estimator="price")
    svi = recorded_svi(noisy_model, guide, ngd, elbo())
    guide(x, y)
    refused(svi, ngd, x, y, match="AutoGuideList")


@config_enumerate
def mixture_model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.5, dtype=x.dtype)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1) + 3.0 * c, 0.5), obs=y)


def test_price_refuses_a_blocked_model_and_reparam_handles_it():
    _, x, y = blr(p=2)
    y = y + 3.0
    guide = AutoStructuredNormal(poutine.block(mixture_model, hide=["c"]), "dense")
    ngd = NGD(estimator="price")
    svi = recorded_svi(mixture_model, guide, ngd, TraceEnum_ELBO(max_plate_nesting=1))
    guide(x, y)
    refused(svi, ngd, x, y, match="poutine.block")
    ngd.estimator = "reparam"
    losses = [svi.step(x, y) for _ in range(60)]
    assert losses[-1] < losses[0] and all_finite(snapshot(ngd))


def test_price_refuses_latent_sites_the_guide_does_not_cover():
    def growing_model(x, y):  # a latent site that appears only for larger data sets
        w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0).to_event(1))
        shift = pyro.sample("shift", dist.Normal(x.new_zeros(()), 1.0)) if x.shape[0] > 20 else 0.0
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal((x * w).sum(-1) + shift, 0.5), obs=y)

    _, x, y = blr()
    guide = AutoStructuredNormal(growing_model, "dense")
    guide(x[:10], y[:10])
    ngd = NGD(estimator="price")
    svi = recorded_svi(growing_model, guide, ngd, elbo())
    with pytest.warns(UserWarning):  # Pyro's own warning: a model site the guide does not have
        refused(svi, ngd, x, y, match=r"sites \['shift'\] from their prior")


@pytest.mark.parametrize("estimator", ["reparam", "price"])
def test_under_poutine_scale_the_reparam_step_shrinks_by_the_scale_and_the_price_step_does_not(estimator):
    """The docstring's statement: with model and guide scaled by ``s``, ``lr`` acts as ``lr * s`` for
    ``"reparam"`` and as ``lr`` for ``"price"`` (one step from the same start and seed)."""
    model, x, y = blr()
    s, lr = 0.1, 0.5
    results = []
    for scale, rate in ((s, lr), (1.0, lr * s if estimator == "reparam" else lr)):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        guide = AutoStructuredNormal(model, "dense")
        ngd = NGD(lr=rate, estimator=estimator, max_step=None)
        SVI(poutine.scale(model, scale), poutine.scale(guide, scale), ngd, elbo(4)).step(x, y)
        results.append(torch.cat([guide.loc.detach(), guide.factor.detach().reshape(-1)]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------- 4. saving
def test_saving_a_guide_mid_training_keeps_it_whole(tmp_path):
    """Pyro's autoguides drop their model and master when pickled; the guide being saved keeps both."""
    model, x, y = blr()
    guide = AutoStructuredNormal(model, "dense")
    svi = SVI(model, guide, NGD(lr=0.5, estimator="price"), elbo())
    svi.step(x, y)
    torch.save(guide, io.BytesIO())
    copy.deepcopy(guide)
    assert guide._model is not None and guide.master is None
    svi.step(x, y)  # the Price estimator still has the model
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.get_param_store().load(tmp_path / "params.pt")  # the guide's family views tensors the store dropped
    loaded = pickle.loads(pickle.dumps(guide))
    assert loaded.family is None and loaded._last_arguments is None and loaded._model is None
    pyro.clear_param_store()
    parts = AutoGuideList(noisy_model)
    parts.append(AutoStructuredNormal(poutine.block(noisy_model, expose=["w"])))
    parts(x, y)
    torch.save(parts[0], io.BytesIO())
    assert parts[0].master is not None and parts[0].master() is parts


@pytest.mark.parametrize("how", ["pickle", "get_state"])
def test_guide_param_store_and_ngd_saved_mid_training_resume_bit_for_bit(tmp_path, how):
    _, x, y = blr()

    def make():
        guide = AutoStructuredNormal(noise_param_model, "block_triangular", k=1)
        ngd = NGD(lr=0.3, momentum=0.5, fallback=pyro.optim.Adam({"lr": 0.05}))
        return guide, ngd

    guide, ngd = make()
    svi = SVI(noise_param_model, guide, ngd, elbo(4))
    for _ in range(4):
        svi.step(x, y)
    torch.save(guide, tmp_path / "guide.pt")
    pyro.get_param_store().save(tmp_path / "params.pt")
    torch.save(ngd, tmp_path / "ngd.pt")
    ngd.save(str(tmp_path / "state.pt"))
    rng = torch.get_rng_state()
    continued = [svi.step(x, y) for _ in range(4)]
    final = snapshot()

    pyro.clear_param_store()
    guide = torch.load(tmp_path / "guide.pt", weights_only=False)
    pyro.get_param_store().load(tmp_path / "params.pt")
    if how == "pickle":
        ngd = torch.load(tmp_path / "ngd.pt", weights_only=False)
    else:
        ngd = make()[1]
        ngd.load(str(tmp_path / "state.pt"))
    torch.set_rng_state(rng)
    svi = SVI(noise_param_model, guide, ngd, elbo(4))
    assert [svi.step(x, y) for _ in range(4)] == continued
    assert_same(final, snapshot())
    assert set(ngd.get_state()["fallback"]) == {"noise"}


def test_a_pickled_guide_refuses_price_until_rebuilt_from_its_model():
    model, x, y = blr()
    guide = AutoStructuredNormal(model, "dense")
    SVI(model, guide, NGD(estimator="price"), elbo()).step(x, y)
    loaded = pickle.loads(pickle.dumps(guide))
    loaded(x, y)
    with pytest.raises(RuntimeError, match="does not keep"):
        loaded.price_gradients()


# ------------------------------------------------------------------------ 5. input validation
def test_flags_numbers_and_structures_are_checked():
    for bad in ("no", 1, None):
        with pytest.raises(ValueError, match="antithetic must be True or False"):
            AutoStructuredNormal(noise_param_model, antithetic=bad)
    with pytest.raises(ValueError, match="bad options"):
        AutoStructuredNormal(noise_param_model, "block_triangular")  # k missing
    with pytest.raises(ValueError, match="bad options"):
        AutoStructuredNormal(noise_param_model, "dense", k=2)
    with pytest.raises(ValueError, match="bad options"):
        AutoStructuredNormal(noise_param_model, "block_triangular", kk=2)
    with pytest.raises(ValueError, match="unknown structure"):
        AutoStructuredNormal(noise_param_model, "Dense")
    with pytest.raises(ValueError, match="max_step"):
        NGD(max_step=0.0)
    with pytest.raises(ValueError, match="num_pairs"):
        NGD(num_pairs=1.5)


def test_reassigned_hyperparameters_are_checked_at_the_step():
    model, x, y = blr()
    guide = AutoStructuredNormal(model)
    ngd = NGD(fallback=False)
    svi = recorded_svi(model, guide, ngd, elbo())
    svi.step(x, y)
    for name, bad in (("estimator", "score"), ("num_pairs", 0), ("max_step", -1.0), ("momentum", 1.0)):
        good = getattr(ngd, name)
        setattr(ngd, name, bad)
        refused(svi, ngd, x, y, match=name)
        setattr(ngd, name, good)


def test_numpy_scalars_are_numbers_and_numpy_bools_flags():
    model, x, y = blr()
    runs = []
    for lr, momentum, max_step, pairs, scale, anti in ((0.3, 0.5, 1.0, 2, 0.2, True),
                                                       (np.float64(0.3), np.float32(0.5), np.float64(1.0),
                                                        np.int64(2), np.float64(0.2), np.bool_(True))):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoStructuredNormal(model, "dense", init_scale=scale, antithetic=anti)
        for estimator in ("reparam", "price"):
            ngd = NGD(lr=lr, momentum=momentum, max_step=max_step, num_pairs=pairs, estimator=estimator)
            svi = SVI(model, guide, ngd, elbo(4))
            for _ in range(3):
                svi.step(x, y)
        runs.append(snapshot())
    assert_same(*runs)


# ---------------------------------------------------------- 6. every structure as a Pyro autoguide
def constrained_model(x, y=None):
    """Latents ``scale > 0``, ``probs`` on the simplex, ``w`` in R^3: 6 unconstrained coordinates."""
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    probs = pyro.sample("probs", dist.Dirichlet(torch.ones(3)))
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((x * w).sum(-1) + probs[..., :1], scale), obs=y)


def constrained_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g)
    return x, x @ torch.tensor([1.0, -1.0, 0.5]) + 0.3 * torch.randn(20, generator=g)


def fitted(structure, options):
    x, y = constrained_data()
    guide = AutoStructuredNormal(constrained_model, structure, **options)
    svi = SVI(constrained_model, guide, NGD(lr=0.05), elbo(4))
    for _ in range(5):
        svi.step(x, y)
    return guide, x, y


def summaries(guide, x):
    """Median, quantiles and seeded Predictive samples of a guide."""
    pyro.set_rng_seed(5)
    samples = Predictive(constrained_model, guide=guide, num_samples=4)(x)
    return guide.median(x), guide.quantiles([0.25, 0.75], x), samples


@pytest.mark.parametrize("structure,options", STRUCTURES, ids=IDS)
def test_every_structure_pickles_saves_and_loads_like_pyros_autoguides(tmp_path, structure, options):
    guide, x, y = fitted(structure, options)
    expected = summaries(guide, x)
    pyro.get_param_store().save(tmp_path / "params.pt")
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    for load in (lambda: pickle.loads(pickle.dumps(guide)), lambda: torch.load(io.BytesIO(buffer.getvalue()),
                                                                               weights_only=False)):
        pyro.clear_param_store()
        loaded = load()
        pyro.get_param_store().load(tmp_path / "params.pt")
        got = summaries(loaded, x)
        for a, b in zip(expected, got):
            for name in a:
                torch.testing.assert_close(torch.as_tensor(b[name]), torch.as_tensor(a[name]), rtol=0, atol=0)
        assert loaded.group.name == structure and repr(loaded.group) == repr(guide.group)


MISSING = [s for s in STRUCTURES if s[0] in ("lower_triangular", "upper_triangular", "block_diagonal",
                                             "block_triangular")]


@pytest.mark.parametrize("structure,options", MISSING, ids=[s for s, _ in MISSING])
def test_predictive_median_quantiles_of_the_remaining_structures(structure, options):
    guide, x, y = fitted(structure, options)
    assert guide.latent_dim == 6
    median, quantiles, samples = summaries(guide, x)
    assert samples["probs"].shape == (4, 1, 3) and samples["y"].shape == (4, 20) and (samples["scale"] > 0).all()
    torch.testing.assert_close(samples["probs"].sum(-1), torch.ones(4, 1))
    post = guide.get_posterior()
    sd = post.covariance_matrix.diagonal().sqrt()
    torch.testing.assert_close(torch.log(median["scale"]), post.mean[0])  # scale = exp(z_0)
    z = dist.Normal(0.0, 1.0).icdf(torch.tensor(0.75))
    torch.testing.assert_close(quantiles["w"][1], post.mean[3:] + z * sd[3:])
    torch.testing.assert_close(quantiles["w"][0], post.mean[3:] - z * sd[3:])


def representable_problem(group, seed=0):
    """A Gaussian model ``w ~ N(0, I)``, ``y ~ N(A w, I)`` whose posterior precision ``I + A^T A = B B^T``
    has ``B`` in ``group``, so the guide can equal the posterior."""
    g = torch.Generator().manual_seed(seed)
    d = group.dim
    b = group.from_diagonal(torch.full((d,), 2.0, dtype=torch.float64))
    b = b + 0.3 * torch.randn(b.shape, generator=g, dtype=torch.float64)
    dense = group.to_dense(b)
    precision = dense @ dense.mT
    a = torch.linalg.cholesky(precision - torch.eye(d, dtype=torch.float64)).mT  # A^T A = P - I
    y = torch.randn(d, generator=g, dtype=torch.float64)

    def model(a, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=torch.float64), 1.0).to_event(1))
        pyro.sample("y", dist.Normal((a * w.unsqueeze(-2)).sum(-1), 1.0).to_event(1), obs=y)

    return model, a, y, torch.linalg.solve(precision, a.mT @ y), precision


@pytest.mark.parametrize("structure,options", STRUCTURES[4:], ids=IDS[4:])
def test_price_ngd_reaches_an_exact_posterior_the_structure_can_represent(structure, options):
    group = groups.make(structure, 6, **options)
    model, a, y, mean, precision = representable_problem(group)
    guide = AutoStructuredNormal(model, structure, **options)
    svi = SVI(model, guide, NGD(lr=1.0, estimator="price", fallback=False), Trace_ELBO())
    for _ in range(40):
        svi.step(a, y)
    post = guide.get_posterior()
    torch.testing.assert_close(post.mean, mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(post.precision_matrix, precision, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("structure,options", STRUCTURES, ids=IDS)
def test_plain_adam_keeps_every_structure(structure, options):
    x, y = constrained_data()
    guide = AutoStructuredNormal(constrained_model, structure, **options)
    svi = SVI(constrained_model, guide, pyro.optim.Adam({"lr": 0.05}), elbo(2))
    for _ in range(10):
        svi.step(x, y)
    factor = guide.factor.detach()
    assert torch.equal(guide.group.restrict(guide.group.to_dense(factor)), factor)  # nothing stored off the pattern
