"""A device-resident loader for small in-memory datasets (Fashion-MNIST-LT, CIFAR-LT sized).

The whole set lives on the training device, zero-padded and already normalised in the output
dtype (Fashion-MNIST-LT: 2478 x 36 x 36 float32, 12.8 MB); each batch is drawn by the sampler op
and cropped, flipped and gathered there by one indexing op, with no worker processes and no host
round trip. Normalising once up front rather than per batch is exact (the per-pixel map is the
same) and leaves one large op per batch: on a busy 2-core machine each extra parallel op cost
~8 ms of thread wake-up, more than the op itself.

    loader = DeviceTensorLoader(fmnist["train"], ClassBalancedSampler(labels), batch_size=128,
                                device="cuda", train=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader: ...
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .datasets import InMemoryDataset
from .samplers import _distributed_rank_and_size, _splitmix64

FASHION_MNIST_MEAN = (0.2860,)  # over the 60k training images
FASHION_MNIST_STD = (0.3530,)


class DeviceTensorLoader:
    """Batches ``(images, labels)`` of an :class:`InMemoryDataset` on ``device``.

    Training (``train=True``): the sampler's indices for this epoch and rank, in batches of
    ``batch_size`` (per rank; the last partial batch is dropped unless ``drop_last=False``), each
    image randomly cropped back to its size from a ``pad``-pixel zero padding (torchvision's
    ``RandomCrop(size, padding=pad)``), flipped horizontally with probability 1/2 when ``flip``,
    then scaled to [0, 1] and normalised by ``mean``/``std`` (zero padding becomes -mean/std, as
    in torchvision, where the crop comes before ``Normalize``). The augmentation draws come from a
    generator seeded by (seed, epoch, rank), so an epoch is reproducible on its own.

    Evaluation (``train=False``): no augmentation, the dataset in order, sharded ``rank::world_size``
    over the DDP ranks so that all-reduced per-class counts cover every image exactly once; the last
    partial batch is kept. ``sampler`` may be None.
    """

    def __init__(self, dataset: InMemoryDataset, sampler=None, batch_size: int = 128, device="cpu",
                 train: bool = True, mean: Sequence[float] = FASHION_MNIST_MEAN,
                 std: Sequence[float] = FASHION_MNIST_STD, pad: int = 4, flip: bool = True,
                 dtype: torch.dtype = torch.float32, drop_last: bool | None = None, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        if not isinstance(dataset, InMemoryDataset):
            raise TypeError(f"dataset must be an ltfast.data.InMemoryDataset, got {type(dataset).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if train and sampler is None:
            raise ValueError("sampler is required when train=True (e.g. ltfast.data.InstanceSampler(labels))")
        if not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be a non-negative int, got {pad!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        channels = dataset.images.shape[1]
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() not in (1, channels) or std.numel() not in (1, channels):
            raise ValueError(f"mean and std must have 1 or {channels} (channel) entries, got {mean.numel()} and {std.numel()}")
        if bool((std <= 0).any()):
            raise ValueError(f"std must be positive, got {std.tolist()}")
        self.device = torch.device(device)
        self.train = train
        self.sampler = sampler
        self.batch_size = batch_size
        self.dtype = dtype
        self.flip = flip
        self.pad = pad if train else 0
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = _distributed_rank_and_size(rank, world_size)
        self.epoch = 0
        self.image_size = tuple(dataset.images.shape[2:])
        images = dataset.images.to(self.device)
        if self.pad:  # zero padding of the raw image, as RandomCrop(padding=pad) before Normalize
            images = torch.nn.functional.pad(images, (self.pad,) * 4)
        scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(self.device)
        shift = (-mean / std).view(1, -1, 1, 1).to(self.device)
        # (x / 255 - mean) / std in float32, stored in the output dtype
        self.images = (images.to(torch.float32) * scale + shift).to(dtype).contiguous()
        self.labels = dataset.labels.to(self.device)
        self._rows = torch.arange(self.image_size[0], device=self.device)
        self._cols = torch.arange(self.image_size[1], device=self.device)
        self._channels = torch.arange(channels, device=self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _epoch_indices(self) -> torch.Tensor:
        if self.train:
            indices = self.sampler.indices() if hasattr(self.sampler, "indices") else torch.tensor(list(self.sampler))
            return indices.to(self.device)
        return torch.arange(self.rank, self.labels.numel(), self.world_size, device=self.device)

    def __len__(self) -> int:
        n = len(self.sampler) if self.train else len(range(self.rank, self.labels.numel(), self.world_size))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _augment(self, batch_indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One gather: crop offsets and flips become row/column index grids into the padded set."""
        b = batch_indices.numel()
        height, width = self.image_size
        span = 2 * self.pad + 1
        top = torch.randint(0, span, (b, 1), device=self.device, generator=generator)
        left = torch.randint(0, span, (b, 1), device=self.device, generator=generator)
        rows = top + self._rows  # [B, H]
        cols = left + self._cols  # [B, W]
        if self.flip:
            flipped = torch.rand((b, 1), device=self.device, generator=generator) < 0.5
            cols = torch.where(flipped, left + (width - 1 - self._cols), cols)
        return self.images[batch_indices[:, None, None, None], self._channels[None, :, None, None],
                           rows[:, None, :, None], cols[:, None, None, :]]

    def __iter__(self):
        indices = self._epoch_indices()
        generator = None
        if self.train:
            generator = torch.Generator(device=self.device)
            key = _splitmix64(_splitmix64((self.seed & (2**64 - 1)) ^ _splitmix64(self.epoch)) ^ self.rank)
            generator.manual_seed(key & (2**63 - 1))
        for batch in range(len(self)):
            batch_indices = indices[batch * self.batch_size:(batch + 1) * self.batch_size]
            if self.train:
                images = self._augment(batch_indices, generator)
            else:
                images = self.images[batch_indices]
            yield images, self.labels[batch_indices]
