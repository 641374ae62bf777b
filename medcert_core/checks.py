"""The certification parameters by name, checked where users type them (CLI arguments, grid files)
with the API's own checks: sigma > 0, 0.5 <= tau < 1, 0 < alpha < 1, n0 >= 1, n >= 1.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from medcert_core.certify import check_alpha, check_draws, check_sigma, check_tau

PARAMETER_CHECKS: dict[str, Callable[[Any], None]] = {
    "sigma": check_sigma,
    "tau": check_tau,
    "alpha": check_alpha,
    "n0": partial(check_draws, "n0"),
    "n": partial(check_draws, "n"),
}
INTEGERS = frozenset({"n0", "n"})


def check_parameter(name: str, value: Any) -> Any:
    """``value`` if it is a valid ``name`` (a key of :data:`PARAMETER_CHECKS`), else ValueError naming the range."""
    PARAMETER_CHECKS[name](value)
    return value
