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

VAL_ACR = "val_acr"             # the search objective (validation ACR at the budget's search n)
VAL_CLEAN_ACC = "val_clean_acc"


def cert_tsv_artifact(split: str) -> str:
    return f"{CERT_DIR}/{split}.tsv"


def cert_plot_artifact(split: str) -> str:
    return f"{CERT_DIR}/{split}_certified_accuracy.png"
