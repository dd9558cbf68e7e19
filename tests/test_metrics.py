"""Metrics, Cohen et al.'s TSV and the certified-accuracy plot (trainables/metrics.py), hand-computed."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import pytest

from trainables import metrics as M
from trainables.smoothing import ABSTAIN, CertRow

# idx label predict radius correct time
ROWS = [CertRow(0, 1, 1, 0.30, 1, 0.5),
        CertRow(1, 2, ABSTAIN, 0.0, 0, 0.5),
        CertRow(2, 3, 4, 0.50, 0, 0.5),      # wrong, with a radius: counts 0 everywhere
        CertRow(3, 3, 3, 1.00, 1, 0.5),
        CertRow(4, 7, 7, 0.25, 1, 0.5)]


def test_certified_accuracy_and_acr_by_hand():
    acc = M.certified_accuracy(ROWS, [0.0, 0.25, 0.3, 0.5, 1.0, 1.01])
    assert acc == {0.0: 3 / 5, 0.25: 3 / 5, 0.3: 2 / 5, 0.5: 1 / 5, 1.0: 1 / 5, 1.01: 0.0}
    assert M.acr(ROWS) == pytest.approx((0.30 + 1.00 + 0.25) / 5)  # over ALL rows; abstain and wrong count 0
    assert M.abstain_rate(ROWS) == pytest.approx(1 / 5)
    df = pd.DataFrame([r.__dict__ for r in ROWS])
    assert M.acr(df) == M.acr(ROWS) and M.certified_accuracy(df, [0.3]) == {0.3: 2 / 5}


def test_summarize_names_are_valid_mlflow_metrics():
    from mlflow.utils.validation import _validate_metric_name

    s = M.summarize(ROWS, M.RADII_DRF[:3], prefix="test_")
    assert s["test_acr"] == pytest.approx(M.acr(ROWS))
    assert s["test_clean_acc"] == pytest.approx(3 / 5)
    assert s["test_abstain_rate"] == pytest.approx(1 / 5)
    assert s["test_certacc_r0.25"] == pytest.approx(3 / 5) and s["test_certacc_r0.5"] == pytest.approx(1 / 5)
    assert M.certacc_key(0.25) == "certacc_r0.25" and M.certacc_key(0) == "certacc_r0"
    for name in s:
        _validate_metric_name(name)  # raises on names MLflow refuses (e.g. with '@')


def test_summarize_reports_a_deterministic_certificate_separately():
    @dataclass
    class DetRow(CertRow):
        det_predict: int = -1
        det_radius: float = 0.0

    rows = [DetRow(0, 1, 1, 0.1, 1, 0.0, det_predict=1, det_radius=0.4),
            DetRow(1, 2, 2, 0.2, 1, 0.0, det_predict=5, det_radius=0.9),   # det class wrong: counts 0
            DetRow(2, 3, ABSTAIN, 0.0, 0, 0.0, det_predict=3, det_radius=0.7)]  # smoothed abstains: still counts
    s = M.summarize(rows, [0.0, 0.3])
    assert s["acr"] == pytest.approx(0.3 / 3)
    assert s["det_acr"] == pytest.approx((0.4 + 0.7) / 3)        # the certificate stands on its own prediction
    assert s["det_certacc_r0.3"] == pytest.approx(2 / 3)


def test_tsv_round_trip_with_a_json_sidecar_and_extra_columns(tmp_path):
    @dataclass
    class DetRow(CertRow):
        det_radius: float = 0.0

    rows = [DetRow(5, 1, 1, 0.123456789012345, 1, 0.25, det_radius=0.5), DetRow(9, 0, ABSTAIN, 0.0, 0, 1.5)]
    meta = {"sigma": 0.25, "n0": 100, "n": 100000, "alpha": 0.001, "fingerprint": "ab12", "seed": 0}
    path = M.write_tsv(rows, tmp_path / "c.tsv", meta=meta)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time", "det_radius"]
    assert not any(line.startswith("#") for line in lines) and len(lines) == 3
    assert json.loads((tmp_path / "c.json").read_text()) == meta      # the sidecar beside the TSV
    df = M.read_tsv(path)
    assert df.attrs["meta"] == meta
    assert df["radius"].tolist() == [0.123456789012345, 0.0]  # full precision: shards compare exactly
    assert df["predict"].tolist() == [1, ABSTAIN] and df["idx"].dtype.kind == "i"
    assert df["det_radius"].tolist() == [0.5, 0.0]
    # a DataFrame written back keeps its meta
    again = M.read_tsv(M.write_tsv(df, tmp_path / "d.tsv"))
    assert again.attrs["meta"] == df.attrs["meta"] and again.equals(df)


def test_analyze_py_reads_our_tsv_unchanged(tmp_path):
    """locuslab/smoothing's analyze.py: `pd.read_csv(path, delimiter="\t")`, then certified accuracy at r is
    (df["correct"] & (df["radius"] >= r)).mean() (ApproximateAccuracy). Extra columns ride along."""
    @dataclass
    class DetRow(CertRow):
        det_radius: float = 0.0

    path = M.write_tsv([DetRow(**r.__dict__, det_radius=0.1) for r in ROWS], tmp_path / "a.tsv",
                       meta={"sigma": 0.25})
    df = pd.read_csv(path, delimiter="\t")
    assert list(df.columns[:6]) == ["idx", "label", "predict", "radius", "correct", "time"]
    for r in (0.0, 0.25, 0.5, 1.0):
        assert (df["correct"] & (df["radius"] >= r)).mean() == pytest.approx(M.certified_accuracy(ROWS, [r])[r])


def test_reads_tsvs_with_comment_lines_from_earlier_versions(tmp_path):
    p = tmp_path / "old.tsv"
    p.write_text("# sigma=0.25\n# n=1000\nidx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t7\t7\t0.5\t1\t0.1\n")
    df = M.read_tsv(p)
    assert df.attrs["meta"] == {"sigma": 0.25, "n": 1000} and M.acr(df) == 0.5


def test_reads_the_reference_tsv(tmp_path):
    """Cohen et al.'s certify.py writes radius with 3 digits and time as a timedelta string."""
    p = tmp_path / "ref.tsv"
    p.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t7\t7\t0.953\t1\t0:00:01.500000\n"
                 "20\t2\t-1\t0.0\t0\t0:01:00.000000\n")
    df = M.read_tsv(p)
    assert df["time"].tolist() == [1.5, 60.0]
    assert M.acr(df) == pytest.approx(0.953 / 2)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no certification rows"):
        M.acr([])
    with pytest.raises(ValueError, match="lack column"):
        M.acr(pd.DataFrame({"idx": [0], "radius": [0.1]}))
    with pytest.raises(FileNotFoundError):
        M.read_tsv(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="meta"):
        M.write_tsv(ROWS, tmp_path / "x.tsv", meta={"": 1})


def test_plot_certified_accuracy(tmp_path):
    png = M.plot_certified_accuracy({"A": ROWS, "B": ROWS[:2]}, tmp_path / "a.png", radii=M.RADII_DRF)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the (curves, radii, path) order some callers use works too
    png = M.plot_certified_accuracy({"A": ROWS}, M.RADII_GLEAN, tmp_path / "b.png")
    assert png.exists() and png.stat().st_size > 1000
