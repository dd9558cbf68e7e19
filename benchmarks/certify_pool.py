"""Benchmark of the certification actor pool (issue 7): throughput with 1 vs 2 actors, and the pool's overhead
against calling `certify_many` in-process on the same examples.

    python benchmarks/certify_pool.py [--examples 16] [--n 10000] [--n0 100] [--batch 1000] [--arch lenet]

The model is an untrained network of the dataset's default architecture (LeNet for MNIST): CERTIFY always
draws n0 + n samples per example, so its cost does not depend on the weights. Examples are the first
--examples test digits of `load_dataset("mnist")`. Every configuration certifies the same examples with the
same seed, and the script checks that they return the same rows.

Measured (wall clock, seconds):
  in-process 1 thread   Smooth.certify_many in this process, torch.set_num_threads(1)
  in-process 2 threads  the same with 2 threads (what a user gets without Ray on 2 cores)
  pool 1 actor          certify_with_pool(actors=1) on a running Ray, actor start-up and model load included
  pool 2 actors         certify_with_pool(actors=2)
  start-up of k actors  creating k actors and waiting until each has loaded the model (measured separately)
overhead = pool 1 actor / in-process 1 thread - 1 (target <= 10%); speed-up = pool 1 actor / pool 2 actors
(target >= 1.7x on 2 cores); both also without the start-up (a fixed cost per call, not per image).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from orchestrator.pool import certify_with_pool  # noqa: E402
from trainables.data import load_dataset  # noqa: E402
from trainables.registry import get_trainable  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--arch", default="lenet")
    p.add_argument("--shard-size", type=int, default=1)
    args = p.parse_args(argv)

    data = load_dataset("mnist")
    torch.manual_seed(0)
    trainable = get_trainable("gaussian")({"arch": args.arch}, data.info, epochs=1)
    indices = list(range(args.examples))
    xs = torch.stack([data.test[i][0] for i in indices])
    labels = [int(data.test[i][1]) for i in indices]
    cert = dict(n0=args.n0, n=args.n, alpha=args.alpha, seed=0)
    times, results = {}, {}
    load = os.getloadavg()

    for threads in (1, 2):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        rows = trainable.certifier().certify_many(xs, labels, indices, batch_size=args.batch, **cert)
        times[f"in-process {threads} thread{'s' * (threads > 1)}"] = time.perf_counter() - t0
        results[threads] = [(r.idx, r.predict, round(r.radius, 9)) for r in rows]

    import ray
    from orchestrator.pool import CertifyWorker, _checkpoint_bytes, actor_resources
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for actors in (1, 2):   # start-up alone: actor processes, torch import, model load
            n_act, options, threads, device = actor_resources(actors)
            remote_cls = ray.remote(max_restarts=-1, max_task_retries=-1)(CertifyWorker)
            t0 = time.perf_counter()
            ref = ray.put(_checkpoint_bytes(trainable))
            pool = [remote_cls.options(**options).remote(ref, threads, device) for _ in range(n_act)]
            ray.get([a.pid.remote() for a in pool])
            times[f"start-up of {actors} actor{'s' * (actors > 1)}"] = time.perf_counter() - t0
            for a in pool:
                ray.kill(a)
        for actors in (1, 2):
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                df = certify_with_pool(trainable, data.test, indices, out_dir=out, actors=actors,
                                       progress=False, batch=args.batch, shard_size=args.shard_size, **cert)
                times[f"pool {actors} actor{'s' * (actors > 1)}"] = time.perf_counter() - t0
                results[f"pool{actors}"] = [(int(r.idx), int(r.predict), round(float(r.radius), 9))
                                            for r in df.itertuples()]
    finally:
        ray.shutdown()
    same = all(v == results[1] for v in results.values())
    steady = {a: times[f"pool {a} actor{'s' * (a > 1)}"] - times[f"start-up of {a} actor{'s' * (a > 1)}"]
              for a in (1, 2)}
    report = {"examples": args.examples, "n0": args.n0, "n": args.n, "batch": args.batch, "arch": args.arch,
              "seconds": {k: round(v, 2) for k, v in times.items()},
              "s_per_image": {k: round(v / args.examples, 3) for k, v in times.items()},
              "overhead_pool1_vs_inprocess1":
                  round(times["pool 1 actor"] / times["in-process 1 thread"] - 1, 3),
              "speedup_2_vs_1_actor": round(times["pool 1 actor"] / times["pool 2 actors"], 2),
              "overhead_without_startup": round(steady[1] / times["in-process 1 thread"] - 1, 3),
              "speedup_without_startup": round(steady[1] / steady[2], 2),
              "same_rows": same, "loadavg_before": [round(x, 2) for x in load],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__}
    print(json.dumps(report, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
