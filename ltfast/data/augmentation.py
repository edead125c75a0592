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

Contrastive views (``view``, :data:`CONTRASTIVE_VIEWS`): PaCo's second view (the survey's
``PaCo-codebase/paco_lt.py``), torchvision's ``Compose`` as parameters:

- ``mocov2`` (``augmentation``, MoCo v2's): RandomResizedCrop(scale (0.2, 1)), ColorJitter(0.4, 0.4,
  0.4, 0.1) applied with probability 0.8, RandomGrayscale(0.2), GaussianBlur(sigma uniform in
  [0.1, 2]) with probability 0.5, horizontal flip.
- ``sim`` (``augmentation_sim``): RandomResizedCrop(scale (0.08, 1)), ColorJitter(0.4, 0.4, 0.4, 0)
  always, RandomGrayscale(0.2), the same blur, flip.

The jitter's brightness / contrast / saturation amplitude is the loader's ``color_jitter`` (0.4);
its four factors are applied in the fixed order brightness, contrast, saturation, hue, as the
standard view does. The view's extra draws (:func:`draw_view_randoms`) come from the batch's
generator AFTER the standard draws, so the crop and flip of image k are drawn the same way.
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



class ContrastiveView:
    """A second view's transform beyond crop and flip: the crop's ``scale``, the probability of the
    colour jitter and its ``hue`` amplitude (hue factor uniform in [-hue, hue], a fraction of the
    hue circle as torchvision's), the grayscale and blur probabilities and the blur's sigma range."""

    def __init__(self, name: str, scale: tuple, jitter_p: float, hue: float, grayscale_p: float, blur_p: float,
                 blur_sigma: tuple = (0.1, 2.0)) -> None:
        self.name, self.scale, self.jitter_p, self.hue = name, tuple(scale), jitter_p, hue
        self.grayscale_p, self.blur_p, self.blur_sigma = grayscale_p, blur_p, tuple(blur_sigma)

    def __repr__(self) -> str:
        return f"ContrastiveView({self.name!r})"


CONTRASTIVE_VIEWS = {
    "mocov2": ContrastiveView("mocov2", (0.2, 1.0), jitter_p=0.8, hue=0.1, grayscale_p=0.2, blur_p=0.5),
    "sim": ContrastiveView("sim", (0.08, 1.0), jitter_p=1.0, hue=0.0, grayscale_p=0.2, blur_p=0.5),
}
VIEWS = ("standard",) + tuple(CONTRASTIVE_VIEWS)


def contrastive_view(view: str):
    """None for "standard", else the :class:`ContrastiveView`; ValueError naming the choices."""
    if view == "standard":
        return None
    if view not in CONTRASTIVE_VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return CONTRASTIVE_VIEWS[view]


def draw_view_randoms(rng: np.random.Generator, batch: int) -> dict:
    """A contrastive view's draws for ``batch`` images, after :func:`draw_train_randoms`' (fixed count
    per image): whether the jitter applies, the hue factor, grayscale, blur and its sigma."""
    return {"jitter_apply": rng.random(batch), "hue": rng.random(batch), "grayscale": rng.random(batch),
            "blur_apply": rng.random(batch), "sigma": rng.random(batch)}


def view_params(randoms: dict, view: ContrastiveView, params: dict) -> dict:
    """``params`` (:func:`train_params` of the same rows) completed for ``view``: the brightness /
    contrast / saturation factors set to 1 where the jitter does not apply, float32 ``hue`` (0 there
    too), bool ``grayscale`` and float32 ``sigma`` (0 = no blur)."""
    apply = randoms["jitter_apply"] < view.jitter_p
    out = dict(params)
    for key in ("brightness", "contrast", "saturation"):
        out[key] = np.where(apply, params[key], np.float32(1.0)).astype(np.float32)
    hue = (-view.hue + 2.0 * view.hue * randoms["hue"]).astype(np.float32)
    out["hue"] = np.where(apply, hue, np.float32(0.0)).astype(np.float32)
    out["grayscale"] = randoms["grayscale"] < view.grayscale_p
    lo, hi = view.blur_sigma
    sigma = (lo + (hi - lo) * randoms["sigma"]).astype(np.float32)
    out["sigma"] = np.where(randoms["blur_apply"] < view.blur_p, sigma, np.float32(0.0)).astype(np.float32)
    return out


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


# RandAugment as PaCo's randaugment.py (Ross Wightman's, via timm) builds it for
# ``rand_augment_transform('rand-n2-m10-mstd0.5', ...)`` (paco_lt.py's ``augmentation_randncls``): N
# operations drawn uniformly WITH replacement from these 15, each applied with probability 0.5, its
# magnitude ~ N(m, mstd) clipped to [0, 10], signed ops negated with probability 0.5, the geometric
# ones resampled bilinear or bicubic with probability 1/2 each and filled with the ImageNet mean.
RAND_AUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeTpu", "Solarize", "SolarizeAdd", "Color",
                    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_AUGMENT_MAX_LEVEL = 10.0
RAND_AUGMENT_FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # paco_lt.py's ra_params img_mean


def parse_rand_augment(spec: str) -> tuple[int, int, float]:
    """(n, m, mstd) of a timm-style ``rand-n2-m10-mstd0.5`` string (defaults n 2, m 10, mstd 0, as
    ``rand_augment_transform``); ValueError naming the spec otherwise (weights ``w`` are not supported)."""
    import re
    parts = spec.split("-") if isinstance(spec, str) else []
    if not parts or parts[0] != "rand":
        raise ValueError(f"rand_augment must look like 'rand-n2-m10-mstd0.5', got {spec!r}")
    n, m, mstd = 2, 10, 0.0
    for part in parts[1:]:
        found = re.fullmatch(r"(mstd|m|n)(\d+(?:\.\d+)?)", part)
        if not found:
            raise ValueError(f"rand_augment: unknown section {part!r} in {spec!r} (n<int>, m<int>, mstd<float>)")
        key, value = found.groups()
        if key == "mstd":
            mstd = float(value)
        elif key == "m":
            m = int(float(value))
        else:
            n = int(float(value))
    return n, m, mstd


def draw_rand_augment_randoms(rng: np.random.Generator, batch: int, layers: int) -> dict:
    """RandAugment's draws for ``batch`` images and ``layers`` operations each: a fixed count per image
    (op choice, apply, a standard normal for the magnitude, sign, interpolation), all [batch, layers]."""
    return {"ra_op": rng.integers(0, len(RAND_AUGMENT_OPS), (batch, layers)), "ra_apply": rng.random((batch, layers)),
            "ra_normal": rng.standard_normal((batch, layers)), "ra_sign": rng.random((batch, layers)),
            "ra_bicubic": rng.random((batch, layers))}


def rand_augment_ops_of(randoms: dict, row: int, magnitude: float, magnitude_std: float) -> list:
    """The operations image ``row`` goes through, in order: [(name, level argument or None, bicubic)]
    (the level as randaugment.py's ``LEVEL_TO_ARG`` makes it; skipped operations left out)."""
    ops = []
    for k in range(randoms["ra_op"].shape[1]):
        if randoms["ra_apply"][row, k] > 0.5:  # AutoAugmentOp: `if random.random() > self.prob: return img`
            continue
        name = RAND_AUGMENT_OPS[int(randoms["ra_op"][row, k])]
        level = magnitude + magnitude_std * float(randoms["ra_normal"][row, k]) if magnitude_std > 0 else magnitude
        level = min(RAND_AUGMENT_MAX_LEVEL, max(0.0, level)) / RAND_AUGMENT_MAX_LEVEL
        sign = -1.0 if randoms["ra_sign"][row, k] > 0.5 else 1.0
        argument = {"Rotate": sign * level * 30.0, "ShearX": sign * level * 0.3, "ShearY": sign * level * 0.3,
                    "TranslateXRel": sign * level * 0.45, "TranslateYRel": sign * level * 0.45,
                    "PosterizeTpu": int(level * 4), "Solarize": int(level * 256), "SolarizeAdd": int(level * 110),
                    "Color": level * 1.8 + 0.1, "Contrast": level * 1.8 + 0.1, "Brightness": level * 1.8 + 0.1,
                    "Sharpness": level * 1.8 + 0.1}.get(name)
        ops.append((name, argument, bool(randoms["ra_bicubic"][row, k] > 0.5)))
    return ops
