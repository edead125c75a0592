"""List files, long-tailed splits, Fashion-MNIST(-LT) and the JPEG-folder writer (ltfast.data.datasets).
Fashion-MNIST comes from Debian's dataset-fashion-mnist package: CI installs it, so a missing
package fails these tests rather than skipping them."""
import gzip
import os

import pytest
import torch

from ltfast.data import (InMemoryDataset, class_counts, fashion_mnist_lt, load_fashion_mnist, long_tailed_counts,
                         long_tailed_indices, read_list_file, write_jpeg_folder, write_list_file)


@pytest.fixture(scope="module")
def fmnist_lt():
    return fashion_mnist_lt()


# ------------------------------------------------------------------ list files
def test_list_file_round_trip(tmp_path):
    paths = ["train/n01440764/a.JPEG", "train/n01443537/b c.JPEG", "val/x.jpg"]
    write_list_file(str(tmp_path / "list.txt"), paths, [0, 1, 999])
    ds = read_list_file(str(tmp_path / "list.txt"), root="/data/ImageNet")
    assert ds.paths == paths and ds.labels.tolist() == [0, 1, 999] and ds.labels.dtype == torch.int64
    assert ds.full_path(1) == "/data/ImageNet/train/n01443537/b c.JPEG"
    assert ds.num_classes == 1000 and ds.class_counts()[[0, 1, 999]].tolist() == [1, 1, 1]
    assert read_list_file(str(tmp_path / "list.txt")).root == str(tmp_path)


@pytest.mark.parametrize("content,message", [
    ("a.jpg 0\nb.jpg\n", "list.txt:2: expected '<relative path> <integer label>'"),
    ("a.jpg 0\nb.jpg one\n", "list.txt:2: label must be an integer, got 'one'"),
    ("a.jpg -3\n", "list.txt:1: label must be >= 0"),
    ("\n\n", "list.txt: no entries"),
])
def test_list_file_errors_name_file_and_line(tmp_path, content, message):
    (tmp_path / "list.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_list_file(str(tmp_path / "list.txt"))


def test_list_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="list file not found: .*nope.txt"):
        read_list_file(str(tmp_path / "nope.txt"))
    (tmp_path / "list.txt").write_text("a.jpg 0\n")
    with pytest.raises(FileNotFoundError, match="list.txt:1: image not found: .*a.jpg"):
        read_list_file(str(tmp_path / "list.txt"), check_files=True)


# ------------------------------------------------------------------ long-tailed splits
def test_long_tailed_counts_exponential_and_step():
    assert long_tailed_counts(1000, 10, 100) == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert sum(long_tailed_counts(500, 100, 100)) == 10847  # CIFAR-100-LT, IF 100 (seed-methods.md 3.2)
    assert sum(long_tailed_counts(5000, 10, 100)) == 12406  # CIFAR-10-LT, IF 100
    assert long_tailed_counts(100, 4, 10, "step") == [100, 100, 10, 10]
    with pytest.raises(ValueError, match="profile must be 'exp' or 'step'"):
        long_tailed_counts(100, 4, 10, "linear")
    with pytest.raises(ValueError, match="ratio .* must be >= 1"):
        long_tailed_counts(100, 4, 0.5)


def test_long_tailed_indices():
    labels = torch.arange(5).repeat_interleave(40)
    idx = long_tailed_indices(labels, ratio=10, n_max=30, seed=1)
    assert class_counts(labels[idx]).tolist() == long_tailed_counts(30, 5, 10)
    assert torch.equal(idx, long_tailed_indices(labels, ratio=10, n_max=30, seed=1))
    assert not torch.equal(idx, long_tailed_indices(labels, ratio=10, n_max=30, seed=2))
    held_out = torch.arange(0, 200, 4)
    idx = long_tailed_indices(labels, ratio=10, n_max=30, seed=1, exclude=held_out)
    assert not torch.isin(idx, held_out).any()
    with pytest.raises(ValueError, match="class 0 has 30 usable images.*needs 35"):
        long_tailed_indices(labels, ratio=10, n_max=35, exclude=held_out)


# ------------------------------------------------------------------ Fashion-MNIST(-LT)
def test_fashion_mnist_from_debian_package():
    train, test = load_fashion_mnist()
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert (train.class_counts() == 6000).all() and (test.class_counts() == 1000).all()
    assert 70 < train.images.float().mean() < 75  # the known mean pixel, 0.286 * 255 = 72.9


def test_fashion_mnist_lt_exact_counts(fmnist_lt):
    assert fmnist_lt["class_counts"].tolist() == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert len(fmnist_lt["train"]) == 2478
    assert (fmnist_lt["val"].class_counts() == 50).all()
    assert (fmnist_lt["test"].class_counts() == 1000).all()
    assert not torch.isin(fmnist_lt["train_indices"], fmnist_lt["val_indices"]).any()
    counts = fmnist_lt["class_counts"]
    assert ((counts > 100).sum(), ((counts >= 20) & (counts <= 100)).sum(), (counts < 20).sum()) == (5, 3, 2)
    again = fashion_mnist_lt()
    assert torch.equal(again["train"].images, fmnist_lt["train"].images)


def test_idx_reader_rejects_a_corrupt_file(tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 10)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: header says"):
        load_fashion_mnist(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "missing"))


# ------------------------------------------------------------------ JPEG folder
def test_write_jpeg_folder_round_trip(tmp_path, fmnist_lt):
    from PIL import Image
    import numpy as np

    small = fmnist_lt["train"].subset(torch.arange(0, 2478, 120))
    list_file = write_jpeg_folder(small, str(tmp_path), "train")
    ds = read_list_file(list_file, check_files=True)
    assert torch.equal(ds.labels, small.labels)
    for i in range(len(ds)):
        assert ds.paths[i].startswith(f"train/{int(small.labels[i])}/")
        decoded = torch.from_numpy(np.array(Image.open(ds.full_path(i))))
        assert decoded.shape == (28, 28)
        assert (decoded.float() - small.images[i, 0].float()).abs().mean() < 4  # JPEG q90


def test_write_jpeg_folder_rgb_and_errors(tmp_path):
    rgb = InMemoryDataset(torch.randint(0, 255, (3, 3, 16, 20), dtype=torch.uint8), torch.tensor([0, 1, 1]))
    list_file = write_jpeg_folder(rgb, str(tmp_path), "val", quality=95)
    assert os.path.basename(list_file) == "val.txt" and len(read_list_file(list_file)) == 3
    with pytest.raises(ValueError, match="1 or 3 channels"):
        write_jpeg_folder(InMemoryDataset(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), torch.tensor([0])), str(tmp_path), "x")
    with pytest.raises(ValueError, match="images must be a uint8 tensor"):
        InMemoryDataset(torch.zeros(1, 4, 4), torch.tensor([0]))
