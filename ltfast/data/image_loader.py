"""What the two image loaders (ltfast.data.dali, ltfast.data.pil) share besides the augmentation:
the error that names an undecodable file, the argument checks, and the epoch plan (indices from
the sampler, batching, ``set_epoch``, ``len``)."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from .augmentation import _RRC_RATIO, _RRC_SCALE, contrastive_view


class ImageDecodeError(RuntimeError):
    """An image file of a dataset could not be read or decoded; ``path`` names it."""

    def __init__(self, path: str, reason: str | None = None, index: int | None = None):
        if reason is None:
            # Re-raised from a DataLoader worker, which rebuilds an exception from its message alone
            # (it raised a RuntimeError instead when that failed): recover the path from the message.
            import re
            found = re.search(r"cannot decode image file '((?:[^'\\]|\\.)*)'(?: \(dataset index (\d+)\))?", path)
            self.path = found.group(1) if found else None
            self.index = int(found.group(2)) if found and found.group(2) else None
            super().__init__(path)
            return
        self.path = path
        self.index = index
        where = f" (dataset index {index})" if index is not None else ""
        super().__init__(f"cannot decode image file {path!r}{where}: {reason}")



def _check_common(dataset, sampler, batch_size, train, crop_size, resize_size, mean, std, color_jitter,
                  num_threads, dtype, name, seed=0, scale=_RRC_SCALE, ratio=_RRC_RATIO):
    from .datasets import ListDataset
    if not isinstance(dataset, ListDataset):
        raise TypeError(f"dataset must be an ltfast.data.ListDataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if train and sampler is None:
        raise ValueError("sampler is required when train=True (e.g. ltfast.data.InstanceSampler(dataset.labels))")
    if sampler is not None and not hasattr(sampler, "__iter__"):
        raise TypeError(f"sampler must be an iterable of dataset indices, got {type(sampler).__name__}")
    for arg, value in (("crop_size", crop_size), ("resize_size", resize_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if len(mean) not in (1, 3) or len(std) != len(mean):
        raise ValueError(f"mean and std must both have 1 (grey) or 3 (RGB) entries, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    if not (isinstance(color_jitter, (int, float)) and 0 <= color_jitter):
        raise ValueError(f"color_jitter must be a non-negative number, got {color_jitter!r}")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"{name} must be a positive int or None, got {num_threads!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(scale)}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must be (lo, hi) with 0 < lo <= hi, got {tuple(ratio)}")


def default_num_threads() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1



class _LoaderBase:
    """Epoch plan shared by both loaders: indices from the sampler (or rank::world_size in order
    for evaluation without one), batching, ``set_epoch`` and ``len``."""

    def __init__(self, dataset, sampler, batch_size, device, train, crop_size, resize_size, mean, std,
                 color_jitter, dtype, drop_last, seed, rank, world_size, scale, ratio, view="standard"):
        from .samplers import _distributed_rank_and_size
        # a contrastive view (PaCo's second view) brings its own crop scale and colour / grey / blur steps
        self.view = contrastive_view(view)
        if self.view is not None:
            if not train:
                raise ValueError(f"view={view!r} is a training transform; evaluation (train=False) has none")
            if tuple(scale) != _RRC_SCALE:
                raise ValueError(f"scale: view={view!r} sets the crop scale {self.view.scale}; leave scale at its "
                                 f"default, got {tuple(scale)}")
            scale = self.view.scale
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = train
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.channels = len(self.mean)
        self.color_jitter = float(color_jitter)
        self.dtype = dtype
        self.drop_last = train if drop_last is None else bool(drop_last)
        self.seed = seed
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        if rank is None and world_size is None and sampler is not None and hasattr(sampler, "rank"):
            rank, world_size = sampler.rank, getattr(sampler, "world_size", 1)
        self.rank, self.world_size = _distributed_rank_and_size(rank, world_size)
        self.epoch = 0
        self.labels = dataset.labels.to(torch.int64).cpu()
        self._paths = [dataset.full_path(i) for i in range(len(dataset))]

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _num_indices(self) -> int:
        if self.sampler is not None:
            return len(self.sampler)
        return len(range(self.rank, len(self.dataset), self.world_size))

    def __len__(self) -> int:
        n = self._num_indices()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _epoch_indices(self) -> np.ndarray:
        if self.sampler is None:
            indices = np.arange(self.rank, len(self.dataset), self.world_size, dtype=np.int64)
        elif hasattr(self.sampler, "indices"):
            indices = self.sampler.indices().cpu().numpy().astype(np.int64, copy=False)
        else:
            indices = np.fromiter((int(i) for i in self.sampler), dtype=np.int64)
        bad = indices[(indices < 0) | (indices >= len(self.dataset))]
        if bad.size:
            raise IndexError(f"sampler yielded index {int(bad[0])} outside the dataset of {len(self.dataset)} images")
        return indices

    def _batches(self):
        indices = self._epoch_indices()
        for b in range(len(self)):
            chunk = indices[b * self.batch_size:(b + 1) * self.batch_size]
            if chunk.size:
                yield b, chunk
