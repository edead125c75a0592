"""The losses a recipe can name (``loss.name``): ONE table, ``LOSSES``, name -> how to build it from
the ``loss`` section and the training class counts, which ``loss.*`` keys it reads, and the checks of
those keys. Adding a loss is one entry here (its keys go into ``KEYS`` when new); the config schema,
the trainer and ``describe_loss`` (the log line, read off the built module) follow from it.

Every loss is an ``ltfast.nn`` module (the fused ops). Plain CE is ``ltfast.nn.CrossEntropyLoss``:
the survey's ``nn.CrossEntropyLoss`` computed by the fused op, which also takes mixup's two targets
in one call. A loss that trains each expert of a multi-expert model on its own logits declares
``expert_logits`` here (the config then requires a multi-expert ``model.arch``) and its class
declares ``takes_expert_logits``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

import ltfast.nn
from ltfast import priors

from . import schema
from .errors import ConfigError
from .schema import NoneType

# loss.* keys: (default, types, check, comment), in the order config.yaml lists them
KEYS: dict[str, tuple] = {
    "alpha": (0.1, (int, float), schema.non_negative, "LADE: weight of the LADER term (survey 0.1)"),
    "remine_lambda": (0.1, (int, float), schema.non_negative, "LADE: lambda of the regularised DV bound"),
    "gather_batch": (False, bool, None,
                     "LADE under DDP: compute LADER on the all-gathered global batch, as the survey's "
                     "DataParallel did"),
    "gamma": (0.9, (int, float), schema.seql_gamma, "SEQL: drop probability of tail negatives (survey 0.9)"),
    "focal_gamma": (2.0, (int, float), schema.non_negative, "focal: the exponent (Lin et al. 2017: 2)"),
    "lambda_": (4.3e-4, (int, float), schema.probability, "SEQL: tail = training frequency <= lambda_"),
    "count_threshold": (None, (int, NoneType), None, "SEQL: tail = fewer training images than this"),
    "max_margin": (0.5, (int, float), schema.positive, "LDAM: largest margin"),
    "s": (30.0, (int, float), schema.positive, "LDAM: scale of the margin"),
    "ldam_scale_logits": (False, bool, None,
                          "LDAM: the original CE(s*(z - m e_y)) for cosine classifiers (model.classifier=cosine)"),
    "drw_epoch": (None, (int, NoneType), None, "LDAM: 0-based epoch from which DRW re-weights"),
    "beta": (0.9999, (int, float), schema.beta, "LDAM-DRW / effective-number weights"),
    "tau": (1.0, (int, float), None, "logit_adjusted: tau"),
    "sade_tau": (2.0, (int, float), None, "SADE: weight of the inverse prior for the third expert (survey 2)"),
    "base_temperature": (1.0, (int, float), schema.positive, "RIDE: diversity temperature before DRW"),
    "diversity_factor": (-0.2, (int, float), None, "RIDE: weight of the KL diversity term (negative: diverse)"),
    "reweight_factor": (0.02, (int, float), schema.probability,
                        "RIDE: per-class diversity temperature C pi_c r + 1 - r after DRW (survey 0.02)"),
    "smooth_head": (0.3, (int, float), schema.probability, "label_aware_smoothing: epsilon of the most frequent class"),
    "smooth_tail": (0.0, (int, float), schema.probability, "label_aware_smoothing: epsilon of the rarest class"),
    "smooth_shape": ("concave", str, schema.choice("concave", "linear", "convex", "exp"),
                     "label_aware_smoothing: epsilon against the class count (MiSLAS default concave)"),
    "smooth_power": (None, (int, float, NoneType), schema.positive, "label_aware_smoothing: exponent of shape 'exp'"),
    "reslt_beta": (0.99, (int, float), schema.probability,
                   "ResLT: (1 - beta) fusion CE + beta per-branch CE (X50.sh --beta 0.99)"),
    "reslt_medium_classes": (None, (int, NoneType), schema.positive,
                             "ResLT: the medium branch trains on this many rarest classes (ImageNet-LT code 825)"),
    "reslt_tail_classes": (None, (int, NoneType), schema.positive,
                           "ResLT: the tail branch trains on this many rarest classes (ImageNet-LT code 220)"),
    "reslt_fusion_epsilon": (1e-7, (int, float), schema.non_negative,
                             "ResLT: -log(p + eps) of the summed logits (ImageNet-LT code 1e-7; CIFAR code 0 = CE)"),
    "reslt_global_batch": (False, bool, None,
                           "ResLT under DDP: normalise by the global batch's counts (all-reduced), as the seed's "
                           "DataParallel did"),
}


@dataclass(frozen=True)
class Loss:
    """One ``loss.name``. ``build(loss_section, class_counts)`` -> the criterion. ``own_keys``: keys
    only this loss reads; another loss.name with one of them changed from its default is refused
    (they used to be ignored without a word, trial finding 9d). ``check(loss_section)``: what the
    key types cannot say. ``expert_logits``: trains each expert on its own logits."""
    build: Callable[[dict, list], nn.Module]
    own_keys: tuple = ()
    check: Optional[Callable[[dict], None]] = None
    expert_logits: bool = False
    summary: str = field(default="")


def label_aware_smoothing_loss(class_counts, loss: dict) -> nn.Module:
    """THE construction of MiSLAS's stage-2 loss: cross-entropy with the per-class label smoothing
    ``ltfast.priors.label_aware_smoothing(class_counts, smooth_head, smooth_tail, smooth_shape,
    smooth_power)``, the epsilon of each row's target class, in the fused ``ltfast.nn.CrossEntropyLoss``
    (which also takes mixed targets)."""
    eps = priors.label_aware_smoothing(class_counts, loss["smooth_head"], loss["smooth_tail"],
                                       loss["smooth_shape"], loss["smooth_power"])
    return ltfast.nn.CrossEntropyLoss(label_smoothing=eps)


def _smooth_power_check(loss: dict) -> None:
    if (loss["smooth_shape"] == "exp") != (loss["smooth_power"] is not None):
        raise ConfigError("loss.smooth_power: required with loss.smooth_shape=exp, and only used by it "
                          f"(got shape {loss['smooth_shape']!r}, power {loss['smooth_power']!r})")


def _gamma_is_not_focal(loss: dict) -> None:
    # loss.gamma was shared by SEQL (a drop probability, 0.9) and focal (an exponent): focal silently
    # trained with 0.9 instead of the paper's 2. Each has its own key now.
    if loss["gamma"] != KEYS["gamma"][0]:
        raise ConfigError(f"loss.gamma: is SEQL's drop probability; the focal exponent is loss.focal_gamma "
                          f"(got loss.gamma={loss['gamma']})")


def _reslt_check(loss: dict) -> None:
    for key in ("reslt_medium_classes", "reslt_tail_classes"):
        if loss[key] is None:
            raise ConfigError(f"loss.{key}: required with loss.name=reslt (a number of rarest classes; the seed: "
                              f"825 / 220 of ImageNet-LT's 1000, 65 / 30 of CIFAR-100, 8 / 6 of CIFAR-10)")
    if loss["reslt_tail_classes"] > loss["reslt_medium_classes"]:
        raise ConfigError(f"loss.reslt_tail_classes: must be <= loss.reslt_medium_classes (the tail branch's classes "
                          f"are the rarest of the medium branch's), got {loss['reslt_tail_classes']} > "
                          f"{loss['reslt_medium_classes']}")


LOSSES: dict[str, Loss] = {
    "ce": Loss(lambda loss, counts: ltfast.nn.CrossEntropyLoss(), summary="softmax cross-entropy"),
    "weighted_ce": Loss(lambda loss, counts: ltfast.nn.WeightedCrossEntropyLoss(counts),
                        summary="cross-entropy weighted by inverse class frequency"),
    "seql": Loss(lambda loss, counts: ltfast.nn.SoftmaxEqualizationLoss(
        counts, gamma=loss["gamma"], lambda_=loss["lambda_"], count_threshold=loss["count_threshold"]),
        summary="softmax equalization loss"),
    "balanced_softmax": Loss(lambda loss, counts: ltfast.nn.BalancedSoftmaxLoss(counts),
                             summary="balanced softmax"),
    "lade": Loss(lambda loss, counts: ltfast.nn.LADELoss(counts, alpha=loss["alpha"], remine_lambda=loss["remine_lambda"],
                                                         gather_batch=loss["gather_batch"]),
                 summary="LADE"),
    "ldam_drw": Loss(lambda loss, counts: ltfast.nn.LDAMLoss(
        counts, max_margin=loss["max_margin"], s=loss["s"], drw_epoch=loss["drw_epoch"], beta=loss["beta"],
        scale_logits=loss["ldam_scale_logits"]), summary="LDAM with deferred re-weighting"),
    "focal": Loss(lambda loss, counts: ltfast.nn.FocalLoss(loss["focal_gamma"]), own_keys=("focal_gamma",),
                  check=_gamma_is_not_focal, summary="focal loss"),
    "logit_adjusted": Loss(lambda loss, counts: ltfast.nn.LogitAdjustedLoss(counts, tau=loss["tau"]),
                           summary="logit-adjusted cross-entropy"),
    "label_aware_smoothing": Loss(lambda loss, counts: label_aware_smoothing_loss(counts, loss),
                                  own_keys=("smooth_head", "smooth_tail", "smooth_shape", "smooth_power"),
                                  summary="MiSLAS's label-aware smoothing"),
    "sade": Loss(lambda loss, counts: ltfast.nn.DiverseExpertLoss(counts, tau=loss["sade_tau"]), own_keys=("sade_tau",),
                 expert_logits=True, summary="SADE's diverse expert loss"),
    "ride": Loss(lambda loss, counts: ltfast.nn.RIDELoss(
        counts, max_margin=loss["max_margin"], s=loss["s"], drw_epoch=loss["drw_epoch"], beta=loss["beta"],
        base_temperature=loss["base_temperature"], diversity_factor=loss["diversity_factor"],
        reweight_factor=loss["reweight_factor"]),
        own_keys=("diversity_factor", "base_temperature", "reweight_factor"), expert_logits=True,
        summary="RIDE's distribution-aware diversity loss"),
    # The branch logits come from the ResLT head (methods/reslt.py), not from a multi-expert arch:
    # ResLTLoss declares takes_expert_logits, the entry leaves expert_logits False.
    "reslt": Loss(lambda loss, counts: ltfast.nn.ResLTLoss(
        counts, loss["reslt_medium_classes"], loss["reslt_tail_classes"], beta=loss["reslt_beta"],
        fusion_epsilon=loss["reslt_fusion_epsilon"], global_batch=loss["reslt_global_batch"]),
        own_keys=("reslt_beta", "reslt_medium_classes", "reslt_tail_classes", "reslt_fusion_epsilon",
                  "reslt_global_batch"),
        check=_reslt_check, summary="ResLT's fusion + per-branch loss"),
}


def check(loss: dict) -> None:
    """The ``loss`` section's checks beyond the key types: keys another loss owns, each loss's own."""
    # focal_gamma's message names focal (its owner) before the generic rule below names the users
    if loss["name"] != "focal" and loss["focal_gamma"] != KEYS["focal_gamma"][0]:
        raise ConfigError(f"loss.focal_gamma: only used by loss.name=focal (got loss.name={loss['name']!r})")
    spec = LOSSES[loss["name"]]
    if spec.check is not None:
        spec.check(loss)


def check_own_keys(loss: dict) -> None:
    """A key only other losses read, changed from its default: refused, naming the losses that read it."""
    for key in KEYS:
        users = [name for name, spec in LOSSES.items() if key in spec.own_keys]
        if key == "focal_gamma" or not users or loss["name"] in users:
            continue
        if loss[key] != KEYS[key][0]:
            raise ConfigError(f"loss.{key}: only used by loss.name={' / '.join(users)}, but loss.name is "
                              f"{loss['name']!r} (set to {loss[key]!r}; remove it or change loss.name)")
    _smooth_power_check(loss)


def build_loss(loss: dict, class_counts: list[int]) -> nn.Module:
    """The recipe's criterion (``loss.name`` from ``LOSSES``)."""
    if loss["name"] not in LOSSES:
        raise ConfigError(f"loss.name: unknown loss {loss['name']!r}")
    return LOSSES[loss["name"]].build(loss, class_counts)


def _summarise_vector(name: str, values: torch.Tensor) -> str:
    values = values.detach().double().cpu()
    if values.numel() <= 10:
        return f"{name} [{', '.join(f'{v:.3g}' for v in values.tolist())}]"
    return f"{name} {values.min().item():.3g}..{values.max().item():.3g} (mean {values.mean().item():.3g})"


def describe_loss(criterion: nn.Module) -> str:
    """One line: the loss class, its scalar settings and a summary of its per-class buffers (tail
    classes, margins, weights), so a run's log shows what it trained with: SEQL on 10 classes with
    the survey's lambda used to become plain CE without a word. Reads what the module holds, so a
    new loss is described without an entry here."""
    parts = []
    per_class_smoothing = getattr(criterion, "_per_class_smoothing", False)
    for key in ("gamma", "tau", "alpha", "remine_lambda", "s", "max_margin", "drw_epoch", "beta", "label_smoothing",
                "base_temperature", "diversity_factor", "reweight_factor", "medium_classes", "tail_classes",
                "fusion_epsilon"):
        if key == "label_smoothing" and per_class_smoothing:
            continue  # the scalar is 0 then; the per-class values that run are summarised below
        value = getattr(criterion, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) or (key == "drw_epoch" and value is not None):
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    tail = getattr(criterion, "tail_mask", None)
    if isinstance(tail, torch.Tensor):
        classes = torch.nonzero(tail.bool()).flatten().tolist()
        shown = ", ".join(map(str, classes[:20])) + (" ..." if len(classes) > 20 else "")
        parts.append(f"tail classes {len(classes)} of {tail.numel()}: [{shown}]"
                     + (" (none: this is plain cross-entropy)" if not classes else ""))
    for name in ("target_margin", "weight", "drw_weight", "adjustment", "log_prior", "label_smoothing",
                 "class_label_smoothing", "log_inverse_prior", "temperature_weight", "diversity_temperature"):
        value = getattr(criterion, name, None)
        if isinstance(value, torch.Tensor):
            label = {"class_label_smoothing": "label_smoothing per class",
                     "diversity_temperature": "diversity temperature per class (with DRW)",
                     "drw_weight": "drw_weight (with DRW)"}.get(name, name)
            parts.append(_summarise_vector(label, value))
    adjustments = getattr(criterion, "adjustments", None)  # SADE: one [C] logit adjustment per expert
    if isinstance(adjustments, torch.Tensor) and adjustments.dim() == 2:
        parts += [_summarise_vector(f"expert {k + 1} adjustment", row) for k, row in enumerate(adjustments)]
    return f"{type(criterion).__name__}({', '.join(parts)})"
