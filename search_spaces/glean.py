"""GLEAN's sweep: lambda (IRM weight), the learning rate and the penalty-annealing steps; ranges are the
declarations in trainables/glean.py HPARAMS (anneal_steps' range ends below the quick budget's steps, so every
trial trains with the full penalty for >= 100 steps).

sigma is not searched by default: the latent noise is also the certification noise, so trials with different
sigma certify different smoothed classifiers, and the paper compares methods at sigma = 0.12 (Table 2). Its
parameter study (Fig. 5) varies it explicitly: `--space sigma=0.12,0.25,0.5,1.0` (README, "GLEAN").
Model selection follows orchestrator/selection.py (oracle test-domain validation by default on cmnist, celeba
and domainnet)."""
from trainables.hparams import SearchSpace

SPACE = SearchSpace(trainable="glean", searched=("lam", "lr", "anneal_steps"))
