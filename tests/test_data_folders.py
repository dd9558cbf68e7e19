"""The file-backed datasets on their official layouts, written here: CIFAR-10 pickled batches, CelebA annotation
files + aligned JPEGs, DomainNet folders (one per domain and class). The writers are shared with
tests/test_glean.py (GLEAN's smoke runs on CelebA / DomainNet folders)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables import data
from trainables.data import DatasetNotFoundError, load_dataset


@pytest.fixture(autouse=True)
def _no_ambient_root(monkeypatch, tmp_path):
    """Tests decide the data root themselves: no $SMOOTHING_DATA_ROOT, and an empty download cache."""
    monkeypatch.delenv(data.ROOT_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


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
