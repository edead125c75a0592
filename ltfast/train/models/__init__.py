"""Models: torchvision's architectures from scratch (ResNeXt-50 32x4d for ImageNet-LT), a small
ResNet for 28x28 / 32x32 images (``small``), the multi-expert networks of RIDE / SADE
(``experts``), and the head rule every method relies on (``heads``).

``build_backbone`` is the ``model`` section's network before any method changes its head;
``ltfast.train.engine.build_model`` is the one place that turns it into the run's model (method
heads, ``model.init_from``, the frozen backbone, stage-2 adaptations).
"""
from __future__ import annotations

import difflib
from typing import Optional

from torch import nn

from ..checkpoint import load as load_checkpoint
from ..checkpoint import model_state
from ..errors import ConfigError
from .experts import (EXPERT_ARCHS, ExpertOutput, build_expert_model, count_expert_correct, expert_fields,
                      expert_summaries, is_expert_arch, loss_input, split_output, takes_expert_logits)
from .heads import CosineLinear, find_head, freeze_backbone, is_head, replace_head, use_cosine_classifier
from .resnet_cifar import resnet_cifar
from .small import BasicBlock, SmallResNet

__all__ = ["BasicBlock", "CIFAR_ARCHS", "CosineLinear", "EXPERT_ARCHS", "ExpertOutput", "SmallResNet", "build_backbone",
           "build_expert_model", "build_model", "check_arch", "count_expert_correct", "expert_fields",
           "expert_summaries", "find_head", "freeze_backbone", "is_expert_arch", "is_head", "load_init_weights",
           "loss_input", "replace_head", "split_output", "takes_expert_logits", "use_cosine_classifier"]


# The CIFAR ResNets of He et al. 2016 §4.2 as LDAM-DRW builds them (resnet_cifar.py): name -> depth.
CIFAR_ARCHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


def build_model(arch: str, num_classes: int, in_channels: int = 3, width: int = 32) -> nn.Module:
    """``small_resnet``, a CIFAR ResNet (``CIFAR_ARCHS``: resnet32 ...), a multi-expert arch (the survey's configs: 3 experts, reduced widths, cosine
    x 30) or a torchvision classification model by name (weights=None: from scratch)."""
    if arch == "small_resnet":
        return SmallResNet(num_classes, in_channels, width)
    if arch in CIFAR_ARCHS:  # head "fc" (nn.Linear); model.classifier=cosine swaps it as for any model
        return resnet_cifar(CIFAR_ARCHS[arch], num_classes, in_channels=in_channels)
    if is_expert_arch(arch):
        return build_expert_model(arch, num_classes, in_channels, width)
    import torchvision
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as error:
        raise ValueError(f"model.arch: unknown architecture {arch!r} (small_resnet or a torchvision model "
                         f"name such as resnext50_32x4d): {error}") from None
    if in_channels != 3:
        raise ValueError(f"model.arch: {arch} expects 3-channel images, the dataset has {in_channels}")
    find_head(model, num_classes)  # a model without a findable classifier fails here, not in stage 2
    return model


def build_backbone(model_cfg: dict, num_classes: int, in_channels: int) -> nn.Module:
    """The ``model`` section's network as the architecture defines it: ``build_model``, or for a
    multi-expert arch its experts with cosine classifiers x ``model.expert_scale`` when
    ``model.classifier=cosine`` (else plain linear ones, as the survey's ``use_norm``)."""
    arch = model_cfg["arch"]
    if is_expert_arch(arch):
        return build_expert_model(arch, num_classes, in_channels, model_cfg["width"], model_cfg["num_experts"],
                                  model_cfg["reduce_dimension"], model_cfg["classifier"] == "cosine",
                                  model_cfg["expert_scale"])
    return build_model(arch, num_classes, in_channels, model_cfg["width"])


def check_arch(arch: str) -> None:
    """A ConfigError for an unknown ``model.arch``, with the closest names, before any data is read
    (a mistyped model.arch used to fail after the data had loaded)."""
    if arch == "small_resnet" or arch in EXPERT_ARCHS or arch in CIFAR_ARCHS:
        return
    import torchvision
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known + ["small_resnet"] + list(EXPERT_ARCHS) + list(CIFAR_ARCHS), 3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"model.arch: unknown architecture {arch!r}{hint}; small_resnet, a CIFAR ResNet "
                          f"({', '.join(CIFAR_ARCHS)}) or a torchvision classification model name")


def load_init_weights(model: nn.Module, path: str, head: Optional[str] = None, num_classes: Optional[int] = None,
                      log=print) -> dict:
    """``model.init_from``: initialises ``model`` from a trainer checkpoint, a plain state_dict or a
    torchvision weights file saved locally (nothing is downloaded). Every backbone tensor must be
    present with its shape (a wrong architecture fails loudly); head tensors of another shape (1000
    ImageNet classes) are skipped and reported. Returns {"loaded", "skipped_head"}."""
    state = dict(model_state(load_checkpoint(path, "model.init_from"), path))
    head_name, _ = find_head(model, num_classes, head)
    own = model.state_dict()
    skipped = [k for k in own if k.startswith(head_name + ".") and k in state and state[k].shape != own[k].shape]
    for key in skipped:
        state.pop(key)
    missing = [k for k in own if k not in state and not (k.startswith(head_name + ".") and skipped)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"model.init_from: {path} does not fit {type(model).__name__}: "
                          + "; ".join(f"{name}: {items[:6]}{' ...' if len(items) > 6 else ''}"
                                      for name, items in (("missing", missing), ("unexpected", unexpected),
                                                          ("shape", wrong)) if items))
    model.load_state_dict(state, strict=False)
    if skipped:
        log(f"init_from {path}: classifier {head_name} has another shape there ({', '.join(skipped)}); "
            f"it keeps its fresh initialisation")
    return {"loaded": len(state), "skipped_head": skipped}
