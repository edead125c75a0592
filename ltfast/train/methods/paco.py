"""PaCo (Cui et al., ICCV 2021, "Parametric Contrastive Learning") as the survey's ``PaCo-codebase``
trains it: ``moco/builder.py`` (the MoCo model), ``paco_lt.py`` (recipe and views), ``losses.py``
(the loss), ``sh/ImageNetLT_train_X50.sh`` (the ResNeXt-50 run); seed-methods.md §2.4, issue 22 §1.

The network (``PaCoNetwork``, ``MoCo`` in the seed):

- **Query encoder**: the architecture with its classifier replaced by the projection head
  (``model.paco_mlp``: ``Linear(F, F) + BatchNorm1d(F) + ReLU + Linear(F, D)``, MoCo v2's MLP with
  D = ``model.paco_dim``, 128; else one ``Linear(F, D)``), and ``fc``, a linear classifier with bias
  on the pooled F-dim feature (the seed's ``linear``, read there by a hook on the avgpool layer).
- **Key encoder**: a copy of the query encoder and its projection head, never trained by gradient;
  before each key forward ``theta_k <- m theta_k + (1 - m) theta_q`` (``model.paco_momentum``,
  0.999). Its BatchNorm layers use their own batch statistics (train mode), their running
  statistics are not averaged (MoCo's update covers parameters only).
- **Queue**: ``model.paco_queue`` keys (K) with their labels, buffers (saved in the checkpoints, so a
  run resumes with its queue), initialised as the seed: ``normalize(randn(K, D), dim=0)`` (each of
  the D columns has unit norm over the K rows, MoCo's ``[D, K]`` rule kept on PaCo's ``[K, D]``
  layout) and labels uniform in [0, C); ``queue_ptr`` is the next slot.
- **Inference** (``forward(x)``): the classifier's logits of the query encoder (``_inference``).

The training step (``PaCo.train_step``, the seed's ``_train`` then ``PaCoLoss``):
``q = normalize(proj(f(x1)))``; under no_grad the momentum update, then ``k = normalize(proj_k(f_k(x2)))``;
``similarity = q @ cat(q, k, queue).T`` (one matmul), ``sup_logits = fc(f(x1))`` and the loss is
``ltfast.paco_loss(similarity, y, cat(y, y, queue_labels), sup_logits, log(pi + 1e-9), ...)`` with
alpha 0.05, beta 1, gamma 1, T = moco-t 0.07, T_base = T, supt 1 (X50.sh); then the batch's keys and
labels replace the oldest K entries (``_dequeue_and_enqueue``, AFTER the features were taken, so
the batch's own keys enter the loss once, as k). Under DDP the keys and labels are all-gathered
before the enqueue, as the seed's ``concat_all_gather``; the loss of each rank uses its own q and k.
The criterion that ``loss.name`` builds (ce) is not used by the step.

The two views (``data.paco_views``, the seed's ``--aug``): the training loader gives view 1 and a
second loader (``extra_loaders``) view 2, over THE SAME sampler object (a pure function of seed,
epoch and rank, so batch i of both streams holds the same images, in the same order) with its own
augmentation seed and transform. ``regular_regular`` (X50.sh): view 1 is the training transform of
_base.yaml (RandomResizedCrop(0.08-1) + flip + ColorJitter(0.4, 0.4, 0.4, 0), ``augmentation_regular``),
view 2 MoCo v2's (``augmentation``: RandomResizedCrop(0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with
p 0.8, grayscale p 0.2, Gaussian blur sigma in [0.1, 2] with p 0.5, flip), ``view="mocov2"`` of
ltfast/data/augmentation.py in both the DALI and the PIL loader. ``randcls_sim``: view 2 is
``augmentation_sim`` (``view="sim"``); view 1 adds RandAugment n2 m10 mstd 0.5 (``augmentation_randncls``)
after its jitter (``set_rand_augment`` on the training loader before the first epoch). The PIL loader
is the reference; the DALI loader applies the same draws with the same operations, all within 2 grey
levels per image of PIL's on the same input except Equalize, which is OpenCV's histogram equalisation
in DALI (2.4 levels mean on the same input, up to 29 through the whole loaders), as its hue jitter is
YIQ where torchvision's is HSV (ltfast/data/dali.py). The config check refuses in-memory sets, which
have no RandAugment. In-memory sets (Fashion-MNIST-LT,
CIFAR-LT) have one augmentation (pad-crop + flip on the device): both views draw it independently.
A second loader rather than a two-view dataset: both image loaders, the device loader and BBN's
reversed stream already work this way, and nothing in the trainer or the loaders changes.

Differences from the seed, on purpose:

- No shuffle-BN: the seed shuffles the key batch across the GPUs (``_batch_shuffle_ddp``) so that the
  key encoder's BN statistics do not come from the same sub-batch as the query's; with one process
  there is nothing to shuffle across (a shuffle within the batch leaves BN's statistics unchanged),
  and under DDP ltfast keeps each rank's key batch on its rank (each rank's BN already sees its own
  sub-batch for both encoders, as MoCo without shuffling; the leak shuffle-BN guards against is
  small at 64+ images per rank).
- The seed's ``linear_k`` (a momentum copy of the classifier that nothing reads) is left out.
- The queue needs ``model.paco_queue`` to be a multiple of the global ``data.batch_size``, the
  seed's ``assert self.K % batch_size == 0`` (a config error here, before any work).
- Selection on the validation split; PaCo's own code validates on the test list and keeps the best
  epoch (PaCo issue #2): the configs say so.
- The lr schedule is ltfast's per-step cosine with linear warm-up (the seed: per-epoch warm-up to
  epoch 10, then a cosine over the remaining epochs + 1).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ltfast
from ltfast import priors

from .. import schema
from ..data import make_loader
from ..errors import ConfigError
from ..models import CIFAR_ARCHS, EXPERT_ARCHS, find_head
from ..schema import NoneType
from .base import Method

__all__ = ["PaCo", "PaCoNetwork", "KEY_VIEW_LOADER", "VIEWS", "projection_head"]

KEY_VIEW_LOADER = "paco_key_view"
# The key view's augmentation seed is the run's plus this: the same seed would give both views of an
# image the same crop and flip (a prime, as BBN's and RSG's offsets).
KEY_VIEW_SEED_OFFSET = 4099
# data.paco_views -> the key view's transform (ltfast.data.augmentation.CONTRASTIVE_VIEWS) and whether
# the query view adds RandAugment (paco_lt.py's --aug choices).
VIEWS = {"regular_regular": ("mocov2", False), "randcls_sim": ("sim", True)}
# paco_lt.py's rand_augment_transform('rand-n{randaug_n}-m{randaug_m}-mstd0.5') with its defaults n 2, m 10
RAND_AUGMENT = "rand-n2-m10-mstd0.5"
IN_MEMORY_DATASETS = ("fmnist_lt", "cifar10_lt", "cifar100_lt", "synthetic")
_SUPPORTED_ARCHS = "small_resnet, a CIFAR ResNet (resnet32, ...) or a torchvision resnet* / resnext* / wide_resnet*"


def projection_head(features: int, dim: int, mlp: bool) -> nn.Module:
    """MoCo v2's projection (``mlp=True``: Linear(F, F), BN, ReLU, Linear(F, D)), else Linear(F, D);
    PyTorch's default Linear init, as the seed's ``fc`` (torchvision's ResNet init leaves fc alone)."""
    if not mlp:
        return nn.Linear(features, dim)
    return nn.Sequential(nn.Linear(features, features), nn.BatchNorm1d(features), nn.ReLU(), nn.Linear(features, dim))


class PaCoNetwork(nn.Module):
    """The MoCo model of PaCo: ``encoder`` (the architecture, its head an Identity: the pooled feature),
    ``projection``, their momentum copies ``key_encoder`` / ``key_projection``, the queue buffers and
    ``fc`` (registered last: ``find_head`` takes the last linear layer with C outputs).

    ``forward(x)``: the classifier's logits. ``forward(x, key_images=x2)`` (training): (logits, q, k),
    q and k L2-normalised, k computed without gradient after the momentum update."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int, dim: int = 128, mlp: bool = True,
                 queue_size: int = 8192, momentum: float = 0.999) -> None:
        super().__init__()
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.momentum = momentum
        self.encoder = encoder
        self.projection = projection_head(feature_dim, dim, mlp)
        self.key_encoder = copy.deepcopy(encoder)
        self.key_projection = copy.deepcopy(self.projection)
        for param in list(self.key_encoder.parameters()) + list(self.key_projection.parameters()):
            param.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=0))
        self.register_buffer("queue_labels", torch.randint(0, num_classes, (queue_size,)))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.fc = nn.Linear(feature_dim, num_classes)

    @classmethod
    def from_architecture(cls, model: nn.Module, num_classes: int, dim: int = 128, mlp: bool = True,
                          queue_size: int = 8192, momentum: float = 0.999) -> "PaCoNetwork":
        """The architecture's classifier (``find_head``) becomes an Identity: its forward then ends
        with the pooled feature (SmallResNet, the CIFAR ResNets and torchvision's ResNets end with
        ``fc(flatten(pool(x)))``)."""
        head_name, head = find_head(model, num_classes)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"model.paco: the architecture's classifier {head_name!r} is a {type(head).__name__}, "
                             f"expected nn.Linear")
        parent_name, _, leaf = head_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, nn.Identity())
        return cls(model, head.in_features, num_classes, dim, mlp, queue_size, momentum)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_k <- m theta_k + (1 - m) theta_q`` over the encoder and projection parameters
        (``_momentum_update_key_encoder``), in place, one fused op per parameter list."""
        queries = list(self.encoder.parameters()) + list(self.projection.parameters())
        keys = list(self.key_encoder.parameters()) + list(self.key_projection.parameters())
        torch._foreach_mul_(keys, self.momentum)
        torch._foreach_add_(keys, queries, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        """The oldest ``len(keys)`` entries replaced by ``keys`` / ``labels`` (``_dequeue_and_enqueue``,
        after any all-gather); the pointer moves on modulo K. K must be a multiple of the batch (the
        seed's assert; ``PaCo.check`` enforces it for a run)."""
        size = self.queue.shape[0]
        if size == 0:
            return
        batch = keys.shape[0]
        if size % batch:
            raise ValueError(f"PaCo queue: {size} entries is not a multiple of the {batch} keys enqueued per step")
        ptr = int(self.queue_ptr)
        self.queue[ptr:ptr + batch] = keys.to(self.queue.dtype)
        self.queue_labels[ptr:ptr + batch] = labels
        self.queue_ptr[0] = (ptr + batch) % size

    def forward(self, x: Tensor, key_images: Optional[Tensor] = None):
        features = self.encoder(x)
        logits = self.fc(features)
        if key_images is None:
            return logits
        q = F.normalize(self.projection(features), dim=1)
        with torch.no_grad():
            self.momentum_update()
            k = F.normalize(self.key_projection(self.key_encoder(key_images)), dim=1)
        return logits, q, k


def _gather(tensor: Tensor) -> Tensor:
    """``concat_all_gather``: the ranks' tensors concatenated in rank order (no gradient)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class PaCo(Method):
    """``model.paco=true``: the MoCo network with its queue, the two views and ``ltfast.paco_loss``."""
    name = "paco"
    summary = "PaCo: parametric contrastive learning (Cui et al. 2021)"
    config_keys = {
        "model": {
            "paco": (False, bool, None, "PaCo: MoCo key encoder + queue, two views, the parametric contrastive loss"),
            "paco_alpha": (0.05, (int, float), schema.non_negative,
                           "PaCo: weight of the same-class keys as positives (X50.sh --alpha 0.05)"),
            "paco_beta": (1.0, (int, float), schema.non_negative,
                          "PaCo: weight of the class centre (classifier column) positive (X50.sh 1.0)"),
            "paco_gamma": (1.0, (int, float), schema.non_negative,
                           "PaCo: weight of the key columns in the denominator (X50.sh 1.0)"),
            "paco_temperature": (0.07, (int, float), schema.positive, "PaCo: MoCo temperature T (X50.sh --moco-t 0.07)"),
            "paco_base_temperature": (None, (int, float, NoneType), schema.positive,
                                      "PaCo: the loss is scaled by T / T_base; null = T (the seed)"),
            "paco_sup_temperature": (1.0, (int, float), schema.positive,
                                     "PaCo: the classifier logits are divided by this (the seed's supt 1)"),
            "paco_queue": (8192, int, schema.non_negative,
                           "PaCo: queue size K, a multiple of data.batch_size (paco_lt.py --moco-k 8192)"),
            "paco_momentum": (0.999, (int, float), schema.beta, "PaCo: key encoder momentum m (--moco-m 0.999)"),
            "paco_dim": (128, int, schema.positive, "PaCo: projection dimension (--moco-dim 128)"),
            "paco_mlp": (True, bool, None, "PaCo: MoCo v2's MLP projection head (--mlp True)"),
        },
        "data": {
            "paco_views": ("regular_regular", str, schema.choice(*VIEWS),
                           "PaCo: the two views (paco_lt.py --aug; X50.sh regular_regular)"),
        },
    }

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["model"]["paco"]

    @classmethod
    def check(cls, cfg: dict) -> None:
        model, data = cfg["model"], cfg["data"]
        if not cls.enabled(cfg):
            for section, keys in cls.config_keys.items():
                for key, spec in keys.items():
                    if key != "paco" and cfg[section][key] != spec[0]:
                        raise ConfigError(f"{section}.{key}: only used with model.paco=true")
            return
        arch = model["arch"]
        if arch in EXPERT_ARCHS or not (arch == "small_resnet" or arch in CIFAR_ARCHS
                                        or arch.startswith(("resnet", "resnext", "wide_resnet"))):
            raise ConfigError(f"model.arch: model.paco needs {_SUPPORTED_ARCHS}, got {arch!r}")
        if model["classifier"] != "linear":
            raise ConfigError(f"model.classifier: model.paco has its own linear classifier on the pooled feature, got "
                              f"{model['classifier']!r}")
        if cfg["loss"]["name"] != "ce":
            raise ConfigError(f"loss.name: model.paco trains with ltfast.paco_loss (its log prior is the class "
                              f"re-balancing); loss.name must be ce (built, not used), got {cfg['loss']['name']!r}")
        if model["paco_queue"] % data["batch_size"]:
            raise ConfigError(f"model.paco_queue: {model['paco_queue']} is not a multiple of data.batch_size="
                              f"{data['batch_size']} (the whole global batch is enqueued each step, as the seed's "
                              f"assert K % batch_size == 0)")
        if data["mixup_alpha"]:
            raise ConfigError(f"data.mixup_alpha: model.paco's positives come from the labels; mixup must be 0, got "
                              f"{data['mixup_alpha']}")
        if model["freeze_backbone"]:
            raise ConfigError("model.freeze_backbone: model.paco trains the encoder contrastively; not with a frozen "
                              "backbone")
        if VIEWS[data["paco_views"]][1]:
            if data["dataset"] in IN_MEMORY_DATASETS:
                raise ConfigError(f"data.paco_views: {data['paco_views']!r} adds RandAugment to the query view; the "
                                  f"in-memory loader of data.dataset={data['dataset']} has none (regular_regular there)")
        for other in ("bbn", "rsg"):
            if model.get(other):
                raise ConfigError(f"model.{other}: {other.upper()} and PaCo both own the training step; not together")

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.network: Optional[PaCoNetwork] = None
        self.log_prior: Optional[Tensor] = None
        self.memory_format = torch.contiguous_format

    def build_head(self, model: nn.Module, num_classes: int) -> nn.Module:
        mcfg = self.cfg["model"]
        self.network = PaCoNetwork.from_architecture(model, num_classes, mcfg["paco_dim"], mcfg["paco_mlp"],
                                                     mcfg["paco_queue"], mcfg["paco_momentum"])
        return self.network

    def extra_loaders(self, data: dict, run) -> dict:
        # the training counts reach a method with the data: log(pi + 1e-9) as the seed's cal_weight_for_classes
        self.log_prior = priors.log_prior(data["class_counts"]).to(run.device)
        dcfg = self.cfg["data"]
        seed = self.cfg["train"]["seed"] + KEY_VIEW_SEED_OFFSET
        options = {} if data["in_memory"] else {"view": VIEWS[dcfg["paco_views"]][0]}
        if VIEWS[dcfg["paco_views"]][1]:  # randcls_sim: RandAugment on the query view (the training loader)
            data["train_loader"].set_rand_augment(RAND_AUGMENT)
        # the training loader's own sampler: batch i of both streams holds the same images
        loader = make_loader(data, "train", dcfg, sampler=data["train_loader"].sampler,
                             batch_size=dcfg["batch_size"] // run.world, device=run.device, train=True, seed=seed,
                             rank=run.rank, world=run.world, **options)
        return {KEY_VIEW_LOADER: loader}

    def start(self, model: nn.Module, head_name: str, run) -> None:
        self.memory_format = run.memory_format
        mcfg = self.cfg["model"]
        run.log(f"PaCo: ltfast.paco_loss (alpha {mcfg['paco_alpha']}, beta {mcfg['paco_beta']}, gamma "
                f"{mcfg['paco_gamma']}, T {mcfg['paco_temperature']}), queue {mcfg['paco_queue']}, momentum "
                f"{mcfg['paco_momentum']}, views {self.cfg['data']['paco_views']}; the loss.name criterion is unused")

    def loss(self, logits: Tensor, q: Tensor, k: Tensor, labels: Tensor) -> Tensor:
        """``PaCoLoss.forward`` on the step's outputs and the queue as it is before this step's enqueue."""
        network, mcfg = self.network, self.cfg["model"]
        keys = torch.cat((q, k, network.queue.to(q.dtype)))
        similarity = q @ keys.T
        key_labels = torch.cat((labels, labels, network.queue_labels))
        return ltfast.paco_loss(similarity, labels, key_labels, logits, self.log_prior, temperature=mcfg["paco_temperature"],
                                alpha=mcfg["paco_alpha"], beta=mcfg["paco_beta"], gamma=mcfg["paco_gamma"],
                                sup_temperature=mcfg["paco_sup_temperature"],
                                base_temperature=mcfg["paco_base_temperature"])

    def train_step(self, net: nn.Module, images: Tensor, labels: Tensor, extra: dict,
                   criterion: nn.Module) -> Optional[Tensor]:
        key_images, _ = extra[KEY_VIEW_LOADER]
        logits, q, k = net(images.contiguous(memory_format=self.memory_format),
                           key_images=key_images.contiguous(memory_format=self.memory_format))
        loss = self.loss(logits, q, k, labels)
        self.network.enqueue(_gather(k.detach()), _gather(labels))
        return loss
