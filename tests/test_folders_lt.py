"""Image folders and list files made long-tailed (ltfast.data.folders)."""
import os

import pytest
import torch

from ltfast.data import (
    InMemoryDataset,
    long_tailed_counts,
    long_tailed_indices,
    write_list_file,
)
from ltfast.data.folders import (
    image_folder_lt,
    largest_n_max,
    list_file_lt,
    long_tailed_subset,
    read_image_folder,
)


def make_folder(root, sizes, names=None, nested=False):
    """root/<name>/<i>.jpg (empty files: nothing here decodes them), plus files to be skipped."""
    names = names or [f"class_{c}" for c in range(len(sizes))]
    for name, size in zip(names, sizes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(size):
            sub = os.path.join(root, name, "deeper") if nested and i % 2 else os.path.join(root, name)
            os.makedirs(sub, exist_ok=True)
            open(os.path.join(sub, f"{i:03d}.{'JPG' if i == 0 else 'jpg'}"), "wb").close()
        open(os.path.join(root, name, "notes.txt"), "wb").close()
    return str(root)


def test_read_image_folder_follows_imagefolder_order(tmp_path):
    root = make_folder(tmp_path / "train", [3, 5, 2], ["emu", "cat", "dog"], nested=True)
    dataset, names = read_image_folder(root)
    assert names == ["cat", "dog", "emu"]
    assert dataset.class_counts().tolist() == [5, 2, 3]
    assert "cat/000.JPG" in dataset.paths and not any(p.endswith(".txt") for p in dataset.paths)
    assert "cat/deeper/001.jpg" in dataset.paths
    folder = pytest.importorskip("torchvision.datasets.folder")
    reference = folder.make_dataset(root, {n: i for i, n in enumerate(names)}, extensions=folder.IMG_EXTENSIONS)
    assert [(os.path.join(root, p), int(y)) for p, y in zip(dataset.paths, dataset.labels)] == reference


@pytest.mark.parametrize("available,ratio,profile", [([20, 20, 20], 4, "exp"), ([10, 30, 30], 4, "exp"),
                                                     ([30, 3, 30], 4, "exp"), ([40, 40, 9, 40], 10, "step"),
                                                     ([50] * 10, 1, "exp")])
def test_largest_n_max_is_the_largest_that_fits(available, ratio, profile):
    n_max = largest_n_max(available, ratio, profile)

    def fits(n):
        return all(need <= have for need, have in zip(long_tailed_counts(n, len(available), ratio, profile),
                                                      available))
    assert fits(n_max) and not any(fits(n) for n in range(n_max + 1, available[0] + 1))
    if len(set(available)) == 1:
        assert n_max == available[0]  # a balanced set: n per class, the generators' total / classes


def test_long_tailed_subset_of_a_folder(tmp_path):
    root = make_folder(tmp_path / "train", [20, 20, 20, 20, 20])
    dataset, _ = read_image_folder(root)
    subset, kept = long_tailed_subset(dataset, ratio=10, seed=3)
    assert subset.class_counts().tolist() == long_tailed_counts(20, 5, 10) == [20, 11, 6, 3, 2]
    assert torch.equal(kept, long_tailed_indices(dataset.labels, 10, n_max=20, seed=3))
    assert kept.tolist() == sorted(kept.tolist()) and subset.paths == [dataset.paths[i] for i in kept]
    again, _ = long_tailed_subset(dataset, ratio=10, seed=3)
    other, _ = long_tailed_subset(dataset, ratio=10, seed=4)
    assert again.paths == subset.paths and other.paths != subset.paths
    step, _ = long_tailed_subset(dataset, ratio=4, profile="step")
    assert step.class_counts().tolist() == [20, 20, 5, 5, 5]


def test_image_folder_lt_reads_test_and_val_with_the_training_names(tmp_path):
    train = make_folder(tmp_path / "train", [12, 9, 12, 12])
    test = make_folder(tmp_path / "test", [2, 2, 2], ["class_0", "class_1", "class_3"])
    data = image_folder_lt(train, ratio=4, test_root=test)
    # class 0's 12 images cap n_max; class 1 then needs floor(12 * 4 ** (-1/3)) = 7 of its 9.
    assert data["n_max"] == 12 and data["class_counts"].tolist() == long_tailed_counts(12, 4, 4) == [12, 7, 4, 3]
    assert data["val"] is data["test"] and data["test"].class_counts(4).tolist() == [2, 2, 0, 2]
    assert data["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    val = make_folder(tmp_path / "val", [1, 1], ["class_2", "unknown"])
    with pytest.raises(ValueError, match=r"class folders \['unknown'\] are not among the 4 class names"):
        image_folder_lt(train, ratio=4, test_root=test, val_root=val)


def test_list_file_and_in_memory_sets(tmp_path):
    labels = [c for c in range(3) for _ in range(10)]
    write_list_file(str(tmp_path / "train.txt"), [f"img/{i}.jpg" for i in range(30)], labels)
    subset, kept = list_file_lt(str(tmp_path / "train.txt"), ratio=5)
    assert subset.class_counts().tolist() == [10, 4, 2]
    assert subset.where(0) == f"{tmp_path / 'train.txt'}:{kept[0].item() + 1}"  # line numbers survive
    images = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 1, 2, 2).contiguous()
    memory, kept_memory = long_tailed_subset(InMemoryDataset(images, torch.tensor(labels)), ratio=5)
    assert torch.equal(kept_memory, kept) and torch.equal(memory.images[:, 0, 0, 0], kept.to(torch.uint8))


def test_errors_name_the_problem(tmp_path):
    root = make_folder(tmp_path / "train", [10, 0, 10])
    with pytest.raises(FileNotFoundError, match="class_1: no image"):
        read_image_folder(root)
    dataset, _ = read_image_folder(root, allow_empty=True)
    with pytest.raises(ValueError, match=r"classes \[1\] have none"):
        long_tailed_subset(dataset, ratio=2, num_classes=3)
    full, _ = read_image_folder(make_folder(tmp_path / "ok", [10, 10, 10]))
    with pytest.raises(ValueError, match="class 0 has 10 images, the exp profile with n_max=11"):
        long_tailed_subset(full, ratio=2, n_max=11)
    with pytest.raises(ValueError, match=r"leaves classes \[2\] without an image"):
        long_tailed_subset(full, ratio=20)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        read_image_folder(str(tmp_path / "absent"))
    with pytest.raises(TypeError, match="ListDataset or an InMemoryDataset"):
        long_tailed_subset([1, 2], ratio=2)
