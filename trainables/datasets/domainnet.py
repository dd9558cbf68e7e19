"""DomainNet from per-domain image folders."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from trainables.datasets.base import (CONSTRUCTION_SEED, ROOT_ENV, DataInfo, DatasetNotFoundError, DatasetSplits,
                                      ImageFileSplit, _holdout)

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


