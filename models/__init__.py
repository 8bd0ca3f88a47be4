"""Model zoo used by the studies (Pyro BNNs, logistic regression, autoencoders, CNNs)."""
