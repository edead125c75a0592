"""BBN (Zhou et al., CVPR 2020, "BBN: Bilateral-Branch Network with Cumulative Learning"), following
the authors' code (Megvii-Nanjing/BBN: ``lib/backbone/resnet_cifar.py`` ``BBN_ResNet_Cifar``,
``lib/backbone/resnet.py`` ``BBN_ResNet``, ``lib/net/network.py``, ``lib/core/combiner.py``
``bbn_mix``, ``lib/dataset/imbalance_cifar.py``'s reversed sampler, ``lib/core/function.py``
``valid_model``).

- **Network**: the architecture's trunk is shared; its LAST residual block is duplicated into the
  conventional-learning branch (``conventional``, BBN's ``cb_block``) and the re-balancing branch
  (``rebalancing``, ``rb_block``), each globally average-pooled (BBN's ``GAP``); one linear
  classifier with bias (``fc``, BBN's ``FC`` with ``BIAS: True``, PyTorch's default init as in
  ``network.py``) reads the two features side by side, [N, 2F] -> [N, C].
- **Training step** (``bbn_mix``): the uniform batch (the run's ``data.sampler``, BBN's ``default``)
  goes through trunk + conventional branch, the reversed batch (``ltfast.data.ReversedSampler``,
  P(c) proportional to n_max / n_c) through trunk + re-balancing branch, each trunk pass with its own
  batch statistics as in BBN's two ``model(...)`` calls; the classifier reads
  ``2 [alpha f_c, (1 - alpha) f_r]`` and the loss is ``alpha L(z, y_c) + (1 - alpha) L(z, y_r)``, one
  fused call of the mixed-target cross-entropy (``ltfast.mixed_cross_entropy`` with
  ``mix_weight=alpha``, ``target_b=y_r``), two calls for a loss without mixed targets.
- **Cumulative alpha** (``cumulative_alpha``): ``1 - ((e - 1) / T)^2`` for the 1-based epoch e, with
  BBN's divisor T: the epoch count, except 90 -> 100 and 180 -> 200 (``Combiner.div_epoch``).
- **Inference** (``valid_model``: ``feature_flag`` then ``classifier_flag``): both branches on the
  same image, the classifier on ``[f_c, f_r]`` unscaled, which is the training input at alpha = 0.5.

Differences from BBN, on purpose:

- The split works on the architectures ltfast's recipes use, by taking the last block of the last
  stage: ``small_resnet`` (its layer3 is ONE stride-2 block, so the branches are the whole last stage,
  and the trunk is stem + layer1 + layer2), the CIFAR ResNets (``resnet32``: layer3 keeps 4 blocks in
  the trunk, the 5th is duplicated, exactly ``bbn_res32_cifar``) and torchvision's ResNet family
  (``resnext50_32x4d``: layer4's last Bottleneck, as ``bbn_res50`` does for ResNet-50). BBN builds
  both branches as fresh blocks of the trunk's width; here the re-balancing block is a copy of the
  conventional one with its convolutions re-drawn by the architecture's own init rule, so the
  branches differ at the start as in BBN.
- Global average pooling is ``adaptive_avg_pool2d`` (BBN's GAP) also on the CIFAR ResNets, whose
  single-branch forward pools with ``avg_pool2d`` over the whole map (the same op up to ~1e-6).
- The reversed stream is a second loader over the training set with its own seed (its crops, flips
  and draws independent of the uniform stream's) instead of a second image drawn in the dataset's
  ``__getitem__``; same distribution, the same number of batches per epoch, reproducible per
  (seed, epoch, rank) like every ltfast sampler, so resume is exact.
- Under DDP the step is one forward call of the wrapped network (both batches in), not three.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..data import make_loader
from ..errors import ConfigError
from ..models import CIFAR_ARCHS, EXPERT_ARCHS
from ..models.resnet_cifar import CifarResNet
from ..models.small import SmallResNet
from .base import Method

__all__ = ["BBN", "BilateralBranchNetwork", "alpha_divisor", "bbn_mixed_loss", "cumulative_alpha", "split_last_block"]

# The reversed loader's seed is the run's plus this, so its draws and augmentation are not the uniform
# loader's (the same seed would give the k-th image of both streams the same crop and flip).
REVERSED_SEED_OFFSET = 7919
REVERSED_LOADER = "bbn_reversed"


def alpha_divisor(epochs: int) -> int:
    """BBN's ``Combiner.div_epoch``: the epoch count, except 90 -> 100 and 180 -> 200 (so that a 90- or
    180-epoch schedule ends with alpha 0.21, not 0)."""
    return 100 * (epochs // 100 + 1) if epochs in (90, 180) else epochs


def cumulative_alpha(epoch: int, epochs: int) -> float:
    """BBN's parabolic decay ``1 - ((e - 1) / T)^2`` for the 0-based ``epoch`` (e = epoch + 1): 1 in the
    first epoch (the conventional branch alone), falling to near 0 in the last."""
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"cumulative_alpha: epoch must be in [0, epochs={epochs}), got {epoch}")
    return 1.0 - (epoch / alpha_divisor(epochs)) ** 2


def bbn_mixed_loss(criterion: nn.Module, logits: Tensor, labels: Tensor, reversed_labels: Tensor,
                   alpha: float) -> Tensor:
    """``alpha L(z, y_c) + (1 - alpha) L(z, y_r)`` (``bbn_mix``), one fused mixed-target call when the
    criterion takes ``target_b`` (ltfast.nn.CrossEntropyLoss: ``ltfast.mixed_cross_entropy``), else two
    calls. The weight is in the logits' dtype (float64 logits get alpha to float64, not float32)."""
    if getattr(criterion, "supports_mixed_targets", False):
        weight = torch.tensor(alpha, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        return criterion(logits, labels, target_b=reversed_labels, mix_weight=weight)
    return alpha * criterion(logits, labels) + (1.0 - alpha) * criterion(logits, reversed_labels)


# ------------------------------------------------------------------------------------------ network

def _reinit_fan_out(block: nn.Module) -> None:
    """torchvision's ResNet init, which SmallResNet copies: Kaiming-normal fan-out convs, BN 1 / 0."""
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _reinit_fan_in(block: nn.Module) -> None:
    """LDAM-DRW's (and BBN's) ``_weights_init`` for the CIFAR ResNets: ``kaiming_normal_`` (fan-in)."""
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)


def split_last_block(model: nn.Module) -> tuple[nn.Sequential, nn.Module, int, Callable[[nn.Module], None]]:
    """(trunk, last residual block, pooled feature width, the block init rule) of a supported
    architecture: everything before the last block of the last stage, in forward order, and that block.
    ValueError for another architecture."""
    if isinstance(model, SmallResNet):
        trunk = OrderedDict(stem=model.stem, layer1=model.layer1, layer2=model.layer2)
        return nn.Sequential(trunk), model.layer3, model.fc.in_features, _reinit_fan_out
    if isinstance(model, CifarResNet):
        layer3 = list(model.layer3)
        trunk = OrderedDict(conv1=model.conv1, bn1=model.bn1, relu=nn.ReLU(), layer1=model.layer1, layer2=model.layer2,
                            layer3=nn.Sequential(*layer3[:-1]))
        return nn.Sequential(trunk), layer3[-1], model.num_features, _reinit_fan_in
    import torchvision
    if isinstance(model, torchvision.models.ResNet):
        layer4 = list(model.layer4)
        trunk = OrderedDict(conv1=model.conv1, bn1=model.bn1, relu=model.relu, maxpool=model.maxpool,
                            layer1=model.layer1, layer2=model.layer2, layer3=model.layer3,
                            layer4=nn.Sequential(*layer4[:-1]))
        return nn.Sequential(trunk), layer4[-1], model.fc.in_features, _reinit_fan_out
    raise ValueError(f"model.bbn: {type(model).__name__} is not an architecture BBN can split (small_resnet, a CIFAR "
                     f"ResNet such as resnet32, or a torchvision ResNet / ResNeXt)")


class BilateralBranchNetwork(nn.Module):
    """BBN's network: ``trunk``, the two branch blocks, global average pooling, ``fc`` on [N, 2F].

    ``forward(x)``: inference (and any call without a reversed batch): both branches on ``x``,
    ``fc([f_c, f_r])``. ``forward(x, reversed_images=x_r, alpha=a)``: the training step's logits,
    ``fc(2 [a f_c(x), (1 - a) f_r(x_r)])``."""

    def __init__(self, trunk: nn.Module, conventional: nn.Module, rebalancing: nn.Module, feature_dim: int,
                 num_classes: int) -> None:
        super().__init__()
        self.trunk, self.conventional, self.rebalancing = trunk, conventional, rebalancing
        self.feature_dim = feature_dim
        self.fc = nn.Linear(2 * feature_dim, num_classes)

    @classmethod
    def from_architecture(cls, model: nn.Module, num_classes: int) -> "BilateralBranchNetwork":
        trunk, last_block, feature_dim, reinit = split_last_block(model)
        rebalancing = copy.deepcopy(last_block)
        reinit(rebalancing)
        return cls(trunk, last_block, rebalancing, feature_dim, num_classes)

    @staticmethod
    def _pool(x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def branch_features(self, x: Tensor, branch: str) -> Tensor:
        """Pooled [N, F] feature of one branch ("conventional" or "rebalancing") on its own trunk pass."""
        return self._pool(getattr(self, branch)(self.trunk(x)))

    def forward(self, x: Tensor, reversed_images: Optional[Tensor] = None, alpha=None) -> Tensor:
        if reversed_images is None:
            shared = self.trunk(x)
            return self.fc(torch.cat((self._pool(self.conventional(shared)), self._pool(self.rebalancing(shared))), 1))
        if alpha is None:
            raise ValueError("BilateralBranchNetwork: alpha is required with reversed_images")
        conventional = self.branch_features(x, "conventional")
        rebalancing = self.branch_features(reversed_images, "rebalancing")
        return self.fc(2 * torch.cat((alpha * conventional, (1 - alpha) * rebalancing), 1))


# ------------------------------------------------------------------------------------------- method

def _bbn_arch(arch: str) -> bool:
    return arch == "small_resnet" or arch in CIFAR_ARCHS or arch.startswith(("resnet", "resnext", "wide_resnet"))


class BBN(Method):
    """``model.bbn=true``: the bilateral-branch network, the reversed second stream and the cumulative
    alpha of BBN; ``loss.name`` is the loss of both terms (BBN: plain CE)."""
    name = "bbn"
    summary = "BBN: bilateral-branch network with cumulative learning (Zhou et al. 2020)"
    config_keys = {"model": {
        "bbn": (False, bool, None, "BBN: the last residual block duplicated into a conventional and a re-balancing "
                                   "branch, a reversed-sampled second batch, cumulative alpha"),
    }}

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["model"]["bbn"]

    @classmethod
    def check(cls, cfg: dict) -> None:
        if not cls.enabled(cfg):
            return
        model, data = cfg["model"], cfg["data"]
        if model["arch"] in EXPERT_ARCHS or not _bbn_arch(model["arch"]):
            raise ConfigError(f"model.arch: model.bbn needs small_resnet, a CIFAR ResNet ({', '.join(CIFAR_ARCHS)}) or "
                              f"a torchvision ResNet / ResNeXt, got {model['arch']!r}")
        if model["classifier"] != "linear":
            raise ConfigError(f"model.classifier: model.bbn has its own linear classifier on both branches, got "
                              f"{model['classifier']!r}")
        if data["mixup_alpha"]:
            raise ConfigError(f"data.mixup_alpha: model.bbn mixes its own two batches; mixup must be 0, got "
                              f"{data['mixup_alpha']}")
        if model["freeze_backbone"]:
            raise ConfigError("model.freeze_backbone: model.bbn trains both branches; not with a frozen backbone")

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.alpha = 1.0
        self.memory_format = torch.contiguous_format

    def build_head(self, model: nn.Module, num_classes: int) -> nn.Module:
        return BilateralBranchNetwork.from_architecture(model, num_classes)

    def extra_loaders(self, data: dict, run) -> dict:
        from ltfast.data.samplers import ReversedSampler
        dcfg, seed = self.cfg["data"], self.cfg["train"]["seed"] + REVERSED_SEED_OFFSET
        sampler = ReversedSampler(data["train"].labels, seed=seed, rank=run.rank, world_size=run.world)
        loader = make_loader(data, "train", dcfg, sampler=sampler, batch_size=dcfg["batch_size"] // run.world,
                             device=run.device, train=True, seed=seed, rank=run.rank, world=run.world)
        return {REVERSED_LOADER: loader}

    def start(self, model: nn.Module, head_name: str, run) -> None:
        self.memory_format = run.memory_format

    def on_epoch_start(self, model: nn.Module, head_name: str, epoch: int) -> None:
        self.alpha = cumulative_alpha(epoch, self.cfg["optim"]["epochs"])

    def train_step(self, net: nn.Module, images: Tensor, labels: Tensor, extra: dict,
                   criterion: nn.Module) -> Optional[Tensor]:
        reversed_images, reversed_labels = extra[REVERSED_LOADER]
        # alpha as a tensor (a compiled network sees one graph for every epoch's value) in the images'
        # dtype (float32 under autocast too: a 0-dim tensor does not promote the bf16 features)
        alpha = torch.tensor(self.alpha, dtype=images.dtype, device=images.device)
        logits = net(images.contiguous(memory_format=self.memory_format),
                     reversed_images=reversed_images.contiguous(memory_format=self.memory_format), alpha=alpha)
        return bbn_mixed_loss(criterion, logits, labels, reversed_labels, self.alpha)
