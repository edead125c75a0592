"""The classifier at its own learning rate: ``optim.head_lr_factor`` times the scheduled lr for the
head's parameters, the lr itself for everything else. MiSLAS stage 2 trains its classifier at 0.05
(its learnable per-class scale keeps the full lr); LADE's Places-LT recipe trains the classifier of an
ImageNet-initialised ResNet-152 at 100 times the backbone's lr (0.1 against 0.001)."""
from __future__ import annotations

from torch import nn

from .. import schema
from .base import Method


def parameter_groups(model: nn.Module, head_name: str, head_lr_factor: float) -> list[dict]:
    """Trainable parameters as optimizer groups: the classifier's (``head_name``, without a learnable
    scale inside it) at ``head_lr_factor`` times the lr, everything else at the lr. The trainer
    multiplies each group's ``lr_factor`` into the scheduled lr (MiSLAS stage 2: classifier 0.05,
    LearnableWeightScaling 1)."""
    prefix = head_name + "."
    head, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_classifier = name.startswith(prefix) and not name.startswith(prefix + "scale.")
        (head if is_classifier else rest).append(param)
    groups = [{"params": rest, "lr_factor": 1.0, "name": "other"}] if rest else []
    if head:
        groups.append({"params": head, "lr_factor": float(head_lr_factor), "name": "classifier"})
    return groups


class ClassifierLearningRate(Method):
    """``optim.head_lr_factor`` != 1: the head's parameters form their own optimizer group."""
    name = "classifier_lr"
    summary = "the classifier at optim.head_lr_factor times the lr (MiSLAS stage 2, Places-LT)"
    config_keys = {
        "optim": {"head_lr_factor": (1.0, (int, float), schema.positive,
                                     "the classifier's lr is this times the lr (MiSLAS stage 2: 0.05, its learnable "
                                     "scale keeps the full lr; Places-LT: 100)")},
    }

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["optim"]["head_lr_factor"] != 1.0

    def param_groups(self, model: nn.Module, head_name: str, params: list) -> list:
        # each group's lr is lr x its lr_factor (ltfast/train/trainer.py)
        return parameter_groups(model, head_name, self.cfg["optim"]["head_lr_factor"])
