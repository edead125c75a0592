"""Start-up checks of list datasets (issue 13, defects 2, 4 and 5): labels in range with the file and
line of the culprit, every listed image present before training starts, a UTF-8 BOM, and a summary
even when testing fails."""
import json
import os
import resource

import pytest

from ltfast.data import read_list_file
from ltfast.train import load_config, train
from ltfast.train import trainer as trainer_module
from ltfast.train.config import ConfigError

COMMON = ["data.dataset=list", "data.backend=pil", "data.num_threads=0", "data.crop_size=12",
          "data.resize_size=12", "data.mean=[0.5]", "data.std=[0.25]", "data.batch_size=16",
          "data.eval_batch_size=16", "model.width=8", "optim.epochs=1", "optim.warmup_epochs=0",
          "train.progress=false", "train.plot=false"]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """7 classes of 12x12 grey JPEGs: train 8 per class, val 2, test 3; list files train/val/test.txt."""
    import torch
    from ltfast.data import InMemoryDataset, write_jpeg_folder
    root = tmp_path_factory.mktemp("jpegs")
    gen = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 8), ("val", 2), ("test", 3)):
        labels = torch.arange(7).repeat_interleave(per_class)
        images = (torch.rand(labels.numel(), 1, 12, 12, generator=gen) * 255).to(torch.uint8)
        write_jpeg_folder(InMemoryDataset(images, labels), str(root), split)
    return root


def _lists(jpegs, tmp_path, edit=None):
    """Copies of the list files, ``edit(split, lines)`` changing them."""
    out = {}
    for split in ("train", "val", "test"):
        lines = (jpegs / f"{split}.txt").read_text().splitlines()
        if edit:
            edit(split, lines)
        path = tmp_path / f"{split}.txt"
        path.write_text("\n".join(lines) + "\n")
        out[split] = path
    return out


def _config(jpegs, tmp_path, lists, *extra):
    return load_config(None, COMMON + [f"data.root={jpegs}", f"data.train_list={lists['train']}",
                                       f"data.val_list={lists['val']}", f"data.test_list={lists['test']}",
                                       f"train.out_dir={tmp_path / 'run'}"] + list(extra))


def _set_label(lines, index, label):
    path, _ = lines[index].rsplit(maxsplit=1)
    lines[index] = f"{path} {label}"


def test_val_label_outside_the_training_classes_fails_at_start_up(jpegs, tmp_path):
    # Used to train an epoch, then die in evaluate ("size of tensor a (7) must match ... (8)").
    lists = _lists(jpegs, tmp_path, lambda split, lines: split == "val" and _set_label(lines, 3, 7))
    with pytest.raises(ConfigError, match=r"1 of the 8 classes have no training image: 7; .*largest label, 7 at "
                                          r".*val\.txt:4 \(val\)"):
        train(_config(jpegs, tmp_path, lists))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_label_typo_is_not_a_16_way_model(jpegs, tmp_path):
    lists = _lists(jpegs, tmp_path, lambda split, lines: split == "train" and _set_label(lines, 0, 15))
    with pytest.raises(ConfigError, match=r"8 of the 16 classes have no training image: 7, 8, .*15 at .*train\.txt:1"):
        train(_config(jpegs, tmp_path, lists))


def test_huge_label_fails_fast_naming_the_line(jpegs, tmp_path):
    # 10**13 used to end in an 80 TB allocation naming neither file nor line; 10**9 took 35 s, 17 GB.
    lists = _lists(jpegs, tmp_path, lambda split, lines: split == "test" and _set_label(lines, 5, 10**13))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ConfigError, match=r"(too many to list).*10000000000000 at .*test\.txt:6 \(test\)"):
        train(_config(jpegs, tmp_path, lists))
    # no [largest label] allocation on the way (memory, not a clock: a loaded machine stretches time)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 1024 * 1024


def test_num_classes_bounds_every_split(jpegs, tmp_path):
    lists = _lists(jpegs, tmp_path)
    with pytest.raises(ConfigError, match=r"train\.txt:49: train label 6 is outside the 6 classes"):
        train(_config(jpegs, tmp_path, lists, "data.num_classes=6"))
    with pytest.raises(ValueError, match=r"train\.txt:\d+: label 6 is outside the 6 classes"):
        read_list_file(str(lists["train"]), str(jpegs), num_classes=6)


def test_empty_classes_allowed_when_asked(jpegs, tmp_path):
    lists = _lists(jpegs, tmp_path)
    summary = train(_config(jpegs, tmp_path, lists, "data.num_classes=9", "data.allow_empty_classes=true"))
    assert summary["class_counts"][7:] == [0, 0]


def test_missing_image_fails_at_start_up_naming_file_and_line(jpegs, tmp_path, monkeypatch):
    lists = _lists(jpegs, tmp_path, lambda split, lines: split == "test" and lines.__setitem__(
        2, "test/0/gone.jpg 0"))
    # "at start-up": before the first epoch (checked by what ran, not by a clock, which a loaded CI
    # machine stretches: this test once took 25 s on the shared 2-core machine)
    monkeypatch.setattr(trainer_module, "_train_epoch",
                        lambda *args, **kwargs: pytest.fail("an epoch started before the missing image was reported"))
    with pytest.raises(FileNotFoundError, match=r"1 of the 21 test images listed do not exist .*test\.txt:3: "
                                                r".*gone\.jpg"):
        train(_config(jpegs, tmp_path, lists))
    assert not (tmp_path / "run" / "last.pt").exists()  # before any training


def test_test_time_failure_still_writes_the_summary(jpegs, tmp_path):
    lists = _lists(jpegs, tmp_path, lambda split, lines: split == "test" and lines.__setitem__(
        2, "test/0/gone.jpg 0"))
    with pytest.raises(Exception, match="gone.jpg"):
        train(_config(jpegs, tmp_path, lists, "data.check_files=false"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "test_failed" and "gone.jpg" in summary["error"]
    assert len(summary["history"]) == 1 and summary["best_epoch"] == 1


def test_list_file_with_a_byte_order_mark(jpegs, tmp_path):
    # Windows editors write a UTF-8 BOM: it used to become part of the first path ("missing").
    text = (jpegs / "train.txt").read_text()
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    dataset = read_list_file(str(path), str(jpegs), check_files=True)
    assert dataset.paths[0] == text.split()[0]
    assert os.path.isfile(dataset.full_path(0))
