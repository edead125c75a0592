"""The classifier ("head") of a model: how it is found, replaced and kept trainable alone.

A module is a head when it is an ``nn.Linear`` or declares ``is_classifier_head = True`` (with
``in_features`` / ``out_features``, as the cosine, causal, nearest-class-mean and scaled heads of
``methods/`` do); a head that wraps another declares ``wraps_head = True`` as well, and the rule
then stops at it. Nothing here lists head types, so a method adds a head without touching models/.

``find_head``'s rule: the module named by ``model.head`` when given, otherwise the LAST head
registered in the model whose ``out_features`` is the number of classes. That is ``fc`` for
ResNet/ResNeXt/RegNet/small_resnet, ``classifier.1`` / ``classifier.6`` / ``classifier.2`` for
EfficientNet / VGG / ConvNeXt, ``heads.head`` for ViT and ``head`` for Swin (auxiliary heads such as
Inception's ``AuxLogits.fc`` are registered before the main one). The decoupled stage 2 freezes
every parameter outside the head, as the survey's ``feat_model.fix`` froze everything but the
classifier.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def is_head(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a module that declares ``is_classifier_head``."""
    return isinstance(module, nn.Linear) or bool(getattr(module, "is_classifier_head", False))


def wraps_head(module: nn.Module) -> bool:
    """A head around another head (MiSLAS's classifier + learnable scale): it is the head, not its inner layer."""
    return bool(getattr(module, "wraps_head", False))


class CosineLinear(nn.Module):
    """Cosine classifier: ``normalize(x) @ normalize(W)^T`` (LDAM-DRW's ``NormedLinear``; the loss
    scales it by ``s``). ``weight`` is [classes, features] like ``nn.Linear``'s, so a stage-1
    ``fc.weight`` loads into it; there is no bias (a bias would undo the normalisation)."""

    is_classifier_head = True

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.normalize(x, dim=1), nn.functional.normalize(self.weight, dim=1))


def find_head(model: nn.Module, num_classes: Optional[int] = None, name: Optional[str] = None) -> tuple[str, nn.Module]:
    """(dotted name, module) of the classifier. ``name`` (``model.head``) wins; otherwise the last
    head (``is_head``) in registration order whose ``out_features == num_classes`` (any out_features
    when ``num_classes`` is None). Registration order, not forward order, because it is the only
    order a module tree has; every torchvision classifier registers its final layer last. Raises
    ValueError naming the candidates when nothing fits."""
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            linear = [n for n, m in modules.items() if is_head(m)]
            raise ValueError(f"model.head: no module {name!r} in {type(model).__name__} (linear layers: {linear})")
        return name, modules[name]
    found = None
    for module_name, module in modules.items():
        if found and wraps_head(found[1]) and module_name.startswith(found[0] + "."):
            continue
        if is_head(module) and (num_classes is None or module.out_features == num_classes):
            found = (module_name, module)
    if found is None:
        linear = {n: m.out_features for n, m in modules.items() if is_head(m)}
        raise ValueError(f"model.head: {type(model).__name__} has no nn.Linear with {num_classes} outputs to use as "
                         f"the classifier (linear layers and their outputs: {linear}); name it with model.head=<module>")
    return found


def replace_head(model: nn.Module, new: nn.Module, name: Optional[str] = None, num_classes: Optional[int] = None) -> str:
    """Puts ``new`` where ``find_head`` finds the classifier; returns its name."""
    head_name, _ = find_head(model, num_classes, name)
    parent_name, _, leaf = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
    return head_name


def freeze_backbone(model: nn.Module, head: Optional[str] = None, num_classes: Optional[int] = None) -> list[str]:
    """requires_grad=False on everything but the head (``find_head``: ``fc`` for the ResNets);
    returns the names left trainable. The module stays in train mode, so BN running statistics keep
    updating on the stage-2 (class-balanced) batches, as in the survey's cRT."""
    head_name, _ = find_head(model, num_classes, head)
    prefix = head_name + "."
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefix))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"model.freeze_backbone: the head {head_name!r} has no parameters")
    return trainable


def use_cosine_classifier(model: nn.Module, num_classes: int, name: Optional[str] = None) -> str:
    """``model.classifier=cosine``: the head becomes a ``CosineLinear`` of the same shape."""
    _, head = find_head(model, num_classes, name)
    return replace_head(model, CosineLinear(head.in_features, head.out_features), name, num_classes)
