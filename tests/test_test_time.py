"""SADE's test-time self-supervised aggregation (ltfast.train.test_time): the shifted test sets, the
strong views, the learnt expert weights (they move; the early stop fires), and the CLI."""
import json

import pytest
import torch
from torch import nn

from ltfast.data.datasets import InMemoryDataset
from ltfast.train import load_config, metrics
from ltfast.train.config import dump
from ltfast.train.models import ExpertOutput
from ltfast.train.test_time import (ImageSource, StrongViews, aggregate_on, learn_aggregation, main,
                                    parse_distribution, shifted_counts, shifted_test_indices)

# Lines of SADE's ImageNet_LT_<name>.txt (Vanint/SADE-AgnosticLT data_txt/ImageNet_LT, 1000 classes x 50)
SADE_IMAGENET_LT_SIZES = {"forward50": 12058, "forward25": 14437, "forward10": 19059, "forward5": 24365,
                          "forward2": 35574, "uniform": 50000, "backward2": 35574, "backward50": 12058}


def test_shifted_set_sizes_match_sade_lists():
    train_counts = list(range(1000, 0, -1))
    for name, lines in SADE_IMAGENET_LT_SIZES.items():
        counts = shifted_counts(50, train_counts, name)
        assert sum(counts) == lines, name
        assert max(counts) == 50 and min(counts) == round(50 / parse_distribution(name)[1])  # forward50: 1


def test_shifted_counts_follow_the_training_order():
    train_counts = [30, 500, 12, 90, 1000]           # most frequent: class 4, then 1, 3, 0, 2
    forward = shifted_counts(100, train_counts, "forward10")
    ranks = {4: 0, 1: 1, 3: 2, 0: 3, 2: 4}
    assert forward == [int(100 * 0.1 ** (ranks[c] / 4)) for c in range(5)]
    assert forward[4] == 100 and forward[2] == 10      # ratio 10 between the extremes
    backward = shifted_counts(100, train_counts, "backward10")
    assert backward[2] == 100 and backward[4] == 10
    assert sorted(forward) == sorted(backward)
    assert shifted_counts(100, train_counts, "uniform") == [100] * 5


def test_shifted_indices_are_deterministic_and_sized():
    labels = torch.arange(5).repeat_interleave(40)[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    train_counts = [400, 200, 100, 50, 4]
    idx = shifted_test_indices(labels, train_counts, "forward25", seed=3)
    assert torch.bincount(labels[idx], minlength=5).tolist() == shifted_counts(40, train_counts, "forward25")
    assert torch.equal(idx, shifted_test_indices(labels, train_counts, "forward25", seed=3))
    assert not torch.equal(idx, shifted_test_indices(labels, train_counts, "forward25", seed=4))
    assert len(set(idx.tolist())) == idx.numel()
    with pytest.raises(ValueError, match="not balanced"):
        shifted_test_indices(labels[:-1], train_counts, "forward25")
    for bad in ("forward", "sideways5", "backward0.5"):
        with pytest.raises(ValueError, match="--distribution"):
            parse_distribution(bad)


@pytest.mark.parametrize("profile, channels", [("small", 1), ("imagenet", 3)])
def test_strong_views_are_random_per_image_and_reproducible(profile, channels):
    images = torch.rand(16, channels, 20, 20)
    views = StrongViews(profile, torch.Generator().manual_seed(0))
    a, b = views(images), views(images)
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, b) and not torch.allclose(a, images)
    again = StrongViews(profile, torch.Generator().manual_seed(0))(images)
    assert torch.equal(a, again)
    # every image has its own draws: not one transform for the whole batch
    same = torch.stack([images[0]] * 16)
    out = StrongViews(profile, torch.Generator().manual_seed(1))(same)
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) > 8


class StableAndUnstableExperts(nn.Module):
    """Expert 1 ignores the image (its prediction is perfectly stable under augmentation); experts 2
    and 3 are random linear maps of the pixels (unstable). Stability wants expert 1's weight up."""

    def __init__(self, num_classes=4, pixels=144):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.constant = nn.Parameter(torch.linspace(1.0, -1.0, num_classes))
        self.maps = nn.Parameter(torch.randn(2, pixels, num_classes, generator=generator) * 0.5)

    def forward(self, x):
        flat = x.flatten(1)
        experts = [self.constant.expand(x.shape[0], -1)] + [flat @ self.maps[k] for k in range(2)]
        logits = torch.stack(experts, 1)
        return ExpertOutput(logits.mean(1), logits, logits)


def _source(n_per_class=16):
    labels = torch.arange(4).repeat_interleave(n_per_class)
    images = (torch.rand(labels.numel(), 1, 12, 12, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    dataset = InMemoryDataset(images, labels)
    data_cfg = {"dataset": "synthetic", "mean": [0.5], "std": [0.25]}
    sets = {"in_memory": True, "test": dataset}
    return sets, dataset, data_cfg


def test_weights_move_towards_the_stable_expert():
    sets, dataset, data_cfg = _source()
    source = ImageSource(sets, dataset, data_cfg, "cpu", 16)
    learnt = learn_aggregation(StableAndUnstableExperts(), source, epochs=2, log=lambda m: None)
    weights = learnt["weights"]
    assert sum(weights) == pytest.approx(1.0) and learnt["epochs"] == 2 and not learnt["stopped_early"]
    assert weights[0] > 1 / 3 + 1e-3 and weights[1] < 1 / 3 and weights[2] < 1 / 3
    assert learnt["history"][0]["weights"] != learnt["history"][1]["weights"]


def test_early_stop_when_a_weight_drops_below_5_percent():
    sets, dataset, data_cfg = _source()
    source = ImageSource(sets, dataset, data_cfg, "cpu", 16)
    learnt = learn_aggregation(StableAndUnstableExperts(), source, epochs=5, lr=20.0, log=lambda m: None)
    assert learnt["stopped_early"] and learnt["epochs"] < 5
    assert round(min(learnt["weights"]), 2) < 0.05


def test_before_and_after_accuracy():
    sets, dataset, data_cfg = _source()
    model = StableAndUnstableExperts()
    groups = metrics.shot_groups([100, 50, 10, 5])
    result = aggregate_on(model, sets, dataset, data_cfg, [100, 50, 10, 5], groups, device="cpu", batch_size=16,
                          epochs=1, log=lambda m: None)
    with torch.no_grad():
        logits = model((dataset.images.float() / 255 - 0.5) / 0.25).expert_logits
    weights = torch.tensor(result["weights"]).view(1, -1, 1)
    expected_before = (logits.mean(1).argmax(1) == dataset.labels).float().mean().item() * 100
    expected_after = ((weights * logits).sum(1).argmax(1) == dataset.labels).float().mean().item() * 100
    assert result["before"]["micro"] == pytest.approx(expected_before)
    assert result["after"]["micro"] == pytest.approx(expected_after)
    assert result["gain_micro"] == pytest.approx(expected_after - expected_before)
    assert result["samples"] == 64 and result["augment"] == "small"


TINY = ["data.dataset=synthetic", "data.num_classes=7", "data.n_max=128", "data.ratio=10", "data.image_size=12",
        "data.channels=1", "data.val_per_class=4", "data.test_per_class=20", "data.mean=[0.5]", "data.std=[0.25]",
        "model.width=8", "model.arch=small_expert_resnet", "model.classifier=cosine", "loss.name=sade"]


def _run_folder(tmp_path, arch="small_expert_resnet"):
    """A run folder as the trainer leaves it (config.yaml, best.pt), without the training."""
    cfg = load_config(None, TINY + [f"model.arch={arch}", f"train.out_dir={tmp_path}"] +
                      (["loss.name=ce"] if arch == "small_resnet" else []))
    torch.manual_seed(0)
    from ltfast.train.engine import build_model
    model = build_model(cfg, 7, 1, "rebuild")
    tmp_path.mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(dump(cfg))
    torch.save({"model": model.state_dict()}, tmp_path / "best.pt")
    return tmp_path


def test_cli_reports_before_after_and_weights(tmp_path, capsys):
    run = _run_folder(tmp_path / "run")
    assert main([str(run), "--distribution", "forward5,backward5", "--epochs", "1", "--batch-size", "32",
                 "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "test_time.json").read_text())
    from ltfast.data.datasets import long_tailed_counts
    counts = long_tailed_counts(128, 7, 10)     # the synthetic training set of TINY
    for name in ("forward5", "backward5"):
        r = result["results"][name]
        assert r["samples"] == sum(shifted_counts(20, counts, name)) and r["class_counts"] == \
            shifted_counts(20, counts, name)
        assert sum(r["weights"]) == pytest.approx(1.0) and r["epochs"] == 1
        assert {"micro", "top1", "many", "medium", "few"} <= set(r["before"]) and "micro" in r["after"]
    assert "forward5" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    plain = _run_folder(tmp_path / "plain", arch="small_resnet")
    assert main([str(plain)]) == 2
    assert "multi-expert" in capsys.readouterr().err
    run = _run_folder(tmp_path / "run")
    assert main([str(run), "--distribution", "forward"]) == 2
    assert "--distribution" in capsys.readouterr().err


def test_cli_on_list_files(tmp_path):
    # List datasets go through the evaluation pipeline (PIL here), the views through the 'imagenet'
    # profile; --list with --distribution none takes a (shifted) list as it is, like SADE's lists.
    from ltfast.data import write_jpeg_folder
    labels = torch.arange(3).repeat_interleave(4)
    images = (torch.rand(12, 3, 20, 20, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    listed = write_jpeg_folder(InMemoryDataset(images, labels), str(tmp_path / "jpegs"), "test")
    train_list = tmp_path / "train.txt"
    lines = open(listed).read().splitlines()
    train_list.write_text("\n".join(lines[:4] * 3 + lines[4:8] + lines[8:9]) + "\n")   # 12 / 4 / 1 images
    cfg = load_config(None, ["data.dataset=list", f"data.root={tmp_path / 'jpegs'}", f"data.train_list={train_list}",
                             f"data.test_list={listed}", "data.val_list=null", "data.backend=pil",
                             "data.num_threads=0", "data.crop_size=16", "data.resize_size=16",
                             "model.arch=small_expert_resnet", "model.width=8", "model.classifier=cosine",
                             "loss.name=sade", f"train.out_dir={tmp_path / 'run'}"])
    from ltfast.train.engine import build_model
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump(cfg))
    torch.save({"model": build_model(cfg, 3, 3, "rebuild").state_dict()}, run / "best.pt")
    assert main([str(run), "--distribution", "forward2", "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    result = json.loads((tmp_path / "a" / "test_time.json").read_text())["results"]["forward2"]
    assert result["class_counts"] == [4, 2, 2] and result["augment"] == "imagenet"   # 4 * 2^(-rank / 2)
    assert main([str(run), "--list", listed, "--distribution", "none", "--epochs", "1", "--out",
                 str(tmp_path / "b")]) == 0
    result = json.loads((tmp_path / "b" / "test_time.json").read_text())["results"]["test.txt"]
    assert result["samples"] == 12
