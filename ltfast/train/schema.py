"""How a config key is declared, and the value checks the declarations share.

A key is ``(default, allowed types, check or None, comment)``: ``config.SCHEMA`` holds the core
sections' keys, and every method (``methods/``) and every loss (``losses.LOSSES``) declares its own
in the same form, so the schema is assembled from the files that read the keys. A check returns
None for a good value and otherwise the problem, which ``config.validate`` prefixes with the key.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import yaml

NoneType = type(None)


def positive(value) -> Optional[str]:
    return None if value > 0 else "must be > 0"


def non_negative(value) -> Optional[str]:
    return None if value >= 0 else "must be >= 0"


def at_least_one(value) -> Optional[str]:
    return None if value >= 1 else "must be >= 1 (n_max / n_min; 1 keeps the classes balanced)"


def probability(value) -> Optional[str]:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def seql_gamma(value) -> Optional[str]:
    return None if 0 <= value <= 1 else "must be in [0, 1] (SEQL's drop probability; focal's exponent is loss.focal_gamma)"


def beta(value) -> Optional[str]:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def choice(*choices) -> Callable[[Any], Optional[str]]:
    def check(value):
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"
    return check


def milestones(value) -> Optional[str]:
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in value):
        return "must be a list of epoch numbers (ints >= 0)"
    return None if list(value) == sorted(value) else "must be increasing"


def floats3(value) -> Optional[str]:
    if value is None:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "must be a list of numbers"
    return None if len(value) in (1, 3) else "must have 1 (grey) or 3 (RGB) entries"


def seed(value) -> Optional[str]:
    # numpy.random.seed takes [0, 2**32); the trainer seeds numpy with train.seed itself.
    return None if 0 <= value < 2**32 else "must be in [0, 2**32) (numpy's seed range)"


def tau_norm(value) -> Optional[str]:
    if value == "auto" or (not isinstance(value, (str, bool)) and value >= 0):
        return None
    return "must be auto or a number >= 0"


def device(value) -> Optional[str]:
    if value in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", value):
        return None
    return "must be auto, cpu, cuda, cuda:<index> or mps"


def dump(cfg: dict) -> str:
    """A config as the YAML of its run folder's config.yaml (sections in schema order)."""
    return yaml.safe_dump(cfg, sort_keys=False)
