"""The end of a sweep: select each protocol's pick, certify it on the test split with the budget's FINAL settings,
log the figures, the models (the selected one registered) and the Pareto front, and build the summary table.

    table = finish(cl, args, budget, objectives, space, dataset, splits, selection, completed, parent,
                   tracking_uri, experiment, sweep_uri, run_of)

Called by orchestrator.sweep once Tune's trials are done; everything here runs on the driver (contract C4).
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator import storage as st
from orchestrator import tracking
from orchestrator.budgets import Budget
from orchestrator.cli_common import certify_split, format_table
from orchestrator.sweep_run import checkpoint_file


def pareto_front(points: list[tuple[Any, tuple[float, ...]]]) -> list[tuple[Any, tuple[float, ...]]]:
    """The non-dominated (maximised) points, sorted by the first objective, best first."""
    front = [(k, p) for k, p in points
             if not any(all(q[i] >= p[i] for i in range(len(p))) and q != p for _, q in points)]
    return sorted(front, key=lambda kp: -kp[1][0])


def stopped_early(result, budget: Budget, dataset: str, space) -> bool:
    epochs = budget.epochs_for(space.trainable_for(result.config), dataset)
    return int(result.metrics.get(tracking.EPOCH, 0)) < epochs


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def finish(cl, args, budget: Budget, objectives, space, dataset, splits, selection, completed, parent: str,
            tracking_uri: str, experiment: str, sweep_uri: str, run_of: dict[str, str]) -> str:
    """Select (each protocol's pick, orchestrator/selection.py), certify the picks on the test split with the final
    settings, log, and return the summary table (both protocols, labelled, where the dataset has a test domain)."""
    from orchestrator import mlflow_utils
    from orchestrator import selection as S
    from trainables.metrics import RADII_BY_DATASET, certacc_key

    full = [r for r in completed if not stopped_early(r, budget, dataset, space)] or completed
    front = None
    protocol = selection.method
    if len(objectives) > 1:
        front = pareto_front([(r, tuple(float(r.metrics[o]) for o in objectives)) for r in full])
        best = front[0][0]
    else:
        best = S.pick(full, protocol) or full[0]
    picks = {protocol: best}
    if selection.oracle_indices and len(objectives) == 1:      # the other protocol's pick, for the table
        other = "train-domain" if protocol == "oracle" else "oracle"
        picks[other] = S.pick(full, other)

    def run_id_of(result) -> str:
        return run_of[str(result.metrics["trial_id"])]

    final_n = budget.final_n_for(space.trainable_for(best.config))
    radii = RADII_BY_DATASET[dataset]
    tests: dict[str, dict[str, float]] = {}                    # run id -> test metrics
    test_rows: dict[str, Any] = {}                             # run id -> certified rows
    cert_s = 0.0
    grid = getattr(args, "grid", None)      # --sampler grid: a parameter study certifies every setting
    to_certify = list(picks.items()) + ([(None, r) for r in completed] if grid else [])
    for proto, result in to_certify:
        if result is None or run_id_of(result) in tests:
            continue
        run_id = run_id_of(result)
        name = space.trainable_for(result.config)
        print(f"certifying the {proto + ' pick' if proto else 'setting'} ({name}, run {run_id}) on "
              f"{len(selection.test_indices)} {selection.test_label} examples with n={final_n} ...", flush=True)
        t0 = time.perf_counter()
        # the pool's shards go to a local folder on the driver (resumable there when the storage is local), and
        # the finished certification is copied into the sweep's storage
        cert_uri = st.join(sweep_uri, "final_certification", run_id)
        local = st.local_dir(cert_uri)
        with tempfile.TemporaryDirectory(prefix="final-cert-") as tmp:
            out_dir = local if local is not None else Path(tmp) / "final_certification"
            rows = certify_split(checkpoint_file(result, str(Path(tmp) / "ckpt")), splits.test,
                                 selection.test_indices, split="test", n0=budget.final_n0, n=final_n,
                                 alpha=budget.alpha, batch=budget.cert_batch, seed=args.seed, out_dir=out_dir)
            if local is None:
                st.upload_dir(out_dir, cert_uri)
        cert_s += time.perf_counter() - t0
        cl.update_run(run_id, status="RUNNING")
        tests[run_id] = mlflow_utils.log_certification(cl, run_id, rows, "test", radii, prefix=tracking.TEST_PREFIX,
                                                       title=f"{name} (test)")
        test_rows[run_id] = rows
        mlflow_utils.set_tags(cl, run_id, {"test_examples": selection.test_label,
                                           "picked_by": ",".join(p for p, r in picks.items() if r is result)})
        mlflow_utils.close_run(cl, run_id, "FINISHED")
    best_run = run_id_of(best)
    test = tests[best_run]
    params = {k: v for k, v in best.config.items()}
    name = space.trainable_for(params)
    mlflow_utils.set_tags(cl, best_run, {tracking.TAG_SELECTED: "true"})
    mlflow_utils.log_params(cl, parent, {**{f"best.{k}": v for k, v in params.items()},
                                         **{f"best.{k}": v for k, v in space.fixed.items()},
                                         "best.trainable": name})
    val = {f"selected_{o}": float(best.metrics[o]) for o in objectives}
    others = {f"{p.replace('-', '_')}_pick_test_acr": tests[run_id_of(r)][f"{tracking.TEST_PREFIX}acr"]
              for p, r in picks.items() if r is not None}
    mlflow_utils.log_metrics(cl, parent, {**val, **test, **others, "final_certification_s": cert_s})
    mlflow_utils.set_tags(cl, parent, {"selected_run_id": best_run})
    from orchestrator import models   # issue 16: trial models in MLflow, the selected one registered
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        version = models.publish_sweep(
            tracking_uri, [(run_id_of(r), checkpoint_file(r, str(Path(tmp) / run_id_of(r)))) for r in completed],
            best_run, name, dataset,
            tags={**val, **test, **{models.CERT_PREFIX + k: v for k, v in {
                "split": "test", "n0": budget.final_n0, "n": final_n, "alpha": budget.alpha,
                "batch": budget.cert_batch, "seed": args.seed, "selection": selection.method,
                "final_examples": budget.final_examples_for(name)}.items()},
                "sweep": Path(sweep_uri.split("?")[0]).name, "sweep_run_id": parent},
            input_example=splits.test[selection.test_indices[0]][0].numpy()[None])
    model_uri = f"models:/{version.name}@{models.ALIAS}"
    mlflow_utils.set_tags(cl, parent, {"registered_model": f"{model_uri} (version {version.version})"})
    if front is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pareto_front.tsv"
            lines = ["run_id\t" + "\t".join(objectives)]
            lines += [f"{run_of[str(r.metrics['trial_id'])]}\t" + "\t".join(f"{v:.4f}" for v in p) for r, p in front]
            path.write_text("\n".join(lines) + "\n")
            mlflow_utils.log_file(cl, parent, path, "pareto_front.tsv")

    study_rows = []
    if grid:
        study_rows = _parameter_study(cl, parent, grid, [(r.config, test_rows[run_id_of(r)]) for r in completed],
                                      radii, f"{name} on {dataset}: test certification, n={final_n}, "
                                      f"{len(selection.test_indices)} {selection.test_label} examples")
    sets = f"{len(selection.sel_indices)} validation examples"
    if selection.oracle_indices:
        sets += f" and {len(selection.oracle_indices)} test-domain hold-out examples"
    fin = (f"{len(selection.test_indices)} examples of the {selection.test_label.replace('_', ' ')} split, "
           f"FINAL certification n0={budget.final_n0} n={final_n} alpha={budget.alpha}")
    rows_out = [
        ("trainable / dataset", f"{name} on {dataset} (budget {budget.name}, {len(completed)} usable trials)"),
        ("selection", f"{protocol} selection: {S.LABEL[protocol]}; every trial scored on {sets} with the SEARCH "
                      f"certification n0={budget.search_n0} n={budget.search_n} alpha={budget.alpha}"),
        ("best parameters", ", ".join(f"{k}={fmt(v)}" for k, v in {**params, **space.fixed}.items())),
    ]
    if len(objectives) > 1:
        rows_out.append((f"selected {objectives[0]}", f"{float(best.metrics[objectives[0]]):.4f}"))
        rows_out.append((f"selected {objectives[1]}", f"{float(best.metrics[objectives[1]]):.4f}"))
        rows_out.append(("Pareto front (acr, clean_acc)",
                         "  ".join(f"({p[0]:.3f}, {p[1]:.3f})" for _, p in front)))
        acc = "  ".join(f"{r:g}:{test.get(tracking.TEST_PREFIX + certacc_key(r), float('nan')):.3f}" for r in radii)
        rows_out += [("test ACR", f"{test[f'{tracking.TEST_PREFIX}acr']:.4f}   [{fin}; model chosen by {protocol}]"),
                     ("test certified accuracy", f"radius:accuracy  {acc}")]
    else:
        for proto, result in picks.items():
            if result is None:
                rows_out.append((f"[{proto}] picks", "no trial reported this protocol's metric"))
                continue
            rid = run_id_of(result)
            desc = ", ".join(f"{k}={fmt(v)}" for k, v in result.config.items()) + f" (run {rid})"
            rows_out += S.protocol_rows(proto, protocol, result.metrics, desc, tests[rid], radii,
                                        lambda t, r: t.get(tracking.TEST_PREFIX + certacc_key(r), float("nan")),
                                        fin)
    rows_out += [
        ("data source", splits.info.source),
        ("MLflow", f"sweep run {parent}, selected trial run {best_run}, experiment {experiment!r}"),
        ("MLflow UI", mlflow_utils.ui_command(tracking_uri)),
        ("MLflow model", f"{model_uri} (version {version.version}); certify it with "
                         f"python -m orchestrator.certify --model {model_uri}"),
        ("Tune experiment", st.redact(sweep_uri)),
    ]
    return "\n" + format_table(rows_out + study_rows) + "\n"


def _parameter_study(cl, parent: str, grid, points, radii, title: str) -> list[tuple[str, str]]:
    """A grid sweep's test ACR per setting (Markdown, first key down, second across) and parameter_study.png,
    logged to the sweep's run; the rows the summary table shows."""
    from orchestrator import mlflow_utils
    from orchestrator import parameter_study as P

    keys = list(grid)
    frame = P.study_frame(points, keys, radii)
    table = P.pivot_markdown(frame, keys)
    with tempfile.TemporaryDirectory(prefix="study-") as tmp:
        png = P.plot_study(points, keys, Path(tmp) / "parameter_study.png", title=title)
        mlflow_utils.log_file(cl, parent, png, png.name)
        (Path(tmp) / "parameter_study.md").write_text(f"Test ACR per setting ({title})\n\n{table}\n")
        frame.to_csv(Path(tmp) / "parameter_study.csv", index=False)
        for f in ("parameter_study.md", "parameter_study.csv"):
            mlflow_utils.log_file(cl, parent, Path(tmp) / f, f)
    return [("parameter study", "test ACR per setting; parameter_study.png/.md/.csv in the sweep run\n"
                                + "\n".join("    " + line for line in table.splitlines()))]


__all__ = ["finish", "fmt", "pareto_front", "stopped_early"]
