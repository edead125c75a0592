"""``model.classifier=cosine``: the head becomes a cosine classifier, ``normalize(x) @ normalize(W)^T``
(LDAM-DRW's ``NormedLinear``; the loss scales it by ``loss.s``). A multi-expert architecture builds
its cosine classifiers itself (one per expert, times ``model.expert_scale``), so its model is left
as it is."""
from __future__ import annotations

from torch import nn

from ..models import use_cosine_classifier
from .base import Method


class CosineClassifier(Method):
    name = "cosine"
    summary = "cosine classifier head (LDAM-DRW's NormedLinear)"
    classifiers = ("cosine",)

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["model"]["classifier"] == "cosine"

    def build_head(self, model: nn.Module, num_classes: int) -> None:
        if not getattr(model, "owns_classifiers", False):
            use_cosine_classifier(model, num_classes, self.cfg["model"]["head"])
