"""ltfast.data.dali: the DALI image pipeline and its PIL/torchvision baseline, on real JPEG photos
(Debian's lomiri-wallpapers-16.04, re-encoded by ltfast.data.photos) and on Fashion-MNIST JPEGs.

DALI is a test dependency: a missing DALI fails here, it is not skipped."""
import os
import shutil

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: F401  (DALI missing is a failure)

from ltfast.data import InstanceSampler, ListDataset, load_fashion_mnist, read_list_file, write_jpeg_folder
from ltfast.data.dali import (IMAGENET_MEAN, IMAGENET_STD, DaliImageLoader, ImageDecodeError, PilImageLoader,
                              draw_train_randoms, eval_geometry, make_image_loader, train_params)
from ltfast.data.photos import default_photo_dir, prepare_photo_set

THREADS = 2


@pytest.fixture(scope="module")
def photos() -> ListDataset:
    return read_list_file(prepare_photo_set(default_photo_dir(300), count=300))


@pytest.fixture(scope="module")
def fmnist_jpegs(tmp_path_factory) -> ListDataset:
    _, test = load_fashion_mnist()
    small = test.subset(torch.arange(48))
    return read_list_file(write_jpeg_folder(small, str(tmp_path_factory.mktemp("fmnist")), "test"))


def value_range(mean, std):
    lo = torch.tensor([(0 - m) / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)
    return lo, hi


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


# ------------------------------------------------------------------ the photo set
def test_photo_set_is_imagenet_like_and_cached(photos):
    from PIL import Image
    assert len(photos) == 300 and photos.num_classes == 15
    assert photos.labels.tolist() == [i % 15 for i in range(300)]
    for i in (0, 1, 150, 299):
        with Image.open(photos.full_path(i)) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) == 500 and 300 <= min(im.size) <= 400
    list_file = os.path.join(photos.root, "photos.txt")
    mtime = os.path.getmtime(list_file)
    assert prepare_photo_set(photos.root, count=300) == list_file and os.path.getmtime(list_file) == mtime


def test_photo_set_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="count"):
        prepare_photo_set(str(tmp_path / "p"), count=0)
    with pytest.raises(ValueError, match="quality"):
        prepare_photo_set(str(tmp_path / "p"), quality=101)
    with pytest.raises(FileNotFoundError, match="source_dir"):
        prepare_photo_set(str(tmp_path / "p"), source_dir=str(tmp_path))


# ------------------------------------------------------------------ the shared parameter draw
def test_train_params_follow_random_resized_crop():
    rng = np.random.default_rng(0)
    sizes = np.array([[500, 375], [375, 500], [500, 333], [40, 3000], [3000, 40], [224, 224]] * 50)
    p = train_params(sizes, draw_train_randoms(rng, len(sizes)))
    W, H = sizes[:, 0], sizes[:, 1]
    assert (p["width"] >= 1).all() and (p["height"] >= 1).all()
    assert (p["left"] >= 0).all() and (p["top"] >= 0).all()
    assert (p["left"] + p["width"] <= W).all() and (p["top"] + p["height"] <= H).all()
    normal = slice(0, 3)  # ordinary photos: area 8-100 %, ratio 3/4..4/3 (up to rounding)
    area = (p["width"] * p["height"] / (W * H)).reshape(50, 6)[:, normal]
    assert area.min() >= 0.07 and area.max() <= 1.0
    aspect = (p["width"] / p["height"]).reshape(50, 6)[:, normal]
    assert aspect.min() >= 0.7 and aspect.max() <= 1.4
    # extreme aspect ratios fall back to torchvision's clamped centre crop
    thin = p["width"].reshape(50, 6)[:, 3], p["height"].reshape(50, 6)[:, 3]
    assert (thin[0] == 40).any() and (thin[1][thin[0] == 40] == 53).all()
    assert 0.35 < p["flip"].mean() < 0.65
    for key in ("brightness", "contrast", "saturation"):
        assert p[key].min() >= 0.6 and p[key].max() <= 1.4
    no_jitter = train_params(sizes, draw_train_randoms(np.random.default_rng(0), len(sizes)), color_jitter=0)
    assert (no_jitter["brightness"] == 1).all() and (no_jitter["left"] == p["left"]).all()


def test_eval_geometry_matches_torchvision():
    import torchvision.transforms.functional as F
    from PIL import Image
    sizes = np.array([[500, 375], [333, 500], [256, 256], [1000, 257]])
    resized, offsets = eval_geometry(sizes, 256, 224)
    for (w, h), (rw, rh), (ox, oy) in zip(sizes, resized, offsets):
        img = F.resize(Image.new("RGB", (int(w), int(h))), 256)
        assert img.size == (rw, rh)
        assert (ox, oy) == (int(round((rw - 224) / 2.0)), int(round((rh - 224) / 2.0)))


# ------------------------------------------------------------------ DALI on real JPEGs
def test_dali_train_batches_on_photos(photos):
    sampler = InstanceSampler(photos.labels, num_samples=40, seed=3)
    loader = DaliImageLoader(photos, sampler, batch_size=16, device="cpu", train=True, num_threads=THREADS)
    assert len(loader) == 2  # 40 // 16, last partial batch dropped
    batches = collect(loader)
    assert len(batches) == 2
    expected = photos.labels[sampler.indices()[:32]]
    lo, hi = value_range(IMAGENET_MEAN, IMAGENET_STD)
    for k, (x, y) in enumerate(batches):
        assert x.shape == (16, 3, 224, 224) and x.dtype == torch.float32 and x.is_contiguous()
        assert y.dtype == torch.int64 and y.shape == (16,)
        assert torch.equal(y, expected[16 * k:16 * (k + 1)])
        assert torch.isfinite(x).all()
        assert (x >= lo - 1e-4).all() and (x <= hi + 1e-4).all()
        assert x.std() > 0.3  # real pictures, not a constant
        assert (x.flatten(1).std(1) > 0.05).all()
    keep = DaliImageLoader(photos, sampler, batch_size=16, train=True, num_threads=THREADS, drop_last=False)
    assert [y.numel() for _, y in keep] == [16, 16, 8] and len(keep) == 3


def test_dali_matches_pil_baseline(photos):
    """Same sampler, same parameter draw: the two paths give the same images up to decoder and
    resampler rounding (train with jitter, and eval)."""
    subset = ListDataset(photos.root, photos.paths[:20], photos.labels[:20])
    sampler = InstanceSampler(subset.labels, seed=5)
    for train, tolerance in ((True, 4.0), (False, 0.6)):  # 12 + a partial batch of 8
        kwargs = dict(dataset=subset, sampler=sampler if train else None, batch_size=12, train=train,
                      drop_last=False)
        dali = collect(make_image_loader("dali", num_threads=THREADS, **kwargs))
        pil = collect(make_image_loader("pil", num_workers=0, **kwargs))
        assert len(dali) == len(pil) == 2 and dali[1][0].shape[0] == 8
        for (xd, yd), (xp, yp) in zip(dali, pil):
            assert torch.equal(yd, yp) and xd.shape == xp.shape
            diff = (xd - xp).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255  # in grey levels
            assert diff.mean() < tolerance, (train, float(diff.mean()))


def test_gpu_formulation_of_the_jitter_matches_on_cpu(photos):
    """On the GPU the contrast step is DALI arithmetic (argument inputs must live on the CPU);
    the same graph on the CPU gives the same batches as brightness_contrast."""
    sampler = InstanceSampler(photos.labels, num_samples=8, seed=6)
    a = DaliImageLoader(photos, sampler, batch_size=8, train=True, num_threads=THREADS)
    b = DaliImageLoader(photos, sampler, batch_size=8, train=True, num_threads=THREADS)
    b._arithmetic_jitter = True
    (xa, _), = collect(a)
    (xb, _), = collect(b)
    assert (xa - xb).abs().max() < 0.05  # at most a grey level of rounding


def test_dali_eval_sequential_keeps_last_batch_and_is_deterministic(photos):
    subset = ListDataset(photos.root, photos.paths[:21], photos.labels[:21])
    loader = DaliImageLoader(subset, None, batch_size=8, train=False, num_threads=THREADS)
    assert len(loader) == 3
    first, second = collect(loader), collect(loader)
    assert [x.shape[0] for x, _ in first] == [8, 8, 5]
    assert torch.equal(torch.cat([y for _, y in first]), subset.labels)
    for (a, ya), (b, yb) in zip(first, second):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    # sharded evaluation: rank r takes r::world_size
    shard = DaliImageLoader(subset, None, batch_size=8, train=False, num_threads=THREADS, rank=1, world_size=2)
    assert torch.equal(torch.cat([y for _, y in shard]), subset.labels[1::2])


def test_dali_set_epoch_redraws_and_is_reproducible(photos):
    sampler = InstanceSampler(photos.labels, num_samples=16, seed=1)
    loader = DaliImageLoader(photos, sampler, batch_size=8, train=True, num_threads=THREADS, seed=7)
    loader.set_epoch(0)
    epoch0 = collect(loader)
    loader.set_epoch(1)
    assert sampler.epoch == 1
    epoch1 = collect(loader)
    loader.set_epoch(0)
    again = collect(loader)
    for (a, ya), (b, yb) in zip(epoch0, again):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(torch.cat([y for _, y in epoch0]), torch.cat([y for _, y in epoch1]))
    # a fresh loader with the same seed gives the same epoch: nothing depends on earlier epochs
    fresh = DaliImageLoader(photos, InstanceSampler(photos.labels, num_samples=16, seed=1), batch_size=8,
                            train=True, num_threads=THREADS, seed=7)
    fresh.set_epoch(1)
    for (a, _), (b, _) in zip(epoch1, collect(fresh)):
        assert torch.equal(a, b)


def test_dali_early_break_then_full_epoch(photos):
    sampler = InstanceSampler(photos.labels, num_samples=48, seed=2)
    loader = DaliImageLoader(photos, sampler, batch_size=8, train=True, num_threads=THREADS, prefetch=3)
    full = collect(loader)
    for x, y in loader:
        break
    again = collect(loader)
    abandoned = iter(loader)
    next(abandoned)  # left open, then a new epoch starts, then the old one is closed
    fresh = iter(loader)
    first = next(fresh)
    abandoned.close()
    assert torch.equal(first[0], full[0][0])
    assert len([first] + list(fresh)) == 6
    assert len(again) == len(full) == 6
    for (a, ya), (b, yb) in zip(full, again):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_dali_ddp_shards_come_from_the_sampler(photos):
    shards = []
    for rank in range(2):
        sampler = InstanceSampler(photos.labels, num_samples=32, seed=4, rank=rank, world_size=2)
        loader = DaliImageLoader(photos, sampler, batch_size=8, train=True, num_threads=THREADS, color_jitter=0)
        assert loader.rank == rank and len(loader) == 2
        shards.append(torch.cat([y for _, y in loader]))
        assert torch.equal(shards[-1], photos.labels[sampler.indices()])
    both = torch.cat([InstanceSampler(photos.labels, num_samples=32, seed=4, rank=r, world_size=2).indices()
                      for r in range(2)])
    assert both.unique().numel() == 32


def test_dali_bfloat16_and_28x28_grey(fmnist_jpegs):
    mean, std = (0.2860,), (0.3530,)
    sampler = InstanceSampler(fmnist_jpegs.labels, seed=0)
    for train in (True, False):
        loader = DaliImageLoader(fmnist_jpegs, sampler if train else None, batch_size=16, train=train,
                                 crop_size=28, resize_size=32, mean=mean, std=std, dtype=torch.bfloat16,
                                 num_threads=THREADS)
        batches = collect(loader)
        assert len(batches) == 3
        lo, hi = value_range(mean, std)
        for x, y in batches:
            assert x.shape == (16, 1, 28, 28) and x.dtype == torch.bfloat16 and y.dtype == torch.int64
            assert (x.float() >= lo - 0.02).all() and (x.float() <= hi + 0.02).all()
        labels = torch.cat([y for _, y in batches])
        assert torch.equal(labels, fmnist_jpegs.labels[sampler.indices()] if train else fmnist_jpegs.labels)
    # the same pipeline at the size the images were written: eval reproduces them
    exact = DaliImageLoader(fmnist_jpegs, None, batch_size=16, train=False, crop_size=28, resize_size=28,
                            mean=(0.0,), std=(1.0,), num_threads=THREADS)
    x, _ = next(iter(exact))
    _, test = load_fashion_mnist()
    assert (x * 255 - test.images[:16].float()).abs().mean() < 3  # JPEG q90 of 28x28 grey images


def test_pil_loader_with_workers_matches_in_process(photos):
    sampler = InstanceSampler(photos.labels, num_samples=16, seed=9)
    a = collect(PilImageLoader(photos, sampler, batch_size=8, train=True, num_workers=2))
    b = collect(PilImageLoader(photos, sampler, batch_size=8, train=True, num_workers=0))
    assert len(a) == 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == (8, 3, 224, 224) and ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ------------------------------------------------------------------ errors name the file
@pytest.fixture
def broken_folder(photos, tmp_path):
    paths = []
    for k in range(8):
        shutil.copy(photos.full_path(k), tmp_path / f"{k}.jpg")
        paths.append(f"{k}.jpg")
    return tmp_path, paths


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "header_only", "empty", "missing"])
@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_corrupt_file_raises_error_naming_it(broken_folder, damage, backend):
    root, paths = broken_folder
    victim = root / "5.jpg"
    data = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(data[:len(data) // 2])
    elif damage == "not_an_image":
        victim.write_bytes(b"this is not a JPEG file\n" * 20)
    elif damage == "header_only":
        victim.write_bytes(data[:600])
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        victim.unlink()
    dataset = ListDataset(str(root), paths, torch.arange(8))
    for train in (True, False):
        sampler = InstanceSampler(dataset.labels, seed=0) if train else None
        extra = {"num_threads": THREADS} if backend == "dali" else {"num_workers": 0}
        loader = make_image_loader(backend, dataset=dataset, sampler=sampler, batch_size=4, train=train, **extra)
        with pytest.raises(ImageDecodeError) as info:
            collect(loader)
        assert str(victim) in str(info.value) and info.value.path == str(victim)
        if backend == "dali":  # the loader recovers: the next epoch runs until the same file again
            with pytest.raises(ImageDecodeError):
                collect(loader)


# ------------------------------------------------------------------ bad arguments
def test_bad_arguments_are_named(photos):
    sampler = InstanceSampler(photos.labels, seed=0)
    cases = [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(sampler=None, train=True), ValueError, "sampler"),
        (dict(crop_size=0), ValueError, "crop_size"),
        (dict(resize_size=-1), ValueError, "resize_size"),
        (dict(mean=(0.5, 0.5), std=(0.2, 0.2)), ValueError, "mean and std"),
        (dict(std=(0.2, 0.0, 0.2)), ValueError, "std"),
        (dict(color_jitter=-0.1), ValueError, "color_jitter"),
        (dict(num_threads=0), ValueError, "num_threads"),
        (dict(dtype=torch.int64), TypeError, "dtype"),
        (dict(decoder_device="mixed"), ValueError, "decoder_device"),
        (dict(prefetch=0), ValueError, "prefetch"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(scale=(0.5, 0.1)), ValueError, "scale"),
        (dict(ratio=(0.0, 1.0)), ValueError, "ratio"),
    ]
    for kwargs, error, match in cases:
        args = dict(dataset=photos, sampler=sampler, batch_size=8, train=True)
        args.update(kwargs)
        with pytest.raises(error, match=match):
            DaliImageLoader(**args)
    with pytest.raises(TypeError, match="dataset"):
        DaliImageLoader([1, 2, 3], sampler, batch_size=8)
    with pytest.raises(ValueError, match="backend"):
        make_image_loader("opencv", dataset=photos, sampler=sampler, batch_size=8)
    with pytest.raises(ValueError, match="num_workers"):
        make_image_loader("dali", dataset=photos, sampler=sampler, batch_size=8, num_workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        PilImageLoader(photos, sampler, batch_size=8, num_workers=-1)
    loader = DaliImageLoader(photos, sampler, batch_size=8)
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            DaliImageLoader(photos, sampler, batch_size=8, device="cuda")


def test_loaders_accept_the_same_keywords(photos):
    sampler = InstanceSampler(photos.labels, num_samples=8, seed=0)
    kwargs = dict(dataset=photos, sampler=sampler, batch_size=8, device="cpu", train=True, crop_size=64,
                  resize_size=72, mean=IMAGENET_MEAN, std=IMAGENET_STD, color_jitter=0.4, num_threads=THREADS,
                  dtype=torch.float32, drop_last=True, seed=0)
    for backend in ("dali", "pil"):
        loader = make_image_loader(backend, **kwargs)
        (x, y), = collect(loader)
        assert x.shape == (8, 3, 64, 64) and y.shape == (8,)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dali_mixed_decoding_on_gpu(photos):
    sampler = InstanceSampler(photos.labels, num_samples=32, seed=0)
    loader = DaliImageLoader(photos, sampler, batch_size=16, device="cuda", train=True)
    assert loader.decoder_device == "mixed"
    cpu = collect(DaliImageLoader(photos, sampler, batch_size=16, device="cpu", train=True, num_threads=THREADS))
    for (x, y), (xc, yc) in zip(loader, cpu):
        assert x.is_cuda and y.is_cuda and x.shape == (16, 3, 224, 224) and y.dtype == torch.int64
        assert torch.equal(y.cpu(), yc)
        assert ((x.cpu() - xc).abs() * 0.226 * 255).mean() < 4  # nvJPEG vs libjpeg-turbo
