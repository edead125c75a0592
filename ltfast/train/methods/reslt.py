"""ResLT (Cui et al., "ResLT: Residual Learning for Long-tailed Recognition", TPAMI 2022) as the
survey's ``ResLT-codebase`` trains it (``ImageNetTrain_reslt.py``, ``networks/reslt_imagenet.py``,
``sh/X50.sh``) and the upstream CIFAR code (jiequancui/ResLT ``CIFAR/networks/resnet_cifar.py``,
``cifarTrain_reslt_cifar{10,100}.py``): seed-methods.md §2.4, issue 22 §2.

The model: the backbone's last feature map goes through a branch block that makes three feature
maps, one per branch (head, medium, tail); each is pooled and classified by ONE shared classifier;
the prediction is the sum of the three branches' logits. ``loss.name=reslt`` (``ltfast.nn.ResLTLoss``)
trains branch k only on its class set (every class / the ``reslt_medium_classes`` rarest / the
``reslt_tail_classes`` rarest) plus the summed logits on every sample. The head returns an
``ExpertOutput`` (sum, ``[N, 3, C]`` branch logits, ``[N, 3, F]`` branch features), so the loop hands the
loss the branch logits (``takes_expert_logits``) and evaluation reports each branch alone as "expert k".

The branch block (``model.reslt_branches``):

- ``conv`` (``reslt_imagenet.py``, the ImageNet-LT recipe): ``Conv1x1(F -> 3F, no bias) + BN(3F) + ReLU``,
  the 3F channels split into three blocks of F. With ``model.reslt_conv_before_pool`` (X50.sh's
  ``--after_1x1conv``) the block runs on the feature map before pooling in training, but in eval
  mode it runs AFTER pooling, on the pooled [N, F, 1, 1] feature: the seed's ``if self.after_1x1conv
  and self.training`` (its BN then applies running statistics gathered per position to a pooled
  feature, and the ReLU no longer commutes with the mean). The code is followed; false = pool first
  in both modes (the seed's argparse default). Init as the seed: Kaiming-normal fan-out conv, BN 1 / 0.
- ``bn`` (the CIFAR code's ``ResLTResNet32``): three BatchNorm2d(F) (``BNH``, ``BNM``, ``BNT``) on the
  same map before pooling, no convolution and no ReLU.

The classifier (``fc``, shared by the branches) is an ``nn.Linear(F, C)`` with bias in training. In
eval mode, with ``model.reslt_gamma`` g set (X50.sh ``--gamma 0.7``), the seed drops the bias and
divides each class row by its norm to the power g: ``y = x (W / ||W_c||^g)^T``; with g null the eval
classifier is the training one (the CIFAR code).

Differences from the seed, on purpose: class sets come from the training counts (the seed remaps
ImageNet-LT labels to their count rank and slices; ``priors.reslt_branch_classes`` has the tie rule);
the seed's dropout option (off in every script) and label smoothing (``--lsm`` 0) are left out.

Where the branch block sits: a forward hook on the backbone's last stage (``_LAST_STAGE``: ``layer4``
of torchvision's ResNet / ResNeXt, ``layer3`` of ``small_resnet`` and the CIFAR ResNets) replaces the
stage's output by the branch maps, so the model's own pooling and flatten run unchanged and no
backbone module is renamed (a plain checkpoint's backbone keys still fit). The block's parameters
live in the head (``fc.branches``), so they are saved, loaded and frozen with it; ``build_head`` runs
for training and for every rebuild (``ltfast.evaluate``), so the hook is always there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import schema
from ..errors import ConfigError
from ..models import CIFAR_ARCHS, ExpertOutput, SmallResNet, find_head, is_expert_arch, replace_head
from ..models.resnet_cifar import CifarResNet
from ..schema import NoneType
from .base import Method

__all__ = ["ResLT", "ResLTBranches", "ResLTClassifier", "last_stage", "use_reslt_head"]

BRANCHES = ("conv", "bn")


class ResLTBranches(nn.Module):
    """The last stage's map [N, F, H, W] -> the three branches' maps [N, 3F, H', W'] (module docstring)."""

    def __init__(self, features: int, kind: str = "conv", conv_before_pool: bool = True) -> None:
        super().__init__()
        if kind not in BRANCHES:
            raise ValueError(f"model.reslt_branches: must be one of {BRANCHES}, got {kind!r}")
        self.kind, self.conv_before_pool = kind, bool(conv_before_pool)
        if kind == "conv":
            self.block = nn.Sequential(nn.Conv2d(features, 3 * features, 1, bias=False), nn.BatchNorm2d(3 * features),
                                       nn.ReLU(inplace=True))
            nn.init.kaiming_normal_(self.block[0].weight, mode="fan_out", nonlinearity="relu")
        else:
            self.head_bn, self.medium_bn, self.tail_bn = (nn.BatchNorm2d(features) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "bn":
            return torch.cat([self.head_bn(x), self.medium_bn(x), self.tail_bn(x)], dim=1)
        if self.conv_before_pool and self.training:
            return self.block(x)
        return self.block(nn.functional.adaptive_avg_pool2d(x, 1))  # the seed's eval path: pool, then the block


class ResLTClassifier(nn.Module):
    """The head: the branch block (run by the last stage's hook) and the shared classifier ``fc``;
    ``forward`` takes the pooled [N, 3F] branch features and returns an ``ExpertOutput`` whose logits
    are the sum of the three branches'. ``in_features`` is 3F (what it takes); ``wraps_head`` so that
    the head rule stops here and does not pick the inner ``fc``."""

    is_classifier_head = True
    wraps_head = True

    def __init__(self, features: int, num_classes: int, kind: str = "conv", conv_before_pool: bool = True,
                 gamma: Optional[float] = 0.7) -> None:
        super().__init__()
        if gamma is not None and not gamma >= 0:
            raise ValueError(f"model.reslt_gamma: must be >= 0 or null, got {gamma!r}")
        self.features, self.gamma = features, None if gamma is None else float(gamma)
        self.in_features, self.out_features = 3 * features, num_classes
        self.branches = ResLTBranches(features, kind, conv_before_pool)
        self.fc = nn.Linear(features, num_classes)

    def stage_hook(self, module: nn.Module, args, output: Tensor) -> Tensor:
        """Forward hook of the backbone's last stage: its output becomes the branch maps."""
        return self.branches(output)

    def forward(self, x: Tensor) -> ExpertOutput:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"ResLTClassifier: expects the pooled branch features [N, {self.in_features}] (3 x "
                             f"{self.features}), got {tuple(x.shape)}; is the branch hook on the last stage?")
        features = x.reshape(x.shape[0], 3, self.features)  # the seed's x[:, :c], x[:, c:2c], x[:, 2c:]
        if self.training or self.gamma is None:
            logits = self.fc(features)
        else:
            weight = self.fc.weight
            weight = weight / torch.pow(torch.norm(weight, 2, 1, keepdim=True), self.gamma)
            logits = torch.matmul(features, weight.t())  # no bias, as the seed's eval path
        return ExpertOutput(logits.sum(dim=1), logits, features)


def last_stage(model: nn.Module) -> str:
    """The name of the module whose output is the feature map the model pools (``_LAST_STAGE``)."""
    import torchvision
    for kind, name in ((torchvision.models.ResNet, "layer4"), (SmallResNet, "layer3"), (CifarResNet, "layer3")):
        if isinstance(model, kind):
            return name
    raise ValueError(f"loss.name=reslt: no known last stage for {type(model).__name__}; ResLT's branch block "
                     f"supports small_resnet, the CIFAR ResNets ({', '.join(CIFAR_ARCHS)}) and torchvision's "
                     f"ResNet / ResNeXt / Wide ResNet")


def use_reslt_head(model: nn.Module, num_classes: int, model_cfg: dict) -> ResLTClassifier:
    """Replaces the classifier by a ``ResLTClassifier`` and hooks its branch block on the last stage."""
    stage = model.get_submodule(last_stage(model))
    name, head = find_head(model, num_classes, model_cfg["head"])
    reslt = ResLTClassifier(head.in_features, num_classes, model_cfg["reslt_branches"],
                            model_cfg["reslt_conv_before_pool"], model_cfg["reslt_gamma"])
    replace_head(model, reslt, name, num_classes)
    stage.register_forward_hook(reslt.stage_hook)
    return reslt


_SUPPORTED_ARCHS = "small_resnet, a CIFAR ResNet (resnet32, ...) or a torchvision resnet* / resnext* / wide_resnet*"


class ResLT(Method):
    """``loss.name=reslt``: the three-branch head (``build_head``) for ``ltfast.nn.ResLTLoss``."""
    name = "reslt"
    summary = "ResLT: residual learning with head / medium / tail branches (Cui et al. 2022)"
    config_keys = {"model": {
        "reslt_branches": ("conv", str, schema.choice(*BRANCHES),
                           "ResLT: branch block, conv = 1x1 conv F->3F + BN + ReLU (ImageNet-LT code), "
                           "bn = three BNs (CIFAR code)"),
        "reslt_conv_before_pool": (True, bool, None,
                                   "ResLT conv: the block on the map before pooling in training (X50.sh "
                                   "--after_1x1conv; eval pools first, as the seed)"),
        "reslt_gamma": (0.7, (int, float, NoneType), schema.non_negative,
                        "ResLT: eval classifier W / ||W_c||^gamma without bias (X50.sh 0.7); null = the "
                        "training classifier (CIFAR code)"),
    }}

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["loss"]["name"] == "reslt"

    @classmethod
    def check(cls, cfg: dict) -> None:
        model = cfg["model"]
        if not cls.enabled(cfg):
            for key in cls.config_keys["model"]:
                if model[key] != cls.config_keys["model"][key][0]:
                    raise ConfigError(f"model.{key}: only used with loss.name=reslt (got loss.name="
                                      f"{cfg['loss']['name']!r})")
            return
        arch = model["arch"]
        if is_expert_arch(arch) or not (arch == "small_resnet" or arch in CIFAR_ARCHS
                                        or arch.startswith(("resnet", "resnext", "wide_resnet"))):
            raise ConfigError(f"model.arch: loss.name=reslt builds its branch head on {_SUPPORTED_ARCHS}, got "
                              f"{arch!r}")
        if model["classifier"] != "linear":
            raise ConfigError(f"model.classifier: ResLT builds its own head (a shared linear classifier), got "
                              f"{model['classifier']!r}")

    def build_head(self, model: nn.Module, num_classes: int) -> None:
        use_reslt_head(model, num_classes, self.cfg["model"])
