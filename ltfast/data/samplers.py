"""Class-aware samplers for long-tailed training, sharded for DDP.

    sampler = ClassBalancedSampler(train_labels, num_samples_cls=4, seed=1)   # the survey's cRT sampler
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for index in sampler: ...                 # or sampler.indices(): an int64 tensor

Every sampler is a ``torch.utils.data.Sampler[int]`` whose index stream is a pure function of
(seed, epoch, rank): nothing depends on earlier epochs having been drawn, so a resumed run draws
exactly what an uninterrupted one would. An epoch has ``num_samples`` positions (default: the
dataset size, as the survey's 452 steps x 256 are) split into ``world_size`` contiguous shards of
``num_samples // world_size`` positions (the remainder, fewer than ``world_size`` positions, is
dropped, as ``DistributedSampler(drop_last=True)`` does), so every rank has the same length and
shards never share a position.

The draws themselves are the ops ``torch.ops.ltfast.class_aware_sample`` and
``class_weighted_sample`` (C++ and CUDA, counter-based), so an epoch is drawn where the data lives:
``device="cuda"`` keeps the tables and the indices on the GPU.
"""
from __future__ import annotations

import operator
import os

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .. import _extension, _meta, reference  # noqa: F401  (_meta: the fake kernels of the sampler ops)

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _signed64(value: int) -> int:
    """The op schema's `int` is int64: pass a 64-bit key as its two's-complement value."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _class_aware_sample(*args) -> torch.Tensor:
    if _extension.AVAILABLE:
        return torch.ops.ltfast.class_aware_sample(*args)
    _extension.warn_fallback_once()
    return reference.class_aware_sample(*args)


def _class_weighted_sample(*args) -> torch.Tensor:
    if _extension.AVAILABLE:
        return torch.ops.ltfast.class_weighted_sample(*args)
    _extension.warn_fallback_once()
    return reference.class_weighted_sample(*args)


def _as_int(value, name: str) -> int:
    """An int from any integer type (numpy ints included, bool excluded): samplers built from numpy
    arithmetic used to be rejected as "not an int"."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def _env_int(name: str):
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def _distributed_rank_and_size(rank, world_size) -> tuple[int, int]:
    """Explicit values, else the initialised process group's, else torchrun's RANK / WORLD_SIZE
    environment variables: under torchrun a sampler built before init_process_group used to see
    rank 0 of 1 and draw the same stream on every rank."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else _env_int("WORLD_SIZE") or 1
    if rank is None:
        rank = dist.get_rank() if initialised else (_env_int("RANK") or 0)
    world_size, rank = _as_int(world_size, "world_size"), _as_int(rank, "rank")
    if world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    return rank, world_size


class LongTailSampler(Sampler[int]):
    """Base class: labels, epoch length, seed, sharding, ``set_epoch`` and the class table (dataset
    indices grouped by class, in CSR form, empty classes left out)."""

    def __init__(self, labels, *, num_samples: int | None = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, device="cpu"):
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence of class indices, got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
            raise TypeError(f"labels must hold integers, got {labels.dtype}")
        labels = labels.to(device="cpu", dtype=torch.int64)
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be non-negative class indices, got {int(labels.min())}")
        self.rank, self.world_size = _distributed_rank_and_size(rank, world_size)
        if num_samples is None:
            num_samples = labels.numel()
        num_samples = _as_int(num_samples, "num_samples")
        if num_samples < self.world_size:
            raise ValueError(f"num_samples must be an int >= world_size ({self.world_size}), got {num_samples!r}")
        seed = _as_int(seed, "seed")
        self.labels = labels
        self.num_samples = num_samples
        self.shard_length = num_samples // self.world_size
        self.epoch_length = self.shard_length * self.world_size
        self.seed = seed
        self.epoch = 0
        self.device = torch.device(device)
        # unique, not bincount: a label of 10**9 made a 10**9-entry table (35 s, 17 GB).
        present_classes, present_counts = torch.unique(labels, sorted=True, return_counts=True)
        self.present_classes = present_classes
        self._present_class_counts = present_counts
        order = torch.argsort(labels, stable=True)
        offsets = torch.zeros(present_classes.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(present_counts, 0)
        self._members = order.to(self.device)
        self._class_offsets = offsets.to(self.device)

    @property
    def class_counts(self) -> torch.Tensor:
        """Images per class for all classes up to the largest label, zeros included (built on use)."""
        counts = torch.zeros(int(self.present_classes[-1]) + 1, dtype=torch.int64)
        counts[self.present_classes] = self._present_class_counts
        return counts

    def set_epoch(self, epoch: int) -> None:
        try:
            epoch = _as_int(epoch, "epoch")
        except TypeError as error:
            raise ValueError(str(error)) from None
        if epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.shard_length

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, int64 on ``device``."""
        return self._draw(start=self.rank * self.shard_length, count=self.shard_length)

    def __iter__(self):
        return iter(self.indices().tolist())

    def _draw(self, start: int, count: int) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint sampler seed {state['seed']} differs from this sampler's seed {self.seed}")
        self.set_epoch(int(state["epoch"]))

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        return (f"{type(self).__name__}(num_samples={self.num_samples}, classes={self.present_classes.numel()}, "
                f"seed={self.seed}, rank={self.rank}/{self.world_size}, epoch={self.epoch}{', ' + extra if extra else ''})")


class InstanceSampler(LongTailSampler):
    """Instance-balanced sampling: every epoch a fresh shuffle of the dataset (each image once when
    num_samples <= len(labels); beyond that, further shuffles follow)."""

    def _draw(self, start, count):
        # One class holding every index: the class-aware draw reduces to a keyed permutation,
        # reshuffled every len(labels) positions. The key folds in the epoch, so each epoch starts
        # on a fresh permutation.
        epoch_seed = _signed64(_splitmix64((self.seed & _MASK64) ^ _splitmix64(self.epoch + 1)))
        everything = torch.tensor([0, self.labels.numel()], dtype=torch.int64, device=self.device)
        members = torch.arange(self.labels.numel(), device=self.device)
        return _class_aware_sample(everything, members, epoch_seed, 0, start, count, 1,
                                                   self.epoch_length)


class ClassBalancedSampler(LongTailSampler):
    """The survey's ClassAwareSampler (Main-codebase/data/ClassAwareSampler.py; cRT uses
    ``num_samples_cls=4``): classes are visited in cycles, each a fresh shuffle of the classes, and a
    visited class yields ``num_samples_cls`` consecutive images of its own cycle over its images,
    reshuffled at every wrap. As in the survey the cycles carry on across epochs and each epoch
    starts a new group; unlike it, the stream is a function of (seed, epoch), not of iterator
    state, and empty classes are skipped (the survey's sampler would fail on them)."""

    def __init__(self, labels, num_samples_cls: int = 4, **kwargs):
        super().__init__(labels, **kwargs)
        num_samples_cls = _as_int(num_samples_cls, "num_samples_cls")
        if num_samples_cls < 1:
            raise ValueError(f"num_samples_cls must be a positive int, got {num_samples_cls!r}")
        self.num_samples_cls = num_samples_cls

    def _draw(self, start, count):
        return _class_aware_sample(self._class_offsets, self._members, _signed64(self.seed & _MASK64),
                                                   self.epoch, start, count, self.num_samples_cls, self.epoch_length)

    def extra_repr(self):
        return f"num_samples_cls={self.num_samples_cls}"


class _WeightedClassSampler(LongTailSampler):
    """Picks a class with probability ``class_probabilities()``, then an image of it uniformly,
    with replacement (the survey's MixedPrioritizedSampler weights, without its sum tree)."""

    def class_probabilities(self) -> torch.Tensor:
        """float64 [number of present classes], summing to 1."""
        raise NotImplementedError

    def _draw(self, start, count):
        probabilities = self.class_probabilities()
        cdf = torch.cumsum(probabilities / probabilities.sum(), 0)
        cdf[-1] = 1.0
        cdf = cdf.clamp_(max=1.0).to(self.device)
        return _class_weighted_sample(cdf, self._class_offsets, self._members,
                                                      _signed64(self.seed & _MASK64), self.epoch, start, count,
                                                      self.epoch_length)

    def _present_counts(self) -> torch.Tensor:
        return self._present_class_counts.to(torch.float64)


class SquareRootSampler(_WeightedClassSampler):
    """Square-root sampling: P(class c) proportional to sqrt(n_c) (the survey's
    MixedPrioritizedSampler with ``nroot: 2``, ``lam: 1``, ``manual_only: true``)."""

    def class_probabilities(self):
        weights = self._present_counts().sqrt()
        return weights / weights.sum()


class ProgressivelyBalancedSampler(_WeightedClassSampler):
    """Progressively balanced sampling: P(class c) = (1 - t) n_c / N + t / C with t = epoch /
    (total_epochs - 1), moving linearly from instance-balanced (first epoch) to class-balanced
    (last epoch; t stays 1 after it) as the survey's progressive ("shift") recipe does."""

    def __init__(self, labels, total_epochs: int, **kwargs):
        super().__init__(labels, **kwargs)
        total_epochs = _as_int(total_epochs, "total_epochs")
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be a positive int, got {total_epochs!r}")
        self.total_epochs = total_epochs

    def balance(self) -> float:
        return 1.0 if self.total_epochs == 1 else min(self.epoch / (self.total_epochs - 1), 1.0)

    def class_probabilities(self):
        counts = self._present_counts()
        t = self.balance()
        return (1 - t) * counts / counts.sum() + t / counts.numel()

    def extra_repr(self):
        return f"total_epochs={self.total_epochs}"


class ReversedSampler(_WeightedClassSampler):
    """BBN's reversed sampler (Zhou et al. 2020, Megvii-Nanjing/BBN ``imbalance_cifar.py``
    ``get_weight`` / ``sample_class_index_by_weight``): P(class c) proportional to w_c = n_max / n_c,
    drawn by inverting the CDF of the weights, then an image of the class uniformly, with
    replacement. BBN feeds its re-balancing branch from it. Unlike BBN, empty classes are left out
    (BBN's ``max_num / 0`` fails on them)."""

    def class_probabilities(self):
        counts = self._present_counts()
        weights = counts.max() / counts
        return weights / weights.sum()


SAMPLERS = {"instance": InstanceSampler, "class_balanced": ClassBalancedSampler, "square_root": SquareRootSampler,
            "progressive": ProgressivelyBalancedSampler, "reversed": ReversedSampler}


def make_sampler(name: str, labels, **kwargs) -> LongTailSampler:
    """``name``: 'instance', 'class_balanced', 'square_root', 'progressive' or 'reversed'."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](labels, **kwargs)
