"""`python -m orchestrator.reproduce NAME`: the GLEAN paper's Colored-MNIST evidence, one command each.

    python -m orchestrator.reproduce glean-table2      [--budget quick|paper] [--n N] [--examples K] [--seeds 0,1]
    python -m orchestrator.reproduce glean-ablations   [--budget quick|paper] [--sigmas 0.12,0.25] [--seeds 0]
    python -m orchestrator.reproduce glean-parameters  [--budget quick|paper] [--lams 10,...] [--sigmas ...]
        common: [--tracking-uri URI] [--experiment NAME] [--data-root P] [--out DIR] [--dry-run]

- glean-table2 (Table 2's CMNIST block): GLEAN, Gaussian, MACER, SmoothAdv and Consistency at σ = 0.12, each an
  `orchestrator.train` run on cmnist certified Monte-Carlo with the SAME n0, n, α on the SAME test-domain
  examples (`--certify-n`, `--certify-examples`), then `orchestrator.compare` over exactly those runs: the table
  (GLEAN's deterministic certificate only in its own `det ACR` column, never compared with a Monte-Carlo
  number), the certified-accuracy plot, and a compare run in MLflow. Default n / examples: the budget's final
  certification of the input-space baselines (quick: n = 10,000 on 500 examples; paper: n = 100,000 on every
  reported example), since their input-space sampling is what costs; GLEAN is certified exactly like them.
- glean-ablations (Fig. 4): GLEAN, w/o invariance (lam = 0), w/o Lipschitz (lipschitz = false: free layers + ReLU,
  L an upper bound from the layers' norms) and both, at σ = 0.12 and 0.25, GLEAN's own final certification
  (class-space sampling: n = 100,000 on every reported example), then `compare`.
- glean-parameters (Fig. 5): `orchestrator.sweep glean --sampler grid --space lam=10,...,1000000 --space
  sigma=0.12,0.25,0.5,1.0`: every setting trained and certified on the test domain; the sweep prints test ACR per
  setting and logs parameter_study.png (certified accuracy vs radius per setting, one panel per σ).

`--budget paper` is the papers' budget (a GPU cluster's job: `ray job submit -- python -m orchestrator.reproduce
...`); `quick` (default) is the reduced CPU budget. Every run goes to one MLflow experiment (default: NAME) and
is tagged `reproduce_key` = a hash of its command: relaunching skips runs that FINISHED (DomainBed's rule), so an
interrupted reproduction continues where it stopped. `--dry-run` prints the commands. Bad input: one line, exit 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from orchestrator import cli_common, defaults
from orchestrator.budgets import BUDGETS, DEFAULT_BUDGET, get_budget
from orchestrator.cli_common import UsageError, run_main

#: Table 2's CMNIST block: the methods compared with GLEAN, at the paper's σ = 0.12
TABLE2_METHODS = ("glean", "gaussian", "macer", "smoothadv", "consistency")
TABLE2_SIGMA = 0.12
#: Fig. 4: the ablations (label -> pinned hyperparameters) and their σ
ABLATIONS = {"GLEAN": {}, "w/o invariance": {"lam": 0}, "w/o Lipschitz": {"lipschitz": "false"},
             "w/o both": {"lam": 0, "lipschitz": "false"}}
ABLATION_SIGMAS = (0.12, 0.25)
#: Fig. 5: the parameter study's grid
PARAMETER_LAMS = (10, 100, 1000, 10_000, 100_000, 1_000_000)
PARAMETER_SIGMAS = (0.12, 0.25, 0.5, 1.0)
NAMES = ("glean-table2", "glean-ablations", "glean-parameters")
DATASET = "cmnist"
DEFAULT_OUT = "reproduce-out"
KEY_TAG = "reproduce_key"


@dataclass(frozen=True)
class TrainRun:
    """One `orchestrator.train` run of a reproduction."""

    label: str
    argv: tuple[str, ...]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.argv).encode()).hexdigest()[:16]


def build_parser() -> argparse.ArgumentParser:
    p = cli_common.ArgumentParser(prog="python -m orchestrator.reproduce", allow_abbrev=False,
                                description="The GLEAN paper's CMNIST tables and figures as commands.")
    p.add_argument("name", choices=NAMES)
    p.add_argument("--budget", choices=tuple(BUDGETS), default=DEFAULT_BUDGET, help="orchestrator/budgets.py")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each is one run per setting (default 0)")
    p.add_argument("--n", type=int, help="glean-table2: n of every method's certification (default: the budget's)")
    p.add_argument("--examples", type=int, help="glean-table2: test examples certified (default: the budget's)")
    p.add_argument("--sigmas", help="glean-ablations / glean-parameters: comma-separated σ (default: the paper's)")
    p.add_argument("--lams", help="glean-parameters: comma-separated λ (default: 10,...,1000000)")
    p.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: NAME)")
    p.add_argument("--data-root", help="data root (default $SMOOTHING_DATA_ROOT, the packaged MNIST, download)")
    p.add_argument("--out", help="compare's output folder (default reproduce-out/NAME)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def _numbers(text: str | None, default: Sequence[float], flag: str, kind=float) -> list:
    if text is None:
        return list(default)
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"{flag} must be non-negative numbers, got {text!r}")
    return values


def plan(args) -> list[TrainRun]:
    """The train runs of glean-table2 / glean-ablations (in order), from the parsed arguments."""
    seeds = _numbers(args.seeds, (0,), "--seeds", int)
    common = ["--dataset", DATASET, "--budget", args.budget]
    runs: list[TrainRun] = []
    if args.name == "glean-table2":
        budget = get_budget(args.budget)
        n = args.n or budget.final_n
        examples = args.examples or budget.final_examples     # None: every reported example
        cert = ["--certify-n", str(n)] + (["--certify-examples", str(examples)] if examples else [])
        for method in TABLE2_METHODS:
            for seed in seeds:
                runs.append(TrainRun(method, (method, *common, "--set", f"sigma={TABLE2_SIGMA}", *cert,
                                              "--seed", str(seed))))
    elif args.name == "glean-ablations":
        for sigma in _numbers(args.sigmas, ABLATION_SIGMAS, "--sigmas"):
            for label, pins in ABLATIONS.items():
                sets = [a for k, v in {"sigma": sigma, **pins}.items() for a in ("--set", f"{k}={v}")]
                for seed in seeds:
                    runs.append(TrainRun(f"{label}, σ={sigma:g}", ("glean", *common, *sets, "--seed", str(seed))))
    return runs


def sweep_argv(args) -> list[str]:
    """glean-parameters: the grid sweep's arguments."""
    lams = _numbers(args.lams, PARAMETER_LAMS, "--lams")
    sigmas = _numbers(args.sigmas, PARAMETER_SIGMAS, "--sigmas")
    argv = ["glean", "--dataset", DATASET, "--budget", args.budget, "--sampler", "grid",
            "--space", "lam=" + ",".join(map(_num, lams)), "--space", "sigma=" + ",".join(map(_num, sigmas)),
            "--experiment", args.experiment or args.name, "--seed", str(_numbers(args.seeds, (0,), "--seeds", int)[0])]
    return argv + _store_flags(args)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _store_flags(args) -> list[str]:
    return ((["--tracking-uri", args.tracking_uri] if args.tracking_uri else [])
            + (["--data-root", args.data_root] if args.data_root else []))


def _finished(tracking_uri: str, experiment: str, key: str) -> str | None:
    """The id of a FINISHED run of `experiment` tagged with `key`, else None (also when there is no store yet:
    reading an sqlite store that does not exist would create it)."""
    from orchestrator import mlflow_utils

    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not Path(tracking_uri[len(prefix):]).exists():
        return None
    cl = mlflow_utils.client(tracking_uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = cl.search_runs([exp.experiment_id], filter_string=f"tags.{KEY_TAG} = '{key}' and "
                                                                "attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n is not None and args.n < 1 or args.examples is not None and args.examples < 1:
        raise UsageError("--n and --examples must be >= 1")
    if args.name != "glean-table2" and (args.n or args.examples):
        raise UsageError("--n / --examples apply to glean-table2 (the others use GLEAN's own certification)")
    if args.name == "glean-table2" and args.sigmas:
        raise UsageError("--sigmas does not apply to glean-table2 (Table 2 is at σ = 0.12)")
    if args.name != "glean-parameters" and args.lams:
        raise UsageError("--lams applies to glean-parameters")
    if args.name == "glean-parameters" and len(_numbers(args.seeds, (0,), "--seeds", int)) > 1:
        raise UsageError("glean-parameters is one grid sweep: give one --seeds value")
    from orchestrator import compare, sweep, train

    if args.name == "glean-parameters":
        cmd = sweep_argv(args)
        print("python -m orchestrator.sweep " + " ".join(cmd), flush=True)
        return 0 if args.dry_run else sweep.main(cmd)

    from orchestrator import mlflow_utils
    experiment = args.experiment or args.name
    runs = plan(args)
    if args.dry_run:
        for run in runs:
            print("python -m orchestrator.train " + " ".join(run.argv + ("--experiment", experiment)))
        return 0
    tracking_uri = mlflow_utils.resolve_tracking_uri(args.tracking_uri)
    done: list[str] = []
    for i, run in enumerate(runs, 1):
        previous = _finished(tracking_uri, experiment, run.key)
        if previous:
            print(f"[{i}/{len(runs)}] {run.label}: done before (run {previous}), skipped", flush=True)
            done.append(previous)
            continue
        print(f"[{i}/{len(runs)}] {run.label}: python -m orchestrator.train {' '.join(run.argv)}", flush=True)
        code = train.main([*run.argv, "--experiment", experiment, "--tag", f"{KEY_TAG}={run.key}",
                           "--tag", f"reproduce={args.name}", "--tag", f"reproduce_label={run.label}",
                           *_store_flags(args)])
        found = _finished(tracking_uri, experiment, run.key) if code == 0 else None
        if found is None:
            raise RuntimeError(f"{run.label}: the train run did not finish (exit code {code})")
        done.append(found)
    out = args.out or str(defaults.default_output_dir(f"{DEFAULT_OUT}/{args.name}"))
    print(f"\ncomparing {len(done)} runs (orchestrator.compare) ...", flush=True)
    return compare.main(["--runs", *done, "--out", out, *(["--tracking-uri", args.tracking_uri]
                                                          if args.tracking_uri else [])])


if __name__ == "__main__":
    sys.exit(run_main(defaults.with_locations(main, build_parser, DEFAULT_OUT)))
