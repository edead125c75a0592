"""MiSLAS (Zhong et al. 2021, "Improving Calibration for Long-Tailed Recognition") as trainer
recipes, following the authors' code (dvlab-research/MiSLAS ``methods.py``, ``train_stage1.py``,
``train_stage2.py``) and the survey's MiSLAS-codebase configs (shared/reference/seed-methods.md §2.4).

Stage 1: the usual joint training with mixup (``data.mixup_alpha``, 0.2): per batch one
lambda ~ Beta(alpha, alpha) and one random permutation of the batch; images ``lam x + (1 - lam)
x[perm]``, loss ``lam L(z, y) + (1 - lam) L(z, y[perm])`` (``Mixup``).

Stage 2 (10 epochs, class-balanced sampler with 4 images per class, as the authors' ClassAwareSampler):
- the stage-1 model with its classifier; every backbone parameter frozen (``model.freeze_backbone``);
- "shift learning on BN" (``model.shift_bn``, true): the frozen backbone stays in train mode, so its
  BN layers normalise with the stage-2 batch statistics and re-estimate their running statistics;
  false puts the backbone in eval mode (the authors' ``shift_bn: False``);
- a learnable per-class scale on the classifier's logits (``model.learnable_scale``, LearnableWeightScaling,
  initialised to 1), trained at the full lr, while the classifier trains at ``optim.head_lr_factor``
  (0.05) times the lr (``methods/classifier_lr.py``); both with the same SGD, momentum and weight decay;
- label-aware smoothing (``loss.name=label_aware_smoothing``): cross-entropy whose label-smoothing
  epsilon depends on the target class, from ``smooth_head`` (0.3, most frequent class) to
  ``smooth_tail`` (0.0, rarest), concave in the class count (``ltfast.priors.label_aware_smoothing``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import schema
from ..errors import ConfigError
from ..losses import label_aware_smoothing_loss
from ..models import find_head, replace_head
from .base import Method
from .decoupled import LearnableWeightScaling

__all__ = ["Mixup", "MixupMethod", "MiSLAS", "ScaledClassifier", "label_aware_smoothing_loss", "mixed_loss",
           "use_learnable_weight_scaling"]


# -------------------------------------------------------------------------------------------- mixup

class Mixup:
    """Batch mixup as the authors' ``mixup_data`` / ``mixup_criterion``: one lambda per batch from
    Beta(alpha, alpha) (drawn with torch's global generator, so a resumed run draws what an
    uninterrupted one would) and one ``torch.randperm`` of the batch."""

    def __init__(self, alpha: float) -> None:
        if not alpha > 0:
            raise ValueError(f"data.mixup_alpha: must be > 0 to mix, got {alpha}")
        self.alpha = float(alpha)
        self._beta = torch.distributions.Beta(torch.tensor(self.alpha, dtype=torch.float64),
                                              torch.tensor(self.alpha, dtype=torch.float64))

    def draw(self, batch_size: int) -> tuple[float, Tensor]:
        """(lambda, permutation of range(batch_size)), both from the CPU generator."""
        lam = float(self._beta.sample())
        return lam, torch.randperm(batch_size)

    def mix(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, float]:
        """(mixed images, the partner labels labels[perm], lambda)."""
        lam, perm = self.draw(images.shape[0])
        perm = perm.to(images.device, non_blocking=True)
        mixed = images.mul(lam).add_(images[perm], alpha=1.0 - lam)
        return mixed, labels[perm], lam


def mixed_loss(criterion: nn.Module, logits: Tensor, labels: Tensor, labels_b: Tensor, lam: float) -> Tensor:
    """``lam * L(z, y_a) + (1 - lam) * L(z, y_b)``: in one fused call when the criterion declares
    ``supports_mixed_targets`` (``criterion(z, y_a, target_b=y_b, mix_weight=lam)``), otherwise as two
    calls, so that any loss works with mixup."""
    if getattr(criterion, "supports_mixed_targets", False):
        weight = torch.tensor(lam, dtype=torch.float32, device=logits.device)
        return criterion(logits, labels, target_b=labels_b, mix_weight=weight)
    return lam * criterion(logits, labels) + (1.0 - lam) * criterion(logits, labels_b)


# ------------------------------------------------------------------------------------ stage 2 head

class ScaledClassifier(nn.Module):
    """``scale(classifier(x))``: a classifier followed by LearnableWeightScaling. ``in_features`` /
    ``out_features`` are the classifier's, so the head rule still sees a classifier here."""

    is_classifier_head = True
    wraps_head = True

    def __init__(self, classifier: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.scale = LearnableWeightScaling(num_classes)
        self.in_features = getattr(classifier, "in_features", None)
        self.out_features = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(self.classifier(x))


def use_learnable_weight_scaling(model: nn.Module, num_classes: int, head: Optional[str] = None) -> str:
    """``model.learnable_scale``: wraps the head (``models.find_head``) as ``ScaledClassifier``; returns its name.
    Done after ``model.init_from`` is loaded (a stage-1 checkpoint has no scale) and after
    ``freeze_backbone`` (the new scale is trainable)."""
    name, module = find_head(model, num_classes, head)
    if isinstance(module, ScaledClassifier):
        raise ValueError(f"model.learnable_scale: the head {name!r} is scaled already")
    return replace_head(model, ScaledClassifier(module, num_classes), name, num_classes)


class MixupMethod(Method):
    """MiSLAS stage 1 (and any recipe with ``data.mixup_alpha`` > 0): mixup on every training batch."""
    name = "mixup"
    summary = "batch mixup, MiSLAS stage 1 (Zhang et al. 2018; Zhong et al. 2021)"
    config_keys = {"data": {
        "mixup_alpha": (0.0, (int, float), schema.non_negative,
                        "mixup: lambda ~ Beta(alpha, alpha) per batch (MiSLAS stage 1: 0.2); 0 = off"),
    }}

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["data"]["mixup_alpha"] > 0

    def start(self, model: nn.Module, head_name: str, run) -> None:
        self.mixup = Mixup(self.cfg["data"]["mixup_alpha"])

    def mix_batch(self, images: Tensor, labels: Tensor, criterion: nn.Module):
        images, labels_b, lam = self.mixup.mix(images, labels)
        return images, lambda outputs: mixed_loss(criterion, outputs, labels, labels_b, lam)


class MiSLAS(Method):
    """MiSLAS stage 2 (with label-aware smoothing as ``loss.name`` and a frozen backbone): a learnable
    per-class scale on the classifier's logits (``model.learnable_scale``). Its classifier lr of 0.05
    times the lr is ``optim.head_lr_factor``, the ``classifier_lr`` method (methods/classifier_lr.py),
    which the learnable scale stays out of."""
    name = "mislas"
    summary = "MiSLAS stage 2: learnable per-class scale on the logits (Zhong et al. 2021)"
    config_keys = {
        "model": {"learnable_scale": (False, bool, None,
                                      "a learnable per-class scale on the head's logits (MiSLAS stage 2's "
                                      "LearnableWeightScaling)")},
    }

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["loss"]["name"] == "label_aware_smoothing" or cfg["model"]["learnable_scale"]

    @classmethod
    def check(cls, cfg: dict) -> None:
        model = cfg["model"]
        if model["learnable_scale"] and model["classifier"] in ("causal", "lws", "ncm", "tau_norm"):
            raise ConfigError(f"model.learnable_scale: not with model.classifier={model['classifier']} (causal: the "
                              "TDE logits are not a plain head; lws has its own scale; ncm and tau_norm train nothing)")

    def adapt(self, model: nn.Module, num_classes: int, stage: str) -> None:
        # after init_from (stage 1 has no scale) and the freeze (the scale trains)
        if self.cfg["model"]["learnable_scale"]:
            use_learnable_weight_scaling(model, num_classes, self.cfg["model"]["head"])
