"""Consistency regularisation (Jeong & Shin 2020): sigma, the consistency weight lambda and the entropy weight
eta. Ranges: trainables/consistency.py."""
from trainables.hparams import SearchSpace

SPACE = SearchSpace(trainable="consistency", searched=("sigma", "lbd", "eta"))
