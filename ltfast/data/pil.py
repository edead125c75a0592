"""The PIL/torchvision baseline of the DALI image loader (:class:`PilImageLoader`): the usual
torchvision set-up, a per-image ``Dataset`` (PIL decode, ``torchvision.transforms.functional``,
``to_tensor``, ``normalize``) in a ``torch.utils.data.DataLoader`` with ``num_workers`` worker
processes and the default collate, with the sampler, random parameters and transform of the DALI
path (ltfast/data/augmentation.py). PIL and torchvision are imported when a loader is built or an
item decoded, so that importing this module needs neither."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .augmentation import (_RRC_RATIO, _RRC_SCALE, IMAGENET_MEAN, IMAGENET_STD, RAND_AUGMENT_FILL, _batch_generator,
                           _row, draw_rand_augment_randoms, draw_train_randoms, draw_view_randoms, eval_geometry,
                           parse_rand_augment, rand_augment_ops_of, train_params, view_params)
from .image_loader import ImageDecodeError, _check_common, _LoaderBase, default_num_threads


class _PilDataset(torch.utils.data.Dataset):
    """The torchvision way: one item per image, ``(image [C, H, W] float, label)``, collated by
    the DataLoader. An item is addressed by (dataset index, epoch, batch, position in the batch),
    and its random parameters are row ``position`` of the batch's draw, as in the DALI path (the
    draw is cached per batch: a worker makes whole batches)."""

    def __init__(self, loader: "PilImageLoader"):
        self.paths = loader._paths
        self.labels = loader.labels.tolist()
        self.train = loader.train
        self.crop_size, self.resize_size = loader.crop_size, loader.resize_size
        self.mode = "RGB" if loader.channels == 3 else "L"
        self.mean, self.std = loader.mean, loader.std
        self.color_jitter, self.scale, self.ratio = loader.color_jitter, loader.scale, loader.ratio
        self.seed, self.rank, self.batch_size = loader.seed, loader.rank, loader.batch_size
        self.view = loader.view
        self.rand_augment = loader.rand_augment  # (n, m, mstd) or None
        self._cached = (None, None)

    def __len__(self):
        return len(self.paths)

    def _randoms(self, epoch: int, batch: int) -> dict:
        if self._cached[0] != (epoch, batch):
            rng = _batch_generator(self.seed, epoch, self.rank, batch)
            randoms = draw_train_randoms(rng, self.batch_size)
            if self.view is not None:  # after the standard draws: the crop and flip are drawn alike
                randoms.update(draw_view_randoms(rng, self.batch_size))
            if self.rand_augment is not None:
                randoms.update(draw_rand_augment_randoms(rng, self.batch_size, self.rand_augment[0]))
            self._cached = ((epoch, batch), randoms)
        return self._cached[1]

    def __getitem__(self, spec):
        import torchvision.transforms.functional as F
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        i, epoch, batch, k = spec
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
        except Exception as e:  # noqa: BLE001 - any failure names the file
            raise ImageDecodeError(path, f"{type(e).__name__}: {e}", i) from None
        if self.train:
            size = np.array([img.size], dtype=np.int64)
            randoms = self._randoms(epoch, batch)
            row = _row(randoms, k)
            p = train_params(size, row, self.color_jitter, self.scale, self.ratio)
            img = F.resized_crop(img, int(p["top"][0]), int(p["left"][0]), int(p["height"][0]), int(p["width"][0]),
                                 [self.crop_size, self.crop_size], InterpolationMode.BILINEAR, antialias=True)
            if self.view is not None:
                return self._contrastive_view(img, view_params(row, self.view, p), i)
            if p["flip"][0]:
                img = F.hflip(img)
            if self.color_jitter > 0:
                img = F.adjust_brightness(img, float(p["brightness"][0]))
                img = F.adjust_contrast(img, float(p["contrast"][0]))
                if self.mode == "RGB":
                    img = F.adjust_saturation(img, float(p["saturation"][0]))
            if self.rand_augment is not None:  # paco_lt.py's augmentation_randncls: after the jitter
                img = self._rand_augment(img, rand_augment_ops_of(randoms, k, *self.rand_augment[1:]))
        else:
            resized, _ = eval_geometry(np.array([img.size]), self.resize_size, self.crop_size)
            img = F.resize(img, [int(resized[0, 1]), int(resized[0, 0])], InterpolationMode.BILINEAR, antialias=True)
            img = F.center_crop(img, [self.crop_size, self.crop_size])
        return F.normalize(F.to_tensor(img), self.mean, self.std), self.labels[i]

    def _rand_augment(self, img, ops: list):
        """RandAugment's operations (augmentation.py's ``rand_augment_ops_of``) with PaCo's randaugment.py
        PIL calls: ImageOps, ImageEnhance and affine transforms filled with the ImageNet mean."""
        from PIL import Image, ImageEnhance, ImageOps
        fill = RAND_AUGMENT_FILL if img.mode == "RGB" else round(sum(RAND_AUGMENT_FILL) / 3)
        for name, argument, bicubic in ops:
            geometry = dict(resample=Image.BICUBIC if bicubic else Image.BILINEAR, fillcolor=fill)
            if name == "AutoContrast":
                img = ImageOps.autocontrast(img)
            elif name == "Equalize":
                img = ImageOps.equalize(img)
            elif name == "Invert":
                img = ImageOps.invert(img)
            elif name == "Rotate":
                img = img.rotate(argument, **geometry)
            elif name == "PosterizeTpu":
                img = img if argument >= 8 else ImageOps.posterize(img, argument)
            elif name == "Solarize":
                img = ImageOps.solarize(img, argument)
            elif name == "SolarizeAdd":
                lut = [min(255, i + argument) if i < 128 else i for i in range(256)]
                img = img.point(lut * (3 if img.mode == "RGB" else 1))
            elif name in ("Color", "Contrast", "Brightness", "Sharpness"):
                img = getattr(ImageEnhance, name)(img).enhance(argument)
            else:
                w, h = img.size
                matrix = {"ShearX": (1, argument, 0, 0, 1, 0), "ShearY": (1, 0, 0, argument, 1, 0),
                          "TranslateXRel": (1, 0, argument * w, 0, 1, 0),
                          "TranslateYRel": (1, 0, 0, 0, 1, argument * h)}[name]
                img = img.transform(img.size, Image.AFFINE, matrix, **geometry)
        return img

    def _contrastive_view(self, img, p: dict, i: int):
        """A contrastive view after the crop (augmentation.py's ``CONTRASTIVE_VIEWS``, paco_lt.py's
        Compose order): jitter (brightness, contrast, saturation, hue), grayscale, Gaussian blur (PIL's
        ``GaussianBlur(radius=sigma)``, MoCo's ``moco.loader.GaussianBlur``), flip."""
        import torchvision.transforms.functional as F
        from PIL import ImageFilter
        if self.color_jitter > 0:
            img = F.adjust_brightness(img, float(p["brightness"][0]))
            img = F.adjust_contrast(img, float(p["contrast"][0]))
            if self.mode == "RGB":
                img = F.adjust_saturation(img, float(p["saturation"][0]))
        if self.mode == "RGB" and p["hue"][0] != 0:
            img = F.adjust_hue(img, float(p["hue"][0]))
        if self.mode == "RGB" and p["grayscale"][0]:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        if p["sigma"][0] > 0:
            img = img.filter(ImageFilter.GaussianBlur(radius=float(p["sigma"][0])))
        if p["flip"][0]:
            img = F.hflip(img)
        return F.normalize(F.to_tensor(img), self.mean, self.std), self.labels[i]


class _SpecSampler:
    """Yields (index, epoch, batch, position) for every image of the loader's epoch plan."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        epoch = self.loader.epoch
        for batch, indices in self.loader._batches():
            for k, i in enumerate(indices.tolist()):
                yield i, epoch, batch, k

    def __len__(self):
        return min(self.loader._num_indices(), len(self.loader) * self.loader.batch_size)


class PilImageLoader(_LoaderBase):
    """The PIL/torchvision baseline of :class:`DaliImageLoader`: same arguments, same sampler,
    same random parameters and transform, decoded with PIL and transformed with
    ``torchvision.transforms.functional`` in a ``torch.utils.data.DataLoader`` with
    ``num_workers`` processes (default: the cores this process may use; 0 = in the main process).
    Each worker produces whole batches. ``num_threads`` is accepted as an alias of
    ``num_workers`` so that both loaders take the same keyword arguments. ``view``: "standard" or a
    contrastive view (augmentation.py's ``CONTRASTIVE_VIEWS``, PaCo's second view), as the DALI
    loader. ``rand_augment`` (the reference of the DALI loader's; also ``set_rand_augment`` before the first epoch): RandAugment
    after the standard view's jitter, e.g. "rand-n2-m10-mstd0.5" (PaCo's randcls view)."""

    def __init__(self, dataset, sampler=None, batch_size: int = 256, device="cpu", train: bool = True,
                 crop_size: int = 224, resize_size: int = 256, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, color_jitter: float = 0.4, num_threads: int | None = None,
                 dtype: torch.dtype = torch.float32, drop_last: bool | None = None, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, num_workers: int | None = None,
                 prefetch: int = 2, persistent_workers: bool = True, scale: Sequence[float] = _RRC_SCALE,
                 ratio: Sequence[float] = _RRC_RATIO, decoder_device: str | None = None, view: str = "standard",
                 rand_augment: str | None = None):
        _check_common(dataset, sampler, batch_size, train, crop_size, resize_size, mean, std, color_jitter,
                      num_threads, dtype, "num_threads", seed, scale, ratio)
        if num_workers is None:
            num_workers = num_threads if num_threads is not None else default_num_threads()
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a positive int, got {prefetch!r}")
        if decoder_device not in (None, "cpu"):
            raise ValueError(f"decoder_device must be 'cpu' or None for the PIL loader, got {decoder_device!r}")
        super().__init__(dataset, sampler, batch_size, device, train, crop_size, resize_size, mean, std,
                         color_jitter, dtype, drop_last, seed, rank, world_size, scale, ratio, view)
        self.rand_augment = None
        if rand_augment is not None:
            self._check_rand_augment(rand_augment)
            self.rand_augment = parse_rand_augment(rand_augment)
        self.num_workers = num_workers
        import torchvision.transforms.functional  # noqa: F401  (here, so that forked workers inherit it)
        # drop_last=False: the epoch plan has already dropped (or kept) the last partial batch.
        self._loader = torch.utils.data.DataLoader(
            _PilDataset(self), sampler=_SpecSampler(self), batch_size=batch_size, drop_last=False,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=prefetch if num_workers else None,
            persistent_workers=persistent_workers and num_workers > 0)

    def _check_rand_augment(self, spec) -> None:
        if not self.train:
            raise ValueError("rand_augment is a training transform; evaluation (train=False) has none")
        if self.view is not None:
            raise ValueError(f"rand_augment: not with a contrastive view (view={self.view.name!r}); PaCo adds it to "
                             f"the standard view (augmentation_randncls)")
        parse_rand_augment(spec)

    def set_rand_augment(self, spec: str) -> None:
        """Adds RandAugment (``spec`` as 'rand-n2-m10-mstd0.5') after the standard view's jitter, before
        the first iteration (the workers start with the first epoch and keep their copy)."""
        self._check_rand_augment(spec)
        if getattr(self._loader, "_iterator", None) is not None:
            raise RuntimeError("set_rand_augment: the loader has already been iterated; set it before the first epoch")
        self.rand_augment = parse_rand_augment(spec)
        self._loader.dataset.rand_augment = self.rand_augment

    def __iter__(self):
        for images, labels in self._loader:
            if self.device.type == "cuda":
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield (images if self.dtype == torch.float32 else images.to(self.dtype)), labels
