"""DRF's sweep (product brief): lambda_0 (log 0.1..10), zeta_lambda (log 1e-3..0.1), kappa (int, log 10..1,000),
sigma, and the variant -- SmoothAdv+DRF or Consistency+DRF -- which picks the registered trainable
(`drf-smoothadv` / `drf-consistency`). Ranges: trainables/drf.py HPARAMS; both variants declare the searched
parameters. `orchestrator.sweep drf-smoothadv` pins the variant (search_spaces.ALIASES)."""
from typing import Any, Mapping

from trainables.hparams import HParam, SearchSpace

VARIANTS = ("smoothadv", "consistency")

SPACE = SearchSpace(
    trainable="drf-smoothadv", searched=("lam0", "zeta", "kappa", "sigma", "variant"),
    extra={"variant": HParam("smoothadv", choices=VARIANTS, doc="the base defense DRF is added to")})


def trainable_for(config: Mapping[str, Any]) -> str:
    return f"drf-{config.get('variant', SPACE.extra['variant'].default)}"
