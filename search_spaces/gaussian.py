"""Gaussian augmentation (Cohen et al. 2019): sigma and the learning rate. Ranges: trainables/gaussian.py."""
from trainables.hparams import SearchSpace

SPACE = SearchSpace(trainable="gaussian", searched=("sigma", "lr"))
