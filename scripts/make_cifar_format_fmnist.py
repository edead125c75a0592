"""Writes Fashion-MNIST as a CIFAR-10 folder, so the CIFAR-LT readers and configs run on real images
without CIFAR itself (nothing is downloaded).

    python scripts/make_cifar_format_fmnist.py OUT_ROOT [--per-class 5000] [--fmnist-root DIR]
    # -> OUT_ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}

Images: Debian's dataset-fashion-mnist (``ltfast.data.load_fashion_mnist``), 28x28 grey padded
with 2 black pixels on every side to 32x32 and repeated over the 3 channels. Layout: CIFAR-10's
pickles as the real files hold them (``ltfast.data.cifar.write_cifar_folder``: Python-2 strings,
keys ``batch_label`` / ``labels`` / ``data`` / ``filenames``, ``data`` uint8 [N, 3072]), readable
by ``ltfast.data.cifar`` and by torchvision's ``CIFAR10`` (which would only object to the md5s).

Training set: by default the first 5,000 images of each class in file order, i.e. CIFAR-10's
50,000 images (5 batches of 10,000 in Fashion-MNIST's file order, where the classes are already
mixed: 942 to 1,027 images of each class in data_batch_1). CIFAR-10-LT at ratio
100 then has CIFAR-10's counts, 5000, 2997, ..., 50. ``--per-class 0`` keeps all 60,000 (n_max
6,000). Test set: all 10,000 test images (``--test-per-class K``: the first K of each class, still
balanced). Prints the CIFAR-10-LT counts read back at ratios 10,
50 and 100.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ltfast.data.cifar import cifar_lt, write_cifar_folder
from ltfast.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    InMemoryDataset,
    load_fashion_mnist,
)


def to_cifar_images(dataset: InMemoryDataset) -> InMemoryDataset:
    """[N, 1, 28, 28] -> [N, 3, 32, 32]: zero padding of 2 on each side, the grey channel repeated."""
    padded = torch.nn.functional.pad(dataset.images, (2, 2, 2, 2), value=0)
    return InMemoryDataset(padded.expand(-1, 3, -1, -1).contiguous(), dataset.labels)


def first_per_class(dataset: InMemoryDataset, per_class: int) -> InMemoryDataset:
    """The first ``per_class`` images of every class, file order kept."""
    keep = torch.zeros(len(dataset), dtype=torch.bool)
    for c in range(10):
        members = torch.nonzero(dataset.labels == c).flatten()
        if members.numel() < per_class:
            raise ValueError(f"--per-class {per_class}: class {c} has only {members.numel()} training images")
        keep[members[:per_class]] = True
    return dataset.subset(torch.nonzero(keep).flatten())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_root", help="folder to hold cifar-10-batches-py/")
    parser.add_argument("--per-class", type=int, default=5000,
                        help="training images per class (CIFAR-10: 5000); 0 keeps all 6000")
    parser.add_argument("--test-per-class", type=int, default=0,
                        help="test images per class, the first in file order (default 0: all 1000, CIFAR-10's 10,000)")
    parser.add_argument("--fmnist-root", default=FASHION_MNIST_ROOT)
    args = parser.parse_args(argv)
    if args.per_class < 0:
        parser.error("--per-class must be >= 0")
    if not 0 <= args.test_per_class <= 1000:
        parser.error("--test-per-class must be in [0, 1000] (Fashion-MNIST has 1000 test images per class)")
    start = time.perf_counter()
    train, test = load_fashion_mnist(args.fmnist_root)
    if args.per_class:
        train = first_per_class(train, args.per_class)
    if args.test_per_class:
        test = first_per_class(test, args.test_per_class)
    folder = write_cifar_folder(args.out_root, "cifar10", to_cifar_images(train), to_cifar_images(test),
                                FASHION_MNIST_CLASSES)
    print(f"wrote {len(train)} training and {len(test)} test images to {folder} "
          f"in {time.perf_counter() - start:.1f} s")
    for ratio in (10, 50, 100):
        data = cifar_lt(args.out_root, "cifar10", ratio)
        counts = data["class_counts"].tolist()
        print(f"CIFAR-10-LT layout, ratio {ratio}: {sum(counts)} training images: {', '.join(map(str, counts))}")


if __name__ == "__main__":
    main()
