"""A report a person reads in a browser: `report.html` (self-contained: HTML tables, PNG plots embedded as base64)
and `report.md` (the same content, plots as PNG files beside it in report_files/), for a sweep and for a
comparison. Everything comes from what the sweep recorded: the MLflow runs (parameters, metrics, certification
TSVs, artifacts) and the Optuna study in its storage (orchestrator.search).

    paths = sweep_report(tracking_uri, parent_run_id, out_dir, command="python -m orchestrator.sweep glean")
    paths = compare_report(out_dir, table, markdown, files)

A sweep's report: what ran (command, settings, data source, selection protocol, MLflow and Optuna pointers),
the selected model (parameters, registered model, validation and test results of every protocol recorded),
certified accuracy vs radius of the selected model beside the other certified runs of the same MLflow
experiment (baselines), the optimisation history and parameter importances from the study, the trials, and
DRF's lambda trajectories where the trials logged them. The HTML marks an image that fails to load (and sets
`data-broken-images` on <body>, which the browser test reads).
"""
from __future__ import annotations

import base64
import html
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from orchestrator import tracking

HTML_FILE, MD_FILE, FILES_DIR = "report.html", "report.md", "report_files"
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}code{background:#f6f6f6;padding:0 .2em}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.broken{color:#b00;font-weight:bold}"""
_IMG_CHECK = """<script>
window.addEventListener('load', function () {
  var bad = 0;
  document.querySelectorAll('img').forEach(function (img) {
    if (!(img.complete && img.naturalWidth > 0)) {
      bad += 1;
      var p = document.createElement('p'); p.className = 'broken';
      p.textContent = 'image failed to load: ' + img.alt; img.after(p);
    }
  });
  document.body.setAttribute('data-broken-images', String(bad));
  document.body.setAttribute('data-images', String(document.images.length));
});
</script>"""


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)             # paragraphs (plain text)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        rows.append("| " + " | ".join(_cell(v).replace("|", "\\|") for v in r.tolist()) + " |")
    return "\n".join(rows)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(title: str, sections: Sequence[Section], out_dir: str | Path) -> list[Path]:
    """Write report.html (self-contained) and report.md (+ report_files/) into out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = out / FILES_DIR
    files.mkdir(exist_ok=True)
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    md = [f"# {title}", ""]
    for s in sections:
        h.append(f"<h2>{html.escape(s.title)}</h2>")
        md += [f"## {s.title}", ""]
        for p in s.text:
            h.append(f"<p>{html.escape(p)}</p>")
            md += [p, ""]
        for caption, df in s.tables:
            if caption:
                h.append(f"<h3>{html.escape(caption)}</h3>")
                md += [f"**{caption}**", ""]
            h.append(df.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4g}", border=0))
            md += [_md_table(df), ""]
        for caption, path in s.images:
            data = Path(path).read_bytes()
            name = f"{len(list(files.iterdir())):02d}-{Path(path).name}"
            (files / name).write_bytes(data)
            h.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,"
                     f"{base64.b64encode(data).decode()}'><figcaption>{html.escape(caption)}</figcaption></figure>")
            md += [f"![{caption}]({FILES_DIR}/{name})", ""]
    h.append(_IMG_CHECK + "</body></html>")
    (out / HTML_FILE).write_text("\n".join(h))
    (out / MD_FILE).write_text("\n".join(md))
    return [out / HTML_FILE, out / MD_FILE, files]


def _kv(d: dict[str, Any], keys: Sequence[str] | None = None) -> pd.DataFrame:
    items = [(k, d[k]) for k in (keys or sorted(d)) if k in d]
    return pd.DataFrame(items, columns=["", "value"])


# --- a sweep --------------------------------------------------------------------------------------------------
def _trials_table(study) -> pd.DataFrame:
    rows = []
    for t in study.trials:
        rows.append({"#": t.number, "state": t.state.name,
                     **({f"value[{i}]": v for i, v in enumerate(t.values)} if t.values else {"value": ""}),
                     "last epoch": max(t.intermediate_values) if t.intermediate_values else "",
                     **{k: _cell(v) for k, v in t.params.items()},
                     "tune trial": t.user_attrs.get("tune_trial_id", "")})
    return pd.DataFrame(rows).fillna("")


def _lambda_images(cl, runs, tmp: Path) -> list[tuple[str, Path]]:
    """DRF's lambda trajectories: every `*lambda*.png` artifact of the sweep's trial runs (contract C3), else a
    plot of the `drf_lambda` metric history of the runs that logged one."""
    images: list[tuple[str, Path]] = []
    for r in runs:
        try:
            arts = [a.path for a in cl.list_artifacts(r.info.run_id) if not a.is_dir]
            arts += [a.path for d in cl.list_artifacts(r.info.run_id) if d.is_dir
                     for a in cl.list_artifacts(r.info.run_id, d.path) if not a.is_dir]
        except Exception:
            continue
        for path in arts:
            if "lambda" in Path(path).name and path.endswith(".png"):
                local = cl.download_artifacts(r.info.run_id, path, str(tmp))
                images.append((f"λ trajectory, run {r.info.run_name or r.info.run_id}", Path(local)))
    if images:
        return images
    histories = {r.info.run_name or r.info.run_id: cl.get_metric_history(r.info.run_id, "drf_lambda")
                 for r in runs if "drf_lambda" in r.data.metrics}
    if not histories:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, hist in histories.items():
        hist = sorted(hist, key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist], label=name)
    ax.set_xlabel("optimiser step"), ax.set_ylabel("λ"), ax.legend(fontsize=7), ax.grid(alpha=.3)
    fig.tight_layout()
    path = tmp / "drf_lambda.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [("DRF λ per optimiser step (metric drf_lambda)", path)]


def sweep_report(tracking_uri: str, parent_run_id: str, out_dir: str | Path, command: str | None = None
                 ) -> list[Path]:
    """Write the sweep's report into out_dir (see the module doc) and log it as artifacts of the sweep run
    (artifact folder `report/`). Returns the written paths."""
    from orchestrator import compare, compare_format, mlflow_utils
    from orchestrator.search import study_of_sweep
    from orchestrator.sweep_plots import plot_sweep

    cl = mlflow_utils.client(tracking_uri)
    parent = cl.get_run(parent_run_id)
    params, tags, metrics = parent.data.params, parent.data.tags, parent.data.metrics
    exp = cl.get_experiment(parent.info.experiment_id)
    stored = study_of_sweep(parent)
    study = stored[0] if stored else None
    command = command or (study.user_attrs.get("command") if study else None) or "(not recorded)"
    sections: list[Section] = []

    what = Section("What ran", [f"Command: {command}"])
    what.tables.append(("Settings", _kv(params, [k for k in ("dataset", "trainables", "budget", "trials",
                                                              "concurrency", "sampler", "seed", "objectives",
                                                              "selection", "workers", "epochs", "search", "final",
                                                              "data_source", "data_notes") if k in params])))
    what.tables.append(("Search space", _kv({k[len("space."):]: v for k, v in params.items()
                                             if k.startswith("space.")})))
    pointers = {"MLflow tracking URI": tracking_uri, "experiment": exp.name, "sweep run": parent_run_id,
                "git commit": tags.get(tracking.TAG_GIT_COMMIT, ""), "status": parent.info.status}
    if params.get("optuna_storage"):
        pointers.update({"Optuna storage": params["optuna_storage"], "Optuna study": params.get("optuna_study", ""),
                         "open the study": f"optuna-dashboard {params['optuna_storage']}"})
    what.tables.append(("Where it is recorded", _kv(pointers, list(pointers))))
    what.text.append(f"Selection protocol: {params.get('selection', tags.get(tracking.TAG_SELECTION, '?'))} "
                     "(train-domain: the validation split of the training domains chooses the model; oracle: a "
                     "held-out 20% of the test domain chooses it and the other 80% reports it).")
    sections.append(what)

    sel = Section("The selected model")
    best = {k[len("best."):]: v for k, v in params.items() if k.startswith("best.")}
    if best:
        sel.tables.append(("Parameters", _kv(best)))
    if tags.get("registered_model"):
        sel.text.append(f"Registered as {tags['registered_model']}; certify it again with "
                        f"python -m orchestrator.certify --model {tags['registered_model'].split(' ')[0]}")
    if tags.get("selected_run_id"):
        sel.text.append(f"Selected trial run: {tags['selected_run_id']}")
    groups: dict[str, dict[str, float]] = {}
    for k, v in sorted(metrics.items()):
        group = ("validation (selection)" if k.startswith("selected_") else
                 "test" if k.startswith(tracking.TEST_PREFIX) else
                 "oracle protocol" if k.startswith("oracle_") else "other")
        groups.setdefault(group, {})[k] = v
    for group, vals in groups.items():
        sel.tables.append((f"Metrics: {group}", _kv(vals)))
    sections.append(sel)

    with tempfile.TemporaryDirectory(prefix="report-") as tmp_s:
        tmp = Path(tmp_s)
        cert = Section("Certified accuracy vs radius",
                       ["The selected model beside every other certified run of the same MLflow experiment "
                        f"({exp.name!r}), recomputed from their certification TSVs (orchestrator.compare)."])
        try:
            runs = compare.find_runs(cl, [exp.name], [])
            certified = compare.load_certified(cl, runs, "test")
            from trainables import metrics as M
            radii = tuple(sorted(set().union(*(M.RADII_BY_DATASET.get(c.dataset, M.RADII_DRF)
                                               for c in certified))))
            table = compare.build_table(certified, radii)
            keep = [c for c in table.columns if c in ("trainable", "source", "sigma", "configuration", "runs")
                    or c.endswith("_mean")]
            cert.tables.append(("", table[keep]))
            cert.images.append(("certified accuracy vs radius (test)",
                                compare_format.plot_table(certified, table, radii, tmp / "certified_accuracy.png",
                                                          title=f"{exp.name} (test)")))
        except compare.CompareInputError as exc:
            cert.text.append(f"No certified runs to plot: {exc}")
        sections.append(cert)

        opt = Section("Optimisation")
        if study is not None:
            opt.text.append(f"Study {study.study_name!r}: {len(study.trials)} trials, objectives "
                            f"{', '.join(study.metric_names or [])}.")
            opt.tables.append(("Trials", _trials_table(study)))
        for path in plot_sweep(cl, parent_run_id, tmp):
            label = "optimisation history" if "history" in path.name else \
                "parameter importances" if "importance" in path.name else "Pareto front"
            opt.images.append((label, path))
        sections.append(opt)

        trial_runs = cl.search_runs([parent.info.experiment_id],
                                    filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                    max_results=10_000)
        lam = _lambda_images(cl, trial_runs, tmp)
        if lam:
            sections.append(Section("DRF λ trajectories", images=lam))
        paths = render(f"Sweep {tags.get(tracking.TAG_SWEEP, parent.info.run_name or parent_run_id)}",
                       sections, out_dir)
    out = Path(out_dir)
    cl.log_artifacts(parent_run_id, str(out), "report") if _is_dir_of(out, paths) else None
    return paths


def try_sweep_report(tracking_uri: str, parent_run_id: str, out_dir: str | Path, command: str | None = None
                     ) -> Path | None:
    """sweep_report for the end of a sweep: the sweep's results are already recorded, so a report that cannot
    be written is one line on stderr, not a failed sweep. Returns the HTML path, or None."""
    import sys

    try:
        return sweep_report(tracking_uri, parent_run_id, out_dir, command)[0]
    except Exception as exc:  # noqa: BLE001 -- reported, never fatal
        print(f"sweep: warning: no report ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})",
              file=sys.stderr)
        return None


def _is_dir_of(out: Path, paths: list[Path]) -> bool:
    return all(p.parent == out or p == out / FILES_DIR for p in paths)


# --- a comparison ---------------------------------------------------------------------------------------------
def compare_report(out_dir: str | Path, table: pd.DataFrame, markdown: str, files: Sequence[Path]) -> list[Path]:
    """The comparison's report (the table, its caption, every plot compare wrote) into out_dir."""
    caption = [line for line in markdown.splitlines() if line and not line.startswith("|")]
    keep = [c for c in table.columns if c in ("dataset", "trainable", "source", "sigma", "configuration", "runs")
            or c.endswith("_mean")]
    sec = Section("Comparison", caption, [("", table[keep])])
    sweeps = Section("Sweeps")
    for f in files:
        f = Path(f)
        if f.suffix == ".png":
            (sweeps if f.name.startswith("sweep-") else sec).images.append((f.stem.replace("-", " "), f))
    # render() reads the images before it writes: copy them out first when they live in out_dir/report_files
    with tempfile.TemporaryDirectory() as tmp:
        for s in (sec, sweeps):
            s.images = [(c, Path(shutil.copy(p, Path(tmp) / p.name))) for c, p in s.images]
        return render("Comparison", [sec] + ([sweeps] if sweeps.images else []), out_dir)


__all__ = ["Section", "compare_report", "render", "sweep_report", "try_sweep_report"]
