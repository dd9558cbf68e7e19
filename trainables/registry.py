"""The registered trainables, by command-line name.

An explicit dict (no `globals()` magic): name -> "module:Class". Modules are imported on first use so
that `glean` does not pay for DRF's imports and a broken optional module cannot break the others.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainables.base import Trainable

TRAINABLES: dict[str, str] = {
    "glean": "trainables.glean:Glean",
    "gaussian": "trainables.gaussian:Gaussian",
    "stability": "trainables.stability:Stability",
    "macer": "trainables.macer:Macer",
    "smoothmix": "trainables.smoothmix:SmoothMix",
    "smoothadv": "trainables.smoothadv:SmoothAdv",
    "consistency": "trainables.consistency:Consistency",
    "drf-smoothadv": "trainables.drf:DrfSmoothAdv",
    "drf-consistency": "trainables.drf:DrfConsistency",
}


class UnknownTrainableError(KeyError):
    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0])


def get_trainable(name: str) -> type["Trainable"]:
    """The Trainable class registered under `name`; an unknown name lists the registered ones."""
    try:
        target = TRAINABLES[name]
    except KeyError:
        raise UnknownTrainableError(
            f"unknown trainable {name!r}; registered: {', '.join(TRAINABLES)}") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
