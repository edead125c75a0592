"""BBN (methods/bbn.py): the cumulative alpha against BBN's Combiner formula, the reversed sampler's
class distribution, the network split and its inference rule, the training loss against a plain
PyTorch transcription of BBN's ``bbn_mix`` (values and gradients), the config checks, and the
Fashion-MNIST-LT recipe end to end (train, ``python -m ltfast.evaluate``, resume)."""
import copy
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import ltfast.nn
from ltfast.data import ReversedSampler, make_sampler
from ltfast.train import load_config, methods, train
from ltfast.train.config import ConfigError
from ltfast.train.evaluation import main as evaluate_main
from ltfast.train.methods.bbn import (BBN, REVERSED_LOADER, BilateralBranchNetwork, alpha_divisor, cumulative_alpha)
from ltfast.train.models import build_model, find_head

from ddp_support import free_port
from test_train import TINY, _ddp_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST_BBN = os.path.join(ROOT, "configs", "fmnist_lt", "bbn.yaml")


# ------------------------------------------------------------------------------------ cumulative alpha

def _bbn_combiner_alpha(epoch_1_based, max_epoch):
    """Megvii-Nanjing/BBN lib/core/combiner.py, transcribed: initilize_all_parameters + bbn_mix's l."""
    div_epoch = 100 * (max_epoch // 100 + 1) if max_epoch in [90, 180] else max_epoch
    return 1 - ((epoch_1_based - 1) / div_epoch) ** 2


@pytest.mark.parametrize("epochs", [1, 2, 30, 90, 180, 200])
def test_cumulative_alpha_is_bbn_combiner(epochs):
    for epoch in range(epochs):
        assert cumulative_alpha(epoch, epochs) == _bbn_combiner_alpha(epoch + 1, epochs)
    assert cumulative_alpha(0, epochs) == 1.0
    assert [cumulative_alpha(e, epochs) for e in range(epochs)] == sorted(
        (cumulative_alpha(e, epochs) for e in range(epochs)), reverse=True)


def test_cumulative_alpha_values_and_errors():
    assert cumulative_alpha(199, 200) == pytest.approx(1 - (199 / 200) ** 2)          # 0.00998: the last epoch
    assert alpha_divisor(90) == 100 and alpha_divisor(180) == 200 and alpha_divisor(200) == 200
    assert cumulative_alpha(89, 90) == pytest.approx(1 - 0.89 ** 2)                    # 0.2079, not ~0
    with pytest.raises(ValueError, match="epoch"):
        cumulative_alpha(30, 30)
    with pytest.raises(ValueError, match="epoch"):
        cumulative_alpha(-1, 30)


# ------------------------------------------------------------------------------------ reversed sampler

COUNTS = [500, 120, 40, 9, 3]


def _labels(counts=COUNTS):
    return torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])


def test_reversed_sampler_class_distribution():
    labels = _labels()
    draws = 60000
    sampler = ReversedSampler(labels, num_samples=draws, seed=5)
    drawn = labels[sampler.indices()]
    observed = torch.bincount(drawn, minlength=len(COUNTS)).double() / draws
    weights = torch.tensor([max(COUNTS) / n for n in COUNTS], dtype=torch.float64)   # BBN get_weight
    expected = weights / weights.sum()
    assert torch.allclose(sampler.class_probabilities(), expected)
    # binomial standard error at 60000 draws is <= 0.002; 5 sigma
    assert torch.allclose(observed, expected, atol=0.01), (observed, expected)
    assert observed[-1] > 0.6 and observed[0] < 0.01          # the rarest class dominates, the head is rare
    # within a class, images uniformly: every image of class 0 (500 of them, ~0.4% of draws) is a
    # member of class 0, and the 3 images of the rarest class each get about a third of its draws
    rare = sampler.indices()[drawn == 4]
    share = torch.bincount(rare - (len(labels) - 3), minlength=3).double() / rare.numel()
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)


def test_reversed_sampler_is_a_function_of_seed_epoch_and_rank():
    labels = _labels()
    a, b = ReversedSampler(labels, seed=1), ReversedSampler(labels, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert torch.equal(a.indices(), b.indices())
    b.set_epoch(4)
    assert not torch.equal(a.indices(), b.indices())
    assert not torch.equal(a.indices(), ReversedSampler(labels, seed=2, world_size=1, rank=0).indices())
    # DDP: the two ranks' shards are the two halves of the single-process stream of the same length
    whole = ReversedSampler(labels, seed=1, rank=0, world_size=1, num_samples=672)
    shards = [ReversedSampler(labels, seed=1, rank=r, world_size=2, num_samples=672) for r in range(2)]
    for s in [whole] + shards:
        s.set_epoch(3)
    assert len(shards[0]) == len(shards[1]) == 336
    assert torch.equal(torch.cat([s.indices() for s in shards]), whole.indices())
    assert type(make_sampler("reversed", labels)) is ReversedSampler


# ------------------------------------------------------------------------------------------- network

def test_resnet32_split_is_bbn_res32_cifar():
    plain = build_model("resnet32", 10)
    bbn = BilateralBranchNetwork.from_architecture(copy.deepcopy(plain), 10)
    assert len(bbn.trunk.layer3) == 4                      # BBN_ResNet_Cifar: layer3 of num_blocks[2] - 1 blocks
    assert find_head(bbn, 10)[0] == "fc" and bbn.fc.in_features == 128 and bbn.fc.bias is not None
    block = sum(p.numel() for p in plain.layer3[-1].parameters())
    assert sum(p.numel() for p in bbn.parameters()) == (sum(p.numel() for p in plain.parameters()) + block
                                                        + 64 * 10)   # + one block, + fc's 64 more inputs
    # the re-balancing block is re-drawn, not a copy of the conventional one
    assert not torch.equal(bbn.conventional.conv1.weight, bbn.rebalancing.conv1.weight)
    small = BilateralBranchNetwork.from_architecture(build_model("small_resnet", 10, 1, 8), 10)
    assert [name for name, _ in small.trunk.named_children()] == ["stem", "layer1", "layer2"]
    assert small.fc.in_features == 64
    with pytest.raises(ValueError, match="model.bbn"):
        BilateralBranchNetwork.from_architecture(torch.nn.Linear(3, 3), 3)


def test_inference_is_both_branches_at_one_half():
    torch.manual_seed(0)
    net = BilateralBranchNetwork.from_architecture(build_model("small_resnet", 5, 1, 8), 5).eval()
    x = torch.randn(6, 1, 12, 12)
    with torch.no_grad():
        shared = net.trunk(x)
        f_c = F.adaptive_avg_pool2d(net.conventional(shared), 1).flatten(1)
        f_r = F.adaptive_avg_pool2d(net.rebalancing(shared), 1).flatten(1)
        # valid_model: model(image, feature_flag=True) = cat(cb_block, rb_block) -> GAP -> classifier
        expected = F.linear(torch.cat((f_c, f_r), 1), net.fc.weight, net.fc.bias)
        assert torch.allclose(net(x), expected, atol=1e-6)
        assert torch.allclose(net(x, reversed_images=x, alpha=0.5), expected, atol=1e-6)


# ------------------------------------------------------------------------------ loss vs transcription

def _bbn_mix_transcription(model, image_a, label_a, image_b, label_b, epoch, max_epoch):
    """BBN's Combiner.bbn_mix (lib/core/combiner.py) in plain PyTorch, with BBN_ResNet's feature_cb /
    feature_rb forwards (trunk, branch block, GAP) and nn.CrossEntropyLoss as the criterion."""
    criterion = torch.nn.CrossEntropyLoss()

    def feature(x, block):
        return F.adaptive_avg_pool2d(block(model.trunk(x)), (1, 1)).view(x.shape[0], -1)

    feature_a, feature_b = feature(image_a, model.conventional), feature(image_b, model.rebalancing)
    div_epoch = 100 * (max_epoch // 100 + 1) if max_epoch in [90, 180] else max_epoch
    l = 1 - ((epoch - 1) / div_epoch) ** 2  # noqa: E741  (BBN's name)
    mixed_feature = 2 * torch.cat((l * feature_a, (1 - l) * feature_b), dim=1)
    output = model.fc(mixed_feature)
    return l * criterion(output, label_a) + (1 - l) * criterion(output, label_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epoch, epochs", [(0, 30), (11, 30), (29, 30), (45, 90)])
def test_training_loss_matches_bbn_mix(dtype, epoch, epochs):
    torch.manual_seed(epoch)
    classes = 7
    net = BilateralBranchNetwork.from_architecture(build_model("resnet20", classes, 3), classes).to(dtype).train()
    reference = copy.deepcopy(net)
    images, reversed_images = torch.randn(9, 3, 16, 16, dtype=dtype), torch.randn(9, 3, 16, 16, dtype=dtype)
    labels, reversed_labels = torch.randint(0, classes, (9,)), torch.randint(0, classes, (9,))
    cfg = load_config(None, ["model.bbn=true", f"optim.epochs={epochs}"])
    method = BBN(cfg)
    method.on_epoch_start(net, "fc", epoch)
    loss = method.train_step(net, images, labels, {REVERSED_LOADER: (reversed_images, reversed_labels)},
                             ltfast.nn.CrossEntropyLoss())
    expected = _bbn_mix_transcription(reference, images, labels, reversed_images, reversed_labels, epoch + 1, epochs)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, expected, **tol)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)
    for (name, b), c in zip(net.named_buffers(), reference.buffers()):   # each trunk pass updated BN once
        torch.testing.assert_close(b, c, **tol, msg=name)


def test_the_fused_mixed_op_is_what_the_loss_calls(monkeypatch):
    """With ltfast's CE the two terms are ONE mixed-target call (mix_weight = alpha, target_b = y_r)."""
    calls = []
    criterion = ltfast.nn.CrossEntropyLoss()
    original = criterion.forward

    def spy(logits, target, **kwargs):
        calls.append(kwargs)
        return original(logits, target, **kwargs)

    monkeypatch.setattr(criterion, "forward", spy)
    net = BilateralBranchNetwork.from_architecture(build_model("small_resnet", 4, 1, 8), 4).train()
    method = BBN(load_config(None, ["model.bbn=true", "optim.epochs=10"]))
    method.on_epoch_start(net, "fc", 3)
    x, y = torch.randn(5, 1, 10, 10), torch.tensor([0, 1, 2, 3, 0])
    method.train_step(net, x, y, {REVERSED_LOADER: (x.flip(0), y.flip(0))}, criterion)
    assert len(calls) == 1 and torch.equal(calls[0]["target_b"], y.flip(0))
    assert float(calls[0]["mix_weight"]) == pytest.approx(1 - 0.3 ** 2)


# --------------------------------------------------------------------------------------------- config

def test_registry_and_checks():
    assert "bbn" in methods.available() and "bbn" in methods.describe()
    cfg = load_config(FMNIST_BBN)
    assert [m.name for m in methods.active(cfg)] == ["ce", "bbn"]
    for override, key in [("model.classifier=cosine", "model.classifier"), ("data.mixup_alpha=0.2", "data.mixup_alpha"),
                          ("model.arch=small_expert_resnet", "model.arch"), ("model.arch=vgg11", "model.arch")]:
        with pytest.raises(ConfigError, match=key):
            load_config(FMNIST_BBN, [override])


# ------------------------------------------------------------------------------------------ end to end

SMALL_FMNIST = ["data.n_max=150", "data.val_per_class=10", "data.eval_batch_size=1000", "train.plot=false"]


@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bbn") / "run"
    summary = train(load_config(FMNIST_BBN, SMALL_FMNIST + ["optim.epochs=2", f"train.out_dir={out}"]))
    return out, summary


def test_fmnist_recipe_trains_and_evaluates(fmnist_run, tmp_path):
    run, summary = fmnist_run
    assert summary["status"] == "finished" and len(summary["history"]) == 2
    assert all(record["loss"] == record["loss"] for record in summary["history"])   # finite
    weights = torch.load(run / "best.pt", weights_only=True)["model"]
    assert {"trunk.layer1.conv1.weight", "conventional.conv1.weight", "rebalancing.conv1.weight"} <= set(weights)
    assert weights["fc.weight"].shape == (10, 128)        # width 16: two 64-d branch features
    out = tmp_path / "eval"
    assert evaluate_main([str(run), "--out", str(out), "--no-plot"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["results"]["plain"]["correct"] == summary["test"]["correct"]
    assert result["results"]["plain"]["total"] == summary["test"]["total"]


def test_resume_equals_an_uninterrupted_run(fmnist_run, tmp_path):
    full, _ = fmnist_run
    cut = tmp_path / "cut"
    base = SMALL_FMNIST + ["optim.epochs=2", f"train.out_dir={cut}"]
    assert train(load_config(FMNIST_BBN, base + ["train.stop_after=1"]))["status"] == "stopped"
    train(load_config(FMNIST_BBN, base + ["train.resume=true"]))
    expected = torch.load(full / "last.pt", weights_only=True)["model"]
    resumed = torch.load(cut / "last.pt", weights_only=True)["model"]
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_the_step_reads_the_reversed_stream(tmp_path, monkeypatch):
    """The re-balancing branch's labels follow n_max / n_c over an epoch (synthetic data, 7 classes)."""
    seen = []
    original = BBN.train_step

    def spy(self, net, images, labels, extra, criterion):
        seen.append(extra[REVERSED_LOADER][1])
        return original(self, net, images, labels, extra, criterion)

    monkeypatch.setattr(BBN, "train_step", spy)
    cfg = load_config(None, TINY + ["model.bbn=true", "optim.epochs=1", "train.plot=false", f"train.out_dir={tmp_path}"])
    train(cfg)
    drawn = torch.cat(seen)
    counts = torch.tensor(json.loads((tmp_path / "summary.json").read_text())["class_counts"], dtype=torch.float64)
    assert len(seen) == int(counts.sum()) // 32            # as many steps as the uniform loader's
    frequency = torch.bincount(drawn, minlength=7).double() / drawn.numel()
    expected = (counts.max() / counts) / (counts.max() / counts).sum()
    assert frequency[-1] > frequency[0] and torch.argmax(frequency) == torch.argmax(expected)


def test_bf16_autocast_step(tmp_path):
    summary = train(load_config(None, TINY + ["model.bbn=true", "train.amp=bf16", "optim.epochs=1", "data.n_max=64",
                                              "train.save_checkpoints=false", "train.plot=false",
                                              f"train.out_dir={tmp_path}"]))
    assert summary["bf16"] and math.isfinite(summary["history"][0]["loss"]) and summary["history"][0]["loss"] > 0


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes(tmp_path):
    """Under DDP the step is one forward of the wrapped network (a second forward before the backward
    would fail DDP's reducer); each rank reads its shard of both streams."""
    overrides = TINY + [f"train.out_dir={tmp_path}", "model.bbn=true", "optim.epochs=1", "train.seed=3",
                        "train.plot=false"]
    mp.spawn(_ddp_worker, args=(2, free_port(), overrides), nprocs=2, join=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    assert math.isfinite(summary["history"][0]["loss"])


def test_imagenet_lt_recipe_runs(rgb_jpegs, tmp_path):
    # The ResNeXt-50 recipe for one epoch (one step of two batches of 12): tiny JPEGs, 16-pixel crops, CPU,
    # through the image-path loader (PIL backend) for both streams.
    cfg = load_config(os.path.join(ROOT, "configs", "imagenet_lt", "bbn.yaml"),
                      [f"data.root={rgb_jpegs}", f"data.train_list={rgb_jpegs / 'train.txt'}",
                       f"data.val_list={rgb_jpegs / 'val.txt'}", f"data.test_list={rgb_jpegs / 'test.txt'}",
                       "data.backend=pil", "data.num_threads=0", "data.crop_size=16", "data.resize_size=16",
                       "data.batch_size=12", "data.eval_batch_size=8", "optim.epochs=1", "train.progress=false",
                       "train.plot=false", "train.device=cpu", "train.save_checkpoints=false",
                       f"train.out_dir={tmp_path}"])
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["test"]["samples"] == 8 and summary["name"] == "BBN"
    assert math.isfinite(summary["history"][0]["loss"]) and summary["history"][0]["loss"] > 0


def test_imagenet_lt_split_is_bbn_res50():
    net = BilateralBranchNetwork.from_architecture(build_model("resnext50_32x4d", 10), 10)
    assert len(net.trunk.layer4) == 2 and net.fc.in_features == 4096     # BBN_ResNet: layer4 of 3 - 1 blocks
    assert net.conventional.conv2.groups == 32 and net.rebalancing.conv2.groups == 32   # ResNeXt 32x4d
