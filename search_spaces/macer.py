"""MACER (Zhai et al. 2020): sigma, the robustness weight lambda, gamma (hinge) and beta (inverse temperature).
Ranges: trainables/macer.py."""
from trainables.hparams import SearchSpace

SPACE = SearchSpace(trainable="macer", searched=("sigma", "lbd", "gamma", "beta"))
