"""What a sweep's search did, as Optuna draws it: optimisation history, parameter importances and (two
objectives) the Pareto front, from the sweep's own Optuna study or, for a sweep without one, a study rebuilt
from its MLflow runs. Used by `orchestrator.compare` (for every sweep a compared run came from) and by the
sweep's report (orchestrator/report.py).

    study, objectives = sweep_study(client, parent_run_id)
    paths = plot_sweep(client, parent_run_id, out_dir)      # sweep-<id>-history.png, -importance.png, -pareto.png
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from orchestrator import tracking


def _distribution(description: str):
    """An Optuna distribution from a sweep's logged range (search_spaces.Space.describe):
    "log-uniform 1e-3..0.1", "int 0..300", "log-int 64..512", "choice a,b,c"; None for "fixed ..."."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    kind, _, rest = description.partition(" ")
    if kind == "choice":
        return CategoricalDistribution(tuple(rest.split(",")))
    if kind in ("uniform", "log-uniform", "int", "log-int"):
        low, _, high = rest.partition("..")
        if kind.endswith("int"):
            return IntDistribution(int(float(low)), int(float(high)), log=kind.startswith("log"))
        return FloatDistribution(float(low), float(high), log=kind.startswith("log"))
    return None


def _param_value(text: str, dist) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return text
    return int(float(text)) if isinstance(dist, IntDistribution) else float(text)


def sweep_study(client, parent_id: str):
    """The sweep's study from its Optuna storage (orchestrator.search); for a sweep without one (older sweeps,
    storage unreachable from here), a study rebuilt from the sweep's MLflow runs (orchestrator/sweep.py's logging): the search space
    from the parent's "space.*" params, the objectives from its "objectives" param (val_<name>), and one trial
    per finished trial run in start order -- COMPLETE when it ran to the end, PRUNED (with its intermediate
    values per epoch) when ASHA stopped it. Returns (study, objective metric names)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from orchestrator.search import study_of_sweep
    parent = client.get_run(parent_id)
    stored = study_of_sweep(parent)      # issue 16: the sweep's own study in its Optuna storage
    if stored is not None:
        return stored
    params = parent.data.params
    dists = {k[len("space."):]: d for k, v in params.items() if k.startswith("space.")
             if (d := _distribution(v)) is not None}
    objectives = [f"val_{o}" for o in params.get("objectives", "acr").split(",")]
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10_000)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=parent.info.run_name or parent_id,
                                directions=["maximize"] * len(objectives))
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        m = run.data.metrics
        if run.info.status != "FINISHED" or any(o not in m for o in objectives):
            continue
        try:
            values = {k: _param_value(run.data.params[k], d) for k, d in dists.items()}
        except (KeyError, ValueError):
            continue  # a trial that did not log the searched parameters
        pruned = run.data.tags.get(tracking.TAG_STOPPED_EARLY) == "true" and len(objectives) == 1
        inter = {int(h.step): h.value for h in client.get_metric_history(run.info.run_id, objectives[0])}
        study.add_trial(create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE, params=values, distributions=dists,
            values=None if pruned else [m[o] for o in objectives], intermediate_values=inter,
            user_attrs={"mlflow_run_id": run.info.run_id}))
    return study, objectives


def plot_sweep(client, parent_id: str, out: Path) -> list[Path]:
    """PNGs of one sweep: optimisation history, parameter importances (optuna.importance's default evaluator)
    and, for two objectives, the Pareto front. A plot the sweep cannot support (fewer than 2 complete trials,
    nothing varied) is skipped with a note on stdout."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as ovm

    study, objectives = sweep_study(client, parent_id)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    first = (lambda t: t.values[0]) if len(objectives) > 1 else None
    plots = {"history": lambda: ovm.plot_optimization_history(study, target=first, target_name=objectives[0]),
             "importance": lambda: ovm.plot_param_importances(study, target=first, target_name=objectives[0])}
    if len(objectives) == 2:
        plots["pareto"] = lambda: ovm.plot_pareto_front(study, target_names=objectives)
    paths = []
    for name, make in plots.items():
        if name == "importance" and (len(complete) < 2 or not study.trials[0].distributions):
            print(f"sweep {parent_id}: no parameter importances ({len(complete)} complete trial(s))")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            try:
                ax = make()
            except (ValueError, RuntimeError) as exc:
                print(f"sweep {parent_id}: no {name} plot ({exc})")
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        path = out / f"sweep-{parent_id[:8]}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def sweep_summaries(client, certified: Sequence, out: Path) -> list[Path]:
    """plot_sweep for every sweep a compared run belongs to (a trial's parent, or a sweep run itself)."""
    sweeps = sorted({c.get("mlflow.parentRunId") for c in certified if c.get("mlflow.parentRunId")}
                    | {c.run_id for c in certified if c.get(tracking.TAG_ROLE) == "sweep"})
    paths: list[Path] = []
    for sweep_id in sweeps:
        if client.get_run(sweep_id).data.tags.get(tracking.TAG_ROLE) == "sweep":
            paths += plot_sweep(client, sweep_id, out)
    return paths


__all__ = ["plot_sweep", "sweep_study", "sweep_summaries"]
