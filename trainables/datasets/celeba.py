"""CelebA with the GLEAN paper's construction (label Smiling, spurious hair colour)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trainables.datasets.base import (CONSTRUCTION_SEED, ROOT_ENV, DataInfo, DatasetNotFoundError, DatasetSplits,
                                      ImageFileSplit, _holdout, _md5_note, _try_download)

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


