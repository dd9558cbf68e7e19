"""`python -m orchestrator.compare`: paper-style tables and certified-accuracy plots from what MLflow holds.

    python -m orchestrator.compare [--experiment NAME ...] [--runs ID ...] [--sigma S] [--radii 0,0.25,...]
        [--split test] [--out DIR] [--tracking-uri URI] [--no-log]

Reads the runs (`MlflowClient.search_runs` -> pandas) and their certification TSVs (tracking.cert_tsv_artifact),
and recomputes every number from the TSVs with trainables.metrics.summarize (never from logged metrics, so the
table cannot disagree with the rows it summarises). Writes to --out (default compare-out/):
  table.csv   one row per (dataset, trainable, model source, sigma, configuration): certified accuracy at each
              radius, ACR, clean accuracy, abstain rate (and det_acr / det_certacc_r<r> where the TSVs carry
              GLEAN's deterministic certificate), <metric>_mean and <metric>_std over the row's runs (seeds),
              and the runs' ids
  table.md    the same as a Markdown table ("mean ± std", accuracies in %), with a caption stating the data,
              the certification settings, the model-selection method and the budget
  certified_accuracy.png   certified accuracy vs radius, one curve per row (the papers' figure)
  sweep-<id>-history.png / -importance.png / -pareto.png   for every sweep the compared runs came from:
              Optuna's optimisation history, parameter importances and (two objectives) Pareto front, from a
              study rebuilt from the sweep's trial runs
and logs all of it as artifacts of a new run (tag role=compare) in the experiment "compare" (--no-log: don't).
Bad input (unknown or empty experiment, unknown run id, runs without certification): one line on stderr,
exit code 2.

Rows: like with like only. Runs are averaged into one row only when trainable, dataset, σ, how the model was
obtained (a sweep's selected trial, "sweep-selected", or a run of `orchestrator.train`, "fixed config"),
budget, selection protocol, split, the certified examples (the set of example indices in the TSV) and the
certification settings n0, n and α all match, and (fixed-config runs) their parameters other than the seed do.
Anything else is its own row, and its "configuration" column names what differs from the other rows of the
same trainable and σ (e.g. "n=1000" vs "n=100000", "selection=oracle"). Runs that differ only in their seed
are one row: mean ± sample standard deviation (ddof=1) over them.

MLflow is read and written through an `MlflowClient` for the given store (never MLflow's global state), and the
store must exist: compare never creates one.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from orchestrator import cli_common, defaults, mlflow_utils, tracking
from orchestrator.cli_common import UsageError, run_main
from orchestrator.compare_format import plot_table, to_markdown
from orchestrator.sweep_plots import sweep_summaries

COMPARE_EXPERIMENT = "compare"
DEFAULT_OUT = "compare-out"
#: run params that do not define a configuration: runs differing only in these are seeds of one configuration
NOT_CONFIG = frozenset({"seed", "data_source", "workers", "git_commit"})
#: what must match, besides dataset / trainable / source / sigma, for runs to share a row (issue 15)
SETTING_KEYS = ("budget", "selection", "split", "examples", "n0", "n", "alpha")


class CompareInputError(UsageError, ValueError):
    """Bad input: the CLI prints it on one line and exits with code 2."""


@dataclass
class CertifiedRun:
    """One run's certification: its identity (from tags, falling back to params) and its TSV rows."""

    run_id: str
    experiment_id: str
    source: str                 # "sweep": a sweep's trial (the selected one is certified); "train": otherwise
    trainable: str
    dataset: str
    sigma: float
    rows: pd.DataFrame
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)   # SETTING_KEYS -> value ("?" when not recorded)

    def get(self, key: str, default: str = "") -> str:
        return self.tags.get(key) or self.params.get(key) or default


def build_parser() -> argparse.ArgumentParser:
    p = cli_common.ArgumentParser(prog="python -m orchestrator.compare", allow_abbrev=False,
                                description="Tables and plots of certified accuracy from MLflow runs.")
    p.add_argument("--experiment", nargs="+", action="extend", default=[], metavar="NAME",
                   help="MLflow experiment(s) whose certified runs to compare (default: all experiments)")
    p.add_argument("--runs", nargs="+", action="extend", default=[], metavar="ID", help="run ids to compare")
    p.add_argument("--sigma", type=float, default=None, help="only runs with this σ")
    p.add_argument("--radii", default=None,
                   help="comma-separated radius grid (default: the dataset's, metrics.RADII_BY_DATASET)")
    p.add_argument("--split", default="test", help="certified split to compare (default: test)")
    p.add_argument("--out", help=f"output directory (default: {DEFAULT_OUT}; inside a Ray job "
                                   f"~/.smoothing-orchestrator/{DEFAULT_OUT}, see orchestrator/defaults.py)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; in "
                        "a Ray job ~/.smoothing-orchestrator/mlflow.db)")
    p.add_argument("--no-log", action="store_true", help="do not log a comparison run to MLflow")
    return p


def parse_radii(text: str) -> tuple[float, ...]:
    try:
        radii = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise CompareInputError(f"--radii must be comma-separated numbers, got {text!r}") from None
    if not radii or any(r < 0 or not math.isfinite(r) for r in radii):
        raise CompareInputError(f"--radii must be non-negative numbers, got {text!r}")
    return tuple(sorted(set(radii)))


# --- reading MLflow -----------------------------------------------------------------------------------------
def _search(client, experiment_ids: Sequence[str], filter_string: str = "") -> list:
    """Every run of the experiments matching `filter_string` (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs(list(experiment_ids), filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _frame(runs: Sequence) -> pd.DataFrame:
    """Runs as rows with run_id, experiment_id, status, tags.<k> and params.<k> columns."""
    return pd.DataFrame.from_records([
        {"run_id": r.info.run_id, "experiment_id": r.info.experiment_id, "status": r.info.status,
         **{f"tags.{k}": v for k, v in r.data.tags.items()}, **{f"params.{k}": v for k, v in r.data.params.items()}}
        for r in runs], columns=None if runs else ["run_id", "experiment_id", "status"])


def find_runs(client, experiments: Sequence[str], run_ids: Sequence[str]) -> pd.DataFrame:
    """The candidate runs (one row each); CompareInputError for unknown names/ids or no runs."""
    from mlflow.exceptions import MlflowException

    found: list = []
    ids = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise CompareInputError(f"unknown experiment {name!r} (experiments: {known})")
        ids.append(exp.experiment_id)
    if experiments:
        runs = _search(client, ids)
        if not runs:
            raise CompareInputError(f"experiment(s) {', '.join(experiments)} hold no runs; train and certify "
                                    "first (python -m orchestrator.train / sweep / certify)")
        found += runs
    for run_id in run_ids:
        try:
            found.append(client.get_run(run_id))
        except MlflowException:
            raise CompareInputError(f"unknown run id {run_id!r} in "
                                    f"{mlflow_utils.redact(client.tracking_uri)}") from None
    if not experiments and not run_ids:
        found = _search(client, [e.experiment_id for e in client.search_experiments()])
        if not found:
            raise CompareInputError(f"no runs in {mlflow_utils.redact(client.tracking_uri)}; give "
                                    "--tracking-uri or train first")
    runs = _frame(found).drop_duplicates("run_id")
    if f"tags.{tracking.TAG_ROLE}" in runs:
        runs = runs[runs[f"tags.{tracking.TAG_ROLE}"].fillna("") != "compare"]
    return runs.reset_index(drop=True)


def _columns(row: pd.Series, prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: v for k, v in row.items()
            if k.startswith(prefix) and isinstance(v, str) and v != ""}


def load_certified(client, runs: pd.DataFrame, split: str,
                   explicit: Sequence[str] = ()) -> list[CertifiedRun]:
    """Download every run's certification TSV. Runs named explicitly (--runs) must have one; others without
    one (sweep trials that were not selected, a sweep's parent) are skipped."""
    from trainables.metrics import read_tsv

    tsv_name = tracking.cert_tsv_artifact(split)
    hint = f"certify them first (python -m orchestrator.certify --run-id ID --split {split})"
    out, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _, row in runs.iterrows():
            run_id = row["run_id"]
            if tsv_name not in {f.path for f in client.list_artifacts(run_id, tracking.CERT_DIR)}:
                missing.append(run_id)
                continue
            local = client.download_artifacts(run_id, tsv_name, dst_path=str(Path(tmp) / run_id))
            tags, params = _columns(row, "tags."), _columns(row, "params.")
            c = CertifiedRun(
                run_id=run_id, experiment_id=str(row["experiment_id"]),
                source="sweep" if tags.get(tracking.TAG_ROLE) == "trial" else "train",
                trainable=tags.get(tracking.TAG_TRAINABLE) or params.get("trainable") or "?",
                dataset=tags.get(tracking.TAG_DATASET) or params.get("dataset") or "?",
                sigma=float(tags.get(tracking.TAG_SIGMA) or params.get("sigma") or "nan"),
                rows=read_tsv(local), tags=tags, params=params)
            c.settings = run_settings(c, split)
            out.append(c)
    bad = [r for r in explicit if r in missing]
    if bad:
        raise CompareInputError(f"run(s) {', '.join(bad)} have no {tsv_name} artifact: {hint}")
    if not out:
        raise CompareInputError(f"none of the {len(runs)} run(s) has a {tsv_name} artifact: {hint}")
    return out


# --- the table ----------------------------------------------------------------------------------------------
def examples_id(rows: pd.DataFrame) -> str:
    """The identity of a certification's example set: how many, and a hash of their indices (two runs
    certified on different examples, e.g. the oracle's 80% and the whole test split, never share a row)."""
    import hashlib

    idx = sorted(int(i) for i in rows["idx"])
    return f"{len(idx)}#{hashlib.sha256(','.join(map(str, idx)).encode()).hexdigest()[:8]}"


def run_settings(c: CertifiedRun, split: str) -> dict[str, str]:
    """SETTING_KEYS of a run: budget and selection from its tags/params; n0/n/alpha from the certify tags
    ("<split>_cert_*"), else the budget's final settings; the examples from its TSV."""
    cert = dict(zip(("n0", "n", "alpha"), _cert_values(c, split)))
    return {"budget": c.get(tracking.TAG_BUDGET, "?"), "selection": c.get(tracking.TAG_SELECTION, "?"),
            "split": split, "examples": examples_id(c.rows), **{k: str(v) for k, v in cert.items()}}


def _peer_key(c: CertifiedRun) -> tuple:
    return (c.dataset, c.trainable, c.source, c.sigma)


def _config_labels(certified: list[CertifiedRun]) -> list[str]:
    """Per run, what tells its row apart from the other rows of the same dataset, trainable, source and sigma:
    the SETTING_KEYS that differ among them, then (fixed-config runs) the differing parameters. "" when
    nothing differs. Runs with equal labels are seeds of one configuration."""
    def params(c: CertifiedRun) -> dict[str, str]:
        return {k: v for k, v in c.params.items() if k not in NOT_CONFIG and k not in SETTING_KEYS} \
            if c.source == "train" else {}

    labels = []
    for c in certified:
        peers = [d for d in certified if _peer_key(d) == _peer_key(c)]
        parts = [f"{k}={c.settings.get(k, '?')}" for k in SETTING_KEYS
                 if len({d.settings.get(k, "?") for d in peers}) > 1]
        ps = [params(d) for d in peers]
        varying = sorted(k for k in set().union(*ps) if len({q.get(k) for q in ps}) > 1)
        parts += [f"{k}={params(c).get(k, '-')}" for k in varying]
        labels.append(", ".join(parts))
    return labels


def build_table(certified: list[CertifiedRun], radii: Sequence[float]) -> pd.DataFrame:
    """One row per (dataset, trainable, source, sigma, config) (see the module docstring): runs, examples,
    <metric>_mean and <metric>_std for every metric of trainables.metrics.summarize (std NaN for one run,
    else the sample standard deviation over the runs), seeds and run_ids."""
    from trainables.metrics import summarize

    keys = ["dataset", "trainable", "source", "sigma", *SETTING_KEYS, "config"]
    per_run = pd.DataFrame.from_records([
        {"dataset": c.dataset, "trainable": c.trainable, "source": c.source, "sigma": c.sigma,
         **{k: c.settings.get(k, "?") for k in SETTING_KEYS}, "config": label, "run_id": c.run_id, "seed": c.get(tracking.TAG_SEED), "examples": len(c.rows),
         **summarize(c.rows, radii)}
        for c, label in zip(certified, _config_labels(certified))])
    metric_cols = [c for c in per_run.columns if c not in (*keys, "run_id", "seed", "examples")]
    rows = []
    for values, g in per_run.groupby(keys, sort=True, dropna=False):
        row: dict[str, Any] = {**dict(zip(keys, values)), "runs": len(g),
                               "examples": int(g["examples"].min())}
        for m in metric_cols:
            v = g[m].dropna()
            row[f"{m}_mean"] = float(v.mean()) if len(v) else float("nan")
            row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        row["seeds"] = ",".join(str(s) for s in g["seed"] if s)
        row["run_ids"] = ",".join(g["run_id"])
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def _cert_values(c: CertifiedRun, split: str) -> tuple[str, str, str]:
    """(n0, n, alpha) of a run's certification: the tags orchestrator.certify sets, else the run's budget's
    final settings (train and sweep certify the test split with them), else "?"."""
    tagged = tuple(c.tags.get(f"{split}_cert_{k}") for k in ("n0", "n", "alpha"))
    if all(tagged):
        return tagged  # type: ignore[return-value]
    if c.get(tracking.TAG_BUDGET) and split == "test":
        from orchestrator.budgets import BUDGETS
        b = BUDGETS.get(c.get(tracking.TAG_BUDGET))
        if b is not None:   # (a run from before train tagged its settings)
            return str(b.final_n0), str(b.final_n_for(c.trainable)), str(b.alpha)
    return "?", "?", "?"


def _cert_settings(c: CertifiedRun, split: str) -> str:
    n0, n, alpha = _cert_values(c, split)
    return "" if n0 == "?" else f"n0={n0}, n={n}, α={alpha}"


def caption(certified: list[CertifiedRun], table: pd.DataFrame, split: str) -> str:
    """What a reader needs to interpret the table: data, split, certification settings, how each row's model
    was selected, the budget, and what ± means."""
    def joined(values) -> str:
        found = sorted({v for v in values if v})
        return ", ".join(found) if found else "not recorded"

    sweeps = [c for c in certified if c.source == "sweep"]
    selection = []
    if sweeps:
        methods = joined(c.get(tracking.TAG_SELECTION) for c in sweeps)
        selection.append(f"sweep-selected rows: best validation ACR, {methods} selection")
    if any(c.source == "train" for c in certified):
        selection.append("fixed-config rows: no selection (the given hyperparameters)")
    examples = joined(str(n) for n in table["examples"])
    spread = ("mean ± std over the runs (seeds) of each row" if (table["runs"] > 1).any()
              else "one run per row")
    return (f"Certified accuracy (%) at ℓ2 radius r and average certified radius (ACR) on "
            f"{joined(c.dataset for c in certified)} ({split} split, {examples} examples, "
            f"{joined(_cert_settings(c, split) for c in certified)}). Model selection: "
            f"{'; '.join(selection)}. Budget: {joined(c.get(tracking.TAG_BUDGET) for c in certified)}. "
            f"{spread[0].upper() + spread[1:]}.")


# --- main ---------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """The command, for a parsed command line. Returns the table, the Markdown, the files and the run id."""
    from trainables import metrics

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    radii = parse_radii(args.radii) if args.radii else None
    uri = mlflow_utils.resolve_tracking_uri(args.tracking_uri, create=False)   # reads: never creates a store
    out = Path(args.out or defaults.default_output_dir(DEFAULT_OUT))
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise CompareInputError(f"--out {out}: {existing} is {'a file' if not existing.is_dir() else 'not writable'}")
    client = mlflow_utils.client(uri)
    runs = find_runs(client, args.experiment, args.runs)
    certified = load_certified(client, runs, args.split, explicit=args.runs)
    if args.sigma is not None:
        certified = [c for c in certified if math.isclose(c.sigma, args.sigma)]
        if not certified:
            raise CompareInputError(f"no certified run with σ={args.sigma:g}")
    if radii is None:
        grids = {metrics.RADII_BY_DATASET.get(c.dataset, metrics.RADII_DRF) for c in certified}
        radii = tuple(sorted(set().union(*grids)))
    table = build_table(certified, radii)
    md = to_markdown(table, radii, caption(certified, table, args.split))

    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(md)
    title = f"{', '.join(sorted(table['dataset'].unique()))} ({args.split})"
    files = [out / "table.csv", out / "table.md",
             plot_table(certified, table, radii, out / "certified_accuracy.png", title=title)]
    files += sweep_summaries(client, certified, out)
    from orchestrator.report import compare_report   # issue 16: report.html / report.md of the comparison
    files += [p for p in compare_report(out, table, md, files) if p.is_file()]
    print(md)
    print("wrote " + ", ".join(str(f) for f in files))
    result = {"table": table, "markdown": md, "files": files, "run_id": None}
    if not args.no_log:
        result["run_id"] = log_comparison(client, uri, certified, args.split, radii, files)
        print(f"logged comparison run {result['run_id']} (experiment {COMPARE_EXPERIMENT!r})")
    return result


def log_comparison(client, uri: str, certified: list[CertifiedRun], split: str, radii: Sequence[float],
                   files: Sequence[Path]) -> str:
    """A run (role "compare") in the experiment COMPARE_EXPERIMENT holding the comparison's files."""
    exp_id = mlflow_utils.ensure_experiment(client, COMPARE_EXPERIMENT, uri)
    run_id = mlflow_utils.create_run(client, exp_id, "compare", {tracking.TAG_ROLE: "compare"})
    try:
        mlflow_utils.log_params(client, run_id, {"runs": len(certified), "split": split,
                                                 "radii": ",".join(f"{r:g}" for r in radii)})
        mlflow_utils.set_tags(client, run_id, {"compared_runs": ",".join(c.run_id for c in certified)})
        for f in files:
            client.log_artifact(run_id, str(f))
    except BaseException as exc:
        mlflow_utils.close_run(client, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                               f"{type(exc).__name__}: {exc}")
        raise
    mlflow_utils.close_run(client, run_id, "FINISHED")
    return run_id


def _main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Bad input: one line on stderr, exit code 2 (cli_common.run_main, which also handles SIGTERM/SIGINT)."""
    return run_main(_main, argv, prog="compare")


if __name__ == "__main__":
    sys.exit(defaults.with_locations(main, build_parser, DEFAULT_OUT)())
