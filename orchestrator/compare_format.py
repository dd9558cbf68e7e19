"""How `orchestrator.compare` shows its table: the Markdown rows ("mean ± std", accuracies in %) and the
certified-accuracy plot, one curve per row. Pure formatting of compare.build_table's DataFrame."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pandas as pd

#: how a row's model was obtained: a sweep's selected trial, or a run of orchestrator.train
SOURCE_LABEL = {"sweep": "sweep-selected", "train": "fixed config"}


def _fmt(mean: float, std: float, scale: float, digits: int) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std * scale:.{digits}f}"


def row_label(row: pd.Series, table: pd.DataFrame) -> str:
    """A row's name in the plot's legend: only the fields that differ between rows."""
    return " ".join(part for part in (
        row["dataset"] if table["dataset"].nunique() > 1 else "", row["trainable"],
        f"({SOURCE_LABEL[row['source']]})" if table["source"].nunique() > 1 else "",
        f"σ={row['sigma']:g}", row["config"]) if part)


def to_markdown(table: pd.DataFrame, radii: Sequence[float], caption_text: str) -> str:
    from trainables.metrics import certacc_key

    cols = {"dataset": table["dataset"].nunique() > 1, "model": table["source"].nunique() > 1,
            "configuration": (table["config"] != "").any(),
            "det": "det_acr_mean" in table and table["det_acr_mean"].notna().any()}
    header = ((["dataset"] if cols["dataset"] else []) + ["trainable"] + (["model"] if cols["model"] else [])
              + ["σ"] + (["configuration"] if cols["configuration"] else []) + ["runs"]
              + [f"{r:g}" for r in radii] + ["ACR"] + (["det ACR"] if cols["det"] else []))
    lines = [f"**{caption_text}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = (([row["dataset"]] if cols["dataset"] else []) + [row["trainable"]]
                 + ([SOURCE_LABEL[row["source"]]] if cols["model"] else []) + [f"{row['sigma']:g}"]
                 + ([row["config"]] if cols["configuration"] else []) + [str(row["runs"])])
        cells += [_fmt(row[f"{certacc_key(r)}_mean"], row[f"{certacc_key(r)}_std"], 100, 1) for r in radii]
        cells.append(_fmt(row["acr_mean"], row["acr_std"], 1, 3))
        if cols["det"]:
            cells.append(_fmt(row["det_acr_mean"], row["det_acr_std"], 1, 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_table(certified: list, table: pd.DataFrame, radii: Sequence[float], path: Path,
               title: str = "") -> Path:
    """Certified accuracy vs radius, one curve per table row, via trainables.metrics.plot_certified_accuracy.
    A row's runs are pooled: with runs of equal size (as seeds of one configuration are) the pooled curve is
    exactly the mean of the runs' curves."""
    from trainables import metrics

    curves = {}
    for _, row in table.iterrows():
        ids = set(row["run_ids"].split(","))
        curves[row_label(row, table)] = pd.concat([c.rows for c in certified if c.run_id in ids],
                                                  ignore_index=True)
    return metrics.plot_certified_accuracy(curves, path, radii=radii, title=title)


__all__ = ["SOURCE_LABEL", "plot_table", "row_label", "to_markdown"]
