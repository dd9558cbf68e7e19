"""Model selection (contract C5): which examples score a trial, and which trial each protocol picks.

DomainBed's two protocols (Gulrajani & Lopez-Paz 2021, "In search of lost domain generalization"):

- `train-domain`: the validation split of the TRAINING domains scores every trial (`val_acr`). On a dataset built
  to have a spurious feature (Colored-MNIST: colour agrees with the label 80-90% of the time in training, 10% in
  the test domain) this rewards exactly the spurious feature: DomainBed documents it, and our own sweeps picked
  ERM-on-colour models with it (README, benchmarks/RESULTS.md).
- `oracle` (test-domain validation): a fixed, seeded 20% hold-out of the TEST domain scores every trial
  (`oracle_acr`); the test figures are then reported on the other 80% only, never on examples that chose the
  model. It is the default wherever the dataset has a held-out test domain (cmnist, celeba, domainnet), and an
  input error (exit 2) where it does not (mnist, cifar10: no domain shift to validate on).

Trials on a dataset with a held-out test domain report BOTH metrics at every evaluation, so one sweep shows what
either protocol would have picked; the search itself (Optuna, ASHA) follows the chosen protocol's metric. Both
protocols' picks are reported on the same 80% of the test domain, so the two rows of the final table compare.

Everything here is a pure function of the splits and the trials' reports (no Ray, no MLflow).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from orchestrator import tracking

PROTOCOLS = ("train-domain", "oracle")
ORACLE_ACR = "oracle_acr"
ORACLE_CLEAN_ACC = "oracle_clean_acc"
#: the metric each protocol maximises
METRIC = {"train-domain": tracking.VAL_ACR, "oracle": ORACLE_ACR}
#: what the table calls each protocol
LABEL = {"train-domain": "train-domain validation (val split of the training domains)",
         "oracle": "test-domain validation (oracle: fixed 20% hold-out of the test domain)"}
#: fraction of the test split held out for oracle selection (DomainBed: 20% of the test domain), drawn with a
#: fixed seed so every sweep holds out the same examples
ORACLE_FRACTION = 0.2
ORACLE_SEED = 0


class SelectionError(ValueError):
    """A protocol that cannot be applied to this dataset (callers turn it into exit code 2)."""


def has_test_domain(info) -> bool:
    """Whether the dataset holds out a test domain (info.test_domains non-empty: cmnist, celeba, domainnet)."""
    return bool(getattr(info, "test_domains", ()))


def default_protocol(info) -> str:
    """oracle where there is a held-out test domain, else train-domain."""
    return "oracle" if has_test_domain(info) else "train-domain"


def check_protocol(protocol: str | None, info) -> str:
    """The protocol to use (None -> the dataset's default); SelectionError when it cannot apply."""
    protocol = default_protocol(info) if protocol is None else protocol
    if protocol not in PROTOCOLS:
        raise SelectionError(f"unknown selection protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
    if protocol == "oracle" and not has_test_domain(info):
        raise SelectionError(f"--select oracle needs a held-out test domain; dataset {info.name!r} has none "
                             "(its test split is the training distribution): use --select train-domain")
    return protocol


def spread(indices: Sequence[int], k: int | None) -> list[int]:
    """k of `indices` spread evenly (Cohen's --skip); all of them when k is None or too large."""
    indices = list(indices)
    if k is None or k >= len(indices):
        return indices
    picks = np.linspace(0, len(indices) - 1, num=k).round().astype(int)
    return [indices[i] for i in picks]


def oracle_split(n_test: int) -> tuple[list[int], list[int]]:
    """(hold-out, rest): the fixed seeded 20% of range(n_test) and the disjoint other 80%, both sorted."""
    perm = torch.randperm(n_test, generator=torch.Generator().manual_seed(ORACLE_SEED)).tolist()
    k = max(1, int(round(ORACLE_FRACTION * n_test)))
    return sorted(perm[:k]), sorted(perm[k:])


@dataclass
class SelectionSets:
    """The examples of a sweep or run: `val` scores train-domain selection (indices into splits.val), `oracle`
    the oracle (indices into splits.test; None without a test domain), `report` is where test figures come from
    (indices into splits.test: the 80% disjoint from the hold-out when there is one, else the test split)."""

    protocol: str
    val: list[int]
    oracle: list[int] | None
    report: list[int]
    report_label: str                  # "test" | "test_minus_holdout"


def selection_sets(splits, protocol: str, search_examples: int | None, final_examples: int | None
                   ) -> SelectionSets:
    """The selection and report examples for `protocol` (already checked by check_protocol)."""
    if len(splits.val) == 0:
        raise SelectionError("the validation split is empty: train-domain validation needs one (use a larger "
                             "budget)")
    val = spread(range(len(splits.val)), search_examples)
    if not has_test_domain(splits.info):
        return SelectionSets(protocol, val, None, spread(range(len(splits.test)), final_examples), "test")
    holdout, rest = oracle_split(len(splits.test))
    return SelectionSets(protocol, val, spread(holdout, search_examples), spread(rest, final_examples),
                         "test_minus_holdout")


def pick(results: Sequence[Any], protocol: str, metrics=lambda r: r.metrics) -> Any | None:
    """The result with the highest metric of `protocol` (None when no result reports it). `metrics(r)` gives
    a result's last report (Tune's Result.metrics by default); ties go to the earliest result."""
    key = METRIC[protocol]
    scored = [r for r in results if _finite(metrics(r).get(key))]
    return max(scored, key=lambda r: float(metrics(r)[key])) if scored else None


def _finite(v: Any) -> bool:
    try:
        return v is not None and np.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def protocol_rows(protocol: str, chosen: str, best_metrics: Mapping[str, Any], params: str, test: Mapping[str, float],
                  radii: Sequence[float], fmt_certacc, report_desc: str) -> list[tuple[str, str]]:
    """Table rows for one protocol's pick: its parameters, its selection metric and its test-domain ACR and
    certified accuracy (labelled; `chosen` marks the protocol the sweep selected with)."""
    tag = f"{protocol}{' (selected)' if protocol == chosen else ''}"
    metric = METRIC[protocol]
    acc = "  ".join(f"{r:g}:{fmt_certacc(test, r):.3f}" for r in radii)
    return [
        (f"[{tag}] picks", params),
        (f"[{tag}] {'validation ACR' if protocol == 'train-domain' else 'oracle ACR'}",
         f"{float(best_metrics[metric]):.4f}   [{metric}: {LABEL[protocol]}]"),
        (f"[{tag}] test ACR", f"{test[f'{tracking.TEST_PREFIX}acr']:.4f}   [{report_desc}]"),
        (f"[{tag}] test cert. acc.", f"radius:accuracy  {acc}"),
    ]
