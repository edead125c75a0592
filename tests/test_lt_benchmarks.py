"""The long-tail benchmarks through the trainer (issue 23): CIFAR-10-LT from CIFAR-format pickles built
here (a 2-epoch CPU run of configs/cifar10_lt/balanced_softmax.yaml, its calibration metrics checked
against a plain-numpy recomputation from the saved weights), image folders and list files made
long-tailed by data.imbalance, the CIFAR ResNets by name, and the config errors naming the key."""
import json
import os

import numpy as np
import pytest
import torch

from ltfast.data.cifar import cifar_lt_counts, write_cifar_folder
from ltfast.data.datasets import InMemoryDataset, long_tailed_counts, write_list_file
from ltfast.data.folders import largest_n_max
from ltfast.train import load_config, train
from ltfast.train.config import ConfigError
from ltfast.train.data import CIFAR_MEAN, CIFAR_STD, load_datasets
from ltfast.train.engine import load_run
from ltfast.train.models import build_model, check_arch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_CLASS_TRAIN, PER_CLASS_TEST, CLASSES = 60, 12, 10


def _class_images(per_class: int, seed: int) -> InMemoryDataset:
    """uint8 [N, 3, 32, 32] images: a fixed colour template per class plus noise, so two epochs learn
    something (the metrics below are then not those of a constant prediction)."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand((CLASSES, 3, 32, 32), generator=torch.Generator().manual_seed(7))
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.numel(), generator=gen)]  # file order mixes the classes, as CIFAR's
    noise = torch.rand((labels.numel(), 3, 32, 32), generator=gen)
    return InMemoryDataset(((0.5 * templates[labels] + 0.5 * noise) * 255).to(torch.uint8), labels)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_folder(str(root), "cifar10", _class_images(PER_CLASS_TRAIN, 0), _class_images(PER_CLASS_TEST, 1),
                       [f"class{c}" for c in range(CLASSES)])
    return root


def _cifar_overrides(root, out_dir):
    # 2 epochs of the recipe: the 160 / 180 milestones scaled into the run, 1 warm-up epoch
    return [f"data.root={root}", f"train.out_dir={out_dir}", "data.imbalance=10", "optim.epochs=2",
            "optim.milestones=[1]", "optim.warmup_epochs=1", "data.batch_size=32", "data.eval_batch_size=40",
            "train.threads=1", "train.progress=false"]


@pytest.fixture(scope="module")
def cifar_run(cifar_root, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("runs") / "balanced_softmax"
    cfg = load_config(os.path.join(ROOT, "configs", "cifar10_lt", "balanced_softmax.yaml"),
                      _cifar_overrides(cifar_root, out_dir))
    summary = train(cfg)
    return out_dir, summary


def _numpy_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """ECE (15 bins, (e_b, e_b+1]), macro-F1 and geometric-mean recall straight from their definitions."""
    shifted = logits - logits.max(1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
    confidence, prediction = probs.max(1), probs.argmax(1)
    bins = np.digitize(confidence, np.linspace(0, 1, 16), right=True) - 1
    ece = 0.0
    for b in range(15):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs((prediction[inside] == labels[inside]).mean() - confidence[inside].mean())
    f1, recall = [], []
    for c in range(num_classes):
        tp = np.sum((prediction == c) & (labels == c))
        r = tp / np.sum(labels == c)
        p = tp / np.sum(prediction == c) if np.sum(prediction == c) else 0.0
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    gmean = 0.0 if min(recall) == 0 else float(np.exp(np.mean(np.log(recall))))
    return {"ece": ece * 100, "macro_f1": float(np.mean(f1)) * 100, "gmean_recall": gmean * 100,
            "recall": [r * 100 for r in recall]}


def test_cifar10_lt_two_epoch_run_reports_calibration(cifar_run):
    out_dir, summary = cifar_run
    written = json.loads((out_dir / "summary.json").read_text())
    test = written["test"]
    # the LDAM-DRW counts of this folder: n_max = 600 / 10 = 60, imbalance 10
    assert written["class_counts"] == cifar_lt_counts(CLASSES * PER_CLASS_TRAIN, CLASSES, 10) == \
        [60, 46, 35, 27, 21, 16, 12, 10, 7, 6]
    assert written["class_names"] == [f"class{c}" for c in range(CLASSES)]
    assert written["config"]["model"]["arch"] == "resnet32" and len(written["history"]) == 2
    assert test["samples"] == CLASSES * PER_CLASS_TEST
    for key in ("ece", "confidence", "accuracy", "macro_precision", "macro_recall", "macro_f1", "gmean_recall",
                "many_ece", "medium_macro_f1", "few_gmean_recall", "many_pred_ece"):
        assert key in test, key
    assert len(test["precision"]) == len(test["recall"]) == len(test["f1"]) == CLASSES
    # the new numbers agree with the ones the summary already had
    assert test["macro_recall"] == pytest.approx(test["top1"], abs=1e-9)
    assert test["accuracy"] == pytest.approx(test["micro"], abs=1e-9)
    assert test["recall"] == pytest.approx(test["per_class"], abs=1e-9)
    assert sum(test["bins"]["bin_count"]) == test["samples"]
    assert (out_dir / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Recompute from the selected weights with plain numpy: the test images normalised by hand.
    loaded = load_run(str(out_dir), None, [], torch.device("cpu"), "test")
    images = loaded.sets["test"].images.float() / 255
    images = (images - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = loaded.model(images).double().numpy()
    expected = _numpy_metrics(logits, loaded.sets["test"].labels.numpy(), CLASSES)
    assert test["recall"] == pytest.approx(expected["recall"], abs=1e-9)
    for key in ("ece", "macro_f1", "gmean_recall"):
        assert test[key] == pytest.approx(expected[key], abs=1e-4), key


def test_evaluate_cli_writes_the_calibration_keys(cifar_run, tmp_path):
    from ltfast.train.evaluation import main
    out_dir, _ = cifar_run
    assert main([str(out_dir), "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    trained = json.loads((out_dir / "summary.json").read_text())["test"]
    plain = result["results"]["plain"]
    assert plain["correct"] == trained["correct"]
    for key in ("ece", "macro_f1", "gmean_recall", "many_ece", "medium_macro_f1"):
        assert plain[key] == pytest.approx(trained[key], abs=1e-4), key
    assert plain["f1"] == pytest.approx(trained["f1"], abs=1e-6)
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 1000


def test_cifar_config_errors_name_the_key(cifar_root, tmp_path):
    path = os.path.join(ROOT, "configs", "cifar10_lt", "ce.yaml")
    with pytest.raises(ConfigError, match=r"^data\.imbalance: required"):
        load_config(path, [f"data.root={cifar_root}", "data.imbalance=null"])
    with pytest.raises(ConfigError, match=r"^data\.imbalance: must be >= 1"):
        load_config(path, ["data.imbalance=0.5"])
    with pytest.raises(ConfigError, match=r"^data\.imbalance: not read by data\.dataset='fmnist_lt'"):
        load_config(os.path.join(ROOT, "configs", "fmnist_lt", "ce.yaml"), ["data.imbalance=10"])
    with pytest.raises(ConfigError, match=r"^data\.mean: 1 entries"):
        load_config(path, ["data.mean=[0.5]", "data.std=[0.5]"])
    # the pickles absent: the reader's message (the expected files) behind the key
    cfg = load_config(path, [f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^data\.root: cifar10: expected the python pickles data_batch_1"):
        load_datasets(cfg["data"])
    # CIFAR-100 layout asked of a CIFAR-10 folder
    cfg = load_config(os.path.join(ROOT, "configs", "cifar100_lt", "ce.yaml"), [f"data.root={cifar_root}"])
    with pytest.raises(ConfigError, match=r"^data\.root: .*cifar-100-python"):
        load_datasets(cfg["data"])


def test_cifar_sets_default_to_cifar_normalisation(cifar_root):
    cfg = load_config(os.path.join(ROOT, "configs", "cifar10_lt", "ce.yaml"),
                      [f"data.root={cifar_root}", "data.mean=null", "data.std=null", "data.imbalance=1"])
    sets = load_datasets(cfg["data"])
    assert sets["in_memory"] and sets["val"] is sets["test"] and sets["class_counts"] == [PER_CLASS_TRAIN] * CLASSES
    from ltfast.train.data import make_loader
    loader = make_loader(sets, "test", cfg["data"], sampler=None, batch_size=CLASSES * PER_CLASS_TEST,
                         device="cpu", train=False, seed=0)
    images, _ = next(iter(loader))
    by_hand = (sets["test"].images.float() / 255 - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(images, by_hand, atol=1e-5)


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnets_by_name(depth):
    torch.set_num_threads(1)
    check_arch(f"resnet{depth}")
    model = build_model(f"resnet{depth}", 100)
    blocks = sum(1 for name, _ in model.named_modules() if name.count(".") == 1 and name.startswith("layer"))
    assert blocks == 3 * (depth - 2) // 6 and model.fc.out_features == 100
    if depth == 32:
        assert sum(p.numel() for p in build_model("resnet32", 10).parameters()) == 464_154
    with pytest.raises(ConfigError, match="resnet32"):
        check_arch("resnet33")


# ------------------------------------------------------------------ image folders and list files
def _write_folder(root, split, sizes):
    from PIL import Image
    for c, n in enumerate(sizes):
        folder = root / split / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (c * 40, i, 0)).save(folder / f"{i:03d}.png")


def test_image_folder_made_long_tailed(tmp_path):
    _write_folder(tmp_path, "train", [30, 30, 30, 30])
    _write_folder(tmp_path, "test", [3, 3, 3, 3])
    cfg = load_config(None, ["data.dataset=image_folder", f"data.root={tmp_path}", "data.imbalance=10"])
    sets = load_datasets(cfg["data"])
    assert sets["class_names"] == ["c0", "c1", "c2", "c3"] and not sets["in_memory"]
    assert sets["class_counts"] == long_tailed_counts(30, 4, 10) == [30, 13, 6, 3]
    assert sets["val"] is sets["test"] and len(sets["test"]) == 12 and "validation = the test folder" in sets["rule"]
    assert all(path.startswith(f"c{label}{os.sep}") for path, label in zip(sets["train"].paths,
                                                                            sets["train"].labels.tolist()))
    # the step profile, another split seed: other images, the same counts
    step = load_datasets(load_config(None, ["data.dataset=image_folder", f"data.root={tmp_path}",
                                            "data.imbalance=10", "data.profile=step"])["data"])
    assert step["class_counts"] == [30, 30, 3, 3]
    other = load_datasets(load_config(None, ["data.dataset=image_folder", f"data.root={tmp_path}",
                                             "data.imbalance=10", "data.split_seed=1"])["data"])
    assert other["class_counts"] == sets["class_counts"] and other["train"].paths != sets["train"].paths
    # no imbalance: the folder as it is
    whole = load_datasets(load_config(None, ["data.dataset=image_folder", f"data.root={tmp_path}"])["data"])
    assert whole["class_counts"] == [30, 30, 30, 30]


def test_image_folder_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.root: required when data\.dataset is 'image_folder'"):
        load_config(None, ["data.dataset=image_folder"])
    _write_folder(tmp_path, "train", [5, 5])
    cfg = load_config(None, ["data.dataset=image_folder", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^data\.root: .* must hold train/ and test/"):
        load_datasets(cfg["data"])
    _write_folder(tmp_path, "test", [1, 1])
    cfg = load_config(None, ["data.dataset=image_folder", f"data.root={tmp_path}", "data.imbalance=10"])
    with pytest.raises(ConfigError, match=r"^data\.imbalance: image folder .*leaves classes \[1\] without an image"):
        load_datasets(cfg["data"])  # 5 images per class cannot make n_max / n_min = 10
    with pytest.raises(ConfigError, match=r"^data\.profile: needs data\.imbalance"):
        load_config(None, ["data.dataset=image_folder", f"data.root={tmp_path}", "data.profile=step"])


def test_list_file_made_long_tailed(tmp_path):
    paths = [f"img{i}.jpg" for i in range(60)]
    labels = [i % 3 for i in range(60)]
    for name in paths:
        (tmp_path / name).write_bytes(b"")
    write_list_file(str(tmp_path / "train.txt"), paths, labels)
    write_list_file(str(tmp_path / "test.txt"), paths[:6], labels[:6])
    base = ["data.dataset=list", f"data.root={tmp_path}", f"data.train_list={tmp_path / 'train.txt'}",
            f"data.test_list={tmp_path / 'test.txt'}"]
    sets = load_datasets(load_config(None, base + ["data.imbalance=4"])["data"])
    assert largest_n_max([20, 20, 20], 4) == 20
    assert sets["class_counts"] == long_tailed_counts(20, 3, 4) == [20, 10, 5]
    assert sets["train"].list_file == str(tmp_path / "train.txt")  # errors still name list file and line
    assert load_datasets(load_config(None, base)["data"])["class_counts"] == [20, 20, 20]
