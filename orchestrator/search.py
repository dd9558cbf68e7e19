"""The sweep's search algorithm (contract C6): Ray Tune's OptunaSearch, sized to the sweep, its study in a database.

    searcher = build_searcher("tpe", seed=0, trials=6, concurrency=2, objectives=("val_acr",),
                              storage_url="sqlite:////abs/optuna.db", study_name="glean-1a2b3c4d5e-20261128-0913",
                              planned_epochs=250)

Why not Ray's and Optuna's defaults:
- TPE starts with 10 random trials, more than the quick budget's 6: the default sweep was random search. Here the
  start-up phase is a third of the trials (at least 1); the rest are TPE proposals.
- NSGA-II's population of 50 exceeds the paper budget's 32 trials (no second generation would ever be bred):
  the population is half the trials (at least 2, at most Optuna's 50).
- Trials run concurrently, so TPE uses `constant_liar` (a running trial counts as a bad one, so concurrent
  proposals spread out) whenever concurrency > 1. CMA-ES and NSGA-II have no such option; they propose from
  the finished trials (CMA-ES by generations, NSGA-II by populations), which is what they are built for.
- Ray's OptunaSearch tells Optuna COMPLETE with the first-rung score for a trial that ASHA stopped. Here a trial
  whose last reported epoch is before its planned epochs is told PRUNED; its intermediate values (validation
  metric per evaluated epoch, step = the reported `epoch`, which survives a restore unlike Tune's iteration
  counter) are in the study, and Optuna records the last one as the pruned trial's value.
- `grid` (Optuna's GridSampler) runs every combination of the listed values once, e.g. GLEAN's parameter study
  (its Fig. 5: lam x sigma); see `grid_of`. A grid sweep stops nothing early (every setting is a result).
- The study lives in an RDB storage (default: `optuna.db` beside an sqlite MLflow store, else in the sweep's
  folder on the driver), named after the sweep, so `optuna-dashboard <storage url>` shows it while the sweep runs
  and afterwards, and `--resume` continues the same study (`load_if_exists`). Not the MLflow database itself:
  both schemas are managed by alembic with one `alembic_version` table, so they cannot share a database.

Only the driver touches the study (Tune's searcher lives in the driver process): like MLflow (contract C4), the
storage needs to be reachable from the driver only.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
from ray.tune.search.optuna import OptunaSearch

SAMPLERS = ("tpe", "cmaes", "nsga2", "random", "grid")
#: the file name of the default study database
STUDY_DB = "optuna.db"
#: the result key holding the number of finished epochs (orchestrator.tracking.EPOCH)
EPOCH_KEY = "epoch"
#: Optuna trial user attribute holding Tune's trial id (the MLflow trial run's tag tune_trial_id)
TUNE_TRIAL_ATTR = "tune_trial_id"
#: study user attribute: numbers of finished trials a killed driver told after Tune's last save (redone by Tune)
ORPHANS_ATTR = "orphaned_trials"


def tpe_startup_trials(trials: int) -> int:
    """Random start-up trials of TPE: a third of the sweep (at least 1, at most Optuna's default 10)."""
    return max(1, min(10, trials // 3))


def nsga2_population(trials: int) -> int:
    """NSGA-II's population: half the sweep (at least 2, Optuna's minimum; at most Optuna's default 50)."""
    return max(2, min(50, trials // 2))


class TuneNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGAIISampler that pickles. Tune saves its searcher (sampler included) with pickle at every step
    and on `--resume`; Optuna 5.1's genetic samplers hold a `threading.Lock`, which cannot be pickled (the sweep
    died in Tuner() with "cannot pickle '_thread.lock' object"). The lock guards one process's threads, so a
    fresh one is made on load."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


class TuneGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler for a study Tune drives by ask-and-tell. GridSampler.after_trial calls
    `study.stop()` once the grid is exhausted, which is only allowed inside `study.optimize` and otherwise
    raises in the middle of `tell` (Ray logs it as a warning; the trial's state is still stored). Tune already
    runs exactly as many trials as the grid has settings (num_samples), so there is nothing to stop."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def grid_of(searched: Mapping[str, Any]) -> dict[str, list]:
    """The grid of `--sampler grid`: every searched parameter must be a list of values (`--space lam=10,100`
    or a declared choice); ValueError (one line) naming those that are ranges."""
    ranges = [k for k, hp in searched.items() if hp.choices is None]
    if ranges:
        raise ValueError(f"--sampler grid needs values, not ranges: give {', '.join(ranges)} as lists "
                         f"(--space KEY=a,b,c) or pin them (--set KEY=VALUE)")
    return {k: list(hp.choices) for k, hp in searched.items()}


def grid_size(grid: Mapping[str, Sequence]) -> int:
    size = 1
    for values in grid.values():
        size *= len(values)
    return size


def reachable_trainables(space) -> list[str]:
    names = {space.trainable_for({})}
    for key in space.extra_names:
        hp = space.searched.get(key)
        if hp is not None and hp.choices is not None:
            names |= {space.trainable_for({key: c}) for c in hp.choices}
    return sorted(names)


def default_point(space) -> list[dict[str, Any]] | None:
    """The declared defaults as the search's first trial, when every searched default lies in its range (the
    defaults are the settings a method's authors tuned; a small search should not have to find them again)."""
    point = {}
    for key, hp in space.searched.items():
        v = hp.default
        ok = v is not None and (v in hp.choices if hp.choices is not None
                                else hp.low is not None and hp.low <= v <= hp.high)
        if not ok:
            return None
        point[key] = v
    return [point]


def make_sampler(kind: str, seed: int, trials: int, concurrency: int, objectives: int = 1,
                 grid: Mapping[str, Sequence] | None = None):
    """The seeded Optuna sampler of a sweep of `trials` trials, `concurrency` at a time (see the module doc).
    `grid`: the values of `kind == "grid"` (grid_of). ValueError for an unknown kind or CMA-ES with two
    objectives."""
    if kind == "grid":
        # GridSampler hands out unvisited combinations (running trials count as visited), so concurrent
        # trials never repeat one while any is left
        return TuneGridSampler({k: list(v) for k, v in (grid or {}).items()}, seed=seed)

    if kind == "tpe":
        # multivariate: the parameters interact (sigma and the penalty weight, lr and epochs); Optuna's
        # multivariate TPE models them jointly and beat independent TPE on Optuna's own benchmarks
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tpe_startup_trials(trials),
                                          multivariate=True, constant_liar=concurrency > 1)
    if kind == "cmaes":
        if objectives > 1:
            raise ValueError("--sampler cmaes optimises one objective; use nsga2 or tpe with --objectives "
                             "acr,clean_acc")
        # CMA-ES samples only numbers; categorical parameters fall back to this seeded independent sampler
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=tpe_startup_trials(trials),
                                            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                                            warn_independent_sampling=False)
    if kind == "nsga2":
        return TuneNSGAIISampler(seed=seed, population_size=nsga2_population(trials))
    if kind == "random":   # the baseline of benchmarks/search_vs_random.py
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {kind!r}; use one of {', '.join(SAMPLERS)}")


def default_storage_url(tracking_uri: str, local_dir: str | os.PathLike) -> str:
    """`sqlite:///<dir of the MLflow sqlite file>/optuna.db` when the MLflow store is an sqlite file, else
    `sqlite:///<local_dir>/optuna.db` (a folder on the driver: only the driver writes the study)."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and tracking_uri[len(prefix):] not in ("", ":memory:"):
        folder = Path(tracking_uri[len(prefix):]).expanduser().resolve().parent
    else:
        folder = Path(local_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"{prefix}{folder / STUDY_DB}"


def check_storage_url(url: str | None) -> None:
    """ValueError (one line) unless `url` is None or an RDB URL Optuna can open: sqlite:///FILE in an existing
    folder, postgresql://..., mysql://... (checked before the sweep writes anything)."""
    if url is None:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"--optuna-storage {url!r} is not a database URL; use e.g. sqlite:////abs/path/optuna.db "
                         "or postgresql://user@host/db") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise ValueError(f"--optuna-storage {url!r}: Optuna's RDB storage takes sqlite, postgresql or mysql "
                         f"URLs, not {backend!r}")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError(f"--optuna-storage {url!r}: an in-memory database would vanish with the sweep; "
                             "name a file (sqlite:////abs/path/optuna.db)")
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise ValueError(f"--optuna-storage {url!r}: folder {folder} does not exist")


def storage(url: str):
    """The Optuna RDB storage at `url` (sqlite:///..., postgresql://..., mysql://...)."""
    return optuna.storages.RDBStorage(url)


def load_study(storage_url: str, study_name: str):
    """The sweep's study, as optuna-dashboard and `compare`/`report` read it."""
    return optuna.load_study(study_name=study_name, storage=storage_url)


def study_of_sweep(parent_run) -> tuple[Any, list[str]] | None:
    """(study, objective names) of a sweep's MLflow parent run, from the Optuna storage its params name
    (`optuna_storage`, `optuna_study`); None for a sweep that predates them or whose storage is unreachable
    from here (compare then rebuilds the study from the MLflow runs)."""
    params = parent_run.data.params
    url, name = params.get("optuna_storage"), params.get("optuna_study")
    if not url or not name:
        return None
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except Exception:   # KeyError (no such study), sqlalchemy's errors for a missing/unreachable database
        return None
    return study, list(study.metric_names or [])


def _set_metric_names(study, names: list[str]) -> None:
    """optuna-dashboard labels the objectives with these (experimental in Optuna, stable enough to label)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)


def _epochs_of(planned: int | Callable[[dict], int] | None, config: dict) -> int | None:
    if planned is None:
        return None
    return int(planned(config)) if callable(planned) else int(planned)


class SweepSearch(OptunaSearch):
    """OptunaSearch that reports intermediate values by epoch and tells ASHA-stopped trials as PRUNED.

    `planned_epochs`: a trial's planned number of epochs, an int or a function of the trial's config (a
    space whose trainable is a choice may plan different epochs per trainable); it must pickle (Tune saves
    the searcher with pickle): a module-level function or a functools.partial of one.
    """

    def __init__(self, *args, planned_epochs: int | Callable[[dict], int] | None = None,
                 metric_names: Sequence[str] = (), **kwargs):
        self._planned_epochs = planned_epochs
        self._metric_names = list(metric_names)
        self._configs: dict[str, dict] = {}
        self._reported: dict[str, set[int]] = {}
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        if self._metric_names and self._ot_study.metric_names is None:
            _set_metric_names(self._ot_study, self._metric_names)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if config is not None:
            self._configs[trial_id] = config
            # links the Optuna trial to Tune's trial and so to its MLflow run (tag tune_trial_id)
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return config

    def restore(self, checkpoint_path: str) -> None:
        """Tune's restore (`--resume`), then reconcile the searcher with the study, which a killed driver may have
        written after Tune's last save of the searcher:
        - a trial the restored searcher knows but the study already holds as finished (the driver told it, then
          was killed before Tune saved) counts as completed: Tune re-runs it from its checkpoint, and its repeated
          results and completion are ignored (the study keeps the value it was told; Optuna refuses to update a
          finished trial);
        - a trial the study holds as RUNNING that the restored searcher does not know was asked after the last
          save; Tune will not run it, so it is marked FAIL (user attr `orphaned`) instead of staying RUNNING in
          the dashboard forever."""

        super().restore(checkpoint_path)
        storage_ = self._ot_study._storage
        for tune_id, ot_trial in self._ot_trials.items():
            if storage_.get_trial(ot_trial._trial_id).state.is_finished():
                self._completed_trials.add(tune_id)
        known = {t._trial_id for t in self._ot_trials.values()}
        orphans = set(self._ot_study.user_attrs.get(ORPHANS_ATTR, []))
        for t in self._ot_study.get_trials(deepcopy=False):
            if t._trial_id in known:
                continue
            if t.state == optuna.trial.TrialState.RUNNING:
                storage_.set_trial_user_attr(t._trial_id, "orphaned", "asked by an interrupted sweep, never run")
                storage_.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            elif t.state.is_finished():
                # told by the killed driver before Tune saved the trial: Tune redoes it under a new id. Optuna
                # cannot change a finished trial, so the study lists it (its value still informs the sampler)
                orphans.add(t.number)
        if orphans:
            self._ot_study.set_user_attr(ORPHANS_ATTR, sorted(orphans))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials:
            return super().on_trial_result(trial_id, result)
        if self.metric not in result:   # an epoch without evaluation reports training metrics only
            return
        step = int(result.get(EPOCH_KEY, result.get("training_iteration", 0)))
        trial = self._ot_trials.get(trial_id)
        reported = self._reported.setdefault(trial_id, set())
        if trial is not None and step not in reported:   # a trial restored from a checkpoint repeats epochs
            trial.report(float(result[self.metric]), step)
            reported.add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        planned = _epochs_of(self._planned_epochs, self._configs.get(trial_id, {}))
        stopped_early = (not error and result and planned is not None and EPOCH_KEY in result
                         and int(result[EPOCH_KEY]) < planned and trial_id not in self._completed_trials
                         and trial_id in self._ot_trials)
        if not stopped_early:
            return super().on_trial_complete(trial_id, result, error)

        ot_trial = self._ot_trials[trial_id]
        if not isinstance(self.metric, list) and self.metric in result:
            self.on_trial_result(trial_id, result)   # the last rung's value, in case no result preceded
        self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def build_searcher(kind: str, seed: int, trials: int, concurrency: int, objectives: Sequence[str],
                   storage_url: str, study_name: str, *,
                   planned_epochs: int | Callable[[dict], int] | None = None,
                   user_attrs: Mapping[str, Any] | None = None,
                   points_to_evaluate: list[dict[str, Any]] | None = None,
                   grid: Mapping[str, Sequence] | None = None) -> SweepSearch:
    """The sweep's searcher (contract C6): a seeded sampler sized to `trials` (see make_sampler), every
    objective maximised, the study `study_name` in the RDB storage at `storage_url` (created, or continued when
    it exists: `--resume`), ASHA-stopped trials told PRUNED. `user_attrs` (e.g. the sweep's command, dataset,
    selection protocol) are stored on the study for optuna-dashboard, `compare` and `report`."""
    sampler = make_sampler(kind, seed, trials, concurrency, len(objectives), grid)
    metric: str | list[str] = objectives[0] if len(objectives) == 1 else list(objectives)
    mode: str | list[str] = "max" if len(objectives) == 1 else ["max"] * len(objectives)
    rdb = storage(storage_url)
    searcher = SweepSearch(metric=metric, mode=mode, sampler=sampler, study_name=study_name,
                           storage=rdb, planned_epochs=planned_epochs,
                           metric_names=list(objectives), points_to_evaluate=points_to_evaluate)
    # the study exists only once Tune hands the space over (set_search_properties); create it now so that
    # optuna-dashboard sees it from the start, with its attributes
    study = optuna.create_study(study_name=study_name, storage=rdb, load_if_exists=True,
                                directions=["maximize"] * len(objectives))
    if study.metric_names is None:
        _set_metric_names(study, list(objectives))
    for key, value in (user_attrs or {}).items():
        study.set_user_attr(key, value)
    return searcher


__all__ = ["SAMPLERS", "STUDY_DB", "SweepSearch", "build_searcher", "default_point", "default_storage_url", "grid_of",
           "grid_size", "reachable_trainables",
           "load_study",
           "check_storage_url", "make_sampler", "nsga2_population", "storage", "study_of_sweep", "tpe_startup_trials"]
