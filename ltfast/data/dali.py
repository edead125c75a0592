"""Image batches from JPEG list files: a DALI pipeline driven by an ltfast sampler
(:class:`DaliImageLoader`), and :func:`make_image_loader`, which builds it or its baseline, the
PIL/torchvision DataLoader with the same sampler and augmentation (:class:`PilImageLoader`,
ltfast/data/pil.py).

    train = read_list_file("ImageNet_LT_train.txt", root="/data/ImageNet")
    loader = make_image_loader("dali", dataset=train, sampler=ClassBalancedSampler(train.labels),
                               batch_size=256, device="cuda", train=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader: ...        # float [256, 3, 224, 224] and int64 [256], on device

The transform and its random parameters are ltfast/data/augmentation.py's, shared with the PIL
path, so both crop, flip and jitter each image identically, and their batches agree to about
1/255 on average (the decoders' IDCT and the resamplers' rounding differ). The jitter is
torchvision's (brightness; contrast around the mean grey; saturation as a blend with grey) in the
fixed order brightness, contrast, saturation in both paths, where torchvision's ``ColorJitter``
shuffles the order per image. An epoch's batches are a pure function of (dataset, sampler state,
seed, epoch, rank); ``set_epoch`` moves both the sampler and the augmentation to the next epoch.

DALI path (``DaliImageLoader``): the main thread reads each batch's encoded files (plain reads,
~0.1 ms per ImageNet-sized JPEG against ~2.5 ms of decoding and augmentation) and their JPEG
headers (the size, cached), draws the parameters and feeds them through ``fn.external_source``;
DALI's ``num_threads`` threads decode only the crop window (``fn.decoders.image_slice``: ROI
decoding), resize, jitter, flip and normalise into CHW float (the clamp after the saturation
step is one ``clamp_`` on the normalised batch in torch). ``prefetch`` batches are in flight,
so the reads of batch k+1 overlap the decoding of batch k. Decoding runs on ``"mixed"`` (nvJPEG,
and the hardware JPEG decoder where the card has one) when ``device`` is CUDA, on ``"cpu"``
otherwise. Parallel (process-based) external_source is not used: it would only move the cheap
file reads into extra processes that compete with the decoder threads for the same cores. On CPU
the batch reaches torch without a copy (DLPack over DALI's output buffer).

A file that cannot be read or decoded raises :class:`ImageDecodeError` naming the file: headers
are checked when read, and when DALI's decoder fails the files of the batches in flight are
re-decoded with PIL to find the culprit (DALI's message gives only the position in the batch).
Damage inside the entropy-coded data that libjpeg-turbo decodes past (it warns "Corrupt JPEG
data" and returns a garbled image) is not an error on the DALI path; PIL raises on it.

Contrastive views (``view="mocov2"`` / ``"sim"``, PaCo's second view; augmentation.py): after the
brightness / contrast step, one ``color_twist`` (saturation, hue), a clamp, grey for the images drawn
grey, and ``gaussian_blur`` with each image's sigma; the PIL path is the reference (DALI's hue is a
YIQ rotation, torchvision's an HSV shift).

RandAugment (``rand_augment="rand-n2-m10-mstd0.5"`` or ``set_rand_augment``, PaCo's randcls view, after
the standard view's jitter): the PIL path's per-image draws (augmentation.py's ``rand_augment_ops_of``)
become per-sample parameters (:func:`rand_augment_inputs`) of one graph per layer in which every sample
goes through every stage and all but its drawn operation are the exact identity
(``DaliImageLoader._rand_augment_layer``). Measured against the PIL path on photos, every operation but
Equalize stays within 5 grey levels per image (Solarize 8: its threshold amplifies 1-level input
differences); geometric ops drawn bicubic are resampled bilinear (DALI's warp_affine has no cubic mode);
Equalize is OpenCV's, not PIL's (2.4 levels mean on the same input, up to 29 through the whole loaders):
the one operation of PaCo's randcls_sim view that is a different algorithm here, as the hue jitter is.

The names this module has always exported (the augmentation functions, the PIL loader, the shared
error) stay importable from it.
"""
from __future__ import annotations

import io
import math
from collections import deque
from typing import Sequence

import numpy as np
import torch

from .augmentation import (_RRC_RATIO, _RRC_SCALE, IMAGENET_MEAN, IMAGENET_STD, RAND_AUGMENT_FILL, _batch_generator,
                           draw_rand_augment_randoms, draw_train_randoms, draw_view_randoms, eval_geometry,
                           parse_rand_augment, rand_augment_ops_of, train_params, view_params)
from .image_loader import ImageDecodeError, _check_common, _LoaderBase, default_num_threads
from .pil import PilImageLoader

# PIL's names of the formats DALI's image decoders read (nvImageCodec: JPEG, JPEG 2000, PNG, TIFF,
# BMP, PNM, WebP; MPO is a JPEG with extra frames). A GIF used to fail as "nvImageCodec failure: '#4'".
DALI_FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "BMP", "PPM", "JPEG2000", "WEBP")


def _jpeg_size(data: np.ndarray, path: str, index: int) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(memoryview(data))) as im:
            size, kind = im.size, im.format
    except Image.DecompressionBombError as e:
        # PIL refuses images above 2 * MAX_IMAGE_PIXELS (2 x 89.5 Mpx) when opening the header.
        raise ImageDecodeError(path, f"{e} (PIL's decompression-bomb guard, PIL.Image.MAX_IMAGE_PIXELS = "
                               f"{Image.MAX_IMAGE_PIXELS}; raise it if you trust the file)", index) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(path, f"not a readable image ({type(e).__name__}: {e})", index) from None
    if kind not in DALI_FORMATS:
        raise ImageDecodeError(path, f"{kind} images are not decoded by DALI (it reads "
                               f"{', '.join(DALI_FORMATS)}); convert the file or use data.backend=pil", index)
    return size


def find_undecodable(paths: Sequence[str], indices: Sequence[int] | None = None):
    """The first of ``paths`` that PIL cannot fully decode, as (path, index, reason); None if all decode."""
    from PIL import Image
    for k, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - any failure names the file
            return path, (None if indices is None else int(indices[k])), f"{type(e).__name__}: {e}"
    return None


def _pil_affine_matrix(name: str, argument: float, width: int, height: int) -> np.ndarray:
    """The output-to-input affine matrix [2, 3] PIL applies for a RandAugment geometric operation (the PIL
    path's ``_rand_augment``; ``Image.rotate``'s own for Rotate, about the centre (w / 2, h / 2))."""
    if name == "Rotate":
        angle = -math.radians(argument % 360.0)
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        cx, cy = width / 2.0, height / 2.0
        return np.array([[a, b, a * -cx + b * -cy + cx], [-b, a, -b * -cx + a * -cy + cy]])
    return np.array({"ShearX": [[1, argument, 0], [0, 1, 0]], "ShearY": [[1, 0, 0], [argument, 1, 0]],
                     "TranslateXRel": [[1, 0, argument * width], [0, 1, 0]],
                     "TranslateYRel": [[1, 0, 0], [0, 1, argument * height]]}[name], dtype=np.float64)


# the per-sample parameter vector of DaliImageLoader._rand_augment_layer, identity values
_RA_IDENTITY = np.array([1.0, 256.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=np.float32)
_RA_DEGENERATE = {"Color": 3, "Contrast": 4, "Sharpness": 5, "Brightness": None}


def rand_augment_inputs(randoms: dict, rows: int, layers: int, magnitude: float, magnitude_std: float,
                        size: int) -> tuple[np.ndarray, np.ndarray]:
    """The DALI RandAugment inputs of the first ``rows`` images (square crops of ``size``) from the draws
    the PIL path takes (augmentation.py's ``rand_augment_ops_of``): float32 parameters [layers, rows, 10]
    (posterize step, solarize threshold, solarize add, the blend's degenerate weights grey / mean grey /
    smooth / self, the blend factor, autocontrast, equalize) and affine matrices [layers, rows, 2, 3].
    A layer whose operation is skipped keeps the identity (it is the layer-th draw whether applied or not)."""
    params = np.tile(_RA_IDENTITY, (layers, rows, 1))
    matrices = np.tile(np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32), (layers, rows, 1, 1))
    for row in range(rows):
        for layer, (name, argument, _bicubic) in _ops_by_layer(randoms, row, layers, magnitude, magnitude_std):
            p = params[layer, row]
            if name == "PosterizeTpu":
                p[0] = 2.0 ** (8 - argument) if argument < 8 else 1.0
            elif name == "Solarize":
                p[1] = argument
            elif name == "Invert":
                p[1] = 0.0
            elif name == "SolarizeAdd":
                p[2] = argument
            elif name in _RA_DEGENERATE:
                p[6] = 0.0
                if _RA_DEGENERATE[name] is not None:
                    p[_RA_DEGENERATE[name]] = 1.0
                p[7] = argument
            elif name == "AutoContrast":
                p[8] = 1.0
            elif name == "Equalize":
                p[9] = 1.0
            else:
                matrices[layer, row] = _pil_affine_matrix(name, argument, size, size)
    return params, matrices


def _ops_by_layer(randoms: dict, row: int, layers: int, magnitude: float, magnitude_std: float) -> list:
    """[(layer, (name, argument, bicubic))] of image ``row``: ``rand_augment_ops_of`` with each applied
    operation's layer (it leaves the skipped ones out)."""
    applied = [k for k in range(layers) if not randoms["ra_apply"][row, k] > 0.5]
    return list(zip(applied, rand_augment_ops_of(randoms, row, magnitude, magnitude_std)))


class DaliImageLoader(_LoaderBase):
    """Batches ``(images, labels)`` of a :class:`ListDataset` decoded and augmented by DALI.

    ``images``: ``dtype`` [B, C, crop_size, crop_size] on ``device`` (C = ``len(mean)``: 3 decodes
    RGB, 1 decodes grey), labels int64 [B] on ``device``. Training draws the sampler's indices for
    the epoch (``set_epoch``; DDP sharding is the sampler's), drops the last partial batch unless
    ``drop_last=False``; evaluation (``train=False``) keeps it and, without a sampler, goes through
    the dataset in order (rank::world_size under DDP). ``num_threads``: DALI CPU threads (default:
    the cores this process may use). ``decoder_device``: "mixed" (default when ``device`` is CUDA)
    or "cpu". ``prefetch``: batches in flight. ``rand_augment``: as the PIL loader's (also
    ``set_rand_augment`` between epochs). See the module docstring for the transform.
    """

    def __init__(self, dataset, sampler=None, batch_size: int = 256, device="cpu", train: bool = True,
                 crop_size: int = 224, resize_size: int = 256, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, color_jitter: float = 0.4, num_threads: int | None = None,
                 dtype: torch.dtype = torch.float32, drop_last: bool | None = None, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, decoder_device: str | None = None,
                 prefetch: int = 2, scale: Sequence[float] = _RRC_SCALE, ratio: Sequence[float] = _RRC_RATIO,
                 view: str = "standard", rand_augment: str | None = None):
        _check_common(dataset, sampler, batch_size, train, crop_size, resize_size, mean, std, color_jitter,
                      num_threads, dtype, "num_threads", seed, scale, ratio)
        super().__init__(dataset, sampler, batch_size, device, train, crop_size, resize_size, mean, std,
                         color_jitter, dtype, drop_last, seed, rank, world_size, scale, ratio, view)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available")
        if decoder_device is None:
            decoder_device = "mixed" if self.device.type == "cuda" else "cpu"
        if decoder_device not in ("cpu", "mixed"):
            raise ValueError(f"decoder_device must be 'cpu' or 'mixed', got {decoder_device!r}")
        if decoder_device == "mixed" and self.device.type != "cuda":
            raise ValueError("decoder_device='mixed' needs a CUDA device")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a positive int, got {prefetch!r}")
        self.decoder_device = decoder_device
        self.num_threads = num_threads or default_num_threads()
        self.prefetch = prefetch
        self._sizes = np.full((len(dataset), 2), -1, dtype=np.int64)  # (width, height), read lazily
        self._pipe = None
        self._depth = 1
        self._primed = False
        self._zero_copy = False
        self._clamp = None
        self._cast_in_dali = False  # clamp the saturation step in DALI (slower here) or in torch
        self._arithmetic_jitter = False  # the GPU formulation of the jitter, testable on the CPU
        self._in_flight = deque()
        self._generation = 0
        self.rand_augment = None  # (n, m, mstd) or None
        if rand_augment is not None:
            self._check_rand_augment(rand_augment)
            self.rand_augment = parse_rand_augment(rand_augment)

    _check_rand_augment = PilImageLoader._check_rand_augment

    def set_rand_augment(self, spec: str) -> None:
        """Adds RandAugment (``spec`` as 'rand-n2-m10-mstd0.5') after the standard view's jitter, as the PIL
        loader's ``set_rand_augment``; between epochs (the pipeline is rebuilt for the next one)."""
        self._check_rand_augment(spec)
        if self._in_flight:
            raise RuntimeError("set_rand_augment: batches are in flight; set it between epochs")
        self.rand_augment = parse_rand_augment(spec)
        self._pipe = None

    # -------------------------------------------------------------- pipeline
    def _build(self):
        from nvidia.dali import Pipeline, fn, types  # lazily: `import ltfast.data` must not need DALI
        from nvidia.dali import math as dmath

        device_id = None
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        # An epoch shorter than the prefetch queue must still fill it on the first run.
        self._depth = max(1, min(self.prefetch, len(self)))
        self._primed = False
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
                        prefetch_queue_depth=self._depth, seed=self.seed & (2**31 - 1))
        output_type = types.RGB if self.channels == 3 else types.GRAY
        scale = [255.0 * m for m in self.mean], [255.0 * s for s in self.std]
        clamp = False
        with pipe:
            if self.train and self.rand_augment is not None:
                self._rand_augment_constants(fn, types)
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            if self.train:
                anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
                shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
                flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
                images = fn.decoders.image_slice(jpegs, anchor, shape, device=self.decoder_device,
                                                 output_type=output_type, normalized_anchor=False,
                                                 normalized_shape=False, axis_names="WH",
                                                 adjust_orientation=False)
                images = fn.resize(images, resize_x=float(self.crop_size), resize_y=float(self.crop_size),
                                   interp_type=types.INTERP_LINEAR, antialias=True)
                if self.color_jitter > 0:
                    # torchvision's jitter: brightness b, then contrast c around the mean grey of
                    # the brightened image (= b x the image's mean grey), then saturation s (a
                    # blend with grey), each clamped to [0, 255].
                    brightness = fn.external_source(name="brightness", dtype=types.FLOAT, ndim=0)
                    contrast = fn.external_source(name="contrast", dtype=types.FLOAT, ndim=0)
                    grey = images if self.channels == 1 else fn.color_space_conversion(
                        images, image_type=types.RGB, output_type=types.GRAY)
                    mean_grey = fn.reductions.mean(grey)
                    if self.decoder_device == "cpu" and not self._arithmetic_jitter:
                        images = fn.brightness_contrast(images, brightness=brightness, contrast=contrast,
                                                        contrast_center=mean_grey)
                    else:
                        # On the GPU the mean is a GPU tensor, and argument inputs live on the CPU:
                        # b (m + c (x - m)) = b c x + b (1 - c) m as arithmetic, then clamp.
                        if self.decoder_device == "mixed":
                            brightness, contrast = brightness.gpu(), contrast.gpu()
                        images = fn.cast(dmath.clamp(images * (brightness * contrast)
                                                     + mean_grey * (brightness * (1.0 - contrast)), 0.0, 255.0),
                                         dtype=types.UINT8)
                    if self.channels == 3 and self.view is None:
                        # Saturation in float, clamped after normalisation by one torch.clamp_ on
                        # the batch (_to_torch). Per 224x224 image on this CPU: color_twist to
                        # float 0.45 ms; a saturating cast back to uint8 in DALI would add 0.4 ms,
                        # color_twist's own uint8 output (or fn.hsv, fn.saturation) takes 1.1 ms.
                        saturation = fn.external_source(name="saturation", dtype=types.FLOAT, ndim=0)
                        images = fn.color_twist(images, saturation=saturation, dtype=types.FLOAT)
                        if self._cast_in_dali:
                            images = fn.cast(images, dtype=types.UINT8)
                        else:
                            clamp = True
                if self.view is not None:
                    images = self._contrastive_view(images, fn, types, dmath)
                if self.rand_augment is not None:
                    # the PIL path's order: flip, jitter, RandAugment (not flip-invariant: rotations,
                    # shears), each step on uint8 images (PIL's blend truncates the saturation step)
                    images = fn.flip(dmath.floor(dmath.clamp(fn.cast(images, dtype=types.FLOAT), 0.0, 255.0)),
                                     horizontal=flip)
                    flip, clamp = 0, False
                    for layer in range(self.rand_augment[0]):
                        images = self._rand_augment_layer(images, layer, fn, types, dmath)
                images = fn.crop_mirror_normalize(images, mirror=flip, mean=scale[0], std=scale[1],
                                                  dtype=types.FLOAT, output_layout="CHW")
            else:
                resize = fn.external_source(name="resize", dtype=types.FLOAT, ndim=1)
                crop_pos = fn.external_source(name="crop_pos", dtype=types.FLOAT, ndim=1)
                images = fn.decoders.image(jpegs, device=self.decoder_device, output_type=output_type,
                                           adjust_orientation=False)
                images = fn.resize(images, size=resize, interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop_mirror_normalize(images, crop=(self.crop_size, self.crop_size),
                                                  crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1],
                                                  mean=scale[0], std=scale[1], dtype=types.FLOAT,
                                                  output_layout="CHW", out_of_bounds_policy="pad")
            pipe.set_outputs(images)
        pipe.build()
        self._clamp = None
        if clamp:  # the normalised images of x in [0, 255]: [(0 - mean) / std, (1 - mean) / std]
            lo = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], dtype=torch.float32)
            hi = torch.tensor([(1 - m) / s for m, s in zip(self.mean, self.std)], dtype=torch.float32)
            self._clamp = (lo.view(1, -1, 1, 1).to(self.device), hi.view(1, -1, 1, 1).to(self.device))
        self._zero_copy = bool(getattr(pipe, "exec_dynamic", False)) and self.device.type == "cpu"
        return pipe

    def _rand_augment_constants(self, fn, types):
        """The constant images of :meth:`_rand_augment_layer`: the fill colour [C], PIL's SMOOTH kernel and
        the mask of the pixels PIL's 3x3 filters compute (1 inside, 0 on the 1-pixel border they copy)."""
        c = self.crop_size
        fill = list(RAND_AUGMENT_FILL) if self.channels == 3 else [round(sum(RAND_AUGMENT_FILL) / 3)]
        self._fill = fn.constant(fdata=[float(v) for v in fill], shape=[len(fill)], dtype=types.FLOAT)
        interior = np.zeros((c, c, 1), dtype=np.float32)
        interior[1:-1, 1:-1] = 1.0
        self._interior = fn.constant(fdata=interior.ravel().tolist(), shape=[c, c, 1], dtype=types.FLOAT)
        self._smooth_kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0
        if self.decoder_device == "mixed":
            self._fill, self._interior = self._fill.gpu(), self._interior.gpu()

    def _rand_augment_layer(self, images, layer: int, fn, types, dmath):
        """One RandAugment layer (PaCo's randaugment.py, the PIL path's ``_rand_augment``) on integer-valued
        float HWC images: every sample goes through each stage below, with the per-sample parameters of
        :func:`rand_augment_inputs` making all but its drawn operation (if any) the exact identity.

        Why every stage for every sample rather than DALI conditionals: the 15 operations are 5 stages
        (point LUTs, ImageEnhance blends, autocontrast, equalize, one affine warp) whose identity settings
        are exact on integer values, so the graph stays one plain pipeline (no ``pipeline_def``
        rewriting of the loader, no per-op split of the batch). Its cost: 16 ms per 224 x 224 image for
        the two layers of rand-n2 on one DALI thread (measured on a shared, busy 2-core CPU), against
        the module docstring's ~2.5 ms per ImageNet JPEG for decoding and augmenting; conditionals would run each sample through
        one stage only: the next step if this limits a CPU-bound run (not measured).

        Differences from PIL on the same inputs (tests/test_paco.py::test_dali_rand_augment_layer_on_pil_inputs):
        the point and blend operations are bit-exact, AutoContrast within 1 level;
        DALI's warp_affine has no bicubic mode, so the geometric operations drawn bicubic are resampled
        bilinear; DALI's ``equalize`` is OpenCV's (the LUT from the cumulative histogram, rounded), PIL's
        steps by the histogram's size minus its last bin; warp borders blend with the fill colour."""
        params = fn.external_source(name=f"ra_params{layer}", dtype=types.FLOAT, ndim=1)
        matrix = fn.external_source(name=f"ra_matrix{layer}", dtype=types.FLOAT, ndim=2)  # an argument: CPU
        if self.decoder_device == "mixed":  # arithmetic operands on the images' device (not run here: no GPU)
            params = params.gpu()
        x = images
        # PosterizeTpu (step q = 2^(8 - bits), 1: identity), Solarize / Invert (255 - x from the threshold
        # on: 256 none, 0 inverts all), SolarizeAdd (below 128, + a capped at 255; a = 0: identity)
        x = dmath.floor(x / params[0]) * params[0]
        x = x + (x >= params[1]) * (255.0 - 2.0 * x)
        x = x + (x < 128.0) * (dmath.min(x + params[2], 255.0) - x)
        # ImageEnhance: Image.blend(degenerate, x, f) truncated to uint8; the degenerate image is grey
        # (Color: PIL's "L", (19595 R + 38470 G + 7471 B + 2^15) >> 16), the mean of that grey rounded
        # (Contrast), PIL's SMOOTH 3x3 filter rounded with the 1-pixel border kept (Sharpness), black
        # (Brightness) or x itself (the identity, with f = 1).
        if self.channels == 3:
            grey = dmath.floor((x[:, :, 0:1] * 19595.0 + x[:, :, 1:2] * 38470.0 + x[:, :, 2:3] * 7471.0 + 32768.0)
                               / 65536.0)
        else:
            grey = x
        mean_grey = dmath.floor(fn.reductions.mean(grey) + 0.5)
        smooth = dmath.floor(fn.filter(x, self._smooth_kernel, border="clamp") + 0.5)
        smooth = x + self._interior * (smooth - x)
        degenerate = params[3] * grey + params[4] * mean_grey + params[5] * smooth + params[6] * x
        x = dmath.floor(dmath.clamp(degenerate + params[7] * (x - degenerate), 0.0, 255.0))
        # AutoContrast: each channel stretched from [min, max] to [0, 255], truncated (a flat channel kept)
        low = fn.reductions.min(x, axes=(0, 1))
        high = fn.reductions.max(x, axes=(0, 1))
        stretched = dmath.floor((x - low) * (255.0 / dmath.max(high - low, 1.0)))
        x = x + (params[8] * (high > low)) * (stretched - x)
        # Equalize
        equalized = fn.cast(fn.equalize(fn.cast(x, dtype=types.UINT8)), dtype=types.FLOAT)
        x = x + params[9] * (equalized - x)
        # Rotate, ShearX/Y, TranslateX/YRel: PIL's affine matrix (output -> input, pixel centres), filled
        # with the ImageNet mean: warp x - fill with 0 outside, add fill back (warp_affine's fill is one value)
        warped = fn.warp_affine(x - self._fill, matrix=matrix, fill_value=0.0, interp_type=types.INTERP_LINEAR)
        return dmath.floor(warped + self._fill + 0.5)

    def _contrastive_view(self, images, fn, types, dmath):
        """A contrastive view's steps after the brightness / contrast jitter (augmentation.py's
        ``CONTRASTIVE_VIEWS``): saturation and hue in one ``color_twist``, clamped to [0, 255], then grey
        for the images drawn grey (a second ``color_twist`` with saturation 0: the luma Y = 0.299 R +
        0.587 G + 0.114 B, PIL's "L"), then the Gaussian blur with the image's sigma (sigma 1e-3 for an image not blurred:
        a 1-tap window, the identity). DALI's hue is a rotation in YIQ space, torchvision's a shift in
        HSV: batches with hue jitter differ from the PIL path beyond the 1/255 of the standard view;
        DALI's blur is a true Gaussian, PIL's a 3-pass box approximation (~1/255 apart)."""
        if self.channels == 3:
            saturation = fn.external_source(name="saturation", dtype=types.FLOAT, ndim=0)
            hue = fn.external_source(name="hue", dtype=types.FLOAT, ndim=0)
            colour = fn.external_source(name="colour", dtype=types.FLOAT, ndim=0)  # 0: grey, 1: keep
            images = dmath.clamp(fn.color_twist(images, saturation=saturation, hue=hue, dtype=types.FLOAT), 0.0, 255.0)
            # grey AFTER the clamp of the jittered image, as torchvision's RandomGrayscale after ColorJitter
            images = fn.color_twist(images, saturation=colour, dtype=types.FLOAT)
        else:
            images = fn.cast(images, dtype=types.FLOAT)
        images = dmath.clamp(images, 0.0, 255.0)
        sigma = fn.external_source(name="sigma", dtype=types.FLOAT, ndim=0)
        return fn.gaussian_blur(images, sigma=sigma)

    def _sizes_of(self, indices: np.ndarray, data: list) -> np.ndarray:
        sizes = self._sizes[indices]
        for k in np.nonzero(sizes[:, 0] < 0)[0]:
            i = int(indices[k])
            self._sizes[i] = sizes[k] = _jpeg_size(data[k], self._paths[i], i)
        return sizes

    def _read(self, indices: np.ndarray) -> list:
        data = []
        for i in indices.tolist():
            path = self._paths[i]
            try:
                array = np.fromfile(path, dtype=np.uint8)
            except OSError as e:
                raise ImageDecodeError(path, f"cannot read it ({e.strerror or e})", i) from None
            if array.size == 0:
                raise ImageDecodeError(path, "the file is empty", i)
            data.append(array)
        return data

    def _feed(self, batch: int, indices: np.ndarray) -> None:
        data = self._read(indices)
        sizes = self._sizes_of(indices, data)
        pipe = self._pipe
        pipe.feed_input("jpegs", data)
        if self.train:
            # a full batch of draws, as the PIL path makes, so a last partial batch matches too
            rng = _batch_generator(self.seed, self.epoch, self.rank, batch)
            randoms = draw_train_randoms(rng, self.batch_size)
            if self.view is not None:  # after the standard draws, as the PIL path
                randoms.update(draw_view_randoms(rng, self.batch_size))
            if self.rand_augment is not None:
                randoms.update(draw_rand_augment_randoms(rng, self.batch_size, self.rand_augment[0]))
            n = len(indices)
            randoms = {key: (v[:, :n] if key == "jitter" else v[:n]) for key, v in randoms.items()}
            p = train_params(sizes, randoms, self.color_jitter, self.scale, self.ratio)
            if self.view is not None:
                p = view_params(randoms, self.view, p)
                if self.channels == 3:
                    pipe.feed_input("saturation", p["saturation"])
                    pipe.feed_input("hue", (p["hue"] * 360.0).astype(np.float32))  # DALI's hue is in degrees
                    pipe.feed_input("colour", np.where(p["grayscale"], 0.0, 1.0).astype(np.float32))
                pipe.feed_input("sigma", np.where(p["sigma"] > 0, p["sigma"], np.float32(1e-3)).astype(np.float32))
            pipe.feed_input("anchor", np.stack([p["left"], p["top"]], 1).astype(np.float32))
            pipe.feed_input("shape", np.stack([p["width"], p["height"]], 1).astype(np.float32))
            pipe.feed_input("flip", p["flip"].astype(np.int32))
            if self.rand_augment is not None:
                params, matrices = rand_augment_inputs(randoms, n, *self.rand_augment, self.crop_size)
                for layer in range(self.rand_augment[0]):
                    pipe.feed_input(f"ra_params{layer}", params[layer])
                    pipe.feed_input(f"ra_matrix{layer}", matrices[layer])
            if self.color_jitter > 0:
                pipe.feed_input("brightness", p["brightness"])
                pipe.feed_input("contrast", p["contrast"])
                if self.channels == 3 and self.view is None:
                    pipe.feed_input("saturation", p["saturation"])
        else:
            resized, offsets = eval_geometry(sizes, self.resize_size, self.crop_size)
            room = np.maximum(resized - self.crop_size, 1)
            pipe.feed_input("resize", resized[:, ::-1].astype(np.float32))  # `size` is (height, width)
            # crop_mirror_normalize's anchor is crop_pos * (size - crop): hit torchvision's offset
            pipe.feed_input("crop_pos", np.where(resized > self.crop_size, offsets / room, 0.5).astype(np.float32))
        self._in_flight.append(indices)
        # DALI's first schedule_run() runs the whole prefetch queue (`depth` iterations), later
        # ones run one: feed `depth` batches before the first.
        if self._primed:
            pipe.schedule_run()
        elif len(self._in_flight) == self._depth:
            pipe.schedule_run()
            self._primed = True

    def _drain(self) -> None:
        """Discards the batches still in flight (an epoch left early)."""
        if not self._primed:  # fed but never run: start over with a new pipeline
            self._in_flight.clear()
            self._pipe = None
            return
        while self._in_flight:
            self._in_flight.popleft()
            try:
                self._pipe.outputs()
            except Exception:  # noqa: BLE001 - the pipeline is rebuilt on the next epoch
                self._pipe = None
                self._in_flight.clear()

    def _decode_failure(self, error: Exception) -> ImageDecodeError:
        """DALI's error names the operator and the sample's position in the batch ("Failed to
        decode sample #3"), not the file: re-decode the batches in flight with PIL to find it,
        else take the position in the oldest batch in flight (the one that failed)."""
        import re
        batches = list(self._in_flight)
        self._in_flight.clear()
        self._pipe = None  # a failed DALI pipeline is not reused
        text = str(error)
        reason = text.split("encountered:", 1)[-1]
        reason = " ".join(line.strip() for line in reason.splitlines()
                          if line.strip() and "no longer valid" not in line and "Critical error" not in line)
        for indices in batches:
            culprit = find_undecodable([self._paths[i] for i in indices.tolist()], indices)
            if culprit is not None:
                return ImageDecodeError(culprit[0], f"{culprit[2]} (DALI: {reason})", culprit[1])
        position = re.search(r"sample #(\d+)", text)
        if batches and position and int(position.group(1)) < len(batches[0]):
            i = int(batches[0][int(position.group(1))])
            return ImageDecodeError(self._paths[i], f"DALI: {reason}", i)
        files = [self._paths[i] for indices in batches for i in indices.tolist()]
        shown = ", ".join(repr(f) for f in files[:8]) + (" ..." if len(files) > 8 else "")
        return ImageDecodeError(shown, f"DALI failed on one of these {len(files)} files: {reason or text}")

    def _to_torch(self, output, n: int) -> torch.Tensor:
        """The batch as a torch tensor without a copy: DLPack over DALI's output buffer. Under
        DALI's default (dynamic) executor the buffer stays valid while referenced, so the
        tensor owns it; the legacy executors reuse their buffers, so there it is copied."""
        tensor = output.as_tensor()
        if self._zero_copy:
            out = torch.from_dlpack(tensor)
        else:
            from nvidia.dali.plugin.pytorch import feed_ndarray
            out = torch.empty(list(tensor.shape()), dtype=torch.float32, device=self.device)
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            feed_ndarray(tensor, out, cuda_stream=stream)
        if out.shape[0] != n:
            raise RuntimeError(f"DALI returned {out.shape[0]} images for a batch of {n}")
        if self._clamp is not None:
            out.clamp_(*self._clamp)
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def __iter__(self):
        # One epoch at a time: a new iteration drops what an abandoned one left in flight, and the
        # abandoned one, when garbage-collected later, must not drain the new one's batches.
        self._generation += 1
        generation = self._generation
        if self._in_flight:
            self._drain()
        if self._pipe is None:
            self._pipe = self._build()
        batches = self._batches()
        try:
            for batch, indices in batches:
                self._feed(batch, indices)
                if len(self._in_flight) < self._depth:
                    continue
                yield self._next()
            while self._in_flight:
                yield self._next()
        finally:
            if self._in_flight and generation == self._generation:
                self._drain()

    def _next(self):
        indices = self._in_flight[0]
        try:
            if self.device.type == "cuda":  # outputs ordered on torch's stream, as the copy below
                (output,) = self._pipe.outputs(cuda_stream=torch.cuda.current_stream(self.device))
            else:
                (output,) = self._pipe.outputs()
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError; name the file
            raise self._decode_failure(e) from e
        self._in_flight.popleft()
        images = self._to_torch(output, len(indices))
        labels = self.labels[torch.from_numpy(indices)]
        if self.device.type == "cuda":
            labels = labels.to(self.device, non_blocking=True)
        return images, labels


LOADERS = {"dali": DaliImageLoader, "pil": PilImageLoader}


def make_image_loader(backend: str = "dali", **kwargs):
    """``backend``: "dali" (:class:`DaliImageLoader`) or "pil" (:class:`PilImageLoader`, the
    baseline); the keyword arguments are the loaders' own."""
    if backend not in LOADERS:
        raise ValueError(f"backend must be one of {sorted(LOADERS)}, got {backend!r}")
    if backend == "dali" and "num_workers" in kwargs:
        raise ValueError("num_workers is for backend='pil'; the DALI loader takes num_threads")
    return LOADERS[backend](**kwargs)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DALI_FORMATS", "ImageDecodeError", "DaliImageLoader", "PilImageLoader",
           "LOADERS", "make_image_loader", "find_undecodable", "default_num_threads", "draw_train_randoms",
           "train_params", "eval_geometry"]
