"""Data suite of benchmarks/throughput.py: images/s of ltfast's loaders against the usual
PyTorch ones, each pair measured round-robin in the same run (DESIGN.md "Benchmarks").

    python benchmarks/throughput.py --suites data [--quick] [--device cuda] [--json PATH]

Rows (suite "data"; ``median_ms`` is per epoch, ``items_per_s`` images per second over whole
epochs after one warm-up epoch):

- ``photos_train`` / ``photos_eval``: the DALI pipeline ("dali") against the PIL/torchvision
  DataLoader ("pil"), same sampler, same augmentation (RandomResizedCrop 224, flip, colour jitter
  0.4, normalise; eval: resize 256, centre crop 224), on a few hundred real photos (Debian's
  lomiri-wallpapers-16.04 re-encoded to ImageNet sizes around 500x375 at quality 90 by
  ltfast.data.photos). Equal CPU: DALI ``num_threads`` = DataLoader ``num_workers`` = the cores
  this process may use. ``extra`` also holds each loader's CPU milliseconds per image (this
  process's threads, plus the DataLoader workers' from /proc), which the other jobs of a shared
  machine do not move the way they move images/s.
- ``fmnist_lt_jpeg``: the same pair on the Fashion-MNIST-LT training set written as a JPEG folder
  (28x28 grey; RandomResizedCrop 28 of the 28x28 image, flip, brightness/contrast jitter).
- ``device_tensor``: ltfast's DeviceTensorLoader ("ltfast") over Fashion-MNIST-LT in memory
  against a DataLoader over a TensorDataset of the same tensors with the same augmentation
  (torchvision transforms v2: RandomCrop(28, padding=4), flip, normalise), in the main process
  ("dataloader") and with worker processes ("dataloader_workers").
- ``sampler_draw``: one epoch of ClassBalancedSampler indices (the survey's ClassAwareSampler,
  num_samples_cls 4) over an ImageNet-LT-shaped label vector (115,846 labels, 1000 classes,
  1280 down to 5 per class): ltfast's op-backed sampler ("ltfast") against a plain-Python
  re-implementation of the survey's RandomCycleIter sampler ("survey").
"""
from __future__ import annotations

import os
import random
import resource
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Record, device_name, measure_interleaved, percentile  # noqa: E402


def _records(name, mode, shape, dtype, device, times, items, extras, baseline):
    """One Record per implementation; the others' speed-up is taken against ``baseline``."""
    medians = {impl: statistics.median(t) for impl, t in times.items()}
    out = []
    for impl, t in times.items():
        extra = dict(extras.get(impl, {}))
        extra["items_per_epoch"] = items
        if impl != baseline:
            extra["speedup_vs_best_baseline"] = round(medians[baseline] / medians[impl], 2)
        out.append(Record("data", name, impl, device, device_name(device), dtype, list(shape), mode,
                          round(medians[impl], 3), round(percentile(t, 0.2), 3), round(percentile(t, 0.8), 3),
                          None, round(items / (medians[impl] * 1e-3), 1), extra))
    return out


def _epoch_runner(loader):
    """A call that runs the loader's next epoch to the end (set_epoch first, as a trainer does)."""
    state = {"epoch": 0}

    def run():
        loader.set_epoch(state["epoch"])
        state["epoch"] += 1
        for images, labels in loader:
            pass
        if images.is_cuda:
            torch.cuda.synchronize()
    return run


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _workers_cpu_s(loader) -> float:
    """CPU seconds of a PIL loader's live DataLoader worker processes (from /proc)."""
    iterator = getattr(loader._loader, "_iterator", None)
    total = 0.0
    for worker in getattr(iterator, "_workers", []) or []:
        try:
            with open(f"/proc/{worker.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _with_cpu_time(run, loader, account):
    """Wraps an epoch call to add the CPU seconds it used (this process's threads, plus the
    DataLoader workers' for the PIL loader) to ``account``: a measure of work per image that
    the other jobs of a shared machine do not move, unlike images/s."""
    def call():
        workers0 = _workers_cpu_s(loader) if hasattr(loader, "_loader") else 0.0
        cpu0 = _process_cpu_s()
        run()
        cpu1 = _process_cpu_s()
        # persistent workers: the same processes, alive across epochs (read after the epoch)
        workers1 = _workers_cpu_s(loader) if hasattr(loader, "_loader") else 0.0
        account.append(cpu1 - cpu0 + max(0.0, workers1 - workers0))
    return call


def _cache_dir() -> str:
    base = os.environ.get("LTFAST_PHOTO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ltfast")
    return base


def image_pair(name, dataset, sampler, batch_size, args, threads, loader_kwargs, mode="train"):
    from ltfast.data.dali import make_image_loader
    common = dict(dataset=dataset, sampler=sampler, batch_size=batch_size, device=args.device,
                  train=mode == "train", **loader_kwargs)
    dali = make_image_loader("dali", num_threads=threads, **common)
    pil = make_image_loader("pil", num_workers=threads, **common)
    items = len(dali) * batch_size if mode == "train" else dali._num_indices()
    # PIL first: its workers fork before DALI starts its threads
    cpu = {"pil": [], "dali": []}
    times = measure_interleaved({"pil": _with_cpu_time(_epoch_runner(pil), pil, cpu["pil"]),
                                 "dali": _with_cpu_time(_epoch_runner(dali), dali, cpu["dali"])}, args.device,
                                args.min_time, args.max_reps, warmup=1)
    c = 1 if len(loader_kwargs.get("mean", (0, 0, 0))) == 1 else 3
    size = loader_kwargs.get("crop_size", 224)
    # CPU ms per image over the timed epochs (the warm-up epoch, with worker start-up, left out)
    cpu_ms = {k: round(statistics.median(v[1:]) / items * 1e3, 3) for k, v in cpu.items()}
    extras = {"dali": {"threads": threads, "decoder": dali.decoder_device, "cpu_ms_per_image": cpu_ms["dali"],
                       "cpu_efficiency_vs_pil": round(cpu_ms["pil"] / cpu_ms["dali"], 2)},
              "pil": {"workers": threads, "cpu_ms_per_image": cpu_ms["pil"]}}
    records = _records(name, mode, [batch_size, c, size, size], "float32", args.device, times, items, extras, "pil")
    del dali, pil
    return records


def imagenet_lt_shaped_labels(total=115_846, classes=1000, n_max=1280, n_min=5) -> torch.Tensor:
    """Labels with ImageNet-LT's shape: ``classes`` classes from ``n_max`` down to ``n_min`` images,
    ``total`` in all (n_c = n_max (n_min/n_max)^((c/(C-1))^p), p fitted, rounding spread)."""
    def counts(p):
        return [n_max * (n_min / n_max) ** ((c / (classes - 1)) ** p) for c in range(classes)]
    lo, hi = 0.05, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(counts(mid)) > total else (lo, mid)
    n = [int(round(x)) for x in counts(lo)]
    k = 1
    while sum(n) != total:  # spread the rounding remainder over the middle classes
        step = 1 if sum(n) < total else -1
        i = classes // 4 + (k * 7) % (classes // 2)
        if n_min < n[i] + step < n_max:
            n[i] += step
        k += 1
    return torch.repeat_interleave(torch.arange(classes), torch.tensor(n))


class SurveyClassAwareSampler:
    """The survey's Main-codebase/data/ClassAwareSampler.py in plain Python (RandomCycleIter over
    the classes and over each class's images, ``num_samples_cls`` per visit), the baseline of
    the sampler-draw row."""

    class _Cycle:
        def __init__(self, data):
            self.data, self.i = list(data), len(data) - 1

        def __next__(self):
            self.i += 1
            if self.i == len(self.data):
                self.i = 0
                random.shuffle(self.data)
            return self.data[self.i]

    def __init__(self, labels, num_samples_cls=4):
        by_class = [[] for _ in range(int(labels.max()) + 1)]
        for i, c in enumerate(labels.tolist()):
            by_class[c].append(i)
        self.class_iter = self._Cycle(range(len(by_class)))
        self.data_iters = [self._Cycle(x) for x in by_class]
        self.num_samples_cls, self.num_samples = num_samples_cls, len(labels)

    def __iter__(self):
        i = j = 0
        while i < self.num_samples:
            if j >= self.num_samples_cls:
                j = 0
            if j == 0:
                batch = [next(self.data_iters[next(self.class_iter)]) for _ in range(self.num_samples_cls)]
            yield batch[j]
            i += 1
            j += 1


def sampler_rows(args) -> list[Record]:
    from ltfast.data import ClassBalancedSampler
    labels = imagenet_lt_shaped_labels()
    ours = ClassBalancedSampler(labels, num_samples_cls=4, seed=0)
    survey = SurveyClassAwareSampler(labels, 4)
    state = {"epoch": 0}

    def draw_ours():
        ours.set_epoch(state["epoch"])
        state["epoch"] += 1
        ours.indices()

    def draw_survey():
        for _ in survey:
            pass
    times = measure_interleaved({"ltfast": draw_ours, "survey": draw_survey}, "cpu", args.min_time,
                                args.max_reps, warmup=1)
    return _records("sampler_draw", "draw", [labels.numel()], "int64", "cpu", times, labels.numel(),
                    {"ltfast": {"classes": 1000}, "survey": {"classes": 1000}}, "survey")


def device_tensor_rows(args, fmnist, threads) -> list[Record]:
    from torchvision.transforms import v2

    from ltfast.data import DeviceTensorLoader, InstanceSampler
    from ltfast.data.loaders import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    train = fmnist["train"]
    batch = 128
    sampler = InstanceSampler(train.labels, seed=0)
    ours = DeviceTensorLoader(train, sampler, batch_size=batch, device=args.device, train=True)
    transform = v2.Compose([v2.RandomCrop(28, padding=4), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)])

    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            return transform(train.images[i]), train.labels[i]

    def dataloader(workers):
        loader = torch.utils.data.DataLoader(Augmented(), batch_size=batch, sampler=sampler, drop_last=True,
                                             num_workers=workers, persistent_workers=workers > 0,
                                             pin_memory=args.device == "cuda")

        class Epochs:  # set_epoch + move to the device, as the training loop would
            def set_epoch(self, epoch):
                sampler.set_epoch(epoch)

            def __iter__(self):
                for x, y in loader:
                    yield x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        return Epochs()
    calls = {"ltfast": _epoch_runner(ours), "dataloader": _epoch_runner(dataloader(0)),
             "dataloader_workers": _epoch_runner(dataloader(threads))}
    times = measure_interleaved(calls, args.device, args.min_time, args.max_reps, warmup=1)
    # the speed-up is against the faster of the two DataLoader set-ups
    best = min(("dataloader", "dataloader_workers"), key=lambda k: statistics.median(times[k]))
    extras = {"ltfast": {"baseline": best}, "dataloader": {"workers": 0}, "dataloader_workers": {"workers": threads}}
    return _records("device_tensor", "train", [batch, 1, 28, 28], "float32", args.device, times,
                    len(ours) * batch, extras, best)


def data_suite(args) -> list[Record]:
    from ltfast.data import InstanceSampler, ListDataset, fashion_mnist_lt, read_list_file, write_jpeg_folder
    from ltfast.data.dali import default_num_threads
    from ltfast.data.loaders import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from ltfast.data.photos import default_photo_dir, prepare_photo_set

    threads = default_num_threads()
    records = []
    # ---------------------------------------------------------------- real photos
    photos = read_list_file(prepare_photo_set(default_photo_dir(300), count=300))
    batch = 64
    epoch_images = 192 if args.quick else 512
    sampler = InstanceSampler(photos.labels, num_samples=epoch_images, seed=0)
    records += image_pair("photos_train", photos, sampler, batch, args, threads, {})
    if not args.quick:
        subset = ListDataset(photos.root, photos.paths[:256], photos.labels[:256])
        records += image_pair("photos_eval", subset, None, batch, args, threads, {}, mode="eval")
    # ---------------------------------------------------------------- Fashion-MNIST-LT as JPEGs
    fmnist = fashion_mnist_lt()
    jpeg_dir = os.path.join(_cache_dir(), "fmnist_lt_jpeg")
    list_file = os.path.join(jpeg_dir, "train.txt")
    if not os.path.exists(list_file):
        write_jpeg_folder(fmnist["train"], jpeg_dir, "train")
    jpegs = read_list_file(list_file)
    if len(jpegs) != len(fmnist["train"]):
        jpegs = read_list_file(write_jpeg_folder(fmnist["train"], jpeg_dir, "train"))
    batch = 128
    sampler = InstanceSampler(jpegs.labels, num_samples=1024 if args.quick else len(jpegs), seed=0)
    records += image_pair("fmnist_lt_jpeg", jpegs, sampler, batch, args, threads,
                          dict(crop_size=28, resize_size=32, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD))
    # ---------------------------------------------------------------- in-memory and sampler
    records += device_tensor_rows(args, fmnist, threads)
    records += sampler_rows(args)
    return records


if __name__ == "__main__":  # pragma: no cover - use throughput.py --suites data
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--min-time", type=float, default=None)
    parser.add_argument("--max-reps", type=int, default=200)
    a = parser.parse_args()
    a.min_time = a.min_time if a.min_time is not None else (0.3 if a.quick else 1.0)
    for r in data_suite(a):
        print(r)
