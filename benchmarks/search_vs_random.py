"""Does the default sweep search? Best-found validation ACR of the default sampler (TPE sized by
orchestrator.search: a third of the trials random, then multivariate TPE, constant liar) vs random search with
the same trial count, 3 seeds each, on the default sweep (`glean` on cmnist).

    python benchmarks/search_vs_random.py [--seeds 0,1,2] [--trials 6] [--steps 150] [--train 10000] [--out DIR]

Budget (stated): 6 trials (the quick budget's default; the default GLEAN sweep runs 2), 2 at a time, ASHA with 3 rungs, smaller so that 6 sweeps fit
a 2-core machine: GLEAN trains `--steps` full-batch steps (quick: 250) on `--train` training examples (quick:
all 45,000; with 2,000 examples and 60 steps every trial stayed colour-reliant, oracle ACR <= 0.03), and
validation ACR is certified with n = 500 on 100 validation examples (quick: n = 1,000 on 200). The final test
certification is minimal (it is not what is compared). Both samplers see the same data, the same seeds and the same
search space; "best found" is the highest value of the sweep's objective among trials that ran to the end (the
sweep's selection rule), read from each sweep's Optuna study: on cmnist that is `oracle_acr`, the ACR on the
fixed test-domain hold-out (the default oracle selection, DomainBed's test-domain validation). Both samplers
evaluate GLEAN's declared defaults first (the sweep's points_to_evaluate). Prints one Markdown table and writes
it to DIR/search_vs_random.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--train", type=int, default=10_000, help="training examples (quick: all 45,000)")
    p.add_argument("--samplers", default="tpe,random")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import optuna

    from orchestrator import budgets, sweep

    quick = budgets.BUDGETS["quick"]
    budgets.BUDGETS["bench"] = replace(quick, name="bench", epochs={**quick.epochs, "glean/cmnist": args.steps},
                                       max_train=args.train, max_val=200, search_n=500, search_examples=100,
                                       final_n=200, final_examples=20, trials=args.trials,
                                       trials_for={}, evals_for={"glean": 3}, max_train_for={}, final_for={},
                                       description="benchmarks/search_vs_random.py")
    out = Path(args.out or tempfile.mkdtemp(prefix="search-vs-random-"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[float]] = {}
    # seeds outer, samplers inner: a run cut short still holds paired results
    for seed in (int(s) for s in args.seeds.split(",")):
        for sampler in args.samplers.split(","):
            t0 = time.perf_counter()
            uri = f"sqlite:///{out / f'{sampler}-{seed}' / 'mlflow.db'}"
            (out / f"{sampler}-{seed}").mkdir(exist_ok=True)
            rc = sweep.main(["glean", "--budget", "bench", "--sampler", sampler, "--seed", str(seed),
                             "--tracking-uri", uri, "--storage", str(out / f"{sampler}-{seed}" / "ray")])
            assert rc == 0, f"sweep {sampler} seed {seed} failed"
            url = f"sqlite:///{out / f'{sampler}-{seed}' / 'optuna.db'}"
            (name,) = optuna.get_all_study_names(url)
            study = optuna.load_study(study_name=name, storage=url)
            complete = [t.value for t in study.trials if t.state.name == "COMPLETE"]
            results.setdefault(sampler, []).append(max(complete))
            with open(out / "runs.tsv", "a") as f:
                f.write(f"{sampler}\t{seed}\t{max(complete):.4f}\t{len(complete)}\t"
                        f"{sum(t.state.name == 'PRUNED' for t in study.trials)}\t{time.perf_counter() - t0:.0f}\n")
            print(f"== {sampler} seed {seed}: best val_acr {max(complete):.4f} "
                  f"({len(complete)} complete, {sum(t.state.name == 'PRUNED' for t in study.trials)} pruned) "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
    lines = ["| sampler | best validation ACR per seed | mean ± std |", "|---|---|---|"]
    for sampler, vals in results.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {sampler} | {', '.join(f'{v:.4f}' for v in vals)} | "
                     f"{statistics.mean(vals):.4f} ± {sd:.4f} |")
    table = "\n".join(lines)
    (out / "search_vs_random.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
