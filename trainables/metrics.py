"""Certification metrics, Cohen et al.'s TSV and the certified-accuracy plot: the one place they are computed.

Every function takes CertRows (trainables.smoothing.certify_many's output) or a DataFrame with Cohen et al.'s
columns `idx label predict radius correct time` (read_tsv's output); extra columns ride along.

- certified accuracy at radius r: the fraction of ALL rows with correct == 1 and radius >= r (Cohen et al.'s
  `analyze.py`). At r = 0 it is the smoothed classifier's accuracy (abstentions count as wrong).
- ACR (average certified radius, Zhai et al. 2020): the mean over ALL rows of radius * correct; abstentions
  and wrong predictions count 0.
- Cohen's TSV (`write_tsv`) is exactly what locuslab/smoothing's `analyze.py` reads; the certification's
  settings (σ, n0, n, α, model fingerprint, seed) go to a JSON sidecar `<name>.json` beside it.
- MLflow metric names may not contain '@' (MLflow accepts alphanumerics and _ - . : / space), so certified
  accuracy at r is logged as `certacc_r<r>` (`certacc_key`), e.g. certacc_r0.25.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from trainables.smoothing import ABSTAIN

#: radius grids of the papers' tables: DRF certifies at radii 0-2.75 step 0.25 (MNIST, CIFAR-10);
#: GLEAN at 0-0.45 step 0.05 (CMNIST, CelebA, DomainNet).
RADII_DRF = tuple(round(r, 2) for r in np.arange(0, 2.75 + 1e-9, 0.25))
RADII_GLEAN = tuple(round(r, 2) for r in np.arange(0, 0.45 + 1e-9, 0.05))
RADII_BY_DATASET = {"mnist": RADII_DRF, "cifar10": RADII_DRF,
                    "cmnist": RADII_GLEAN, "celeba": RADII_GLEAN, "domainnet": RADII_GLEAN}

#: Cohen et al.'s TSV columns, in order
COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
_INT_COLUMNS = ("idx", "label", "predict", "correct")


def certacc_key(radius: float) -> str:
    """The metric name of certified accuracy at `radius`: 'certacc_r0.25' (valid as an MLflow metric name)."""
    return f"certacc_r{float(radius):g}"


def as_frame(rows_or_df: Any) -> pd.DataFrame:
    """A DataFrame with at least Cohen's columns from CertRows (dataclasses, any subclass) or a DataFrame."""
    if isinstance(rows_or_df, pd.DataFrame):
        df = rows_or_df
    else:
        rows = list(rows_or_df)
        if rows and not dataclasses.is_dataclass(rows[0]):
            raise ValueError(f"expected CertRows or a DataFrame, got a sequence of {type(rows[0]).__name__}")
        df = pd.DataFrame([dataclasses.asdict(r) for r in rows], columns=None if rows else list(COLUMNS))
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"certification rows lack column(s) {', '.join(missing)}; "
                         f"expected {' '.join(COLUMNS)}")
    return df


def _nonempty(df: pd.DataFrame) -> pd.DataFrame:
    if len(df) == 0:
        raise ValueError("no certification rows: certify at least one example")
    return df


def certified_accuracy(rows_or_df: Any, radii: Sequence[float]) -> dict[float, float]:
    """{r: fraction of all rows that are correct with radius >= r} for every r in `radii`."""
    df = _nonempty(as_frame(rows_or_df))
    correct = df["correct"].to_numpy(dtype=int) == 1
    radius = df["radius"].to_numpy(dtype=float)
    return {float(r): float((correct & (radius >= r)).mean()) for r in radii}


def acr(rows_or_df: Any) -> float:
    """Average certified radius: mean over all rows of radius * correct (abstain / wrong rows count 0)."""
    df = _nonempty(as_frame(rows_or_df))
    return float((df["radius"].to_numpy(dtype=float) * (df["correct"].to_numpy(dtype=int) == 1)).mean())


def abstain_rate(rows_or_df: Any) -> float:
    """Fraction of rows where the smoothed classifier abstained (predict == -1)."""
    df = _nonempty(as_frame(rows_or_df))
    return float((df["predict"].to_numpy(dtype=int) == ABSTAIN).mean())


def summarize(rows_or_df: Any, radii: Sequence[float], prefix: str = "") -> dict[str, float]:
    """The metrics logged for a certification (names valid in MLflow), each prefixed with `prefix`:

    acr, clean_acc (smoothed accuracy = certified accuracy at r = 0), abstain_rate, certacc_r<r> for r in
    radii, and, where the rows carry GLEAN's deterministic certificate (det_radius, det_predict), det_acr and
    det_certacc_r<r>: rows where det_predict equals the label (whatever the Monte-Carlo run did), radius det_radius.
    """
    df = _nonempty(as_frame(rows_or_df))
    out = {"acr": acr(df), "clean_acc": float((df["correct"].to_numpy(dtype=int) == 1).mean()),
           "abstain_rate": abstain_rate(df)}
    out.update({certacc_key(r): v for r, v in certified_accuracy(df, radii).items()})
    if "det_radius" in df.columns:
        ok = df["correct"].to_numpy(dtype=int) == 1
        if "det_predict" in df.columns:   # the deterministic certificate stands on its own prediction
            ok = df["det_predict"].to_numpy(dtype=int) == df["label"].to_numpy(dtype=int)
        det = df.assign(radius=df["det_radius"].astype(float), correct=ok.astype(int))
        out["det_acr"] = acr(det)
        out.update({"det_" + certacc_key(r): v for r, v in certified_accuracy(det, radii).items()})
    return {prefix + k: float(v) for k, v in out.items()}


# --- Cohen et al.'s TSV -------------------------------------------------------------------------------------
def sidecar_path(tsv_path: str | os.PathLike) -> Path:
    """Where a TSV's metadata lives: `<name>.json` beside `<name>.tsv`."""
    return Path(tsv_path).with_suffix(".json")


def write_sidecar(tsv_path: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write `meta` as the JSON sidecar of `tsv_path` (atomically: a temporary file, then a rename)."""
    path = sidecar_path(tsv_path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(dict(meta), indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_tsv(rows_or_df: Any, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write Cohen et al.'s TSV, which their `analyze.py` reads unchanged (`pd.read_csv(path, delimiter="\t")`):
    the header `idx label predict radius correct time` (+ any extra columns after those six, e.g. GLEAN's
    det_radius, which analyze.py ignores), tab-separated, one row per example, no comment lines; radius at
    full float precision, time in seconds (the reference writes a timedelta string; read_tsv reads both).
    `meta` (σ, n0, n, α, model fingerprint, seed, ...) goes to the JSON sidecar `<name>.json` beside the TSV
    (`sidecar_path`); without `meta`, a DataFrame's `attrs["meta"]` (what read_tsv returns) is written back.
    No meta: no sidecar is written (an existing one is left alone)."""
    df = as_frame(rows_or_df)
    if meta is None:
        meta = df.attrs.get("meta", {}) if isinstance(rows_or_df, pd.DataFrame) else {}
    for k in meta:
        if not isinstance(k, str) or not k:
            raise ValueError(f"meta key {k!r} must be a non-empty string")
    columns = list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]
    out = df[columns].copy()
    for c in _INT_COLUMNS:
        out[c] = out[c].astype(int)
    path = Path(path)
    if meta:
        write_sidecar(path, meta)
    with open(path, "w", newline="") as f:
        out.to_csv(f, sep="\t", index=False, float_format=None)
    return path


def _parse_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _seconds(v: Any) -> float:
    """Seconds from a float or the reference's timedelta string 'H:MM:SS.ffffff'."""
    if isinstance(v, str) and ":" in v:
        h, m, s = v.split(":")
        return datetime.timedelta(hours=int(h), minutes=int(m), seconds=float(s)).total_seconds()
    return float(v)


def read_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a TSV written by write_tsv (or by Cohen et al.'s certify.py) into a DataFrame: integer idx, label,
    predict, correct; float radius, time (seconds); extra columns as pandas infers them. The JSON sidecar's
    contents (`sidecar_path`), when there is one, are returned in `df.attrs["meta"]`; leading '# key=value'
    lines of TSVs written by earlier versions are still read into it (numbers parsed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no certification TSV at {path}")
    meta: dict[str, Any] = {}
    skip = 0
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            skip += 1
            key, _, value = line[1:].strip().partition("=")
            meta[key.strip()] = _parse_value(value.strip())
    if sidecar_path(path).exists():
        meta.update(json.loads(sidecar_path(path).read_text()))
    df = pd.read_csv(path, sep="\t", skiprows=skip)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a certification TSV: missing column(s) {', '.join(missing)}")
    for c in _INT_COLUMNS:
        df[c] = df[c].astype(int)
    df["radius"] = df["radius"].astype(float)
    df["time"] = [_seconds(v) for v in df["time"]]
    df.attrs["meta"] = meta
    return df


# --- the papers' figure -------------------------------------------------------------------------------------
def plot_certified_accuracy(curves: Mapping[str, Any], path: str | os.PathLike,
                            radii: Sequence[float] | None = None, title: str = "") -> Path:
    """Certified accuracy vs l2 radius, one curve per label (rows or a DataFrame each), as a PNG at `path`.

    The curve is evaluated on a fine grid from 0 to max(radii) (or to the largest certified radius when radii
    is None), so it shows the steps the papers' figures show; the points of `radii`, when given, are marked.
    (Callers may also pass the arguments as (curves, radii, path): the path is recognised by its type.)
    """
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on workers
    import matplotlib.pyplot as plt

    if not isinstance(path, (str, os.PathLike)) and isinstance(radii, (str, os.PathLike)):
        path, radii = radii, path
    if not curves:
        raise ValueError("plot_certified_accuracy: no curves to plot")
    frames = {label: _nonempty(as_frame(rows)) for label, rows in curves.items()}
    top = max(radii) if radii is not None and len(radii) else max(
        [float(df["radius"].max()) for df in frames.values()] + [0.0])
    top = top if top > 0 else 1.0
    grid = np.linspace(0.0, top * 1.02, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, df in frames.items():
        acc = certified_accuracy(df, grid)
        (line,) = ax.plot(grid, list(acc.values()), label=str(label))
        if radii is not None and 0 < len(radii) <= 30:  # a table's grid, not a plotting grid
            marks = certified_accuracy(df, radii)
            ax.plot(list(marks.keys()), list(marks.values()), "o", ms=3, color=line.get_color())
    ax.set_xlabel("radius (ℓ2)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, grid[-1])
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
