"""One declaration per hyperparameter: its default and, where it is searched, its range.

DomainBed's idea without its `globals()`: every trainable declares an `HPARAMS` dict of `HParam`s next to
its code. The default configuration (`defaults`), the validated user override (`resolve`) and the Ray Tune
search space (`search_spaces/`) are all derived from that one declaration, so no default exists twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class HParam:
    """A hyperparameter.

    default: the value used when nothing overrides it.
    low/high/log: a numeric search range (inclusive); `integer` makes it an int range.
    choices: a categorical search range instead of low/high.
    check: a short human-readable constraint ("> 0", ">= 0", ...) enforced by `validate`.
    doc: one line saying what it is and where the default comes from.
    """

    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: Sequence[Any] | None = None
    check: str | None = None
    doc: str = ""

    @property
    def searchable(self) -> bool:
        return self.choices is not None or (self.low is not None and self.high is not None)


_CHECKS = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in (0, 1)": lambda v: 0 < v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    # default None = "derived from another hyperparameter" (e.g. MACER's lambda from sigma), resolved by the trainable
    ">= 0 or None": lambda v: v is None or v >= 0,
    ">= 1 or None": lambda v: v is None or v >= 1,
    "> 0 or None": lambda v: v is None or v > 0,
}


def defaults(hparams: Mapping[str, HParam]) -> dict[str, Any]:
    """The default configuration of a trainable."""
    return {name: hp.default for name, hp in hparams.items()}


def _coerce(name: str, hp: HParam, value: Any) -> Any:
    """Coerce a string from the command line (`--set key=value`) to the default's type."""
    if not isinstance(value, str) or isinstance(hp.default, str):
        if isinstance(hp.default, bool) or hp.default is None:
            return value
        if isinstance(hp.default, int) and isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if isinstance(hp.default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={value!r}: expected a boolean (true/false)")
    try:
        if isinstance(hp.default, int):
            f = float(value)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if isinstance(hp.default, float) or hp.default is None:
            return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a {type(hp.default).__name__}") from None
    return value


def _is_architecture(v: Any) -> bool:
    from trainables.models import ARCHITECTURES

    return v == "" or v in ARCHITECTURES


_CHECKS["an architecture of trainables.models ('' = the dataset's default)"] = _is_architecture
ARCH_CHECK = "an architecture of trainables.models ('' = the dataset's default)"


def check_value(name: str, hp: HParam, value: Any) -> None:
    """The value rules every source of a value obeys (a default, `--set`, a `--space` choice or bound):
    a number is finite, and the declared constraint (`check`) holds. Raises ValueError saying which."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is invalid: {name} must be a finite number")
    if hp.check is not None and not _CHECKS[hp.check](value):
        extra = ""
        if hp.check == ARCH_CHECK:
            from trainables.models import ARCHITECTURES
            extra = f" ({', '.join(ARCHITECTURES)})"
        raise ValueError(f"{name}={value!r} is invalid: {name} must be {hp.check}{extra}")


def validate(name: str, hp: HParam, value: Any) -> None:
    """Raise ValueError if `value` is not finite, violates the declared constraint or is not one of the
    declared categorical choices."""
    check_value(name, hp, value)
    if hp.choices is not None and value not in hp.choices:
        raise ValueError(f"{name}={value!r} is invalid: choose one of {list(hp.choices)}")


def coerce(name: str, hp: HParam, value: Any) -> Any:
    """A command-line string coerced to the declared default's type (ValueError naming the expected type)."""
    return _coerce(name, hp, value)


def resolve(hparams: Mapping[str, HParam], overrides: Mapping[str, Any] | None = None,
            owner: str = "trainable") -> dict[str, Any]:
    """Defaults updated with `overrides`, type-coerced and validated.

    An unknown key is an error listing the known ones: a typo must never silently train the default.
    """
    config = defaults(hparams)
    for key, value in (overrides or {}).items():
        if key not in hparams:
            raise ValueError(f"unknown hyperparameter {key!r} for {owner}; known: {', '.join(sorted(hparams))}")
        config[key] = _coerce(key, hparams[key], value)
    for key, value in config.items():
        validate(key, hparams[key], value)
    return config


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """`["sigma=0.25", "lam=1e4"]` -> `{"sigma": "0.25", "lam": "1e4"}` (values coerced later by `resolve`)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


@dataclass
class SearchSpace:
    """Which declared hyperparameters a sweep searches; ranges are taken from the declaration.

    `fixed` pins values for the whole sweep (e.g. a variant), `extra` adds sweep-only choices that are not
    hyperparameters of one trainable (DRF's `variant` picks the trainable itself).
    """

    trainable: str
    searched: Sequence[str]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, HParam] = field(default_factory=dict)
