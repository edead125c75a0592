"""Multi-expert methods (the survey's Ensemble-codebase, seed-methods.md §6): RIDE and SADE train a
multi-expert network (``models/experts.py``: shared trunk, one stage and classifier per expert) with a
loss that sees every expert's logits (``loss.name=ride`` / ``sade``, ``losses.LOSSES``).

Nothing in the loop is special to them: a loss that declares ``takes_expert_logits`` gets the
[N, E, C] expert logits (``models.loss_input``), the model predicts with the mean of the expert
logits, and evaluation reports each expert alone whenever the model returns an ``ExpertOutput``.
SADE's test-time aggregation of the experts on an unlabelled test set is ``sade_test_time.py``,
run by its own command, ``python -m ltfast.train.test_time``.
"""
from __future__ import annotations

from .. import schema
from ..errors import ConfigError
from ..models import EXPERT_ARCHS
from .base import Method

EXPERT_MODEL_KEYS = {
    "num_experts": (3, int, schema.positive,
                    "multi-expert archs (expert_resnext50_32x4d, small_expert_resnet): experts"),
    "reduce_dimension": (True, bool, None,
                         "multi-expert archs: narrower expert stages (ResNeXt-50: layer3 192 / layer4 384 planes, "
                         "feature 1536; small_expert_resnet: 3w instead of 4w), as the survey's configs"),
    "expert_scale": (30.0, (int, float), schema.positive,
                     "multi-expert archs with model.classifier=cosine: logits = s * cosine (survey s = 30)"),
}


class _MultiExpert(Method):
    loss_name = ""
    config_keys = {"model": EXPERT_MODEL_KEYS}

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["loss"]["name"] == cls.loss_name

    @classmethod
    def check(cls, cfg: dict) -> None:
        model, loss = cfg["model"], cfg["loss"]
        expert_arch = model["arch"] in EXPERT_ARCHS
        if cls.enabled(cfg) and not expert_arch:
            raise ConfigError(f"loss.name: {loss['name']} trains each expert on its own logits; model.arch must be a "
                              f"multi-expert architecture ({', '.join(EXPERT_ARCHS)}), got {model['arch']!r}")


class RIDE(_MultiExpert):
    name = "ride"
    summary = "RIDE: routing diverse distribution-aware experts (Wang et al. 2021)"
    loss_name = "ride"


class SADE(_MultiExpert):
    name = "sade"
    summary = "SADE: self-supervised aggregation of diverse experts (Zhang et al. 2022)"
    loss_name = "sade"

    @classmethod
    def check(cls, cfg: dict) -> None:
        super().check(cfg)
        if cls.enabled(cfg) and cfg["model"]["num_experts"] != 3:
            raise ConfigError(f"model.num_experts: SADE has exactly 3 experts (long-tailed, uniform, inverse), got "
                              f"{cfg['model']['num_experts']}")
