"""Models: torchvision's architectures from scratch (ResNeXt-50 32x4d for ImageNet-LT), and a small
ResNet for 28x28 / 32x32 images that trains in seconds per epoch on a laptop CPU.

Every model ends in a linear classifier named ``fc`` (torchvision's convention). The decoupled
stage 2 freezes every parameter whose name does not start with ``fc.``, as the survey's
``feat_model.fix`` froze everything but the classifier.
"""
from __future__ import annotations

import torch
from torch import nn


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
    import torchvision
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as error:
        raise ValueError(f"model.arch: unknown architecture {arch!r} (small_resnet or a torchvision model "
                         f"name such as resnext50_32x4d): {error}") from None
    if in_channels != 3:
        raise ValueError(f"model.arch: {arch} expects 3-channel images, the dataset has {in_channels}")
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        raise ValueError(f"model.arch: {arch} has no linear classifier named 'fc' (the trainer's convention)")
    return model


def freeze_backbone(model: nn.Module) -> list[str]:
    """requires_grad=False on everything but ``fc.*``; returns the names left trainable. The module
    stays in train mode, so BN running statistics keep updating on the stage-2 (class-balanced)
    batches, as in the survey's cRT."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("fc."))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError("model.freeze_backbone: the model has no parameter named fc.*")
    return trainable
