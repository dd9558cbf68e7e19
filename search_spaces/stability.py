"""Stability training (Li et al. 2019): sigma and the stability weight. Ranges: trainables/stability.py."""
from trainables.hparams import SearchSpace

SPACE = SearchSpace(trainable="stability", searched=("sigma", "lbd"))
