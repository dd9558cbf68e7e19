"""`--budget smoke|quick|paper`: the one table of how much work a run does.

(Initial numbers; the orchestrator issue tunes `quick` so that `python -m orchestrator.sweep glean` finishes
in <= 10 minutes on a 2-core CPU.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from trainables.smoothing import N, N0


@dataclass(frozen=True)
class Budget:
    name: str
    epochs: Mapping[str, int]            # training epochs per dataset
    max_train: int | None                # training examples used (None: the whole split)
    max_val: int | None                  # validation examples available to the search
    search_n0: int                       # certification during the search (validation ACR)
    search_n: int
    search_examples: int
    final_n0: int                        # final certification of the selected model on the test split
    final_n: int
    final_examples: int | None           # None: the whole test split
    trials: int                          # default number of sweep trials
    description: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


BUDGETS: dict[str, Budget] = {
    "smoke": Budget("smoke", epochs={"mnist": 1, "cmnist": 2, "cifar10": 1, "celeba": 1, "domainnet": 1},
                    max_train=512, max_val=64, search_n0=10, search_n=100, search_examples=16,
                    final_n0=10, final_n=200, final_examples=32, trials=2,
                    description="seconds per trial: checks that everything runs, numbers mean nothing"),
    "quick": Budget("quick", epochs={"mnist": 3, "cmnist": 100, "cifar10": 1, "celeba": 2, "domainnet": 2},
                    max_train=4000, max_val=500, search_n0=100, search_n=1000, search_examples=100,
                    final_n0=N0, final_n=10_000, final_examples=500, trials=8,
                    description="<= 10 minutes on a 2-core CPU"),
    "paper": Budget("paper", epochs={"mnist": 90, "cmnist": 501, "cifar10": 150, "celeba": 30, "domainnet": 30},
                    max_train=None, max_val=None, search_n0=N0, search_n=10_000, search_examples=500,
                    final_n0=N0, final_n=N, final_examples=None, trials=32,
                    description="the papers' budget (GPU)"),
}
DEFAULT_BUDGET = "quick"


def get_budget(name: str) -> Budget:
    try:
        return BUDGETS[name]
    except KeyError:
        raise ValueError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}") from None
