"""Models: torchvision's architectures from scratch (ResNeXt-50 32x4d for ImageNet-LT), and a small
ResNet for 28x28 / 32x32 images that trains in seconds per epoch on a laptop CPU.

The classifier ("head") is found by one documented rule (``find_head``): the module named by
``model.head`` when given, otherwise the LAST ``nn.Linear`` registered in the model whose
``out_features`` is the number of classes. That is ``fc`` for ResNet/ResNeXt/RegNet/small_resnet,
``classifier.1`` / ``classifier.6`` / ``classifier.2`` for EfficientNet / VGG / ConvNeXt,
``heads.head`` for ViT and ``head`` for Swin (auxiliary heads such as Inception's ``AuxLogits.fc``
are registered before the main one). The decoupled stage 2 freezes every parameter outside the
head, as the survey's ``feat_model.fix`` froze everything but the classifier; ``model.classifier=
cosine`` replaces the head by a cosine classifier (LDAM-DRW's ``NormedLinear``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .decoupled import NearestClassMean  # decoupled.py imports this module only inside its functions


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Three stages of one basic block (width w, 2w, 4w; strides 1, 2, 2), global average pool, fc.
    For 28x28 inputs the stages run at 28, 14 and 7 pixels. Init as torchvision's ResNets (and the
    survey's ResNeXt): Kaiming-normal fan-out convolutions, BN weight 1, bias 0."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model(arch: str, num_classes: int, in_channels: int = 3, width: int = 32) -> nn.Module:
    """``small_resnet`` or a torchvision classification model by name (weights=None: from scratch)."""
    if arch == "small_resnet":
        return SmallResNet(num_classes, in_channels, width)
    from .experts import build_expert_model, is_expert_arch
    if is_expert_arch(arch):  # the survey's configs: 3 experts, reduced widths, cosine x 30
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


def model_from_config(model_cfg: dict, num_classes: int, in_channels: int) -> nn.Module:
    """The ``model`` section's network: ``build_model``, then ``install_classifier`` (cosine, causal;
    for a multi-expert arch: cosine classifiers x ``model.expert_scale``, else plain linear ones, as
    the survey's ``use_norm``). The decoupled stage-2 heads come later, after ``model.init_from``."""
    from .experts import build_expert_model, is_expert_arch
    arch, cosine = model_cfg["arch"], model_cfg["classifier"] == "cosine"
    if is_expert_arch(arch):
        return build_expert_model(arch, num_classes, in_channels, model_cfg["width"], model_cfg["num_experts"],
                                  model_cfg["reduce_dimension"], cosine, model_cfg["expert_scale"])
    model = build_model(arch, num_classes, in_channels, model_cfg["width"])
    install_classifier(model, num_classes, model_cfg)  # cosine / causal
    return model


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


class CosineLinear(nn.Module):
    """Cosine classifier: ``normalize(x) @ normalize(W)^T`` (LDAM-DRW's ``NormedLinear``; the loss
    scales it by ``s``). ``weight`` is [classes, features] like ``nn.Linear``'s, so a stage-1
    ``fc.weight`` loads into it; there is no bias (a bias would undo the normalisation)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.normalize(x, dim=1), nn.functional.normalize(self.weight, dim=1))


from .causal import CausalNormClassifier  # noqa: E402  (torch-only module, no cycle)
from .mislas import ScaledClassifier  # noqa: E402

HEAD_TYPES = (nn.Linear, CosineLinear, NearestClassMean, CausalNormClassifier, ScaledClassifier)
# A head that wraps another (MiSLAS's classifier + learnable scale) is the head, not its inner layer.
WRAPPING_HEADS = (ScaledClassifier,)


def find_head(model: nn.Module, num_classes: Optional[int] = None, name: Optional[str] = None) -> tuple[str, nn.Module]:
    """(dotted name, module) of the classifier. ``name`` (``model.head``) wins; otherwise the last
    ``nn.Linear`` / ``CosineLinear`` in registration order whose ``out_features == num_classes``
    (any out_features when ``num_classes`` is None). Registration order, not forward order, because
    it is the only order a module tree has; every torchvision classifier registers its final layer
    last. Raises ValueError naming the candidates when nothing fits."""
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            linear = [n for n, m in modules.items() if isinstance(m, HEAD_TYPES)]
            raise ValueError(f"model.head: no module {name!r} in {type(model).__name__} (linear layers: {linear})")
        return name, modules[name]
    found = None
    for module_name, module in modules.items():
        if found and isinstance(found[1], WRAPPING_HEADS) and module_name.startswith(found[0] + "."):
            continue
        if isinstance(module, HEAD_TYPES) and (num_classes is None or module.out_features == num_classes):
            found = (module_name, module)
    if found is None:
        linear = {n: m.out_features for n, m in modules.items() if isinstance(m, HEAD_TYPES)}
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


def install_classifier(model: nn.Module, num_classes: int, mcfg: dict) -> None:
    """``model.classifier``: cosine or causal replace the found head (before ``model.init_from`` is
    loaded, so a checkpoint of the same kind fits); linear keeps it. The trainer and
    ``ltfast.evaluate`` both build the model through this."""
    if mcfg["classifier"] == "cosine":
        use_cosine_classifier(model, num_classes, mcfg["head"])
    elif mcfg["classifier"] == "causal":
        from .causal import use_causal_classifier
        use_causal_classifier(model, num_classes, mcfg)


def use_cosine_classifier(model: nn.Module, num_classes: int, name: Optional[str] = None) -> str:
    """``model.classifier=cosine``: the head becomes a ``CosineLinear`` of the same shape."""
    _, head = find_head(model, num_classes, name)
    return replace_head(model, CosineLinear(head.in_features, head.out_features), name, num_classes)
