"""ResLT (ltfast.train.methods.reslt, ltfast.nn.ResLTLoss): the branch class sets from the counts, the
loss against a plain-PyTorch transcription of the seed code (the survey's ResLT-codebase
``ImageNetTrain_reslt.py`` and the upstream ``cifarTrain_reslt_cifar100.py``) in values and gradients,
the head against a transcription of ``reslt_imagenet.py`` / the CIFAR ``ResLTResNet32``, config checks,
and end-to-end runs: the Fashion-MNIST-LT recipe on tiny data with ``python -m ltfast.evaluate``, and
a ResNeXt-50 step of the ImageNet-LT recipe on tiny list-file data."""
import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ltfast.nn
from ltfast import priors, reference
from ltfast.train import load_config, methods, train
from ltfast.train.config import ConfigError
from ltfast.train.evaluation import main as evaluate_main
from ltfast.train.methods.reslt import ResLTClassifier, use_reslt_head
from ltfast.train.models import ExpertOutput, build_model, find_head

from ddp_support import leave_worker, leave_worker_after_error
from test_train import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ seed transcriptions

def seed_imagenet_loss(logitH, logitM, logitT, target, beta, num_classes, medium, tail, lsm=0.0):
    """ImageNetTrain_reslt.py's train() loss, verbatim but for ``args``; labels and logit columns are in
    the seed's order (label = ascending-count rank)."""
    def label_smoothing(y_batch_tensor, num_classes, delta):
        return (1 - delta - delta / (num_classes - 1)) * y_batch_tensor + delta / (num_classes - 1)

    def crossEntropy(softmax, logit, label, weight, num_classes):
        label = F.one_hot(label, num_classes=num_classes)
        target = label_smoothing(label, num_classes, delta=lsm)
        loss = - (weight * (target * torch.log(softmax(logit) + 1e-7)).sum(dim=1)).sum()
        return loss

    softmax = nn.Softmax(dim=1)
    labelH = F.one_hot(target, num_classes=num_classes).sum(dim=1)
    labelM = F.one_hot(target, num_classes=num_classes)[:, :medium].sum(dim=1)
    labelT = F.one_hot(target, num_classes=num_classes)[:, :tail].sum(dim=1)
    I_loss = (crossEntropy(softmax, logitH, target, labelH, num_classes)
              + crossEntropy(softmax, logitM, target, labelM, num_classes)
              + crossEntropy(softmax, logitT, target, labelT, num_classes)) / (labelH.sum() + labelM.sum() + labelT.sum())
    logit = (logitH + logitM + logitT)
    F_loss = crossEntropy(softmax, logit, target, labelH, num_classes) / labelH.sum()
    return (1 - beta) * F_loss + beta * I_loss


def seed_cifar_loss(logitH, logitM, logitT, target, beta, num_classes, medium, tail):
    """cifarTrain_reslt_cifar100.py's loss (labels in CIFAR-LT's descending-count order; its slices
    ``[35:100]`` / ``[70:100]`` are ``[C - medium:C]`` / ``[C - tail:C]``)."""
    def crossEntropy(softmax, logit, label, weight):
        target = F.one_hot(label, num_classes)
        return - (weight * (target * torch.log(softmax(logit) + 1e-7)).sum(dim=1)).sum()

    softmax = nn.Softmax(dim=1)
    labelH = F.one_hot(target, num_classes).sum(dim=1)
    labelM = F.one_hot(target, num_classes)[:, num_classes - medium:num_classes].sum(dim=1)
    labelT = F.one_hot(target, num_classes)[:, num_classes - tail:num_classes].sum(dim=1)
    loss_ice = (crossEntropy(softmax, logitH, target, labelH) + crossEntropy(softmax, logitM, target, labelM)
                + crossEntropy(softmax, logitT, target, labelT)) / (labelH.sum() + labelM.sum() + labelT.sum()).float()
    logit = logitH + logitM + logitT
    loss_fce = nn.CrossEntropyLoss()(logit, target)
    return loss_ice * beta + (1 - beta) * loss_fce


def seed_class_map(counts):
    """dataset.py's LT_Dataset: class_map[c] = position of c in np.argsort(cls_num_list)."""
    sorted_classes = np.argsort(counts)
    class_map = [0] * len(counts)
    for i in range(len(counts)):
        class_map[sorted_classes[i]] = i
    return torch.tensor(class_map)


# ------------------------------------------------------------------------------ class sets

def test_branch_classes_by_hand():
    # ascending: class 5 (1), 1 (3), 4 (7), 6 (9), 3 and 2 (20: the higher index is the rarer), 0 (50)
    mask = priors.reslt_branch_classes([50, 3, 20, 20, 7, 1, 9], 5, 2)
    assert mask.dtype == torch.bool and mask.shape == (3, 7)
    assert mask[0].all()
    assert mask[1].nonzero().flatten().tolist() == [1, 3, 4, 5, 6]
    assert mask[2].nonzero().flatten().tolist() == [1, 5]


def test_branch_classes_match_the_seed_slices():
    # ImageNet-LT: labels remapped by ascending count, slices [:medium] / [:tail] (distinct counts)
    counts = torch.randperm(1000, generator=torch.Generator().manual_seed(0)) + 5
    rank = seed_class_map(counts.numpy())
    mask = priors.reslt_branch_classes(counts, 825, 220)
    assert torch.equal(mask[1], rank < 825) and torch.equal(mask[2], rank < 220)
    # CIFAR-100-LT's exponential profile (descending, with ties from int()): [35:100] and [70:100]
    cifar = [int(500 * 0.01 ** (i / 99)) for i in range(100)]
    assert len(set(cifar)) < 100                          # the profile has ties
    mask = priors.reslt_branch_classes(cifar, 65, 30)
    assert mask[1].nonzero().flatten().tolist() == list(range(35, 100))
    assert mask[2].nonzero().flatten().tolist() == list(range(70, 100))
    # CIFAR-10: [2:10] and [4:10]
    mask = priors.reslt_branch_classes([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50], 8, 6)
    assert mask[1].nonzero().flatten().tolist() == list(range(2, 10))
    assert mask[2].nonzero().flatten().tolist() == list(range(4, 10))


@pytest.mark.parametrize("medium, tail, message", [(0, 0, "medium_classes"), (8, 0, "tail_classes"),
                                                   (11, 2, "medium_classes"), (3, 4, "tail_classes"),
                                                   (2.5, 1, "medium_classes")])
def test_branch_class_errors(medium, tail, message):
    with pytest.raises(ValueError, match=message):
        priors.reslt_branch_classes(list(range(10, 0, -1)), medium, tail)


# ------------------------------------------------------------------------------ the loss

def _logits(n, c, dtype, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, 3, c, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)


CASES = [  # (N, C, medium, tail, targets from the head classes only: the medium / tail groups empty)
    (1, 3, 2, 1, False), (5, 7, 5, 2, False), (33, 13, 9, 4, False), (17, 13, 9, 4, True), (64, 1000, 825, 220, False),
    (6, 10, 10, 10, False), (9, 11, 1, 1, True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, c, medium, tail, head_only", CASES)
def test_loss_matches_the_imagenet_seed(n, c, medium, tail, head_only, dtype):
    counts = (torch.randperm(c, generator=torch.Generator().manual_seed(c)) * 3 + 2).tolist()  # distinct
    rank = seed_class_map(np.array(counts))
    g = torch.Generator().manual_seed(n)
    if head_only:
        head = (rank >= medium).nonzero().flatten()
        target = head[torch.randint(0, len(head), (n,), generator=g)]
    else:
        target = torch.randint(0, c, (n,), generator=g)
    ours_in, seed_in = _logits(n, c, dtype, n + c), _logits(n, c, dtype, n + c)
    loss = ltfast.nn.ResLTLoss(counts, medium, tail, beta=0.99)(ours_in, target)
    # the seed's network outputs its columns in rank order: column rank[c] is class c
    order = torch.argsort(rank)
    branches = [seed_in[:, k][:, order] for k in range(3)]
    expected = seed_imagenet_loss(*branches, rank[target], 0.99, c, medium, tail)
    loss.backward()
    expected.backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected, **tol)
    torch.testing.assert_close(ours_in.grad, seed_in.grad, **tol)
    # and ltfast.reference's plain version
    plain_in = _logits(n, c, dtype, n + c)
    plain = reference.reslt_loss(plain_in, target, priors.reslt_branch_classes(counts, medium, tail), 0.99)
    plain.backward()
    torch.testing.assert_close(plain, expected, **tol)
    torch.testing.assert_close(plain_in.grad, seed_in.grad, **tol)


@pytest.mark.parametrize("n, head_only", [(7, False), (128, False), (5, True)])
def test_loss_matches_the_cifar_seed(n, head_only):
    counts = [int(500 * 0.01 ** (i / 99)) for i in range(100)]
    g = torch.Generator().manual_seed(n)
    target = torch.randint(0, 35 if head_only else 100, (n,), generator=g)
    ours_in, seed_in = _logits(n, 100, torch.float64, n), _logits(n, 100, torch.float64, n)
    loss = ltfast.nn.ResLTLoss(counts, 65, 30, beta=0.995, fusion_epsilon=0.0)(ours_in, target)
    expected = seed_cifar_loss(*seed_in.unbind(1), target, 0.995, 100, 65, 30)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, seed_in.grad, rtol=1e-10, atol=1e-12)


def test_loss_epsilon_matters_where_p_is_tiny():
    # -log(p + 1e-7) saturates at -log(1e-7) = 16.1 where plain CE grows without bound: the 1e-7 is kept
    logits = torch.zeros(1, 3, 4, dtype=torch.float64)
    logits[0, :, 1] = 60.0                                # p_y ~ e^-60 for target 0
    loss = ltfast.nn.ResLTLoss([4, 3, 2, 1], 4, 4, beta=1.0)(logits, torch.tensor([0]))
    torch.testing.assert_close(loss, torch.tensor(-np.log(np.exp(-60.0) + 1e-7), dtype=torch.float64))


def test_ignored_rows_count_in_neither_term():
    counts = [9, 5, 3, 1]
    logits = _logits(8, 4, torch.float64, 2)
    target = torch.tensor([0, 3, 1, 2, 3, 0, 2, 1])
    dropped = ltfast.nn.ResLTLoss(counts, 3, 1)(logits[::2], target[::2])
    ignored = ltfast.nn.ResLTLoss(counts, 3, 1, ignore_index=-1)(logits, torch.where(torch.arange(8) % 2 == 0, target, -1))
    torch.testing.assert_close(ignored, dropped, rtol=1e-12, atol=1e-12)


def test_loss_bf16_logits_and_bad_input():
    counts = [9, 5, 3, 1]
    criterion = ltfast.nn.ResLTLoss(counts, 3, 1)
    logits = _logits(6, 4, torch.float64, 1)
    target = torch.tensor([0, 1, 2, 3, 3, 0])
    low = criterion(logits.detach().bfloat16(), target)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    torch.testing.assert_close(low.double(), criterion(logits, target), rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match=r"\[N, E, C\]"):
        criterion(logits[:, 0], target)
    with pytest.raises(ValueError, match="E = 3"):
        criterion(logits[:, :2], target)
    with pytest.raises(ValueError, match="beta"):
        ltfast.nn.ResLTLoss(counts, 3, 1, beta=1.5)
    assert ltfast.nn.ResLTLoss.takes_expert_logits


# ------------------------------------------------------------------------------ the head

def _cfg(kind="conv", before=True, gamma=0.7):
    return {"head": None, "reslt_branches": kind, "reslt_conv_before_pool": before, "reslt_gamma": gamma}


def seed_imagenet_head(finalBlock, fc, x, training, after_1x1conv, gamma):
    """The end of reslt_imagenet.py's _forward_impl from layer4's output ``x``."""
    avgpool = nn.AdaptiveAvgPool2d((1, 1))
    if after_1x1conv and training:
        x = finalBlock(x)
        x = avgpool(x)
    else:
        x = avgpool(x)
        x = finalBlock(x)
    x = torch.flatten(x, 1)
    c = x.size(1) // 3
    bt = x.size(0)
    x1, x2, x3 = x[:, :c], x[:, c:c * 2], x[:, c * 2:c * 3]
    out = torch.cat((x1, x2, x3), dim=0)
    if training:
        y = fc(out)
    else:
        weight = fc.weight
        norm = torch.norm(weight, 2, 1, keepdim=True)
        weight = weight / torch.pow(norm, gamma)
        y = torch.mm(out, torch.t(weight))
    return y[:bt, :], y[bt:bt * 2, :], y[bt * 2:bt * 3, :]


@pytest.mark.parametrize("before", [True, False])
def test_conv_head_matches_reslt_imagenet(before):
    torch.manual_seed(0)
    head = ResLTClassifier(8, 5, "conv", before, 0.7)
    seed = copy.deepcopy(head)
    x = torch.randn(6, 8, 5, 5)
    for training in (True, False):
        head.train(training)
        seed.train(training)
        out = head(torch.flatten(F.adaptive_avg_pool2d(head.branches(x), 1), 1))
        expected = seed_imagenet_head(seed.branches.block, seed.fc, x, training, before, 0.7)
        assert isinstance(out, ExpertOutput)
        torch.testing.assert_close(out.expert_logits, torch.stack(expected, dim=1))
        torch.testing.assert_close(out.logits, sum(expected))
    assert head.branches.block[1].num_batches_tracked == 1  # both ran one training forward


def test_bn_head_matches_the_cifar_resltresnet32():
    torch.manual_seed(1)
    head = ResLTClassifier(8, 5, "bn", True, None)
    seed = copy.deepcopy(head)
    x = torch.randn(6, 8, 4, 4)
    for training in (True, False):
        head.train(training)
        seed.train(training)
        out = head(torch.flatten(F.adaptive_avg_pool2d(head.branches(x), 1), 1))
        b = seed.branches
        fs = torch.cat((b.head_bn(x), b.medium_bn(x), b.tail_bn(x)), dim=0)      # ResLTResNet32.forward
        logits = seed.fc(nn.AdaptiveAvgPool2d((1, 1))(fs).view(fs.size(0), -1))
        c = logits.size(0) // 3
        torch.testing.assert_close(out.expert_logits, torch.stack([logits[:c], logits[c:2 * c], logits[2 * c:]], 1))


@pytest.mark.parametrize("arch, channels, size, stage", [("small_resnet", 1, 12, "layer3"), ("resnet32", 3, 16, "layer3")])
def test_head_on_the_architectures(arch, channels, size, stage):
    torch.manual_seed(0)
    model = build_model(arch, 6, channels, 8)
    features = find_head(model, 6)[1].in_features
    use_reslt_head(model, 6, _cfg())
    name, head = find_head(model, 6)
    assert name == "fc" and isinstance(head, ResLTClassifier)      # not the inner fc.fc
    assert head.in_features == 3 * features and head.fc.in_features == features
    captured = []
    model.get_submodule(stage).register_forward_hook(lambda m, a, out: captured.append(out))
    x = torch.randn(4, channels, size, size)
    for training in (True, False):
        model.train(training)
        out = model(x)
        assert out.expert_logits.shape == (4, 3, 6) and out.features.shape == (4, 3, features)
        assert captured[-1].shape[1] == 3 * features                # the stage's output is the branch maps
        assert out.logits.shape == (4, 6)


def test_config_checks():
    base = TINY + ["loss.name=reslt", "loss.reslt_medium_classes=5", "loss.reslt_tail_classes=2"]
    assert load_config(None, base)["model"]["reslt_branches"] == "conv"
    assert "reslt" in methods.available()
    for key in ("model.reslt_gamma=0.5", "loss.reslt_beta=0.5", "loss.reslt_global_batch=true",
                "loss.reslt_tail_classes=3"):  # a ResLT key in a run of another loss
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            load_config(None, TINY + ["loss.name=ce", key])
    for overrides, key in [(["loss.reslt_medium_classes=null"], "loss.reslt_medium_classes"),
                           (["loss.reslt_tail_classes=6"], "loss.reslt_tail_classes"),
                           (["model.classifier=cosine"], "model.classifier"),
                           (["model.arch=small_expert_resnet"], "model.arch"),
                           (["model.arch=vit_b_16"], "model.arch"),
                           (["model.reslt_branches=mlp"], "model.reslt_branches")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, base + overrides)


# ------------------------------------------------------------------------------ end to end

def test_fmnist_recipe_trains_and_evaluates(tmp_path):
    """configs/fmnist_lt/reslt.yaml on TINY's synthetic 7-class data (class sets 5 / 2), 2 epochs."""
    out = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "configs", "fmnist_lt", "reslt.yaml"), TINY + [
        "loss.reslt_medium_classes=5", "loss.reslt_tail_classes=2", "optim.epochs=2", "train.plot=false",
        f"train.out_dir={out}"])
    assert cfg["loss"]["reslt_beta"] == 0.99 and cfg["model"]["reslt_gamma"] == 0.7
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["test"]["samples"] == 7 * 15
    assert len(summary["test"]["experts"]) == 3                   # each branch alone
    state = torch.load(out / "best.pt", weights_only=True)["model"]
    assert state["fc.branches.block.0.weight"].shape == (3 * 32, 32, 1, 1) and state["fc.fc.weight"].shape == (7, 32)
    assert evaluate_main([str(out), "--out", str(tmp_path / "eval"), "--no-plot"]) == 0
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["results"]["plain"]["correct"] == summary["test"]["correct"]


def test_reslt_configs():
    def config(group):
        return load_config(os.path.join(ROOT, "configs", group, "reslt.yaml"))
    imagenet = config("imagenet_lt")
    model, loss, optim, data = imagenet["model"], imagenet["loss"], imagenet["optim"], imagenet["data"]
    assert (model["arch"], model["reslt_branches"], model["reslt_conv_before_pool"], model["reslt_gamma"]) == \
        ("resnext50_32x4d", "conv", True, 0.7)
    assert (loss["name"], loss["reslt_beta"], loss["reslt_medium_classes"], loss["reslt_tail_classes"],
            loss["reslt_fusion_epsilon"]) == ("reslt", 0.99, 825, 220, 1e-7)
    assert loss["reslt_global_batch"]              # the seed's DataParallel normalised over all 256 images
    assert (data["batch_size"], optim["epochs"], optim["lr"], optim["weight_decay"], optim["momentum"]) == \
        (256, 200, 0.1, 5e-4, 0.9)
    assert (optim["schedule"], optim["warmup_epochs"], optim["nesterov"]) == ("cosine", 5, False)
    assert imagenet["eval"]["reported"]["e200"] == {"top1": 53.2, "ua": 58.1, "ra": 91.6, "many": 61.6,
                                                    "medium": 51.4, "few": 38.8}
    for group, beta, medium, tail in [("cifar10_lt", 0.998, 8, 6), ("cifar100_lt", 0.995, 65, 30)]:
        cfg = config(group)
        model, loss, optim = cfg["model"], cfg["loss"], cfg["optim"]
        assert (model["arch"], model["reslt_branches"], model["reslt_gamma"]) == ("resnet32", "bn", None)
        assert (loss["reslt_beta"], loss["reslt_medium_classes"], loss["reslt_tail_classes"],
                loss["reslt_fusion_epsilon"]) == (beta, medium, tail, 0.0)
        assert (cfg["data"]["batch_size"], optim["epochs"], optim["lr"], optim["weight_decay"], optim["nesterov"]) == \
            (128, 200, 0.1, 5e-4, True)
        assert (optim["schedule"], optim["milestones"], optim["gamma"], optim["warmup_epochs"]) == \
            ("multistep", [160, 180], 0.1, 5)
    fmnist = config("fmnist_lt")
    assert (fmnist["loss"]["reslt_medium_classes"], fmnist["loss"]["reslt_tail_classes"]) == (8, 2)


def test_resnext50_imagenet_recipe_runs(jpeg_lists, tmp_path):
    root, lists = jpeg_lists
    out = tmp_path / "reslt"
    cfg = load_config(os.path.join(ROOT, "configs", "imagenet_lt", "reslt.yaml"), [
        f"data.root={root}", f"data.train_list={lists['train']}", f"data.val_list={lists['val']}",
        f"data.test_list={lists['test']}", "data.num_threads=1", "data.batch_size=8", "data.eval_batch_size=8",
        "data.crop_size=16", "data.resize_size=18", "optim.epochs=1", "optim.reference_batch=null",
        "train.progress=false", "train.plot=false", f"train.out_dir={out}", "train.device=cpu",
        "loss.reslt_medium_classes=2", "loss.reslt_tail_classes=1", "optim.warmup_epochs=0"])
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["test"]["samples"] == 6
    model = torch.load(out / "best.pt", weights_only=True)["model"]
    assert model["fc.branches.block.0.weight"].shape == (3 * 2048, 2048, 1, 1) and model["fc.fc.weight"].shape == (3, 2048)


# ------------------------------------------------------------------------------ DDP: the global batch

DDP_COUNTS = [40, 30, 22, 15, 9, 5, 2]
DDP_SIZES = (13, 11)  # unequal local batches with different group counts per rank


def _ddp_problem():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(sum(DDP_SIZES), 16, generator=gen)
    target = torch.randint(0, len(DDP_COUNTS), (sum(DDP_SIZES),), generator=gen)
    torch.manual_seed(1)
    return features, target, nn.Linear(16, 3 * len(DDP_COUNTS))


def _ddp_worker(rank, world, init_file, out_dir, global_batch):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        features, target, model = _ddp_problem()
        ddp = nn.parallel.DistributedDataParallel(model)
        start = sum(DDP_SIZES[:rank])
        local = slice(start, start + DDP_SIZES[rank])
        criterion = ltfast.nn.ResLTLoss(DDP_COUNTS, 4, 2, global_batch=global_batch)
        loss = criterion(ddp(features[local]).view(-1, 3, len(DDP_COUNTS)), target[local])
        loss.backward()
        torch.save({"loss": loss.detach(), "weight_grad": model.weight.grad, "bias_grad": model.bias.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        leave_worker_after_error()
    leave_worker()


def _run_ddp(global_batch):
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "store"), tmp, global_batch), nprocs=2, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_global_batch_under_ddp_matches_one_process():
    features, target, model = _ddp_problem()
    single = ltfast.nn.ResLTLoss(DDP_COUNTS, 4, 2)(model(features).view(-1, 3, len(DDP_COUNTS)), target)
    single.backward()
    results = _run_ddp(global_batch=True)
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, single.detach(), rtol=1e-5, atol=1e-6)
    for rank in range(2):  # DDP averaged the gradients: every rank holds the global batch's
        torch.testing.assert_close(results[rank]["weight_grad"], model.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[rank]["bias_grad"], model.bias.grad, rtol=1e-5, atol=1e-6)
    local = _run_ddp(global_batch=False)  # each rank normalised by its own counts: another weighting
    assert not torch.allclose(local[0]["weight_grad"], model.weight.grad, rtol=1e-3)
