"""The registry of long-tail methods: every ``Method`` subclass of the files in this folder, in the
order their hooks run. ``available()`` lists them; ``active(cfg)`` gives the run's enabled ones.

The trainer and the model builder import this module only: they call the hooks of ``active(cfg)``
(``methods/base.py`` documents each) and never name a method. Adding a method: its file here, one
line in ``REGISTRY`` below (docs/methods.md).
"""
from __future__ import annotations

from .base import Method
from .bbn import BBN
from .causal import CausalTDE
from .classifier_lr import ClassifierLearningRate
from .cosine import CosineClassifier
from .decoupled import ClassifierRetraining, LearnableWeightScalingMethod, NearestClassMeanMethod, TauNormalisation
from .losses import loss_methods
from .mislas import MiSLAS, MixupMethod
from .multi_expert import RIDE, SADE
from .paco import PaCo
from .reslt import ResLT
from .rsg import RSG

# Order matters only where two enabled methods act at the same point: heads are built, then adapted
# in this order (BBN replaces the whole model first, so that a later head method would see its fc; LWS
# wraps the stage-1 head before MiSLAS's learnable scale could wrap a head).
_SPECIAL = [BBN, CosineClassifier, CausalTDE, ClassifierRetraining, LearnableWeightScalingMethod, NearestClassMeanMethod,
            TauNormalisation, MixupMethod, MiSLAS, ClassifierLearningRate, RIDE, SADE, ResLT, RSG, PaCo]
_CLAIMED_LOSSES = {"label_aware_smoothing", "ride", "sade", "reslt"}  # losses that belong to the methods above
REGISTRY: dict[str, type[Method]] = {m.name: m for m in loss_methods(_CLAIMED_LOSSES) + _SPECIAL}

__all__ = ["Method", "REGISTRY", "active", "available", "build_head", "check", "classifiers", "config_keys", "describe"]


def available() -> list[str]:
    """Every registered method's name, in registry order."""
    return list(REGISTRY)


def describe() -> dict[str, str]:
    """name -> one-line summary of every method."""
    return {name: method.summary for name, method in REGISTRY.items()}


def active(cfg: dict) -> list[Method]:
    """The methods ``cfg`` enables, instantiated for one run, in registry order."""
    return [method(cfg) for method in REGISTRY.values() if method.enabled(cfg)]


def config_keys() -> dict[str, dict[str, tuple]]:
    """{section: {key: spec}} that the methods contribute to the config schema. Two methods may share a
    key only with the same spec (RIDE and SADE's multi-expert model keys)."""
    merged: dict[str, dict[str, tuple]] = {}
    for method in REGISTRY.values():
        for section, keys in method.config_keys.items():
            for key, spec in keys.items():
                known = merged.setdefault(section, {}).get(key)
                if known is not None and known is not spec:
                    raise RuntimeError(f"{section}.{key}: declared differently by two methods ({method.name} and "
                                       f"another); declare it once and share it")
                merged[section][key] = spec
    return merged


def classifiers() -> tuple[str, ...]:
    """The ``model.classifier`` values the methods provide (besides the architecture's own 'linear')."""
    return tuple(kind for method in REGISTRY.values() for kind in method.classifiers)


def check(cfg: dict) -> None:
    """Every registered method's checks (enabled or not: a method's key set without it is named)."""
    for method in REGISTRY.values():
        method.check(cfg)



def build_head(model, num_classes: int, cfg: dict, run_methods=None):
    """Every enabled method's ``build_head`` on ``model`` (the architecture's head replaced by the
    configured one: cosine, causal); returns the model, which a method may have replaced (BBN).
    ``run_methods``: the run's ``active(cfg)`` when already made."""
    for method in run_methods if run_methods is not None else active(cfg):
        replaced = method.build_head(model, num_classes)
        if replaced is not None:
            model = replaced
    return model
