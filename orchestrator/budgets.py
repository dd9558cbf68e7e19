"""`--budget smoke|quick|paper`: the one table of how much work a run does.

Every number a run's cost depends on lives here: epochs, data size, how often the search evaluates (ASHA's
rungs), and the certification settings of the search (validation ACR) and of the final test certification.

Epochs are per dataset, with optional per-trainable entries "trainable/dataset" where a method counts its
epochs differently: GLEAN trains full-batch (one optimisation step per epoch, as the IRM reference), so its
epochs are steps and it needs a few hundred of them, while an SGD baseline on the same data makes ~16 steps per
epoch.

`quick` (the default) is sized so that `python -m orchestrator.sweep glean` finishes in <= 10 minutes on a
2-core CPU with no data root (the packaged full MNIST); the measured wall time is in benchmarks/RESULTS.md.
Its choices, stated:
- GLEAN on cmnist: 250 full-batch steps on all 45,000 training examples (QUICK_GLEAN_*: 4,000 examples were
  measured to fail, the same trainable on 45,000 reached 62.6% / ACR 0.195); the searched `anneal_steps`
  range (trainables/glean.py, 50-150) ends >= 100 steps before the budget's end; validation and oracle ACR
  certified with n = 1,000 on 200 validation and 200 test-domain
  hold-out examples at the end of each trial (one evaluation, no early stopping: with 2 trials ASHA's first
  rung, step 62, falls inside the penalty annealing, where no model is invariant yet, and stopping there would
  be a coin toss); 2 trials side by side, the declared defaults first.
- GLEAN on celeba / domainnet: mini-batches holding every training domain (trainables/glean.py
  BATCH_BY_DATASET), 3 epochs of the 4,000-example training subset (~95 / ~75 steps).
- final test certification: n = 10,000, n0 = 100, alpha = 0.001 on 500 test examples spread evenly over the
  test split (Cohen's `--skip`); GLEAN (class-space sampling, seconds for thousands of examples): the paper's
  n = 100,000 on every reported example (the 8,000 test-domain examples outside the oracle hold-out on cmnist).
`paper` is the papers' budget (GPU): DRF's 90 MNIST / 150 CIFAR-10 epochs, the IRM reference's 501 steps,
certification at n = 100,000 on the whole test split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from trainables.smoothing import ALPHA, N, N0


@dataclass(frozen=True)
class Budget:
    name: str
    epochs: Mapping[str, int]            # training epochs per dataset, or per "trainable/dataset"
    max_train: int | None                # training examples used (None: the whole split)
    max_val: int | None                  # validation examples loaded (None: the whole split)
    evals: int                           # validation-ACR evaluations per trial (ASHA's rungs), the last at the end
    search_n0: int                       # certification during the search (validation ACR)
    search_n: int
    search_examples: int                 # validation examples certified per evaluation
    final_n0: int                        # final certification of the selected model on the test split
    final_n: int
    final_examples: int | None           # None: the whole test split
    trials: int                          # default number of sweep trials
    alpha: float = ALPHA
    #: per-dataset or per "trainable/dataset" training-set caps that override max_train (None: the whole split)
    max_train_for: Mapping[str, int | None] = field(default_factory=dict)
    #: per-trainable final certification (n, examples): GLEAN samples in class space, so the paper's n = 100,000
    #: on thousands of examples costs seconds where input-space sampling would take hours
    final_for: Mapping[str, tuple[int, int | None]] = field(default_factory=dict)
    #: per-trainable default number of sweep trials (overrides `trials`)
    trials_for: Mapping[str, int] = field(default_factory=dict)
    #: per-trainable number of evaluations (overrides `evals`)
    evals_for: Mapping[str, int] = field(default_factory=dict)
    cert_batch: int = 1000               # noise samples per forward pass when certifying
    description: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def epochs_for(self, trainable: str, dataset: str) -> int:
        """Epochs of `trainable` on `dataset`: a "trainable/dataset" entry wins over the dataset's."""
        key = f"{trainable}/{dataset}"
        if key in self.epochs:
            return int(self.epochs[key])
        if dataset in self.epochs:
            return int(self.epochs[dataset])
        raise ValueError(f"budget {self.name!r} has no epochs for dataset {dataset!r}")

    def train_cap(self, trainable: str, dataset: str) -> int | None:
        """Training examples used by `trainable` on `dataset` (a "trainable/dataset" entry wins)."""
        for key in (f"{trainable}/{dataset}", dataset):
            if key in self.max_train_for:
                return self.max_train_for[key]
        return self.max_train

    def trials_of(self, trainable: str) -> int:
        return int(self.trials_for.get(trainable, self.trials))

    def final_n_for(self, trainable: str) -> int:
        return int(self.final_for.get(trainable, (self.final_n, self.final_examples))[0])

    def final_examples_for(self, trainable: str) -> int | None:
        return self.final_for.get(trainable, (self.final_n, self.final_examples))[1]

    def eval_epochs(self, epochs: int, trainable: str = "") -> tuple[int, ...]:
        """The epochs (1-based counts of finished epochs) after which validation ACR is computed and reported.

        `evals` points halving back from the end, epochs/2^(k-1), ..., epochs/2, epochs: ASHA (reduction
        factor 2, grace period the first point) compares trials at these rungs, and every trial that runs to
        the end reports its final validation ACR.
        """
        k = max(1, min(int(self.evals_for.get(trainable, self.evals)), epochs))
        return tuple(sorted({max(1, epochs // 2 ** (k - 1 - i)) for i in range(k)}))


#: GLEAN on cmnist at the quick budget, the default main job `python -m orchestrator.sweep glean` (<= 10 min on
#: 2 cores): 250 full-batch steps on ALL 45,000 training examples (4,000 was measured to fail: the IRM penalty
#: needs the data -- test ACR 0.030-0.041 at 4,000, 0.195 at 45,000 with the same trainable, benchmarks/
#: RESULTS.md), 2 trials run side by side (one core each): the declared defaults (the sweep evaluates them
#: first) and one TPE sample from the narrowed ranges of trainables/glean.py; oracle selection picks.
#: Measured on 2 idle cores: 514 s, test-domain 62.9% at r = 0, ACR 0.1953 (benchmarks/RESULTS.md).
QUICK_GLEAN_STEPS = 250
QUICK_GLEAN_TRAIN: int | None = None
QUICK_GLEAN_TRIALS = 2

BUDGETS: dict[str, Budget] = {
    "smoke": Budget("smoke", epochs={"mnist": 1, "cmnist": 2, "cifar10": 1, "celeba": 1, "domainnet": 1,
                                     "glean/cmnist": 5, "glean/celeba": 1, "glean/domainnet": 1},
                    max_train=256, max_val=64, evals=1, search_n0=8, search_n=64, search_examples=8,
                    final_n0=8, final_n=100, final_examples=16, trials=2, cert_batch=64,
                    description="seconds per trial: checks that everything runs, numbers mean nothing"),
    "quick": Budget("quick", epochs={"mnist": 2, "cmnist": 10, "cifar10": 1, "celeba": 2, "domainnet": 2,
                                     "glean/cmnist": QUICK_GLEAN_STEPS, "glean/celeba": 3, "glean/domainnet": 3},
                    max_train=4000, max_val=500, evals=3, search_n0=100, search_n=1000, search_examples=200,
                    final_n0=N0, final_n=10_000, final_examples=500, trials=6,
                    max_train_for={"glean/cmnist": QUICK_GLEAN_TRAIN}, trials_for={"glean": QUICK_GLEAN_TRIALS},
                    evals_for={"glean": 1},
                    final_for={"glean": (N, None)},
                    description="<= 10 minutes on a 2-core CPU for `python -m orchestrator.sweep glean`"),
    "paper": Budget("paper", epochs={"mnist": 90, "cmnist": 501, "cifar10": 150, "celeba": 30, "domainnet": 30},
                    max_train=None, max_val=None, evals=4, search_n0=N0, search_n=10_000, search_examples=500,
                    final_n0=N0, final_n=N, final_examples=None, trials=32, final_for={"glean": (N, None)},
                    # GLEAN's rungs after its penalty: with 4 evaluations (rungs 62, 125, 250, 501) ASHA would compare
                    # trials still annealing (anneal_steps up to 150), all colour-reliant: measured in
                    # benchmarks/RESULTS.md ("Search vs random search"), every pruned trial was stopped before its
                    # anneal_steps. 2 evaluations: rungs 250 and 501.
                    evals_for={"glean": 2},
                    description="the papers' budget (GPU)"),
}
DEFAULT_BUDGET = "quick"


def get_budget(name: str) -> Budget:
    try:
        return BUDGETS[name]
    except KeyError:
        raise ValueError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}") from None
