"""A grid sweep's parameter study (`python -m orchestrator.sweep ... --sampler grid`): every setting's test-domain
certification as one table and one figure, the form of GLEAN's Fig. 5 (λ × σ on Colored-MNIST).

    frame = study_frame([(config, rows), ...], grid_keys, radii)   # one row per setting: params, ACR, cert. acc.
    print(pivot_markdown(frame, grid_keys))                       # ACR, first key down, second across
    plot_study([(config, rows), ...], grid_keys, "parameter_study.png")

Every setting is certified on the same examples with the same (final) settings by orchestrator.sweep_finish,
so the curves compare like with like. The figure has one panel per value of the LAST grid key (σ: the radii
scale with it) and one curve per combination of the others (λ); each curve is certified accuracy against the
ℓ2 radius on a fine grid up to the largest certified radius (trainables.metrics.certified_accuracy).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from trainables import metrics as M

Point = tuple[Mapping[str, Any], Any]     # (a trial's config, its certified rows)


def _label(config: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={config[k]:g}" if isinstance(config[k], (int, float)) else f"{k}={config[k]}"
                     for k in keys)


def study_frame(points: Sequence[Point], grid_keys: Sequence[str], radii: Sequence[float]) -> pd.DataFrame:
    """One row per setting, sorted by the grid keys: the setting, `acr`, `certacc_r<r>` for r in radii, and the
    number of certified `examples`."""
    records = [{**{k: config[k] for k in grid_keys}, **M.summarize(rows, radii), "examples": len(M.as_frame(rows))}
               for config, rows in points]
    return pd.DataFrame.from_records(records).sort_values(list(grid_keys)).reset_index(drop=True)


def pivot_markdown(frame: pd.DataFrame, grid_keys: Sequence[str], value: str = "acr") -> str:
    """`value` per setting as a Markdown table: the first grid key down, the second across (one column when the
    grid has one key; further keys are joined into the row label)."""
    rows_key, cols_key = grid_keys[0], (grid_keys[-1] if len(grid_keys) > 1 else None)
    frame = frame.copy()
    if len(grid_keys) > 2:
        frame[rows_key] = frame.apply(lambda r: _label(r, [k for k in grid_keys if k != cols_key]), axis=1)
    if cols_key is None:
        table = frame.set_index(rows_key)[[value]]
    else:
        table = frame.pivot_table(index=rows_key, columns=cols_key, values=value, aggfunc="first")
    header = [f"{rows_key} \\ {cols_key}" if cols_key else rows_key] + [f"{c:g}" if isinstance(c, float) else str(c)
                                                                        for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in table.iterrows():
        cells = [f"{v:.4f}" if np.isfinite(v) else "–" for v in row.to_numpy(dtype=float)]
        lines.append(f"| {idx:g} | " if isinstance(idx, float) else f"| {idx} | ")
        lines[-1] += " | ".join(cells) + " |"
    return "\n".join(lines)


def plot_study(points: Sequence[Point], grid_keys: Sequence[str], path: str | os.PathLike,
               title: str = "") -> Path:
    """Certified accuracy vs radius, one panel per value of the last grid key, one curve per other setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel_key, curve_keys = grid_keys[-1], list(grid_keys[:-1])
    panels = sorted({config[panel_key] for config, _ in points}, key=lambda v: (str(type(v)), v))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, value in zip(axes[0], panels):
        mine = sorted([(c, r) for c, r in points if c[panel_key] == value], key=lambda cr: [cr[0][k] for k in curve_keys])
        top = max([float(M.as_frame(r)["radius"].replace([np.inf], np.nan).max() or 0) for _, r in mine] + [0.0])
        grid = np.linspace(0.0, (top if top > 0 else 1.0) * 1.05, 300)
        for config, rows in mine:
            acc = M.certified_accuracy(rows, grid)
            ax.plot(grid, list(acc.values()), label=_label(config, curve_keys) if curve_keys else None)
        ax.set_title(_label({panel_key: value}, [panel_key]))
        ax.set_xlabel("radius (ℓ2)")
        ax.grid(alpha=.3)
        if curve_keys:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("certified accuracy")
    axes[0][0].set_ylim(0, 1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["pivot_markdown", "plot_study", "study_frame"]
