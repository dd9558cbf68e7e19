"""Search spaces of `python -m orchestrator.sweep NAME`, one module per name; ranges come from HPARAMS.

Each module `search_spaces/<name>.py` defines `SPACE = SearchSpace(trainable, searched, fixed, extra)`
(trainables.hparams.SearchSpace): which of the trainable's declared hyperparameters are searched. The range of
each one is its `HParam` declaration next to the trainable (low/high/log/integer or choices), never repeated
here. A module may also define `trainable_for(config) -> str` when a sweep-only choice picks the trainable
itself (DRF's `variant`).

How a sweep name is resolved (`get_space`):
- a name in SPACES is that module (`glean`, `drf`, `gaussian`, ...);
- a registered trainable that shares another name's space is listed in ALIASES with the values it pins
  (`drf-smoothadv` = the `drf` space with variant=smoothadv).
So `python -m orchestrator.sweep drf` searches both DRF variants, `... sweep drf-consistency` only one.

`Space.param_space()` turns the declarations into Ray Tune domains (OptunaSearch converts them to Optuna
distributions): choices -> tune.choice, integer -> tune.randint / tune.lograndint (upper bound + 1: Tune's
integer upper bound is exclusive, the declaration's inclusive), float -> tune.uniform / tune.loguniform.
Command-line overrides (`--space key=low:high` or `--space key=a,b,c`) replace a declared range for one sweep
and are validated like the declarations: an inverted, empty or (for log scales) non-positive range is a
SearchSpaceError.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from trainables.hparams import HParam, SearchSpace, check_value, coerce, resolve
from trainables.registry import TRAINABLES, get_trainable

#: sweep name -> module defining SPACE
SPACES: dict[str, str] = {
    "glean": "search_spaces.glean",
    "drf": "search_spaces.drf",
    "gaussian": "search_spaces.gaussian",
    "stability": "search_spaces.stability",
    "macer": "search_spaces.macer",
    "smoothmix": "search_spaces.smoothmix",
    "smoothadv": "search_spaces.smoothadv",
    "consistency": "search_spaces.consistency",
}
#: registered trainable -> (the space it is swept with, the values it pins there)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "drf-smoothadv": ("drf", {"variant": "smoothadv"}),
    "drf-consistency": ("drf", {"variant": "consistency"}),
}


class SearchSpaceError(ValueError):
    """A sweep name, a range or a pinned value that cannot be searched."""


def sweep_names() -> list[str]:
    """Every valid `orchestrator.sweep NAME`."""
    return list(SPACES) + [a for a in ALIASES if a not in SPACES]


def _check_range(name: str, hp: HParam) -> None:
    if hp.choices is not None:
        if len(hp.choices) == 0:
            raise SearchSpaceError(f"search range of {name!r} is empty: give at least one choice")
        return
    if hp.low is None or hp.high is None:
        raise SearchSpaceError(f"{name!r} has no search range (declare low/high or choices on its HParam, "
                               f"or pass --space {name}=LOW:HIGH)")
    if not hp.low < hp.high:
        kind = "empty" if hp.low == hp.high else "inverted"
        raise SearchSpaceError(f"search range of {name!r} is {kind}: low={hp.low:g} must be < high={hp.high:g}")
    if hp.log and hp.low <= 0:
        raise SearchSpaceError(f"search range of {name!r} is log-scaled and needs low > 0, got low={hp.low:g}")
    if hp.integer and int(hp.high) < int(hp.low) + 1 and not float(hp.low).is_integer():
        raise SearchSpaceError(f"integer search range of {name!r} holds no integer: {hp.low:g}..{hp.high:g}")


def parse_range(name: str, text: str, base: HParam | None) -> HParam:
    """`--space key=LOW:HIGH` (numeric, keeps the declaration's log/integer) or `key=a,b,c` (choices).

    Every value goes through the hyperparameter's own rule before Ray starts: the declared type, finite, the
    declared check (e.g. sigma > 0) and, for a categorical hyperparameter (strings, booleans), its declared
    choices. A numeric choice list may leave the declared grid (e.g. another set of sigmas)."""
    base = base or HParam(None)
    categorical = base.choices is not None and not all(
        isinstance(c, (int, float)) and not isinstance(c, bool) for c in base.choices)

    def value(v: str) -> Any:
        try:
            x = coerce(name, base, v)
            check_value(name, base, x)
        except ValueError as exc:
            raise SearchSpaceError(f"--space {name}={text}: {exc}") from None
        if categorical and x not in base.choices:
            raise SearchSpaceError(f"--space {name}={text}: {x!r} is not one of {list(base.choices)}")
        return x

    if ":" in text:
        if categorical:
            raise SearchSpaceError(f"--space {name}={text}: {name} is categorical; give choices a,b,...")
        lo, _, hi = text.partition(":")
        try:
            low, high = float(lo), float(hi)
        except ValueError:
            raise SearchSpaceError(f"--space {name}={text}: expected LOW:HIGH numbers") from None
        for bound in (low, high):
            value(repr(int(bound)) if base.integer and bound.is_integer() else repr(bound))
        return dataclasses.replace(base, low=low, high=high, choices=None)
    items = [v for v in (s.strip() for s in text.split(",")) if v]
    if not items:
        raise SearchSpaceError(f"--space {name}={text!r}: the search range is empty")
    return dataclasses.replace(base, choices=tuple(value(v) for v in items), low=None, high=None)


@dataclass
class Space:
    """A resolved sweep: what is searched (name -> HParam with its range) and what is pinned."""

    name: str
    searched: dict[str, HParam]
    fixed: dict[str, Any]
    default_trainable: str
    chooser: Callable[[Mapping[str, Any]], str] | None = None
    extra_names: frozenset[str] = frozenset()

    def trainable_for(self, config: Mapping[str, Any]) -> str:
        """The registered trainable a trial's flat config trains."""
        return self.chooser({**self.fixed, **config}) if self.chooser else self.default_trainable

    def hparams_for(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The trainable's hyperparameter overrides in a trial's flat config (sweep-only choices removed)."""
        return {k: v for k, v in {**self.fixed, **config}.items() if k not in self.extra_names}

    def param_space(self) -> dict[str, Any]:
        """Ray Tune search domains, one per searched parameter."""
        from ray import tune

        out: dict[str, Any] = {}
        for name, hp in self.searched.items():
            if hp.choices is not None:
                out[name] = tune.choice(list(hp.choices))
            elif hp.integer:
                lo, hi = int(round(hp.low)), int(round(hp.high)) + 1
                out[name] = tune.lograndint(lo, hi) if hp.log else tune.randint(lo, hi)
            else:
                out[name] = tune.loguniform(hp.low, hp.high) if hp.log else tune.uniform(hp.low, hp.high)
        return out

    def describe(self) -> dict[str, str]:
        """Human-readable ranges (logged to the sweep's MLflow run)."""
        out = {}
        for name, hp in self.searched.items():
            if hp.choices is not None:
                out[name] = "choice " + ",".join(map(str, hp.choices))
            else:
                kind = ("log-" if hp.log else "") + ("int" if hp.integer else "uniform")
                out[name] = f"{kind} {hp.low:g}..{hp.high:g}"
        for name, value in self.fixed.items():
            out[name] = f"fixed {value}"
        return out


def get_space(name: str, ranges: Mapping[str, str] | None = None,
              pinned: Mapping[str, Any] | None = None) -> Space:
    """Resolve a sweep name (see the module docstring) with optional range overrides and pinned values.

    Raises SearchSpaceError (unknown name listing the valid ones; a searched name the trainable does not
    declare; a bad range; a pinned value that fails the declaration's check).
    """
    alias_pins: dict[str, Any] = {}
    if name in SPACES:
        module_name = SPACES[name]
    elif name in ALIASES:
        base, alias_pins = ALIASES[name]
        module_name = SPACES[base]
    else:
        raise SearchSpaceError(f"unknown sweep name {name!r}; valid: {', '.join(sweep_names())} "
                               f"(registered trainables: {', '.join(TRAINABLES)})")
    module = importlib.import_module(module_name)
    spec: SearchSpace = module.SPACE
    chooser = getattr(module, "trainable_for", None)
    cls = get_trainable(spec.trainable)
    declared: dict[str, HParam] = {**cls.HPARAMS, **spec.extra}
    fixed = {**spec.fixed, **alias_pins, **(pinned or {})}

    searched: dict[str, HParam] = {}
    for key in spec.searched:
        if key not in declared:
            raise SearchSpaceError(f"search space {name!r} searches {key!r}, which {spec.trainable} does not "
                                   f"declare; declared: {', '.join(sorted(declared))}")
        searched[key] = declared[key]
    for key, text in (ranges or {}).items():
        if key not in declared:
            raise SearchSpaceError(f"--space {key}: unknown parameter for {name}; known: "
                                   f"{', '.join(sorted(declared))}")
        searched[key] = parse_range(key, text, declared[key])
    for key in fixed:
        if key not in declared:
            raise SearchSpaceError(f"--set {key}: unknown parameter for {name}; known: {', '.join(sorted(declared))}")
        searched.pop(key, None)
    for key, hp in searched.items():
        _check_range(key, hp)
    if not searched:
        raise SearchSpaceError(f"nothing left to search for {name!r}: every searched parameter is pinned by --set")

    space = Space(name=name, searched=searched, fixed={}, default_trainable=spec.trainable, chooser=chooser,
                  extra_names=frozenset(spec.extra))
    # coerce and validate the pinned values against the declaration of the trainable they reach
    extra_fixed = {k: v for k, v in fixed.items() if k in spec.extra}
    for k, v in extra_fixed.items():
        hp = spec.extra[k]
        if hp.choices is not None and v not in hp.choices:
            raise SearchSpaceError(f"--set {k}={v!r}: choose one of {list(hp.choices)}")
    space.fixed = dict(extra_fixed)
    target = get_trainable(space.trainable_for(extra_fixed))
    try:
        resolved = resolve(target.HPARAMS, {k: v for k, v in fixed.items() if k not in spec.extra},
                           owner=target.NAME)
    except ValueError as exc:
        raise SearchSpaceError(str(exc)) from None
    space.fixed.update({k: resolved[k] for k in fixed if k not in spec.extra})
    return space
