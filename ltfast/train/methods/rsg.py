"""RSG (Wang et al., CVPR 2021, "RSG: A Simple but Effective Module for Learning Imbalanced Datasets")
as the survey's ``RSG-codebase`` trains it: ``models/RSG.py`` (the module), ``models/resnet.py`` (where
it sits in the ResNeXt-50) and ``imagenet_lt_train.py`` (loss weights, schedule, head classes, the
deferred re-sampling); seed-methods.md §2.4, issue 22 §3.

The module (``RareClassSampleGenerator``) reads the feature maps of the stage BEFORE the last one
(``layer3`` of the ResNeXt-50, 1024 x 14 x 14; ``layer2`` of ``small_resnet`` and of the CIFAR
ResNets) and returns a batch that the last stage, the pooling and the classifier then see:

- **Centre estimation** (``gamma``): each class c has K centres ``centers[c]`` (K x C, constant over
  the map) and a soft assignment ``softmax(pool(f) W_c + b_c)`` (``W_c``: C x K, ``b_c``: K).
- **CESC loss** (``center_loss`` + ``pair_loss``): ``sum_k gamma_k ||f - c_{y,k}||^2`` (summed over the
  whole C x H x W map) averaged over the batch, plus, while ``epoch <= epoch_thresh``, the contrastive
  term: the first half of the batch paired with the second half, channel-concatenated, through
  ``conv1x1(2C -> D) + ReLU + conv3x3(D -> D) + global average pool + fc(D -> 2)`` and cross-entropy
  against "same class".
- **Generation** (``epoch > epoch_thresh``, both head and tail samples in the batch): head samples'
  variation ``v = f_h - c_h`` (c_h: the centre of the head sample's largest gamma) goes through
  ``conv3x3(C -> C)`` into ``v'``, and ``f_t + v'`` is a new sample of the tail sample's class,
  appended to the batch with the tail label. Head chunk j (as many as there are tails) pairs with
  all tails when there are more heads, else tail chunk j with all heads;
  ``segment = max(int(n_more * strength / n_fewer), 1)`` chunks.
- **MV loss** (``mv_loss``, averaged over the segments): cross-entropy of the contrastive classifier
  (frozen) on ``[f_h, v']`` against "different class", plus ``(sum | ||v'_r|| - ||v_r|| | + sum |n_t * n_v - 1|) / n``.
- The module sees the features DETACHED: neither loss reaches the backbone; the generated samples
  train the transformation conv (through the classifier's loss) and the layers after the module.

The total loss is ``criterion(logits, labels + generated labels) + 0.1 CESC + 0.01 MV``
(``imagenet_lt_train.py``); the seed pairs it with LDAM (max_m 0.3, s 30, its class weights all 1)
on a cosine classifier (``NormedLinear``) and re-samples the data from epoch 160 on
(``ImbalancedDatasetSampler``: P(c) proportional to n_c (1 - beta) / (1 - beta^n_c), beta 0.9999;
``data.rsg_resample_epoch`` here). Evaluation runs the model without the module, as the seed's
``phase_train=False``; the module's weights stay in the checkpoints (the seed drops them) so that a
run resumes.

Where the code differs from the paper (the code is followed): the MV loss's direction term is the
element-wise ``|a_i b_i - 1|`` summed over the rows of ``view(-1, C)`` of the NCHW maps (rows of C
consecutive memory elements, not per-position channel vectors), not a cosine; the contrastive module
is frozen in the MV loss by ``requires_grad = False`` in the seed, which stays frozen for the rest of
training (after ``epoch_thresh`` nothing else trains it, so a detached use is the same gradient).

Differences from the seed, on purpose:

- Global average pooling is a mean over the map (the seed's ``AvgPool2d(14)``, the same on 14 x 14),
  so the module runs at any input size.
- The centre term is expanded, ``||f||^2 - 2 c . sum_p f_p + HW ||c||^2`` per centre, instead of the
  seed's [N, K, C, H, W] repeat of the centres (770 MB per 64 images at K = 15, C = 1024, 14 x 14).
- The module computes in float32 (float64 for float64 maps) with autocast off (bf16 would lose the expanded distance to
  cancellation); the generated samples join the batch in the features' dtype.
- An odd batch pairs its first ``N // 2`` samples with the next ``N // 2`` (the seed's halves differ
  in size there and fail; its batches were even); a batch of one has no pair term.
- Under DDP every parameter of the module joins the loss with weight 0 (DDP without
  ``find_unused_parameters`` needs a gradient for each; the transformation conv is idle until
  ``epoch_thresh``): those parameters then get weight decay while idle, which the seed does not do.
- Initialisation is what the seed's ResNet constructor leaves after its own loop: Kaiming-normal
  fan-out convolutions, zero conv biases, a Kaiming-normal (fan-in) pair classifier with zero bias,
  ``W ~ N(0, 1)``, ``b = 1``, centres 0.
- Head classes: the ``int(C * rsg_head_ratio)`` most frequent, ties to the lower index (the seed's
  repeated ``list.index(max)``); the resampling uses ltfast's class-weighted sampler (a class by its
  probability, then an image of it) instead of a multinomial over the images (the same law).
- From ``rsg_resample_epoch`` on, a second loader (``extra_loaders``) supplies the batches and the
  training loader's batch is unused.
"""
from __future__ import annotations

from functools import cache
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import schema
from ..data import make_loader
from ..errors import ConfigError
from ..models import CIFAR_ARCHS, EXPERT_ARCHS, loss_input
from ..models.resnet_cifar import CifarResNet
from ..models.small import SmallResNet
from ..schema import NoneType
from .base import Method

__all__ = ["RSG", "RSGOutput", "RareClassSampleGenerator", "attach_generator", "head_classes",
           "EffectiveNumberSampler", "generator_stage"]

RESAMPLED_LOADER = "rsg_resampled"
# the resampling loader's seed: the run's plus this, so that its crops and draws are its own
RESAMPLED_SEED_OFFSET = 6007


def head_classes(counts, ratio: float) -> Tensor:
    """bool [C]: the ``int(C * ratio)`` most frequent classes, ties to the lower class index
    (``imagenet_lt_train.py``: ``cls_num_list.index(max(cls_num_list))`` taken repeatedly)."""
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if not 0 < ratio < 1:
        raise ValueError(f"model.rsg_head_ratio: must be in (0, 1), got {ratio!r}")
    order = torch.sort(-counts, stable=True).indices
    mask = torch.zeros(counts.numel(), dtype=torch.bool)
    mask[order[:int(counts.numel() * ratio)]] = True
    return mask


class RSGOutput(NamedTuple):
    """What the module gives one training batch: the feature maps with the generated samples appended,
    their labels, the CESC loss and the MV loss (already divided by the segment count)."""
    features: Tensor
    labels: Tensor
    cesc_loss: Tensor
    mv_loss: Tensor


class RareClassSampleGenerator(nn.Module):
    """The RSG module (module docstring). ``forward(feature_maps [N, C, H, W], labels [N], epoch)`` ->
    ``RSGOutput``; ``epoch`` is 0-based as the seed's loop variable (contrastive term while
    ``epoch <= epoch_thresh``, generation while ``epoch > epoch_thresh``). ``head_mask`` (bool [classes]) is a
    buffer set from the training counts (``head_classes``)."""

    def __init__(self, channels: int, num_classes: int, centers: int = 15, contrastive_dim: int = 256,
                 transfer_strength: float = 1.0, epoch_thresh: int = 160) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("num_classes", num_classes), ("rsg_centers", centers),
                            ("rsg_contrastive_dim", contrastive_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if not 0 < transfer_strength <= 1:
            raise ValueError(f"model.rsg_transfer_strength: must be in (0, 1] (a larger value asks for more chunks "
                             f"than the batch holds), got {transfer_strength!r}")
        self.channels, self.num_classes, self.num_centers = channels, num_classes, centers
        self.contrastive_dim, self.strength, self.epoch_thresh = contrastive_dim, float(transfer_strength), epoch_thresh
        self.assignment_weight = nn.Parameter(torch.randn(num_classes, channels, centers))  # the seed's ``linear``
        self.assignment_bias = nn.Parameter(torch.ones(num_classes, centers))               # its ``bias``
        self.centers = nn.Parameter(torch.zeros(num_classes, centers, channels))
        self.transformation = nn.Conv2d(channels, channels, 3, padding=1)                   # vec_transformation_module
        self.pair_reduce = nn.Conv2d(2 * channels, contrastive_dim, 1)                      # contrastive_module[0]
        self.pair_conv = nn.Conv2d(contrastive_dim, contrastive_dim, 3, padding=1)          # contrastive_module[2]
        # contrastive_fc as bare parameters: an nn.Linear with 2 outputs would be a classifier candidate
        # for the head rule of a 2-class model
        self.pair_fc_weight = nn.Parameter(torch.empty(2, contrastive_dim))
        self.pair_fc_bias = nn.Parameter(torch.zeros(2))
        for conv in (self.transformation, self.pair_reduce, self.pair_conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.kaiming_normal_(self.pair_fc_weight)
        self.register_buffer("head_mask", torch.zeros(num_classes, dtype=torch.bool))
        self.keep_all_in_graph = False  # DDP: every parameter joins the loss (module docstring)
        self._pending: Optional[tuple[Tensor, int]] = None
        self._result: Optional[RSGOutput] = None

    def set_head_classes(self, mask: Tensor) -> None:
        mask = torch.as_tensor(mask, dtype=torch.bool).flatten()
        if mask.numel() != self.num_classes:
            raise ValueError(f"head classes: a mask of {self.num_classes} classes expected, got {mask.numel()}")
        self.head_mask.copy_(mask)

    # ---------------------------------------------------------------- the math

    def gamma(self, pooled: Tensor, labels: Tensor) -> Tensor:
        """[n, K] soft assignment of each pooled feature [n, C] to its class's centres."""
        return torch.softmax(torch.bmm(pooled.unsqueeze(1), self.assignment_weight[labels]).squeeze(1)
                             + self.assignment_bias[labels], dim=1)

    def center_loss(self, maps: Tensor, labels: Tensor) -> Tensor:
        """``sum_n sum_k gamma_nk ||f_n - c_{y_n,k}||^2 / N`` over the C x H x W map (the seed's bmm)."""
        n, _, h, w = maps.shape
        gamma = self.gamma(maps.mean(dim=(2, 3)), labels)
        centers = self.centers[labels]                                           # [n, K, C]
        squared = maps.square().sum(dim=(1, 2, 3)).unsqueeze(1)                  # [n, 1]
        cross = torch.bmm(centers, maps.sum(dim=(2, 3)).unsqueeze(2)).squeeze(2)  # [n, K]: c_k . sum_p f_p
        distance = squared - 2 * cross + (h * w) * centers.square().sum(dim=2)
        return (gamma * distance).sum() / n

    def pair_logits(self, pairs: Tensor, frozen: bool = False) -> Tensor:
        """The contrastive classifier on channel-concatenated pairs [n, 2C, H, W] -> [n, 2]; ``frozen``:
        its parameters take no gradient (the MV loss)."""
        params = (self.pair_reduce.weight, self.pair_reduce.bias, self.pair_conv.weight, self.pair_conv.bias,
                  self.pair_fc_weight, self.pair_fc_bias)
        if frozen:
            params = tuple(p.detach() for p in params)
        reduce_w, reduce_b, conv_w, conv_b, fc_w, fc_b = params
        x = F.relu(F.conv2d(pairs, reduce_w, reduce_b))
        x = F.conv2d(x, conv_w, conv_b, padding=1).mean(dim=(2, 3))
        return F.linear(x, fc_w, fc_b)

    def pair_loss(self, maps: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of "same class" for sample i and sample i + N // 2 (odd N: the last one sits out)."""
        half = maps.shape[0] // 2
        same = torch.eq(labels[:half], labels[half:2 * half]).long()
        return F.cross_entropy(self.pair_logits(torch.cat([maps[:half], maps[half:2 * half]], dim=1)), same)

    def cesc_loss(self, maps: Tensor, labels: Tensor, epoch: int) -> Tensor:
        loss = self.center_loss(maps, labels)
        if epoch <= self.epoch_thresh and maps.shape[0] >= 2:
            loss = loss + self.pair_loss(maps, labels)
        return loss

    def mv_loss(self, head_maps: Tensor, head_labels: Tensor, tail_maps: Tensor,
                tail_labels: Tensor) -> tuple[Tensor, Tensor]:
        """(MV loss, generated tail samples) of equally many head and tail maps (``compute_mv_loss``)."""
        num, channels = tail_maps.shape[0], self.channels
        with torch.no_grad():
            head_gamma = self.gamma(head_maps.mean(dim=(2, 3)), head_labels)
            tail_gamma = self.gamma(tail_maps.mean(dim=(2, 3)), tail_labels)
            head_center = self.centers[head_labels, head_gamma.argmax(dim=1)][:, :, None, None]
            tail_center = self.centers[tail_labels, tail_gamma.argmax(dim=1)][:, :, None, None]
        variation = head_maps - head_center
        transformed = self.transformation(variation)
        generated = tail_maps + transformed
        # the seed's view(-1, C) of NCHW maps: rows of C consecutive elements (reshape keeps that order)
        tail_direction = F.normalize((tail_maps - tail_center).reshape(-1, channels), dim=1)
        transformed_rows = transformed.reshape(-1, channels)
        direction = F.normalize(transformed_rows, dim=1)
        different = torch.zeros(num, dtype=torch.long, device=tail_maps.device)
        pair = F.cross_entropy(self.pair_logits(torch.cat([head_maps, transformed], dim=1), frozen=True), different)
        magnitude = torch.abs(transformed_rows.norm(dim=1) - variation.reshape(-1, channels).norm(dim=1)).sum()
        alignment = torch.abs(tail_direction * direction - 1).sum()
        return pair + (magnitude + alignment) / num, generated

    def forward(self, feature_maps: Tensor, labels: Tensor, epoch: int) -> RSGOutput:
        if feature_maps.dim() != 4 or feature_maps.shape[1] != self.channels:
            raise ValueError(f"RSG: expects feature maps [N, {self.channels}, H, W], got {tuple(feature_maps.shape)}")
        if labels.shape != feature_maps.shape[:1]:
            raise ValueError(f"RSG: {feature_maps.shape[0]} feature maps but labels of shape {tuple(labels.shape)}")
        generated, generated_labels = [], []
        with torch.autocast(feature_maps.device.type, enabled=False):
            maps = feature_maps.detach().to(torch.promote_types(feature_maps.dtype, torch.float32))
            cesc = self.cesc_loss(maps, labels, epoch)
            mv_total = torch.zeros((), dtype=maps.dtype, device=maps.device)
            is_head = self.head_mask[labels]
            head_maps, head_labels = maps[is_head], labels[is_head]
            tail_maps, tail_labels = maps[~is_head], labels[~is_head]
            num_head, num_tail = head_maps.shape[0], tail_maps.shape[0]
            segment = 1
            if num_head and num_tail and epoch > self.epoch_thresh:
                if num_head >= num_tail:
                    segment = max(int(num_head * self.strength / num_tail), 1)
                    chunks = [(head_maps[j * num_tail:(j + 1) * num_tail], head_labels[j * num_tail:(j + 1) * num_tail],
                               tail_maps, tail_labels) for j in range(segment)]
                else:
                    segment = max(int(num_tail * self.strength / num_head), 1)
                    chunks = [(head_maps, head_labels, tail_maps[j * num_head:(j + 1) * num_head],
                               tail_labels[j * num_head:(j + 1) * num_head]) for j in range(segment)]
                for chunk in chunks:
                    loss, samples = self.mv_loss(*chunk)
                    mv_total = mv_total + loss
                    generated.append(samples.to(feature_maps.dtype))
                    generated_labels.append(chunk[3])
            mv = mv_total / segment
            if self.keep_all_in_graph:
                cesc = cesc + sum(p.sum() for p in self.parameters()) * 0.0
        return RSGOutput(torch.cat([feature_maps] + generated, dim=0), torch.cat([labels] + generated_labels, dim=0),
                         cesc, mv)

    # ---------------------------------------------------------------- in the backbone

    def arm(self, labels: Tensor, epoch: int) -> None:
        """The next training forward of the stage runs the module on this batch (``stage_hook``)."""
        self._pending, self._result = (labels, epoch), None

    def take_result(self) -> RSGOutput:
        result, self._result, self._pending = self._result, None, None
        if result is None:
            raise RuntimeError("RSG: the armed forward did not reach the module's stage (was the model in eval mode?)")
        return result

    def stage_hook(self, module: nn.Module, args, output: Tensor) -> Optional[Tensor]:
        """Forward hook of the stage before the last: in training, when armed, its output becomes the
        batch with the generated samples; otherwise (evaluation, an unarmed call) it is left alone."""
        if not self.training or self._pending is None:
            return None
        labels, epoch = self._pending
        self._pending = None
        self._result = self(output, labels, epoch)
        return self._result.features


def generator_stage(model: nn.Module) -> tuple[str, int]:
    """(name of the stage the module follows, its output channels): the stage before the last
    (``layer3`` of torchvision's ResNet / ResNeXt as ``models/resnet.py``; ``layer2`` of ``small_resnet``
    and of the CIFAR ResNets)."""
    import torchvision
    for kind, stage, last in ((torchvision.models.ResNet, "layer3", "layer4"), (SmallResNet, "layer2", "layer3"),
                              (CifarResNet, "layer2", "layer3")):
        if isinstance(model, kind):
            first_conv = next(m for m in model.get_submodule(last).modules() if isinstance(m, nn.Conv2d))
            return stage, first_conv.in_channels
    raise ValueError(f"model.rsg: no known stage for {type(model).__name__}; RSG sits before the last stage of "
                     f"{_SUPPORTED_ARCHS}")


def attach_generator(model: nn.Module, num_classes: int, model_cfg: dict) -> RareClassSampleGenerator:
    """Adds the module as ``model.rsg`` (saved with the model) and hooks it on its stage."""
    stage, channels = generator_stage(model)
    generator = RareClassSampleGenerator(channels, num_classes, model_cfg["rsg_centers"],
                                         model_cfg["rsg_contrastive_dim"], model_cfg["rsg_transfer_strength"],
                                         model_cfg["rsg_epoch_thresh"])
    model.rsg = generator
    model.get_submodule(stage).register_forward_hook(generator.stage_hook)
    return generator


@cache
def _effective_number_sampler():
    from ltfast.data.samplers import _WeightedClassSampler

    class EffectiveNumberSampler(_WeightedClassSampler):
        """The seed's ``ImbalancedDatasetSampler``: image weights (1 - beta) / (1 - beta^n_c), i.e.
        P(class c) proportional to n_c (1 - beta) / (1 - beta^n_c); nearly class-balanced at beta 0.9999."""

        def __init__(self, labels, beta: float = 0.9999, **kwargs):
            super().__init__(labels, **kwargs)
            self.beta = float(beta)

        def class_probabilities(self):
            counts = self._present_counts()
            weights = counts * (1.0 - self.beta) / (1.0 - torch.pow(torch.tensor(self.beta, dtype=torch.float64),
                                                                    counts))
            return weights / weights.sum()

    return EffectiveNumberSampler


def EffectiveNumberSampler(labels, beta: float = 0.9999, **kwargs):
    """``ImbalancedDatasetSampler`` of the seed as an ltfast sampler; the class is made on first use
    (``ltfast.data`` loads the compiled sampler ops, which ``ltfast.train`` imports only when it needs them)."""
    return _effective_number_sampler()(labels, beta=beta, **kwargs)


_SUPPORTED_ARCHS = "small_resnet, a CIFAR ResNet (resnet32, ...) or a torchvision resnet* / resnext* / wide_resnet*"


class RSG(Method):
    """``model.rsg=true``: the rare-class sample generator in the backbone, its two losses added to the
    run's loss, the deferred re-sampling (``data.rsg_resample_epoch``)."""
    name = "rsg"
    summary = "RSG: rare-class sample generator (Wang et al. 2021)"
    config_keys = {
        "model": {
            "rsg": (False, bool, None, "RSG: the rare-class sample generator before the last stage"),
            "rsg_centers": (15, int, schema.positive, "RSG: centres per class (ResNeXt-50 seed 15)"),
            "rsg_contrastive_dim": (256, int, schema.positive, "RSG: contrastive module width (seed 256)"),
            "rsg_head_ratio": (0.2, (int, float), None,
                               "RSG: the most frequent int(C x ratio) classes are the head (seed 0.2)"),
            "rsg_transfer_strength": (1.0, (int, float), None,
                                      "RSG: generated chunks = int(n_more x strength / n_fewer), in (0, 1] (seed 1)"),
            "rsg_epoch_thresh": (160, int, schema.non_negative,
                                 "RSG: 0-based epoch after which tail samples are generated (seed 160)"),
            "rsg_cesc_weight": (0.1, (int, float), schema.non_negative, "RSG: weight of the CESC loss (seed 0.1)"),
            "rsg_mv_weight": (0.01, (int, float), schema.non_negative, "RSG: weight of the MV loss (seed 0.01)"),
        },
        "data": {
            "rsg_resample_epoch": (None, (int, NoneType), None,
                                   "RSG: 0-based epoch from which batches come from the effective-number sampler "
                                   "(seed 160); null = never"),
            "rsg_resample_beta": (0.9999, (int, float), schema.beta, "RSG: beta of that sampler (seed 0.9999)"),
        },
    }

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["model"]["rsg"]

    @classmethod
    def check(cls, cfg: dict) -> None:
        if not cls.enabled(cfg):
            for section, keys in cls.config_keys.items():
                for key, spec in keys.items():
                    if key != "rsg" and cfg[section][key] != spec[0]:
                        raise ConfigError(f"{section}.{key}: only used with model.rsg=true")
            return
        model, data = cfg["model"], cfg["data"]
        arch = model["arch"]
        if arch in EXPERT_ARCHS or not (arch == "small_resnet" or arch in CIFAR_ARCHS
                                        or arch.startswith(("resnet", "resnext", "wide_resnet"))):
            raise ConfigError(f"model.arch: model.rsg needs {_SUPPORTED_ARCHS}, got {arch!r}")
        if not 0 < model["rsg_head_ratio"] < 1:
            raise ConfigError(f"model.rsg_head_ratio: must be in (0, 1), got {model['rsg_head_ratio']!r}")
        if not 0 < model["rsg_transfer_strength"] <= 1:
            raise ConfigError(f"model.rsg_transfer_strength: must be in (0, 1], got {model['rsg_transfer_strength']!r}")
        if data["rsg_resample_epoch"] is not None and not 0 <= data["rsg_resample_epoch"] < cfg["optim"]["epochs"]:
            raise ConfigError(f"data.rsg_resample_epoch: must be a 0-based epoch below optim.epochs="
                              f"{cfg['optim']['epochs']} or null, got {data['rsg_resample_epoch']!r}")
        if data["mixup_alpha"]:
            raise ConfigError(f"data.mixup_alpha: model.rsg generates samples from the batch's labels; mixup must be "
                              f"0, got {data['mixup_alpha']}")
        if model["freeze_backbone"]:
            raise ConfigError("model.freeze_backbone: model.rsg trains the layers after its stage; not with a frozen "
                              "backbone")
        if model["bbn"]:
            raise ConfigError("model.bbn: BBN and RSG both own the training step; not together")

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.generator: Optional[RareClassSampleGenerator] = None
        self.epoch = 0
        self.memory_format = torch.contiguous_format

    def build_head(self, model: nn.Module, num_classes: int) -> None:
        self.generator = attach_generator(model, num_classes, self.cfg["model"])

    def extra_loaders(self, data: dict, run) -> dict:
        # the training counts reach a method with the data: the head classes are set here
        self.generator.set_head_classes(head_classes(data["class_counts"], self.cfg["model"]["rsg_head_ratio"]))
        dcfg = self.cfg["data"]
        if dcfg["rsg_resample_epoch"] is None:
            return {}
        seed = self.cfg["train"]["seed"] + RESAMPLED_SEED_OFFSET
        sampler = EffectiveNumberSampler(data["train"].labels, beta=dcfg["rsg_resample_beta"], seed=seed,
                                         rank=run.rank, world_size=run.world)
        loader = make_loader(data, "train", dcfg, sampler=sampler, batch_size=dcfg["batch_size"] // run.world,
                             device=run.device, train=True, seed=seed, rank=run.rank, world=run.world)
        return {RESAMPLED_LOADER: loader}

    def start(self, model: nn.Module, head_name: str, run) -> None:
        self.memory_format = run.memory_format
        self.generator.keep_all_in_graph = run.world > 1

    def on_epoch_start(self, model: nn.Module, head_name: str, epoch: int) -> None:
        self.epoch = epoch

    def resampling(self) -> bool:
        start = self.cfg["data"]["rsg_resample_epoch"]
        return start is not None and self.epoch >= start

    def train_step(self, net: nn.Module, images: Tensor, labels: Tensor, extra: dict,
                   criterion: nn.Module) -> Optional[Tensor]:
        if self.resampling():
            images, labels = extra[RESAMPLED_LOADER]
        self.generator.arm(labels, self.epoch)
        outputs = net(images.contiguous(memory_format=self.memory_format))
        result = self.generator.take_result()
        mcfg = self.cfg["model"]
        return (criterion(loss_input(outputs, criterion), result.labels) + mcfg["rsg_cesc_weight"] * result.cesc_loss
                + mcfg["rsg_mv_weight"] * result.mv_loss)
