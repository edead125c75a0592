"""The CIFAR ResNets of He et al. (2016, §4.2) as the long-tail papers use them (LDAM-DRW
``models/resnet_cifar.py``, Y. Idelbayev's implementation, reused by BBN, LADE and SADE):
torchvision has none of them.

``resnet32(num_classes)``: a 3x3 conv to 16 channels, three stages of 5 basic blocks (16, 32, 64
channels, strides 1, 2, 2), global average pooling and a linear classifier; 0.46M parameters
(464,154 for 10 classes). As in LDAM-DRW:

- option-A shortcuts: where a stage halves the resolution and doubles the width, the shortcut
  subsamples every other pixel and zero-pads the channels (``planes // 4`` on each side), so the
  shortcut has no parameters (option B's 1x1 convolutions would add 2,048 + 8,192 weights);
- ``kaiming_normal_`` (fan-in, gain sqrt(2)) on every ``Conv2d`` and ``Linear`` weight, PyTorch's
  defaults elsewhere (Linear bias uniform, BatchNorm weight 1 / bias 0);
- ``use_norm=True``: the cosine classifier ``NormedLinear`` (``normalize(x) @ normalize(W)``, no
  bias; the LDAM loss scales it by s = 30). Its weight here is stored [classes, features] like
  ``nn.Linear``'s (LDAM-DRW stores the transpose), drawn as LDAM-DRW draws it: each class's
  vector uniform(-1, 1) then scaled to norm 1, so a seeded init gives the same values.

``forward_features`` (feature map [N, 64, H/4, W/4]) and ``forward_head`` (pooled features or
logits) split the forward pass as timm's models do. Imports torch only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormedLinear(nn.Module):
    """Cosine classifier of LDAM-DRW: ``normalize(x, dim=1) @ normalize(W, dim=1).T``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # LDAM-DRW: Tensor(in, out).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5), i.e. unit-norm class vectors;
        # drawn in that layout and transposed, so a seeded init gives LDAM-DRW's values.
        drawn = torch.empty(in_features, out_features).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
        self.weight = nn.Parameter(drawn.t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` zero-padded by ``pad`` channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError(f"option-A shortcut needs stride 2 and doubled width, got {in_planes}->{planes} "
                                 f"stride {stride}")
            self.shortcut = PadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """LDAM-DRW's ``ResNet_s``: ``blocks`` basic blocks per stage (depth = 6 * blocks + 2)."""

    def __init__(self, blocks: int, num_classes: int = 10, use_norm: bool = False, in_channels: int = 3) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.num_features = num_classes, 64
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, strides = (16, 32, 64), (1, 2, 2)
        in_planes, stages = 16, []
        for planes, stride in zip(widths, strides):
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc: nn.Module = NormedLinear(64, num_classes) if use_norm else nn.Linear(64, num_classes)
        for module in self.modules():  # LDAM-DRW's _weights_init (NormedLinear keeps its own init)
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(module.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(out)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # LDAM-DRW pools with avg_pool2d(out, out.size()[3]); a kernel of the whole map is the same op
        # for its square maps (adaptive_avg_pool2d sums in another order: outputs differ by ~1e-6).
        pooled = torch.flatten(F.avg_pool2d(x, tuple(x.shape[-2:])), 1)
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnet_cifar(depth: int, num_classes: int = 10, use_norm: bool = False, in_channels: int = 3) -> CifarResNet:
    """ResNet-``depth`` for 32x32 images, depth = 6n + 2 (20, 32, 44, 56, 110, 1202)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes, use_norm, in_channels)


def resnet32(num_classes: int = 10, use_norm: bool = False, in_channels: int = 3) -> CifarResNet:
    return resnet_cifar(32, num_classes, use_norm, in_channels)
