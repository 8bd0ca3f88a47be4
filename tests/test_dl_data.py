"""Data of the deep-learning study (experiments/dl_data.py) and its models (models.autoencoder,
models.classifiers): determinism, ranges, shapes, the curves' geometry, MNIST-1D's labels, and
that the Kronecker preconditioners find every layer of the models."""

import copy
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments import dl_data
from models.autoencoder import CURVES_SIZES, DeepAutoencoder
from models.autoencoder import loss as autoencoder_loss
from models.classifiers import CNN, MLP, ResNetCNN
from structngd.kron import EKFAC, KFAC, LocalKFAC

ndimage = pytest.importorskip("scipy.ndimage")


# ------------------------------------------------------------------ curves
@pytest.fixture(scope="module")
def curves():
    return dl_data.curves(n_train=300, n_test=60, size=16, seed=3)


def test_curves_deterministic_by_seed(curves):
    again = dl_data.curves(n_train=300, n_test=60, size=16, seed=3)
    other = dl_data.curves(n_train=300, n_test=60, size=16, seed=4)
    assert torch.equal(curves.x_train, again.x_train) and torch.equal(curves.x_test, again.x_test)
    assert (curves.x_train - other.x_train).abs().amax(dim=(1, 2)).gt(0.5).float().mean() > 0.9


def test_curves_shapes_and_ranges(curves):
    assert curves.x_train.shape == (300, 16, 16) and curves.x_test.shape == (60, 16, 16)
    assert curves.x_train.dtype == torch.float32 and curves.y_train is None
    images = torch.cat([curves.x_train, curves.x_test])
    assert images.min() >= 0 and images.max() <= 1
    assert images.amax(dim=(1, 2)).min() > 0.9  # every image holds a stroke through pixel centers
    # train and test images differ (one random draw split in two)
    assert torch.cdist(curves.x_test.flatten(1), curves.x_train.flatten(1)).min() > 0.1


def test_curves_are_thin_connected_strokes(curves):
    images = curves.x_train.numpy()
    ink = (images > 0.5).mean(axis=(1, 2))
    assert ink.min() > 0.005 and ink.max() < 0.3  # a stroke, never a blob or an empty image
    assert 0.02 < ink.mean() < 0.15
    eight = np.ones((3, 3))
    for image in images:
        assert ndimage.label(image > 0.1, structure=eight)[1] == 1  # one connected curve
    # thin: at most a few pixels of ink across, in every row and column crossed
    assert ((images > 0.5).sum(axis=2).max(), (images > 0.5).sum(axis=1).max()) <= (16, 16)
    eroded = [ndimage.binary_erosion(image > 0.5, structure=np.ones((3, 3))).sum() for image in images]
    assert np.mean(eroded) < 2.0  # a 3x3 block of full ink is rare


def test_curves_28_matches_the_curves_paper_shape():
    data = dl_data.curves(n_train=20, n_test=5, size=28, seed=0)
    assert data.x_train.shape == (20, 28, 28)
    model = DeepAutoencoder(CURVES_SIZES)
    assert model(data.x_train).shape == (20, 784)


# ------------------------------------------------------------------ digits
def test_digits_split_ranges_and_determinism():
    a, b, c = dl_data.digits(seed=0), dl_data.digits(seed=0), dl_data.digits(seed=1)
    assert a.x_train.shape == (1438, 8, 8) and a.x_test.shape == (359, 8, 8)
    assert a.x_train.min() == 0 and a.x_train.max() == 1
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    assert set(a.y_train.tolist()) == set(range(10)) and a.num_classes == 10
    assert dl_data.digits(flatten=True).x_train.shape == (1438, 64)


# ---------------------------------------------------------------- MNIST-1D
@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    return dl_data.mnist1d(num_samples=1000, seed=5)


def test_mnist1d_shapes_labels_and_scaling(mnist1d):
    assert mnist1d.x_train.shape == (800, 40) and mnist1d.x_test.shape == (200, 40)
    assert mnist1d.x_train.dtype == torch.float32 and mnist1d.y_train.dtype == torch.int64
    assert mnist1d.num_classes == 10
    counts = torch.bincount(torch.cat([mnist1d.y_train, mnist1d.y_test]), minlength=10)
    assert counts.tolist() == [100] * 10  # the generator makes num_samples / 10 of each class
    train_counts = torch.bincount(mnist1d.y_train, minlength=10)
    assert train_counts.min() >= 60 and train_counts.max() <= 100  # shuffled before the split
    x = torch.cat([mnist1d.x_train, mnist1d.x_test])
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


def test_mnist1d_deterministic_keeps_global_rngs_and_writes_nothing(mnist1d, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    again = dl_data.mnist1d(num_samples=1000, seed=5)
    other = dl_data.mnist1d(num_samples=1000, seed=6)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert list(tmp_path.iterdir()) == []  # no cache file, no download
    assert torch.equal(again.x_train, mnist1d.x_train) and torch.equal(again.y_test, mnist1d.y_test)
    assert not torch.equal(other.x_train, mnist1d.x_train)


# ------------------------------------------------------------------ models
def _models():
    torch.manual_seed(0)
    return {
        "autoencoder": (DeepAutoencoder((64, 32, 16, 4)), torch.rand(6, 8, 8), (6, 64)),
        "mlp": (MLP((40, 32, 32, 10)), torch.randn(6, 40), (6, 10)),
        "cnn1d": (CNN((1, 1, 40), (8, 8, 8)), torch.randn(6, 40), (6, 10)),
        "cnn2d": (CNN((1, 8, 8), (8, 8), kernel_size=3, stride=1), torch.randn(6, 8, 8), (6, 10)),
        "resnet": (ResNetCNN((8, 16), blocks=1, in_channels=3, image_size=8, norm="none"),
                   torch.randn(6, 3, 8, 8), (6, 10)),
    }


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "local"])
def test_models_shapes_and_every_layer_preconditioned(name, kind):
    model, x, shape = _models()[name]
    assert model(x).shape == shape
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unsupported-layer (or structure fallback) warning
        pre = {"kfac": KFAC, "ekfac": EKFAC, "local": lambda m: LocalKFAC(m, structure="diagonal")}[kind](model)
    assert [layer.name for layer in pre.layers] == layers and pre.skipped == {}
    out = model(x)
    loss = autoencoder_loss(model, x) if name == "autoencoder" else F.cross_entropy(out, torch.arange(6) % 10)
    loss.backward()
    pre.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_resnet_with_batch_norm_leaves_only_the_norms_to_the_optimizer():
    model = ResNetCNN((8, 16), blocks=2, in_channels=3, image_size=8)
    with pytest.warns(UserWarning) as record:
        pre = KFAC(model)
    assert len(record) == 1
    assert set(pre.skipped) == {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all("BatchNorm2d" in why for why in pre.skipped.values())
    assert len(pre.layers) == model.num_layers == 1 + 4 * 2 + 1 + 1  # stem, 4 blocks x 2, shortcut, fc


def test_inplace_relu_gives_the_same_preconditioned_gradients():
    """Output-tensor hooks see the pre-activation gradient although ReLU(inplace) overwrites it."""
    torch.manual_seed(1)
    model = CNN((1, 1, 40), (8, 8, 8)).double()
    plain = copy.deepcopy(model)
    relus = [m for m in plain.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus)
    for m in relus:
        m.inplace = False
    x, y = torch.randn(16, 40, dtype=torch.float64), torch.arange(16) % 10
    grads = []
    for net in (model, plain):
        pre = KFAC(net, damping=1e-2)
        F.cross_entropy(net(x), y).backward()
        pre.step()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_autoencoder_loss_is_per_example_bernoulli_nll():
    torch.manual_seed(0)
    model = DeepAutoencoder((16, 8, 3))
    x = torch.rand(5, 4, 4)
    binary = (x > 0.5).float()
    nll = -torch.distributions.Bernoulli(logits=model(binary)).log_prob(binary.reshape(5, 16)).sum(1).mean()
    torch.testing.assert_close(autoencoder_loss(model, binary), nll)
    assert model.loss(x).shape == () and model.squared_error(x) >= 0
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [8, 3, 8, 16]
