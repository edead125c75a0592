"""Long-tailed datasets: the survey's list files, long-tailed splits of any labelled set,
Fashion-MNIST(-LT) from Debian's ``dataset-fashion-mnist`` package, and a JPEG-folder writer.

    train = read_list_file("data/ImageNet_LT_train.txt", root="/data/ImageNet")
    fmnist = fashion_mnist_lt()               # {"train", "val", "test", "class_names", "class_counts"}
    write_jpeg_folder(fmnist["train"], "/tmp/fmnist_lt", "train")   # -> /tmp/fmnist_lt/train.txt

Nothing here downloads anything.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from typing import Sequence

import torch

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _as_label_tensor(labels, name: str = "labels") -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class indices, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"{name} must hold integers, got {labels.dtype}")
    labels = labels.to(torch.int64)
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} must be non-negative class indices, got {int(labels.min())}")
    return labels


def class_counts(labels, num_classes: int | None = None) -> torch.Tensor:
    """Images per class, int64 [C] (C = max label + 1 unless given)."""
    labels = _as_label_tensor(labels)
    if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"num_classes={num_classes} but labels contain class {int(labels.max())}")
    return torch.bincount(labels.cpu(), minlength=num_classes or 0)


# ------------------------------------------------------------------ list files
@dataclass
class ListDataset:
    """Images named by a list file: ``paths[i]`` (relative to ``root``) has class ``labels[i]``."""
    root: str
    paths: list
    labels: torch.Tensor
    list_file: str | None = None      # where the entries came from, for error messages
    line_numbers: list | None = None  # line of entry i in list_file (blank lines are skipped)

    def __post_init__(self):
        self.labels = _as_label_tensor(self.labels)
        if len(self.paths) != self.labels.numel():
            raise ValueError(f"paths ({len(self.paths)}) and labels ({self.labels.numel()}) differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        return class_counts(self.labels, num_classes)

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def where(self, i: int) -> str:
        """``list_file:line`` of entry ``i`` (or ``entry i`` when the dataset was not read from a file)."""
        if self.list_file is None or self.line_numbers is None:
            return f"entry {i}"
        return f"{self.list_file}:{self.line_numbers[i]}"


def read_list_file(list_file: str, root: str | None = None, check_files: bool = False,
                   num_classes: int | None = None) -> ListDataset:
    """Reads the survey's list format, one ``<relative path> <integer label>`` per line (e.g.
    ``train/n01440764/n01440764_190.JPEG 0``). Paths may contain spaces: the label is the last field.
    ``root`` defaults to the list file's folder. Blank lines are skipped; anything else that is not
    a path and a non-negative integer is an error naming the file and line. With ``check_files``
    every image must exist (one stat per file: off by default for ImageNet-sized lists; see
    :func:`check_files_exist` for the parallel check). With ``num_classes`` every label must be
    below it. A UTF-8 byte-order mark (Windows editors write one) is skipped."""
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"list file not found: {list_file}")
    root = os.path.dirname(os.path.abspath(list_file)) if root is None else root
    paths, labels, lines = [], [], []
    # utf-8-sig: a BOM used to become part of the first path, which was then reported missing.
    with open(list_file, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{list_file}:{line_number}: expected '<relative path> <integer label>', got {text!r}")
            path, label = parts
            try:
                value = int(label)
            except ValueError:
                raise ValueError(f"{list_file}:{line_number}: label must be an integer, got {label!r}") from None
            if value < 0:
                raise ValueError(f"{list_file}:{line_number}: label must be >= 0, got {value}")
            if num_classes is not None and value >= num_classes:
                raise ValueError(f"{list_file}:{line_number}: label {value} is outside the {num_classes} classes "
                                 f"[0, {num_classes})")
            if value >= 2**63:
                raise ValueError(f"{list_file}:{line_number}: label {value} does not fit in int64")
            if check_files and not os.path.isfile(os.path.join(root, path)):
                raise FileNotFoundError(f"{list_file}:{line_number}: image not found: {os.path.join(root, path)}")
            paths.append(path)
            labels.append(value)
            lines.append(line_number)
    if not paths:
        raise ValueError(f"{list_file}: no entries")
    return ListDataset(root, paths, torch.tensor(labels, dtype=torch.int64), list_file, lines)


def check_labels(splits: dict, num_classes: int | None = None, allow_empty: bool = False,
                 train: str = "train") -> int:
    """Checks the labels of every split (``{"train": ListDataset, "val": ..., ...}``, None entries
    skipped) against one class count and returns it: ``num_classes`` when given (every label must be
    below it), else the largest label of any split + 1. Unless ``allow_empty``, every class must have
    a training image: a label typo (15 in a 10-class list) would otherwise build a 16-way model with
    five empty "few-shot" classes, and a label of 10**9 a billion-class table. Errors name the
    list file and line. Cost: one max and one unique over the labels (no [C] allocation)."""
    splits = {name: ds for name, ds in splits.items() if ds is not None and len(ds)}

    def largest(ds):
        i = int(torch.argmax(ds.labels))
        return int(ds.labels[i]), ds.where(i)

    tops = {name: largest(ds) for name, ds in splits.items()}
    if num_classes is not None:
        for name, ds in splits.items():
            value, where = tops[name]
            if value >= num_classes:
                raise ValueError(f"{where}: {name} label {value} is outside the {num_classes} classes "
                                 f"[0, {num_classes}) (data.num_classes)")
        count = num_classes
    else:
        count = max(value for value, _ in tops.values()) + 1
    if allow_empty or train not in splits:
        return count
    present = torch.unique(splits[train].labels)
    if present.numel() == count:
        return count
    missing = count - present.numel()
    present_mask_small = count <= 10_000_000  # list the empty classes only when that is cheap
    if present_mask_small:
        seen = torch.zeros(count, dtype=torch.bool)
        seen[present] = True
        empty = torch.nonzero(~seen).flatten().tolist()
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
    else:
        shown = "(too many to list)"
    source, (value, where) = max(tops.items(), key=lambda item: item[1][0])
    origin = "data.num_classes" if num_classes is not None else f"the largest label, {value} at {where} ({source})"
    raise ValueError(f"{missing} of the {count} classes have no training image: {shown}; the class count comes "
                     f"from {origin}. A label typo? Set data.num_classes, fix the list, or set "
                     f"data.allow_empty_classes=true if empty classes are intended.")


def check_files_exist(dataset: "ListDataset", name: str = "", workers: int = 32) -> None:
    """Every listed image must exist: one stat per file on ``workers`` threads (a stat releases the
    GIL; on network file systems latency, not CPU, bounds it). A missing test image used to fail
    only after all training epochs. Raises FileNotFoundError naming the count and the first missing
    files with their list file and line."""
    from concurrent.futures import ThreadPoolExecutor
    paths = [dataset.full_path(i) for i in range(len(dataset))]
    chunk = max(1, len(paths) // (workers * 4) + 1)

    def missing_in(start):
        return [i for i in range(start, min(start + chunk, len(paths))) if not os.path.isfile(paths[i])]

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths) // chunk + 1))) as pool:
        missing = [i for part in pool.map(missing_in, range(0, len(paths), chunk)) for i in part]
    if missing:
        shown = "; ".join(f"{dataset.where(i)}: {paths[i]}" for i in missing[:5])
        label = f"{name} " if name else ""
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} {label}images listed do not exist "
                                f"(data.check_files=false skips this check): {shown}"
                                f"{' ...' if len(missing) > 5 else ''}")


def write_list_file(list_file: str, paths: Sequence[str], labels) -> None:
    labels = _as_label_tensor(labels)
    if len(paths) != labels.numel():
        raise ValueError(f"paths ({len(paths)}) and labels ({labels.numel()}) differ in length")
    os.makedirs(os.path.dirname(os.path.abspath(list_file)), exist_ok=True)
    with open(list_file, "w", encoding="utf-8") as f:
        for path, label in zip(paths, labels.tolist()):
            if "\n" in path:
                raise ValueError(f"path {path!r} contains a newline")
            f.write(f"{path} {label}\n")


# ------------------------------------------------------------------ long-tailed splits
def long_tailed_counts(n_max: int, num_classes: int, ratio: float, profile: str = "exp") -> list[int]:
    """Images per class of a long-tailed split, class 0 the head (CIFAR-LT convention of BBN /
    hyperconnect LADE ``ImbalanceCIFAR``): ``exp``: ``floor(n_max * (1/ratio) ** (i / (C - 1)))``;
    ``step``: ``n_max`` for the first ``C // 2`` classes and ``floor(n_max / ratio)`` for the rest."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if not ratio >= 1:
        raise ValueError(f"ratio (imbalance n_max / n_min) must be >= 1, got {ratio}")
    if profile == "exp":
        if num_classes == 1:
            return [n_max]
        # (1/ratio)**t as BBN writes it: 100**(-1/9) and 0.01**(1/9) differ in the last bit
        return [int(n_max * (1.0 / ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]
    if profile == "step":
        return [n_max if i < num_classes // 2 else int(n_max / ratio) for i in range(num_classes)]
    raise ValueError(f"profile must be 'exp' or 'step', got {profile!r}")


def long_tailed_indices(labels, ratio: float, profile: str = "exp", n_max: int | None = None, seed: int = 0,
                        exclude=None) -> torch.Tensor:
    """Indices of a long-tailed subset of a labelled set: class i keeps the first
    ``long_tailed_counts(...)[i]`` of its images in a seeded shuffle (sorted in the result).
    ``n_max`` defaults to class 0's size; ``exclude`` (indices) are never taken, e.g. a held-out
    validation split. A class with too few images is an error naming it."""
    labels = _as_label_tensor(labels)
    counts_available = class_counts(labels)
    allowed = torch.ones(labels.numel(), dtype=torch.bool)
    if exclude is not None:
        allowed[torch.as_tensor(exclude, dtype=torch.int64)] = False
    num_classes = counts_available.numel()
    if n_max is None:
        n_max = int(allowed[labels == 0].sum())
    wanted = long_tailed_counts(n_max, num_classes, ratio, profile)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c, n_c in enumerate(wanted):
        pool = torch.nonzero((labels == c) & allowed).flatten()
        if pool.numel() < n_c:
            raise ValueError(f"class {c} has {pool.numel()} usable images, the {profile} profile with n_max={n_max} "
                             f"and ratio={ratio} needs {n_c}")
        chosen.append(pool[torch.randperm(pool.numel(), generator=generator)[:n_c]])
    return torch.cat(chosen).sort().values


# ------------------------------------------------------------------ in-memory sets, Fashion-MNIST
@dataclass
class InMemoryDataset:
    """Images as one uint8 tensor [N, C, H, W] with int64 labels [N]."""
    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        self.labels = _as_label_tensor(self.labels)
        if self.labels.numel() != self.images.shape[0]:
            raise ValueError(f"labels ({self.labels.numel()}) and images ({self.images.shape[0]}) differ in length")

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        return class_counts(self.labels, num_classes)

    def subset(self, indices) -> "InMemoryDataset":
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return InMemoryDataset(self.images[indices], self.labels[indices])


def _read_idx(path: str, expected_dims: int) -> torch.Tensor:
    """An IDX file (gzip or plain) as uint8: magic 0x0000 0x08 <dims>, big-endian int32 sizes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (install Debian's dataset-fashion-mnist: "
                                "apt-get install -y dataset-fashion-mnist)")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX header")
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
        raise ValueError(f"{path}: expected an unsigned-byte IDX file with {expected_dims} dimensions, "
                         f"got type 0x{dtype_code:02x} with {dims}")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    payload = data[4 + 4 * dims:]
    if len(payload) != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} ({math.prod(shape)} bytes), file holds {len(payload)}")
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(root: str = FASHION_MNIST_ROOT) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train [60000, 1, 28, 28], test [10000, 1, 28, 28]) from the IDX files of
    ``dataset-fashion-mnist`` (``*-idx3-ubyte.gz`` / ``*-idx1-ubyte.gz``, plain files also read)."""
    def find(stem):
        for name in (stem + ".gz", stem):
            if os.path.isfile(os.path.join(root, name)):
                return os.path.join(root, name)
        return os.path.join(root, stem + ".gz")
    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx(find(f"{prefix}-images-idx3-ubyte"), 3)
        labels = _read_idx(find(f"{prefix}-labels-idx1-ubyte"), 1)
        splits.append(InMemoryDataset(images.unsqueeze(1).contiguous(), labels.to(torch.int64)))
    return splits[0], splits[1]


def fashion_mnist_lt(ratio: float = 100, n_max: int = 1000, val_per_class: int = 50, seed: int = 0,
                     profile: str = "exp", root: str = FASHION_MNIST_ROOT) -> dict:
    """Fashion-MNIST-LT, the CPU benchmark set.

    - train: a long-tailed subset of the 60k training images, class 0 the head; the default
      (ratio 100, n_max 1000) gives 1000, 599, 359, 215, 129, 77, 46, 27, 16, 10 images (2478),
      i.e. 5 many-shot (>100), 3 medium and 2 few-shot (<20) classes with the survey's thresholds.
      n_max 1000 rather than 6000 keeps all three groups populated and a CPU epoch short.
    - val: ``val_per_class`` images per class held out from the training images first (never in
      train), balanced, for model selection as the survey's ImageNet_LT_val.
    - test: the balanced 10k test set.
    ``train_indices`` / ``val_indices`` index the 60k training images.
    """
    train_full, test = load_fashion_mnist(root)
    generator = torch.Generator().manual_seed(seed + 7919)  # distinct from the long-tail draw
    val_indices = []
    for c in range(10):
        pool = torch.nonzero(train_full.labels == c).flatten()
        val_indices.append(pool[torch.randperm(pool.numel(), generator=generator)[:val_per_class]])
    val_indices = torch.cat(val_indices).sort().values
    train_indices = long_tailed_indices(train_full.labels, ratio, profile=profile, n_max=n_max, seed=seed,
                                        exclude=val_indices)
    train = train_full.subset(train_indices)
    return {"train": train, "val": train_full.subset(val_indices), "test": test,
            "class_names": list(FASHION_MNIST_CLASSES), "class_counts": train.class_counts(10),
            "train_indices": train_indices, "val_indices": val_indices}


def write_jpeg_folder(dataset: InMemoryDataset, out_dir: str, split: str, quality: int = 90) -> str:
    """Writes ``out_dir/<split>/<label>/<index>.jpg`` for every image and the list file
    ``out_dir/<split>.txt`` (paths relative to ``out_dir``), so an in-memory set can flow through
    the image pipeline. Grey images (1 channel) are written as greyscale JPEGs. Returns the list
    file's path."""
    from PIL import Image

    if not isinstance(dataset, InMemoryDataset):
        raise TypeError(f"dataset must be an InMemoryDataset, got {type(dataset).__name__}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    channels = dataset.images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels to be written as JPEG, got {channels}")
    paths = []
    for c in range(dataset.num_classes):
        os.makedirs(os.path.join(out_dir, split, str(c)), exist_ok=True)
    images = dataset.images.cpu()
    for i, label in enumerate(dataset.labels.tolist()):
        array = images[i].permute(1, 2, 0).numpy()
        image = Image.fromarray(array[:, :, 0] if channels == 1 else array, "L" if channels == 1 else "RGB")
        relative = os.path.join(split, str(label), f"{i}.jpg")
        image.save(os.path.join(out_dir, relative), quality=quality)
        paths.append(relative)
    list_file = os.path.join(out_dir, f"{split}.txt")
    write_list_file(list_file, paths, dataset.labels)
    return list_file
