"""Model zoo used by the studies (Pyro BNNs, logistic regression, autoencoders, CNNs)."""

from .bnn import BNN
from .linear import BayesianLinearRegression, BayesianLogisticRegression

__all__ = ["BNN", "BayesianLinearRegression", "BayesianLogisticRegression"]
