"""MLflow conventions shared by train, sweep, certify and compare: the one place these names live.

A training run (from `orchestrator.train` or one sweep trial) logs
  params   every hyperparameter, plus trainable, dataset, budget, epochs, workers, data_source
  tags     TAG_* below (role, trainable, dataset, sigma, budget, selection, data_source, git_commit)
  metrics  per-epoch training metrics (loss, lr, drf_lambda, adv_distance, ...) with step=epoch,
           the validation objective VAL_ACR during/after training,
           and after test certification trainables.metrics.summarize(rows, radii, prefix="test_")
  artifacts CHECKPOINT_ARTIFACT, and per certified split certification/<split>.tsv + <split>_certified_accuracy.png
"""
from __future__ import annotations

import re

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
CERT_DIR = "certification"

TAG_ROLE = "role"               # "train" | "trial" | "sweep" | "certify" | "compare"
TAG_TRAINABLE = "trainable"
TAG_DATASET = "dataset"
TAG_SIGMA = "sigma"
TAG_BUDGET = "budget"
TAG_SELECTION = "selection"     # "train-domain" | "oracle": which split chose the model
TAG_DATA_SOURCE = "data_source"
TAG_GIT_COMMIT = "git_commit"
TAG_SEED = "seed"
TAG_SWEEP = "sweep"             # on a sweep's parent run and its trials: the sweep's directory name
TAG_TUNE_TRIAL = "tune_trial_id"  # on a trial run: Ray Tune's trial id (a resumed trial reuses its run)
TAG_STOPPED_EARLY = "stopped_early"  # "true" on a trial ASHA stopped before its last epoch
TAG_ERROR = "error"             # the exception of a failed run, one line
TAG_SELECTED = "selected"       # "true" on the trial a sweep selected

VAL_ACR = "val_acr"             # the search objective (validation ACR at the budget's search n)
VAL_CLEAN_ACC = "val_clean_acc"  # certified accuracy at radius 0 on the same validation examples
EPOCH = "epoch"                 # finished epochs, reported explicitly (ASHA's time_attr; Tune's counter restarts)
TEST_PREFIX = "test_"           # metrics of the final test certification: test_acr, test_certacc_r0.25, ...


def metric_name(key: str) -> str:
    """A metric key as MLflow stores it: MLflow allows only alphanumerics, `_ - . : /` and spaces, so any other
    character becomes "_" (a safety net: trainables.metrics already names certified accuracy `certacc_r0.25`)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


def cert_tsv_artifact(split: str) -> str:
    return f"{CERT_DIR}/{split}.tsv"


def cert_plot_artifact(split: str) -> str:
    return f"{CERT_DIR}/{split}_certified_accuracy.png"
