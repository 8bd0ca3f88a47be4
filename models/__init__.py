"""Model zoo used by the studies (Pyro BNNs, logistic regression, autoencoders, CNNs, plain regression nets)."""

from .autoencoder import CURVES_SIZES, DeepAutoencoder
from .bnn import BNN
from .classifiers import CNN, MLP, ResNetCNN
from .linear import BayesianLinearRegression, BayesianLogisticRegression
from .regression import RegressionMLP

__all__ = [
    "BNN", "BayesianLinearRegression", "BayesianLogisticRegression",
    "CURVES_SIZES", "DeepAutoencoder", "CNN", "MLP", "RegressionMLP", "ResNetCNN",
]
