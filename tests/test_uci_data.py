"""The vendored UCI regression benchmark (experiments/data/uci) and its loader."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import uci_data, vi_data

#: the original folder layout, where a checkout has it beside itself (or where STRUCTNGD_UCI_SOURCE says)
ORIGINAL = Path(os.environ.get("STRUCTNGD_UCI_SOURCE", Path(__file__).resolve().parents[2] / "shared" / "data" / "uci"))
SIZES = {  # rows, inputs, splits, train, test
    "boston": (506, 13, 20, 455, 51),
    "concrete": (1030, 8, 20, 927, 103),
    "energy": (768, 8, 20, 691, 77),
    "kin8nm": (8192, 8, 20, 7373, 819),
    "naval": (11934, 16, 20, 10741, 1193),
    "power": (9568, 4, 20, 8611, 957),
    "protein": (45730, 9, 5, 41157, 4573),
    "wine": (1599, 11, 20, 1439, 160),
    "yacht": (308, 6, 20, 277, 31),
}


def test_every_set_is_vendored_small():
    files = sorted(uci_data.VENDORED.glob("*.npz"))
    assert {f.stem for f in files} == set(uci_data.NAMES.values())
    assert sum(f.stat().st_size for f in files) < 8e6


@pytest.mark.parametrize("name", sorted(SIZES))
def test_split_sizes_and_disjoint(name):
    rows, inputs, splits, n_train, n_test = SIZES[name]
    arrays = uci_data.load_arrays(name)
    assert arrays["data"].dtype == np.float32 and arrays["data"].shape[0] == rows
    assert arrays["index_features"].size == inputs and arrays["index_target"].size == 1
    assert arrays["index_train"].shape == (splits, n_train) and arrays["index_test"].shape == (splits, n_test)
    assert arrays["index_train"].dtype in (np.int16, np.int32)
    for train, test in zip(arrays["index_train"], arrays["index_test"]):
        assert np.intersect1d(train, test).size == 0
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(rows))


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason="original UCI folder not present")
@pytest.mark.parametrize("name", sorted(SIZES))
def test_vendored_equal_original_files(name):
    vendored = uci_data.load_arrays(name)
    original = uci_data.load_arrays(name, str(ORIGINAL))
    assert np.array_equal(vendored["data"], original["data"].astype(np.float32))
    for key in ("index_features", "index_target", "index_train", "index_test"):
        assert np.array_equal(vendored[key].astype(np.int64), original[key]), key
    # the standardized splits agree to float32 precision
    a = uci_data.load_uci(name, 1)
    b = uci_data.load_uci(name, 1, root=ORIGINAL)
    for u, v in zip(a[:4], b[:4]):
        np.testing.assert_allclose(u, v, rtol=0, atol=1e-4)
    assert a[4] == pytest.approx(b[4], rel=1e-5)


@pytest.mark.parametrize("name", ["boston", "yacht", "bostonHousing"])
def test_standardized_with_training_statistics(name):
    x_train, y_train, x_test, y_test, y_std = uci_data.load_uci(name, 3)
    arrays = uci_data.load_arrays(name)
    data = arrays["data"].astype(np.float64)
    target = int(arrays["index_target"][0])
    train, test = arrays["index_train"][3].astype(int), arrays["index_test"][3].astype(int)
    raw_train = data[train, target]
    assert y_std == pytest.approx(raw_train.std())
    np.testing.assert_allclose(y_train, (raw_train - raw_train.mean()) / raw_train.std())
    np.testing.assert_allclose(y_test, (data[test, target] - raw_train.mean()) / raw_train.std())
    np.testing.assert_allclose(x_train.mean(0), 0, atol=1e-10)
    varying = data[np.ix_(train, arrays["index_features"].astype(int))].std(0) > 0
    np.testing.assert_allclose(x_train.std(0)[varying], 1, atol=1e-10)
    assert x_test.shape[1] == x_train.shape[1] and y_test.shape == (x_test.shape[0],)
    assert np.isfinite(x_test).all()


def test_constant_inputs_are_centered_only():
    """Naval has two constant inputs (one with a float64 std of 1e-16 from round-off)."""
    x_train, _, x_test, *_ = uci_data.load_uci("naval", 0)
    constant = np.ptp(x_train, axis=0) == 0
    assert constant.sum() == 2
    assert (x_train[:, constant] == 0).all() and (x_test[:, constant] == 0).all()
    np.testing.assert_allclose(x_train.std(0)[~constant], 1, atol=1e-8)


def test_bad_names_and_splits():
    with pytest.raises(ValueError, match="unknown UCI"):
        uci_data.load_uci("housing", 0)
    with pytest.raises(ValueError, match="splits 0..4"):
        uci_data.load_uci("protein", 5)


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_vi_problem_protocol_and_original_units(float64):
    spec = vi_data.problem_specs("tiny")["uci_yacht"]
    problem = vi_data.load(spec, 2)
    assert spec.hidden == (50,) and spec.activation == "relu"
    assert vi_data.latent_dim(problem) == 6 * 50 + 50 + 50 + 1 + 1
    assert problem.x_train.shape == (277, 6) and problem.x_train.dtype == torch.float64
    y_std = problem.y_std
    assert y_std == pytest.approx(uci_data.load_uci("yacht", 2)[4])

    # a point-mass "guide" at zero weights and sigma = 1: predictive N(0, 1) in standardized units
    def guide(x, y=None):
        import pyro
        import pyro.distributions as dist

        for name, shape in (("layers.0.weight", (50, 6)), ("layers.0.bias", (50,)),
                            ("layers.1.weight", (1, 50)), ("layers.1.bias", (1,))):
            pyro.sample(name, dist.Delta(torch.zeros(shape)).to_event(len(shape)))
        pyro.sample("sigma", dist.Delta(torch.ones(())))

    metrics = vi_data.test_metrics(problem, guide, samples=3, seed=0)
    y = problem.y_test
    rmse_std = y.pow(2).mean().sqrt().item()
    ll_std = torch.distributions.Normal(0.0, 1.0).log_prob(y).mean().item()
    assert metrics["rmse"] == pytest.approx(rmse_std * y_std)
    assert metrics["test_loglik"] == pytest.approx(ll_std - math.log(y_std))


def test_vi_study_on_a_uci_set(tmp_path):
    """A few steps on yacht (2 splits): original-unit metrics with standard errors, the literature
    line, and the O(d^2) guides skipped on UCI problems."""
    import json

    from experiments.__main__ import main

    main(["vi", "--tiny", "--problems", "uci_yacht", "--seeds", "0", "1", "--methods", "ngd_diagonal",
          "adam_normal", "adam_mvn", "--uci-ngd-steps", "4", "--uci-adam-steps", "6", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in results["summary"]}
    assert results["problems"]["uci_yacht"]["latent_dim"] == 402
    assert rows["Adam AutoMVN"]["setting"] == "skipped"
    for key in ("NGD diagonal", "Adam AutoNormal"):
        row = rows[key]
        assert row["status"] == "ok" and row["steps"] == (4 if key.startswith("NGD") else 6)
        for name in ("test_loglik", "test_loglik_se", "rmse", "rmse_se"):
            assert math.isfinite(row[name]), (key, name)
    splits = {r["seed"] for r in results["runs"]}
    assert splits == {0, 1}
    report = (tmp_path / "table.md").read_text()
    assert "Literature (test RMSE / test LL" in report and "PBP 1.02 ± 0.05 / -1.63 ± 0.02" in report
