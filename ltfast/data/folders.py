"""Any labelled image set as a long-tail benchmark: an ``ImageFolder`` tree (``root/<class>/*.jpg``)
or a list file, its training split subsampled to an exponential or step profile.

    data = image_folder_lt("/data/flowers/train", ratio=100, test_root="/data/flowers/val")
    data["class_counts"]     # n_i = floor(n_max * (1/100) ** (i / (C - 1))), class 0 (first name) the head
    train = read_list_file("my_train.txt"); subset, kept = long_tailed_subset(train, ratio=50)

The subsample is deterministic: ``ltfast.data.long_tailed_indices`` (class i keeps the first n_i
of its images in a ``torch.randperm`` under ``seed``; the kept indices sorted, so file order is
preserved). Class order is label order, as in the CIFAR-LT generators: class 0 is the head. For an
image folder that is torchvision's ``ImageFolder`` order (class names sorted), so the head is the
alphabetically first class whatever its size; pass ``class_names`` to choose another order.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .datasets import (
    InMemoryDataset,
    ListDataset,
    class_counts,
    long_tailed_counts,
    long_tailed_indices,
)

# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively, as there)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_classes(root: str) -> list[str]:
    """Sorted names of the sub-folders of ``root`` (torchvision's ``find_classes``)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not names:
        raise FileNotFoundError(f"{root}: no class sub-folders (expected root/<class name>/<image>)")
    return names


def read_image_folder(root: str, class_names: Sequence[str] | None = None,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS, allow_empty: bool = False
                      ) -> tuple[ListDataset, list[str]]:
    """(ListDataset with paths relative to ``root``, class names) of ``root/<class>/**/<image>``,
    in torchvision ``ImageFolder``'s order (classes sorted, then ``sorted(os.walk(...))`` with sorted
    file names, links followed). ``class_names`` fixes the labels (e.g. a val folder read with the
    training folder's names): a sub-folder outside it is an error, a missing one an empty class.
    Unless ``allow_empty``, every class of a folder read without ``class_names`` must hold an image."""
    found = find_classes(root)
    names = list(found if class_names is None else class_names)
    if len(set(names)) != len(names):
        raise ValueError("class_names must be unique")
    index = {name: i for i, name in enumerate(names)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise ValueError(f"{root}: class folders {unknown[:5]} are not among the {len(names)} class names "
                         f"(class_names: {names[:5]}{' ...' if len(names) > 5 else ''})")
    suffixes = tuple(ext.lower() for ext in extensions)
    paths, labels = [], []
    for name in found:
        start = len(paths)
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(suffixes):
                    paths.append(os.path.relpath(os.path.join(folder, file), root))
                    labels.append(index[name])
        if len(paths) == start and class_names is None and not allow_empty:
            raise FileNotFoundError(f"{root}/{name}: no image with an extension in {', '.join(suffixes)}")
    if not paths:
        raise FileNotFoundError(f"{root}: no image with an extension in {', '.join(suffixes)}")
    return ListDataset(root, paths, torch.tensor(labels, dtype=torch.int64)), names


def _require_images(available: list) -> None:
    empty = [c for c, n in enumerate(available) if n == 0]
    if not available or empty:
        raise ValueError(f"every class needs a training image to be given a share of the profile; classes "
                         f"{empty[:10]}{' ...' if len(empty) > 10 else ''} have none")


def largest_n_max(available, ratio: float, profile: str = "exp") -> int:
    """The largest n_max whose ``long_tailed_counts`` every class can supply (class i needs n_i of
    its ``available[i]`` images). A balanced set of n per class gives n, as the CIFAR generators'
    ``total / classes``; an unbalanced one the largest profile that fits under it. Counts grow with
    n_max, so a bisection over [1, available[0]] finds it."""
    available = [int(n) for n in torch.as_tensor(available).tolist()]
    num_classes = len(available)

    def fits(n_max):
        return all(need <= have for need, have in zip(long_tailed_counts(n_max, num_classes, ratio, profile),
                                                      available))
    _require_images(available)
    low, high = 1, available[0]
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def subset_list(dataset: ListDataset, indices) -> ListDataset:
    """The entries ``indices`` of a list dataset, keeping their list file and line numbers."""
    indices = torch.as_tensor(indices, dtype=torch.int64)
    order = indices.tolist()
    lines = None if dataset.line_numbers is None else [dataset.line_numbers[i] for i in order]
    return ListDataset(dataset.root, [dataset.paths[i] for i in order], dataset.labels[indices], dataset.list_file,
                       lines)


def long_tailed_subset(dataset, ratio: float, profile: str = "exp", seed: int = 0, n_max: int | None = None,
                       num_classes: int | None = None):
    """(subset, kept indices) of a ``ListDataset`` or ``InMemoryDataset``: the ``profile`` with
    imbalance ``ratio`` (n_max / n_min) over the classes in label order, n_max defaulting to
    ``largest_n_max`` of the class sizes. ``ratio=1`` with the default n_max keeps a balanced subset.
    Every class of ``num_classes`` (default: largest label + 1) must have images."""
    if not isinstance(dataset, (ListDataset, InMemoryDataset)):
        raise TypeError(f"dataset must be a ListDataset or an InMemoryDataset, got {type(dataset).__name__}")
    available = class_counts(dataset.labels, num_classes)
    if n_max is None:
        n_max = largest_n_max(available, ratio, profile)
    _require_images(available.tolist())
    wanted = long_tailed_counts(n_max, available.numel(), ratio, profile)
    if min(wanted) == 0:
        raise ValueError(f"the {profile} profile with n_max={n_max} and ratio={ratio} leaves classes "
                         f"{[c for c, n in enumerate(wanted) if n == 0][:10]} without an image (n_max must be >= ratio)")
    short = [(c, int(have), need) for c, (have, need) in enumerate(zip(available.tolist(), wanted)) if have < need]
    if short:
        c, have, need = short[0]
        raise ValueError(f"class {c} has {have} images, the {profile} profile with n_max={n_max} and ratio={ratio} "
                         f"needs {need} ({len(short)} classes short; leave n_max unset for the largest that fits)")
    kept = long_tailed_indices(dataset.labels, ratio, profile=profile, n_max=n_max, seed=seed)
    subset = subset_list(dataset, kept) if isinstance(dataset, ListDataset) else dataset.subset(kept)
    return subset, kept


def image_folder_lt(train_root: str, ratio: float, test_root: str | None = None, val_root: str | None = None,
                    profile: str = "exp", seed: int = 0, n_max: int | None = None,
                    class_names: Sequence[str] | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict:
    """A long-tail benchmark from image folders: the training folder subsampled by
    ``long_tailed_subset``; the test (and val) folders read whole with the training folder's class
    names. Returns the dict of ``fashion_mnist_lt`` / ``cifar_lt``: ``train``, ``val``, ``test``
    (``ListDataset``; paths relative to each folder), ``class_names``, ``class_counts``,
    ``train_indices`` (into the full training folder) and ``n_max``. Without ``val_root`` the
    validation set is the test set (as the CIFAR-LT codebases do; a report should say so)."""
    train_full, names = read_image_folder(train_root, class_names, extensions)
    if n_max is None:
        n_max = largest_n_max(class_counts(train_full.labels, len(names)), ratio, profile)
    train, kept = long_tailed_subset(train_full, ratio, profile, seed, n_max, num_classes=len(names))
    test = None if test_root is None else read_image_folder(test_root, names, extensions)[0]
    val = test if val_root is None else read_image_folder(val_root, names, extensions)[0]
    return {"train": train, "val": val, "test": test, "class_names": names,
            "class_counts": train.class_counts(len(names)), "train_indices": kept, "n_max": n_max}


def list_file_lt(list_file: str, ratio: float, root: str | None = None, profile: str = "exp", seed: int = 0,
                 n_max: int | None = None, num_classes: int | None = None) -> tuple[ListDataset, torch.Tensor]:
    """``long_tailed_subset`` of a list file in the survey's format (``read_list_file``)."""
    from .datasets import read_list_file
    return long_tailed_subset(read_list_file(list_file, root, num_classes=num_classes), ratio, profile, seed, n_max,
                              num_classes)
