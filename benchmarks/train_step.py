"""ImageNet-LT-shaped training step: ResNeXt-50 32x4d, 1000 classes, images/s per device, and the
projected wall time of the survey's 90-epoch recipe on 4 GPUs.

    python benchmarks/train_step.py --device cuda --json benchmarks/results/train_step-<card>.json
    python benchmarks/train_step.py --device cpu --batch 2 --image-size 64 --steps 2   # smoke run

Measured, one after the other in this process:
1. ``synthetic``: the trainer's step (bf16 autocast and channels-last on GPU, SGD 0.9 / 5e-4, the
   chosen ltfast loss) on random input already on the device: the model's ceiling.
2. ``dali``: the DALI training pipeline alone (RandomResizedCrop 224, flip, colour jitter,
   normalise; nvJPEG on GPU) over ImageNet-sized JPEGs, with the CPU threads one of 4 ranks on this
   machine would get.
3. ``dali+step``: the two together, as the trainer runs them.
4. ``eval``: forward only (bf16), for the validation / test passes.

Projection (stated assumptions): 4 GPUs each at the measured dali+step rate (linear DDP scaling,
gradient all-reduce overlapped with backward), 452 steps x 256 images per epoch, the 20k validation
images every epoch and the 50k test images once at the eval rate.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES, GLOBAL_BATCH, GPUS = 115846, 20000, 50000, 256, 4


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device, fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - start


def _synthetic_jpegs(folder: str, count: int, size: tuple[int, int]) -> str:
    """Smooth random colour images with noise, JPEG quality 90, two classes; returns the list file."""
    import numpy as np
    from PIL import Image
    from ltfast.data import write_list_file
    rng = np.random.default_rng(0)
    paths, labels = [], []
    w, h = size
    for i in range(count):
        base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        array = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        path = f"{i % 2}/{i}.jpg"
        os.makedirs(os.path.join(folder, str(i % 2)), exist_ok=True)
        Image.fromarray(array).save(os.path.join(folder, path), quality=90)
        paths.append(path)
        labels.append(i % 2)
    list_file = os.path.join(folder, "list.txt")
    write_list_file(list_file, paths, labels)
    return list_file


def _photo_list(args, folder: str) -> tuple[str, str]:
    """ImageNet-sized JPEGs: the data layer's photo set where its source photos are installed,
    otherwise synthetic ones. Returns (list file, description)."""
    if args.jpeg_size is None:
        try:
            from ltfast.data.photos import prepare_photo_set
            return prepare_photo_set(count=args.jpegs), f"{args.jpegs} photos (ltfast.data.photos, ~500x375)"
        except (FileNotFoundError, ImportError, OSError):
            pass
    w, h = (int(v) for v in (args.jpeg_size or "500x375").split("x"))
    return _synthetic_jpegs(folder, args.jpegs, (w, h)), f"{args.jpegs} synthetic {w}x{h} JPEGs"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--arch", default="resnext50_32x4d")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, help="per device (default 64 on cuda, 2 on cpu)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, help="timed steps (default 50 on cuda, 2 on cpu)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 15 on cuda, 1 on cpu)")
    parser.add_argument("--loss", default="balanced_softmax", help="ce or an ltfast loss of the trainer")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--no-dali", action="store_true", help="skip the DALI measurements")
    parser.add_argument("--jpegs", type=int, default=256, help="JPEG files the DALI pipeline cycles over")
    parser.add_argument("--jpeg-size", help="WxH of synthetic JPEGs (default: the photo set, else 500x375)")
    parser.add_argument("--dali-threads", type=int, help="DALI CPU threads (default: cores / 4, one rank's share)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 2)
    steps = args.steps or (50 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (15 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True

    from ltfast.train.models import build_model
    from ltfast.train.trainer import build_loss
    from ltfast.train.config import defaults
    from ltfast.data import long_tailed_counts

    counts = long_tailed_counts(1280, args.classes, 256)  # ImageNet-LT's range: 1280 .. 5 per class
    model = build_model(args.arch, args.classes).to(device)
    memory_format = torch.channels_last if gpu else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    loss_cfg = defaults()["loss"]
    loss_cfg["name"] = args.loss
    criterion = build_loss(loss_cfg, counts).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    net = torch.compile(model) if args.compile else model
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext
    device_name = torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)"

    def step(images, labels):
        with autocast():
            loss = criterion(net(images.contiguous(memory_format=memory_format)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=device, generator=gen)
    labels = torch.randint(0, args.classes, (batch,), device=device, generator=gen)
    records = []

    def record(name, seconds, count, **extra):
        rec = {"suite": "train_step", "name": name, "arch": args.arch, "device": device.type, "device_name": device_name,
               "batch_per_device": batch, "image_size": args.image_size, "bf16": gpu, "compile": args.compile,
               "loss": args.loss, "images": count, "seconds": seconds, "images_per_s": count / seconds, **extra}
        records.append(rec)
        print(f"{name:>10}: {rec['images_per_s']:9.1f} images/s  ({count} images in {seconds:.2f} s)", flush=True)
        return rec

    synthetic = record("synthetic", _timed(device, lambda: step(images, labels), steps, warmup), steps * batch)

    model.eval()
    eval_images = images.repeat(2, 1, 1, 1)

    def forward():
        with torch.no_grad(), autocast():
            net(eval_images.contiguous(memory_format=memory_format))
    evaluation = record("eval", _timed(device, forward, steps, warmup), steps * 2 * batch)
    model.train()

    dali_step = None
    if not args.no_dali:
        try:
            from ltfast.data import make_sampler, read_list_file
            from ltfast.data.dali import DaliImageLoader
            threads = args.dali_threads or max(1, (os.cpu_count() or 4) // GPUS)
            with tempfile.TemporaryDirectory() as tmp:
                list_file, source = _photo_list(args, tmp)
                dataset = read_list_file(list_file)
                # Enough sampler positions for warm-up + timed batches in one epoch.
                sampler = make_sampler("instance", dataset.labels, num_samples=(steps + warmup) * batch,
                                       rank=0, world_size=1)
                loader = DaliImageLoader(dataset, sampler, batch, device, train=True, crop_size=args.image_size,
                                         resize_size=int(args.image_size * 256 / 224), num_threads=threads)

                def run(with_step: bool):
                    loader.set_epoch(0)
                    it = iter(loader)
                    for _ in range(warmup):
                        x, y = next(it)
                        if with_step:
                            step(x, y.remainder(args.classes))
                    _sync(device)
                    start = time.perf_counter()
                    for _ in range(steps):
                        x, y = next(it)
                        if with_step:
                            step(x, y.remainder(args.classes))
                    _sync(device)
                    seconds = time.perf_counter() - start
                    for _ in it:  # finish the epoch so the pipeline is idle
                        pass
                    return seconds
                extra = {"dali_threads": threads, "decoder": loader.decoder_device, "jpegs": source}
                record("dali", run(False), steps * batch, **extra)
                dali_step = record("dali+step", run(True), steps * batch, **extra)
        except Exception as error:  # noqa: BLE001 - the synthetic numbers still stand
            print(f"DALI measurement failed: {type(error).__name__}: {error}", flush=True)
            records.append({"suite": "train_step", "name": "dali", "error": f"{type(error).__name__}: {error}"})

    train_rate = (dali_step or synthetic)["images_per_s"]
    steps_per_epoch = TRAIN_IMAGES // GLOBAL_BATCH
    epoch_train_s = steps_per_epoch * GLOBAL_BATCH / (GPUS * train_rate)
    epoch_val_s = VAL_IMAGES / (GPUS * evaluation["images_per_s"])
    total_h = (90 * (epoch_train_s + epoch_val_s) + TEST_IMAGES / (GPUS * evaluation["images_per_s"])) / 3600
    projection = {"suite": "train_step", "name": "projection_imagenet_lt_90ep_4gpu",
                  "device_name": device_name, "based_on": "dali+step" if dali_step else "synthetic",
                  "per_device_train_images_per_s": train_rate, "epoch_train_s": epoch_train_s,
                  "epoch_val_s": epoch_val_s, "total_hours": total_h,
                  "assumptions": f"{GPUS} devices like this one, linear DDP scaling, {steps_per_epoch} steps x "
                                 f"{GLOBAL_BATCH} per epoch, {VAL_IMAGES} val images per epoch, {TEST_IMAGES} test once"}
    records.append(projection)
    print(f"projected 90-epoch ImageNet-LT run on {GPUS} x {device_name}: {total_h:.2f} h "
          f"({epoch_train_s:.0f} s train + {epoch_val_s:.0f} s val per epoch, from {projection['based_on']})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
