"""SmoothAdv (Salman et al. 2019): sigma, the attack radius epsilon and the noise samples m.
Ranges: trainables/smoothadv.py."""
from trainables.hparams import SearchSpace

SPACE = SearchSpace(trainable="smoothadv", searched=("sigma", "epsilon", "num_noise_vec"))
