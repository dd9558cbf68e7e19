"""SmoothMix (Jeong et al. 2021): sigma, the mixup weight eta and the attack steps. Ranges: trainables/smoothmix.py."""
from trainables.hparams import SearchSpace

SPACE = SearchSpace(trainable="smoothmix", searched=("sigma", "eta", "num_steps"))
