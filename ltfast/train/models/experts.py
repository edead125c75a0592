"""Multi-expert models (RIDE / SADE, the survey's Ensemble-codebase, seed-methods.md §6).

    model = build_expert_model("expert_resnext50_32x4d", num_classes=1000, num_experts=3)
    out = model(images)          # ExpertOutput(logits [N, C], expert_logits [N, E, C], features [N, E, F])

The architecture is ``Ensemble-codebase/model/fb_resnets/Expert_ResNeXt.py`` rebuilt from
torchvision's ``Bottleneck``: the stem, layer1 and layer2 are shared; every expert has its own
layer3 and layer4 and its own classifier. With ``reduce_dimension`` (the survey's configs) the
expert stages are narrower: layer3 192 planes instead of 256 and layer4 384 instead of 512, so one
expert's feature is 384 x 4 = 1536 wide (2048 without). The classifier is the survey's
``NormedLinear`` (here ``CosineLinear``: the cosine of the L2-normalised feature and class weight)
times ``scale`` (s = 30) when ``cosine`` (``use_norm: true``), a plain ``nn.Linear`` with scale 1
otherwise, as upstream. Init as upstream: convolutions normal(0, sqrt(2 / (k*k*out_channels)))
(Kaiming fan-out), BN weight 1 / bias 0, no zero-initialised residual, the cosine weights uniform
in [-1, 1] with unit-norm rows. The aggregate ``logits`` is the plain mean of the expert logits,
as upstream's ``final_out``.

Difference from upstream, on purpose: global average pooling is adaptive (upstream ``AvgPool2d(7)``,
the same at 224 pixels), so small test images work. Module names (``conv1``, ``layer3s.k``,
``layer4s.k``, ``linears.k``) follow upstream's.

``small_expert_resnet`` is the same split applied to :class:`~ltfast.train.models.small.SmallResNet`
(Fashion-MNIST-LT, CPU tests): stem, layer1 and layer2 shared, one layer3 basic block per expert,
3w channels instead of 4w with ``reduce_dimension`` (the survey's 0.75 reduction: 384 / 512).

A loss that trains the experts separately declares the class attribute ``takes_expert_logits =
True`` and gets ``expert_logits`` [N, E, C]; any other loss gets the aggregate ``logits``
(:func:`loss_input`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import metrics
from .heads import CosineLinear
from .small import BasicBlock


class ExpertOutput(NamedTuple):
    """What a multi-expert model returns. ``logits`` [N, C]: the mean of the expert logits (what the
    model predicts); ``expert_logits`` [N, E, C]; ``features`` [N, E, F]: each expert's pooled feature."""
    logits: torch.Tensor
    expert_logits: torch.Tensor
    features: torch.Tensor


def _init_like_upstream(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _classifier(features: int, num_classes: int, cosine: bool) -> nn.Module:
    return CosineLinear(features, num_classes) if cosine else nn.Linear(features, num_classes)


class _ExpertHeads(nn.Module):
    """Runs the per-expert stages and classifiers on the shared trunk's output. The model builds its
    classifiers itself (one per expert, cosine or linear as ``model.classifier`` says), so methods
    that replace a single head leave it alone."""

    owns_classifiers = True

    def _experts(self, shared: torch.Tensor) -> ExpertOutput:
        features, logits = [], []
        for k in range(self.num_experts):
            x = self._expert_stages(k, shared)
            feature = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            features.append(feature)
            logits.append(self.linears[k](feature) * self.scale)
        expert_logits = torch.stack(logits, dim=1)
        return ExpertOutput(expert_logits.mean(dim=1), expert_logits, torch.stack(features, dim=1))


class ExpertResNeXt(_ExpertHeads):
    """Expert ResNe(X)t: shared stem / layer1 / layer2, per-expert layer3 / layer4 / classifier."""

    def __init__(self, num_classes: int, num_experts: int = 3, layers=(3, 4, 6, 3), groups: int = 32,
                 width_per_group: int = 4, reduce_dimension: bool = True, cosine: bool = True,
                 scale: float = 30.0, in_channels: int = 3) -> None:
        super().__init__()
        from torchvision.models.resnet import Bottleneck
        _check_common(num_classes, num_experts, scale)
        self.num_experts = num_experts
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(Bottleneck, 64, 64, layers[0], 1)
        self.layer2 = self._stage(Bottleneck, 256, 128, layers[1], 2)
        planes3, planes4 = (192, 384) if reduce_dimension else (256, 512)
        self.layer3s = nn.ModuleList([self._stage(Bottleneck, 512, planes3, layers[2], 2) for _ in range(num_experts)])
        self.layer4s = nn.ModuleList([self._stage(Bottleneck, planes3 * 4, planes4, layers[3], 2)
                                      for _ in range(num_experts)])
        self.feature_dim = planes4 * Bottleneck.expansion
        _init_like_upstream(self)  # before the classifiers, as upstream: CosineLinear keeps its own init
        self.linears = nn.ModuleList([_classifier(self.feature_dim, num_classes, cosine) for _ in range(num_experts)])
        self.scale = float(scale) if cosine else 1.0

    def _stage(self, block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(inplanes, planes, stride, downsample, groups=self.groups, base_width=self.base_width)]
        layers += [block(planes * block.expansion, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _expert_stages(self, k: int, shared: torch.Tensor) -> torch.Tensor:
        return self.layer4s[k](self.layer3s[k](shared))

    def forward(self, x: torch.Tensor) -> ExpertOutput:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self._experts(self.layer2(self.layer1(x)))


class SmallExpertResNet(_ExpertHeads):
    """SmallResNet split after layer2: one layer3 basic block (stride 2) and classifier per expert."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, num_experts: int = 3,
                 reduce_dimension: bool = True, cosine: bool = True, scale: float = 30.0) -> None:
        super().__init__()
        _check_common(num_classes, num_experts, scale)
        self.num_experts = num_experts
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        expert_width = 3 * width if reduce_dimension else 4 * width
        self.layer3s = nn.ModuleList([BasicBlock(2 * width, expert_width, stride=2) for _ in range(num_experts)])
        self.feature_dim = expert_width
        _init_like_upstream(self)
        self.linears = nn.ModuleList([_classifier(expert_width, num_classes, cosine) for _ in range(num_experts)])
        self.scale = float(scale) if cosine else 1.0

    def _expert_stages(self, k: int, shared: torch.Tensor) -> torch.Tensor:
        return self.layer3s[k](shared)

    def forward(self, x: torch.Tensor) -> ExpertOutput:
        return self._experts(self.layer2(self.layer1(self.stem(x))))


def _check_common(num_classes: int, num_experts: int, scale: float) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts: must be an int >= 1, got {num_experts!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: must be an int >= 1, got {num_classes!r}")
    if not scale > 0:
        raise ValueError(f"scale: the cosine classifier's scale s must be > 0, got {scale!r}")


# arch name -> (constructor, keyword arguments fixed by the name)
EXPERT_ARCHS = {
    "expert_resnext50_32x4d": (ExpertResNeXt, {"layers": (3, 4, 6, 3), "groups": 32, "width_per_group": 4}),
    "expert_resnet50": (ExpertResNeXt, {"layers": (3, 4, 6, 3), "groups": 1, "width_per_group": 64}),
    "small_expert_resnet": (SmallExpertResNet, {}),
}


def is_expert_arch(arch: str) -> bool:
    return arch in EXPERT_ARCHS


def build_expert_model(arch: str, num_classes: int, in_channels: int = 3, width: int = 32, num_experts: int = 3,
                       reduce_dimension: bool = True, cosine: bool = True, scale: float = 30.0) -> nn.Module:
    """A multi-expert model by name (``EXPERT_ARCHS``); ``width`` is small_expert_resnet's only."""
    if arch not in EXPERT_ARCHS:
        raise ValueError(f"model.arch: {arch!r} is not a multi-expert architecture ({', '.join(EXPERT_ARCHS)})")
    constructor, fixed = EXPERT_ARCHS[arch]
    options = dict(num_experts=num_experts, reduce_dimension=reduce_dimension, cosine=cosine, scale=scale,
                   in_channels=in_channels, **fixed)
    if constructor is SmallExpertResNet:
        options["width"] = width
    return constructor(num_classes, **options)


def takes_expert_logits(criterion: nn.Module) -> bool:
    """The criterion's class declares ``takes_expert_logits = True`` (SADE, RIDE)."""
    return bool(getattr(type(criterion), "takes_expert_logits", False))


def loss_input(output, criterion: nn.Module) -> torch.Tensor:
    """What ``criterion`` is called with: ``expert_logits`` for a loss that takes them, else the
    aggregate ``logits`` (a plain model's output as it is)."""
    if isinstance(output, ExpertOutput):
        return output.expert_logits if takes_expert_logits(criterion) else output.logits
    if takes_expert_logits(criterion):
        raise ValueError(f"loss: {type(criterion).__name__} trains each expert on its own logits [N, E, C], but the "
                         f"model returned one tensor {tuple(output.shape)}; use a multi-expert model.arch "
                         f"({', '.join(EXPERT_ARCHS)})")
    return output


def split_output(output) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(aggregate logits, expert logits or None) of any model's output."""
    if isinstance(output, ExpertOutput):
        return output.logits, output.expert_logits
    return output, None


def count_expert_correct(expert_logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-expert, per-class correct counts [E, C] (int64) of one batch."""
    pred = expert_logits.argmax(dim=2)  # [N, E]
    hit = pred == target.long().view(-1, 1)
    num_experts = expert_logits.shape[1]
    # class c of expert k lands in bin k * C + c: one bincount for all experts
    bins = (torch.arange(num_experts, device=pred.device) * num_classes).view(1, -1) + target.long().view(-1, 1)
    return torch.bincount(bins[hit], minlength=num_experts * num_classes).view(num_experts, num_classes).long()


def expert_summaries(expert_correct: torch.Tensor, total: torch.Tensor, groups: dict) -> list[dict]:
    """``metrics.summarize`` of every expert alone (top1, many, medium, few, per_class, ...)."""
    return [metrics.summarize(correct, total, groups) for correct in expert_correct]


def expert_fields(expert_correct: torch.Tensor, total: torch.Tensor, groups: dict, prefix: str = "val_") -> dict:
    """Flat per-expert numbers for an epoch record / TensorBoard: ``val_expert1_top1``, ..."""
    fields = {}
    for k, summary in enumerate(expert_summaries(expert_correct, total, groups), start=1):
        for key in ("top1", "many", "medium", "few"):
            fields[f"{prefix}expert{k}_{key}"] = summary[key]
    return fields
