"""The augmentation both image loaders apply (ltfast.data.dali's DALI pipeline and
ltfast.data.pil's PIL baseline), as plain numpy: the random parameters of a batch and the
evaluation geometry. Keeping them here, computed once for both paths, is what makes the two
loaders crop, flip and jitter each image identically.

Training transform (the survey's ``data/dataloader.py``): RandomResizedCrop(``crop_size``,
scale (0.08, 1), ratio (3/4, 4/3)), horizontal flip with probability 1/2, colour jitter
(brightness, contrast, saturation factors uniform in [1 - j, 1 + j], ``color_jitter=0`` turns it
off as for iNaturalist), then x / 255 normalised by ``mean``/``std`` (given on the [0, 1] scale).
Evaluation: Resize(``resize_size``) of the shorter side, CentreCrop(``crop_size``).

Every random parameter is drawn in numpy from a generator keyed by (seed, epoch, rank, batch):
the crop box of torchvision's ``RandomResizedCrop.get_params`` (10 tries, then the centre-crop
fallback), the flip and the three jitter factors, a fixed number of draws per image whatever its
size (:func:`draw_train_randoms`), so that a per-image loader can take one row.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_TRIES = 10  # torchvision's RandomResizedCrop.get_params

def _batch_generator(seed: int, epoch: int, rank: int, batch: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed & (2**63 - 1), epoch, rank, batch])))


def draw_train_randoms(rng: np.random.Generator, batch: int) -> dict:
    """The uniform draws behind :func:`train_params` for ``batch`` images: a fixed number per
    image, whatever the image sizes, so that image k's parameters depend only on row k and its
    own size (a per-image loader can take one row)."""
    return {"area": rng.random((batch, _TRIES)), "log_ratio": rng.random((batch, _TRIES)),
            "top": rng.random(batch), "left": rng.random(batch), "flip": rng.random(batch),
            "jitter": rng.random((3, batch))}


def train_params(sizes: np.ndarray, randoms: dict, color_jitter: float = 0.4,
                 scale: Sequence[float] = _RRC_SCALE, ratio: Sequence[float] = _RRC_RATIO) -> dict:
    """Parameters of the training transform for images of ``sizes`` (int [B, 2], width and
    height) from ``randoms`` (:func:`draw_train_randoms`, B rows), vectorised over the batch.

    Returns int64 arrays ``top``, ``left``, ``height``, ``width`` (torchvision's
    ``RandomResizedCrop.get_params``: up to 10 tries of an area fraction uniform in ``scale`` and
    a log-uniform aspect ratio in ``ratio``, else the centre crop clamped to ``ratio``), bool
    ``flip`` and float32 ``brightness``, ``contrast``, ``saturation`` factors, uniform in
    [max(0, 1 - color_jitter), 1 + color_jitter] (1 where ``color_jitter`` is 0)."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    b = sizes.shape[0]
    rows = np.arange(b)
    W, H = sizes[:, 0:1], sizes[:, 1:2]
    area = (W * H) * (scale[0] + (scale[1] - scale[0]) * randoms["area"])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * randoms["log_ratio"])
    w = np.round(np.sqrt(area * aspect)).astype(np.int64)  # half to even, as Python's round()
    h = np.round(np.sqrt(area / aspect)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = np.argmax(ok, axis=1)
    found = ok[rows, first]
    w, h = w[rows, first], h[rows, first]
    W, H = sizes[:, 0], sizes[:, 1]
    top = np.minimum((randoms["top"] * (H - h + 1)).astype(np.int64), H - h)
    left = np.minimum((randoms["left"] * (W - w + 1)).astype(np.int64), W - w)
    # fallback: the centre crop, its aspect ratio clamped to `ratio`
    in_ratio = W / H
    fw = np.where(in_ratio > ratio[1], np.round(H * ratio[1]).astype(np.int64), W)
    fh = np.where(in_ratio < ratio[0], np.round(W / ratio[0]).astype(np.int64), H)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    top = np.where(found, top, (H - h) // 2)
    left = np.where(found, left, (W - w) // 2)
    lo = max(0.0, 1.0 - color_jitter)
    factors = (lo + (1.0 + color_jitter - lo) * randoms["jitter"]).astype(np.float32)
    if color_jitter == 0:
        factors[:] = 1.0
    return {"top": top, "left": left, "height": h, "width": w, "flip": randoms["flip"] < 0.5,
            "brightness": factors[0], "contrast": factors[1], "saturation": factors[2]}


def _row(randoms: dict, k: int) -> dict:
    return {key: (value[:, k:k + 1] if key == "jitter" else value[k:k + 1]) for key, value in randoms.items()}


def eval_geometry(sizes: np.ndarray, resize_size: int, crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's Resize(resize_size) (shorter side to ``resize_size``, the longer one
    ``int(resize_size * long / short)``) and CenterCrop(crop_size) offsets: (resized [B, 2] as
    width, height; crop top-left [B, 2] as x, y, ``int(round((size - crop) / 2))``)."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    short = sizes.min(axis=1)
    long_ = sizes.max(axis=1)
    new_long = (resize_size * long_ / short).astype(np.int64)
    resized = np.where(sizes[:, 0:1] <= sizes[:, 1:2], np.stack([np.full_like(short, resize_size), new_long], 1),
                       np.stack([new_long, np.full_like(short, resize_size)], 1))
    offsets = np.round((resized - crop_size) / 2.0).astype(np.int64)
    return resized, offsets
