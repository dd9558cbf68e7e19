"""`python -m orchestrator.certify`: Cohen et al.'s CERTIFY on a fault-tolerant, resumable pool of Ray actors.

    python -m orchestrator.certify (--run-id ID | --checkpoint PATH) [--split test] [--n0 100] [--n 100000]
        [--alpha 0.001] [--batch 1000] [--skip K] [--max M] [--actors A] [--out DIR] [--resume] [--seed S]
        [--tracking-uri URI] [--data-root P] [--shard-size S] [--address ADDR] [--no-progress]

--skip/--max follow Cohen et al.'s certify.py: every K-th example of the split, stopping before index M.
The output directory (default certify-out/<split>-<model fingerprint>-<settings hash>, so that rerunning the
same command resumes) holds the shards, a manifest and, once complete, `<split>.tsv`. `--resume --out DIR`
alone continues DIR with the model and settings its manifest recorded. With --run-id the results are logged
to that training run (metrics prefixed "<split>_", the TSV and a certified-accuracy plot as artifacts, per
orchestrator/tracking.py). Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from orchestrator import cli_common, defaults, tracking
from orchestrator.cli_common import check_reachable, install_signal_handlers, run_main
from orchestrator.pool import CertifyInputError, certify_with_pool, check_out_dir, check_resume, \
    examples_sha256, load_model, model_fingerprint, read_manifest, validate_settings
from trainables.device import DEVICE_CHOICES
from trainables.smoothing import ALPHA, BATCH_SIZE, N, N0

DEFAULT_OUT_ROOT = "certify-out"
SPLITS = ("train", "val", "test")


def build_parser() -> argparse.ArgumentParser:
    p = cli_common.ArgumentParser(prog="python -m orchestrator.certify", allow_abbrev=False,
                                description="Certify a trained model (randomized smoothing) on a pool of Ray "
                                            "actors.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run-id", help="MLflow run whose checkpoint to certify (results are logged to it)")
    src.add_argument("--checkpoint", help="checkpoint file (trainables.checkpoint format)")
    src.add_argument("--model", metavar="URI", help="registered model, models:/NAME@ALIAS or models:/NAME/VERSION "
                                                    "(e.g. models:/glean-cmnist@selected); settings default to "
                                                    "those of the sweep's final certification")
    p.add_argument("--split", choices=SPLITS, default=None, help="split to certify (default: test)")
    p.add_argument("--n0", type=int, default=None, help=f"samples to select the class (default {N0})")
    p.add_argument("--n", type=int, default=None, help=f"samples to estimate its probability (default {N})")
    p.add_argument("--alpha", type=float, default=None, help=f"failure probability (default {ALPHA})")
    p.add_argument("--batch", type=int, default=None, help=f"noise samples per pass (default {BATCH_SIZE})")
    p.add_argument("--skip", type=int, default=None, help="certify every K-th example (default 1)")
    p.add_argument("--max", type=int, default=None, help="stop before this example index (default: all)")
    p.add_argument("--seed", type=int, default=None, help="noise seed; example i uses (seed, i) (default 0)")
    p.add_argument("--actors", type=int, default=None, help="actors (default: as many as the cluster allows)")
    p.add_argument("--shard-size", type=int, default=None, help="examples per shard (default: from n)")
    p.add_argument("--out", default=None,
                   help=f"output directory (default: {DEFAULT_OUT_ROOT}/<split>-<model>-<settings>; in a Ray "
                        f"job under ~/.smoothing-orchestrator/)")
    p.add_argument("--resume", action="store_true",
                   help="continue --out: model and settings default to those its manifest recorded")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; in "
                        "a Ray job ~/.smoothing-orchestrator/mlflow.db)")
    p.add_argument("--data-root", default=None, help="dataset root (default: trainables.data's resolution)")
    p.add_argument("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None, choices=DEVICE_CHOICES,
                   help="auto: the actors use the cluster's GPUs when it has some (default); cpu: never; "
                        "cuda (GPUs required: exit 2 on a cluster without one)")
    return p


# --- inputs -------------------------------------------------------------------------------------------------
def fetch_checkpoint(run_id: str, tracking_uri: str, dst: str) -> str:
    """Download the run's checkpoint artifact; CertifyInputError for an unknown run or a run without one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise CertifyInputError(f"unknown MLflow run id {run_id!r} in {client.tracking_uri}; "
                                "check --run-id and --tracking-uri") from None
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=tracking.CHECKPOINT_ARTIFACT,
                                                   dst_path=dst, tracking_uri=client.tracking_uri)
    except (MlflowException, OSError):
        raise CertifyInputError(f"run {run_id} has no {tracking.CHECKPOINT_ARTIFACT} artifact "
                                "(was it logged by orchestrator.train?)") from None


def load_split(blob: dict, split: str, data_root: str | None, run_params: dict[str, str]):
    """(the dataset split the model is certified on, its provenance for the manifest), loaded as in training:
    the dataset options recorded in the checkpoint (e.g. domainnet's test_domain) and, for a run with a budget
    param, the budget's subsets. Warns (stderr) when the data source differs from the one the model was
    trained on."""
    from trainables.data import load_dataset, resolve_root

    info = blob["info"]
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in info.get("options") or ()}
    if run_params.get("budget"):     # a run of orchestrator.train / sweep: its budget's subsets (train, val)
        from orchestrator.budgets import get_budget
        from orchestrator.cli_common import DATA_SEED

        budget = get_budget(run_params["budget"])
        kwargs.update(max_train=budget.max_train, max_val=budget.max_val, seed=DATA_SEED)
    try:
        splits = load_dataset(info["name"], root=data_root, download=False, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        raise CertifyInputError(f"cannot load the {info['name']} data the model was trained on: "
                                f"{exc}") from None
    trained_on, here = str(info.get("source", "")).split(" (")[0], splits.info.source.split(" (")[0]
    if trained_on and trained_on != here:
        hint = ("check that --data-root holds the data the model was trained on" if data_root else
                "pass --data-root DIR with the data it was trained on to certify on the same data")
        print(f"certify: warning: the model was trained on {trained_on!r} but the {split} split comes from "
              f"{here!r}; {hint}", file=sys.stderr)
    root = str(resolve_root(data_root)[0]) if data_root or os.environ.get("SMOOTHING_DATA_ROOT") else ""
    identity = {"dataset": info["name"], "split": split, "source": here, "root": root,
                "recipe": json.loads(json.dumps(kwargs, sort_keys=True, default=str))}
    return getattr(splits, split), identity


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


# --- MLflow -------------------------------------------------------------------------------------------------
def log_to_run(tracking_uri: str, run_id: str, df: pd.DataFrame, split: str, dataset: str,
               settings: dict[str, Any], title: str = "") -> dict[str, float]:
    """Attach a certification to the training run `run_id`: summarize(prefix="<split>_") metrics on the
    dataset's radius grid, the TSV and the certified-accuracy plot (mlflow_utils.log_certification, shared
    with train and sweep), and the settings as tags "<split>_cert_<name>" (tags, not params: a run may be
    certified again with other settings). Returns the logged metrics."""
    from orchestrator import mlflow_utils
    from trainables import metrics

    cl = mlflow_utils.client(tracking_uri)
    radii = metrics.RADII_BY_DATASET.get(dataset, metrics.RADII_DRF)
    summary = mlflow_utils.log_certification(cl, run_id, df, split, radii, prefix=f"{split}_", title=title,
                                             meta=settings)
    mlflow_utils.set_tags(cl, run_id, {f"{split}_cert_{k}": v for k, v in settings.items()})
    return summary


# --- main ---------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> pd.DataFrame:
    """The command, for a parsed command line: check, load, certify on the pool, print, log to MLflow."""
    if args.resume:
        if not args.out:
            raise CertifyInputError("--resume needs --out DIR (the directory to continue)")
        old = read_manifest(args.out)
        if old is None:
            raise CertifyInputError(f"nothing to resume: {args.out} holds no certification manifest")
        recorded = dict(old.get("extra", {}).get("cli", {}))
        if args.run_id or args.checkpoint or getattr(args, "model", None):   # a model named now wins
            recorded.pop("run_id", None), recorded.pop("checkpoint", None), recorded.pop("model", None)
        for key, value in recorded.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    model_indices = None
    if getattr(args, "model", None):     # issue 16: a registered model; unset settings from its version's tags
        from orchestrator import models
        model_indices = models.certify_args_from_model(args)
    if not (args.run_id or args.checkpoint):
        raise CertifyInputError("give --run-id ID, --checkpoint PATH or --model URI (or --resume --out DIR)")
    split = args.split or "test"
    n0 = N0 if args.n0 is None else args.n0
    n = N if args.n is None else args.n
    alpha = ALPHA if args.alpha is None else args.alpha
    batch = BATCH_SIZE if args.batch is None else args.batch
    seed = 0 if args.seed is None else args.seed
    skip = 1 if args.skip is None else args.skip
    validate_settings(n0, n, alpha, batch, seed)
    if skip < 1:
        raise CertifyInputError(f"--skip must be >= 1, got {skip}")
    if args.max is not None and args.max < 1:
        raise CertifyInputError(f"--max must be >= 1, got {args.max}")
    if args.shard_size is not None and args.shard_size < 1:
        raise CertifyInputError(f"--shard-size must be >= 1, got {args.shard_size} (omit it for the default)")
    if args.actors is not None and args.actors < 1:
        raise CertifyInputError(f"--actors must be >= 1, got {args.actors}")
    check_out_dir(args.out or Path(DEFAULT_OUT_ROOT) / "new")   # default: certify-out/ must be creatable
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:                       # ray.init retries an unreachable address for minutes: fail fast
        check_reachable(address)

    from orchestrator import mlflow_utils
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # read-only use of the store: it must exist (nothing is created), and it is probed with a time-out
    tracking_uri = mlflow_utils.resolve_tracking_uri(args.tracking_uri, create=False) if args.run_id else None
    with tempfile.TemporaryDirectory() as tmp:
        run_params: dict[str, str] = {}
        if args.run_id:
            ckpt = fetch_checkpoint(args.run_id, tracking_uri, tmp)
            run_params = dict(mlflow_utils.client(tracking_uri).get_run(args.run_id).data.params)
        else:
            ckpt = args.checkpoint
            run_params = dict(getattr(args, "model_run_params", None) or {})   # --model: the trial run's params
        trainable, _ = load_model(ckpt)
        from trainables.checkpoint import read
        blob = read(ckpt)
        data, identity = load_split(blob, split, args.data_root, run_params)
        stop = len(data) if args.max is None else min(args.max, len(data))
        if skip >= stop > 1:
            raise CertifyInputError(f"--skip {skip} is beyond the {stop} examples of {split} in range (--max "
                                    f"{args.max}): only example 0 would be certified; use a smaller --skip")
        indices = list(range(0, stop, skip))
        if model_indices is not None and args.skip is None and args.max is None:
            indices = model_indices(len(data))     # the examples of the sweep's final certification
        fingerprint = model_fingerprint(trainable)
        settings = {"split": split, "n0": n0, "n": n, "alpha": alpha, "batch": batch, "seed": seed,
                    "skip": skip, "max": args.max, "shard_size": args.shard_size}
        default_out = (defaults.default_output_dir(DEFAULT_OUT_ROOT)
                       / f"{split}-{fingerprint[:12]}-{_settings_hash(settings)}")
        out = Path(args.out or default_out)
        check_out_dir(out)
        identity["examples_sha256"] = examples_sha256(data, indices)
        check_resume(out, fingerprint, {**identity, "num_examples": len(indices)})   # before Ray starts
        source = f"run {args.run_id}" if args.run_id else (getattr(args, "model", None)
                                                           or str(Path(args.checkpoint).resolve()))
        # the arguments, so that `--resume --out DIR` alone finds the model and settings again
        cli = {"run_id": args.run_id, "checkpoint": args.checkpoint and str(Path(args.checkpoint).resolve()),
               "split": split, "n0": n0, "n": n, "alpha": alpha, "batch": batch, "seed": seed, "skip": skip,
               "max": args.max, "shard_size": args.shard_size, "tracking_uri": tracking_uri,
               "data_root": args.data_root, "device": args.device, "model": getattr(args, "model", None)}
        started = _init_ray(args.address)
        try:
            df = certify_with_pool(trainable, data, indices, out_dir=out, split=split, n0=n0, n=n,
                                   alpha=alpha, batch=batch, seed=seed, actors=args.actors, resume=True,
                                   progress=not args.no_progress, shard_size=args.shard_size, source=source,
                                   extra={"cli": cli}, data_identity=identity, device=args.device or "auto")
        finally:
            if started:
                import ray
                ray.shutdown()

    from trainables import metrics
    dataset = trainable.info.name
    radii = metrics.RADII_BY_DATASET.get(dataset, metrics.RADII_DRF)
    summary = metrics.summarize(df, radii, prefix=f"{split}_")
    print(f"certified {len(df)} examples of {dataset}/{split} (σ={trainable.sigma}, n0={n0}, n={n}, "
          f"α={alpha}): "
          f"computed {df.attrs['shards_computed']} shards, reused {df.attrs['shards_reused']}; "
          f"TSV {df.attrs['tsv']}")
    print(f"  data: {identity['source']}, examples sha256 {identity['examples_sha256'][:16]}")
    print("  " + "  ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    if args.run_id:
        log_to_run(tracking_uri, args.run_id, df, split, dataset,
                   {"sigma": trainable.sigma, **settings, "fingerprint": fingerprint},
                   title=f"{trainable.NAME} σ={trainable.sigma:g}")
        print(f"  logged to MLflow run {args.run_id} ({mlflow_utils.redact(tracking_uri)})")
    return df


def _init_ray(address: str | None) -> bool:
    """Connect to --address / $RAY_ADDRESS, or start a local Ray without the dashboard (actors need none).
    Returns whether this process started Ray (and so should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:       # ray.shutdown() then only disconnects this driver from the cluster
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    install_signal_handlers()      # ray.init replaced the SIGTERM handler (C7)
    return True


def _main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Bad input (CertifyInputError, a UsageError): one line on stderr, exit code 2; SIGTERM/SIGINT: the
    finished shards stay (rerun with --resume), Ray is shut down, exit code 143/130 (cli_common.run_main)."""
    return run_main(_main, argv, prog="certify")


if __name__ == "__main__":
    sys.exit(defaults.with_locations(main, build_parser, DEFAULT_OUT_ROOT)())
