"""The BNN scale study: its ``--tiny`` run end to end (files, ratios that follow from the recorded curves),
the metrics against direct computations, the KL inputs of every method against its draws, and the size of the
default network."""

import argparse
import json
import math
import statistics

import pyro
import pytest
import torch

from experiments import bnn_scale
from experiments.vi_data import expected_calibration_error
from structngd.families import KroneckerGaussian

from helpers import study_settings


def _best_run(results, method):
    return next(r for r in results["runs"] if r["method"] == method and r["label"] == results["best"][method])


def _first_reaching(run, target):
    for step, seconds, value in zip(run["steps"], run["seconds"], run["elbo"]):
        if value is not None and value >= target:
            return step, seconds
    return None, None


def test_tiny_run_writes_its_files_and_ratios_that_follow_from_its_curves(tmp_path):
    settings = study_settings(bnn_scale, ["--tiny"])
    assert settings == bnn_scale.PRESETS["tiny"]
    parser = argparse.ArgumentParser()
    bnn_scale.add_arguments(parser)
    bnn_scale.run(parser.parse_args(["--tiny", "--out", str(tmp_path)]))
    for name in ("table.md", "verdict.json", "results.json", "elbo_vs_steps.png", "elbo_vs_seconds.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == set(bnn_scale.METHODS)
    assert len(results["runs"]) == sum(len(settings.configs(m)) for m in settings.methods)
    for run in results["runs"]:
        assert run["status"] == "ok", run
        assert all(math.isfinite(v) for v in run["elbo"]), run
        assert run["elbo"][-1] < 0  # log-likelihood <= 0 and KL >= 0
        assert 0 <= run["test"]["ece"] <= 1 and 0 <= run["test"]["accuracy"] <= 1 and run["test"]["nll"] > 0

    adam, timing = _best_run(results, "adam_normal"), results["timing"]
    for prefix, method in (("", "kron_ngd"), ("vkfac_", "vkfac")):  # Kronecker NGD, then VariationalKFAC
        ours = _best_run(results, method)
        ratios = {k[len(prefix):]: v for k, v in results["ratios"].items() if k.startswith(prefix)}
        assert ratios["adam_final_elbo"] == pytest.approx(adam["elbo"][-1], rel=1e-6)
        step, seconds = _first_reaching(ours, adam["elbo"][-1])
        assert ratios["steps_to_adam_final"] == step
        if step is None:
            assert ratios["steps_fraction_of_adam"] is None
        else:
            assert ratios["steps_fraction_of_adam"] == pytest.approx(step / adam["steps"][-1])
            assert ratios["seconds_fraction_of_adam"] == pytest.approx(seconds / adam["seconds"][-1], rel=1e-4)
        assert len(timing[method]["ms"]) == settings.timing_rounds
        assert ratios["step_time_ratio_to_adam"] == pytest.approx(
            statistics.median(timing[method]["ms"]) / statistics.median(timing["adam_normal"]["ms"]))
        for baseline in bnn_scale.BASELINES:
            other = _best_run(results, baseline)
            assert ratios[f"test_nll_ratio_to_{baseline}"] == pytest.approx(ours["test"]["nll"] / other["test"]["nll"])
            assert ratios[f"test_ece_ratio_to_{baseline}"] == pytest.approx(ours["test"]["ece"] / other["test"]["ece"])
    # the best setting has the highest final ELBO of its method's grid
    for method in bnn_scale.METHODS:
        finals = [r["elbo"][-1] for r in results["runs"] if r["method"] == method]
        assert _best_run(results, method)["elbo"][-1] == max(finals)

    table = (tmp_path / "table.md").read_text()
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["study"] == "bnn_scale" and verdict["lines"]
    assert table.splitlines()[2] == "**Verdict.** " + " ".join(verdict["lines"])  # first, under the title


def test_ece_of_hand_built_predictions():
    labels = torch.tensor([0, 1, 2, 0])
    confident = torch.nn.functional.one_hot(labels, 3).double()
    assert expected_calibration_error(confident, labels, 15) == 0.0
    # four predictions at confidence 0.9 (three right), two at 0.58 (one right): two occupied bins
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 4 + [[0.58, 0.21, 0.21]] * 2, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 0, 2])
    expected = 4 / 6 * abs(3 / 4 - 0.9) + 2 / 6 * abs(1 / 2 - 0.58)
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(expected, abs=1e-12)
    # the study's metrics: one draw of those probabilities
    metrics = bnn_scale.predictive_metrics(probs.log().unsqueeze(0), labels, 15)
    assert metrics["ece"] == pytest.approx(expected, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(4 / 6)


def test_predictive_nll_is_minus_log_of_the_mean_probability():
    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(5, 7, 4, generator=g, dtype=torch.float64) * 3, -1)
    labels = torch.randint(0, 4, (7,), generator=g)
    direct = 0.0
    for n in range(7):
        mean_p = sum(math.exp(float(log_probs[s, n, labels[n]])) for s in range(5)) / 5
        direct -= math.log(mean_p) / 7
    assert bnn_scale.predictive_nll(log_probs, labels) == pytest.approx(direct, rel=1e-12)
    assert bnn_scale.predictive_metrics(log_probs, labels, 15)["nll"] == pytest.approx(direct, rel=1e-12)


def test_kl_to_the_prior_matches_torch_for_diagonal_and_matrix_normal_posteriors():
    g = torch.Generator().manual_seed(1)
    s = 0.3
    loc, scale = torch.randn(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64) + .1
    variances = scale.square()
    got = bnn_scale.kl_to_isotropic_normal(loc, variances, bnn_scale.diagonal_entropy(variances), s)
    normal, prior_scale = torch.distributions.Normal, torch.tensor(s, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(normal(loc, scale), normal(0.0, prior_scale)).sum()
    assert float(got) == pytest.approx(float(expected), rel=1e-12)
    q = KroneckerGaussian(3, 4, structure="dense", dtype=torch.float64)
    with torch.no_grad():
        q.loc.copy_(torch.randn(3, 4, generator=g, dtype=torch.float64))
        q.in_factor.copy_(torch.eye(4, dtype=torch.float64) + 0.2 * torch.randn(4, 4, generator=g, dtype=torch.float64))
        q.out_factor.copy_(torch.eye(3, dtype=torch.float64) + 0.2 * torch.randn(3, 3, generator=g,
                                                                                 dtype=torch.float64))
        marginal = (q.row_covariance().diagonal()[:, None] * q.column_covariance().diagonal()).mT.reshape(-1)
        got = bnn_scale.kl_to_isotropic_normal(q.mean.mT.reshape(-1), marginal, q.entropy(), s)
        prior = torch.distributions.MultivariateNormal(torch.zeros(12, dtype=torch.float64),
                                                       s**2 * torch.eye(12, dtype=torch.float64))
        assert float(got) == pytest.approx(float(torch.distributions.kl_divergence(q.to_torch(), prior)), rel=1e-10)


@pytest.mark.parametrize("method", bnn_scale.METHODS)
def test_each_methods_moments_are_those_of_its_draws(method):
    """The means and variances that enter the KL are the draws' (after a few steps, 4000 draws, tiny net)."""
    torch.manual_seed(0)
    settings = bnn_scale.PRESETS["tiny"]
    data = bnn_scale.load_data(settings)
    config = settings.configs(method)[0]
    pyro.clear_param_store()
    trained = bnn_scale.build(config, settings, data)
    for step in range(1, 4):
        trained.step(data.x_train[:32], data.y_train[:32], step)
    means, variances, entropy = trained.moments()
    draws = torch.stack([torch.cat([t.reshape(-1) for w, b in trained.draw() for t in (w, b)])
                         for _ in range(4000)])
    assert torch.isfinite(entropy)
    # weights and biases in the layers' order: means / variances come in the same flat layout for every method
    order = _flat_order(trained, means.numel())
    sample_mean, sample_var = draws.double().mean(0), draws.double().var(0)
    spread = (variances.double()[order] / 4000).sqrt()
    assert ((sample_mean - means.double()[order]).abs() < 6 * spread + 1e-6).all()
    assert (sample_var / variances.double()[order]).mean() == pytest.approx(1.0, abs=0.05)


def _flat_order(method, size):
    """The positions in ``moments()``'s layout of the draws' layout (per layer: the weight row by row, then the
    bias): the same but for VariationalKFAC, whose posteriors are over ``W~ = [W, b]`` row by row."""
    if not (isinstance(method, bnn_scale.TorchMethod) and method.config.method == "vkfac"):
        return torch.arange(size)
    order, offset = [], 0
    for layer in method.linears:
        d_out, d_in = layer.weight.shape
        index = torch.arange(offset, offset + d_out * (d_in + 1)).reshape(d_out, d_in + 1)
        order += [index[:, :-1].reshape(-1), index[:, -1]]
        offset += d_out * (d_in + 1)
    return torch.cat(order)


def test_the_default_network_has_at_least_1e5_weights():
    for preset in ("quick", "full"):
        settings = bnn_scale.PRESETS[preset]
        count = bnn_scale.num_weights(settings)
        assert count >= 10**5
        assert count == sum(p.numel() for p in bnn_scale.plain_mlp(settings).parameters())
    assert bnn_scale.num_weights(bnn_scale.Settings()) == 40 * 300 + 300 + 300 * 300 + 300 + 300 * 10 + 10
