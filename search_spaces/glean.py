"""GLEAN's sweep (product brief): lambda (IRM weight, log 10..1e6), sigma in {0.12, 0.25, 0.5, 1.0}, the
learning rate and the penalty-annealing steps. Ranges: trainables/glean.py HPARAMS."""
from trainables.hparams import SearchSpace

SPACE = SearchSpace(trainable="glean", searched=("lam", "sigma", "lr", "anneal_steps"))
