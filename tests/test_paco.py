"""PaCo (methods/paco.py): the registry and config checks, the momentum update and the queue against
MoCo's rules (moco/builder.py), the training step's loss against a plain-PyTorch transcription of the
seed's ``MoCo._train`` + ``PaCoLoss.forward`` (values and gradients) and against reference.paco_loss,
the two views (same images in batch i of both streams; PaCo's contrastive views in the PIL and DALI
loaders), a few ResNeXt-50 steps of configs/imagenet_lt/paco.yaml on tiny list-file data, and the
Fashion-MNIST-LT recipe through ``ltfast.train`` and ``python -m ltfast.evaluate``."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ltfast.nn
from ltfast import priors, reference
from ltfast.train import load_config, methods, train
from ltfast.train.config import ConfigError
from ltfast.train.evaluation import main as evaluate_main
from ltfast.train.methods.paco import KEY_VIEW_LOADER, PaCo, PaCoNetwork
from ltfast.train.models import build_model, find_head

import torch.distributed as dist
import torch.multiprocessing as mp

from ddp_support import free_port
from test_train import TINY, _ddp_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST_PACO = os.path.join(ROOT, "configs", "fmnist_lt", "paco.yaml")
IMAGENET_PACO = os.path.join(ROOT, "configs", "imagenet_lt", "paco.yaml")


# --------------------------------------------------------------------------------------------- config

def test_registry_and_checks():
    assert "paco" in methods.available() and "paco" in methods.describe()
    cfg = load_config(FMNIST_PACO)
    assert [m.name for m in methods.active(cfg)] == ["ce", "paco"]
    imagenet = load_config(IMAGENET_PACO)
    assert imagenet["model"]["paco_queue"] == 8192 and imagenet["model"]["paco_alpha"] == 0.05
    assert imagenet["model"]["paco_temperature"] == 0.07 and imagenet["optim"]["warmup_epochs"] == 10
    assert imagenet["data"]["paco_views"] == "regular_regular" and imagenet["data"]["val_list"]
    for override, key in [("model.paco_queue=1000", "model.paco_queue"), ("loss.name=balanced_softmax", "loss.name"),
                          ("model.classifier=cosine", "model.classifier"), ("data.mixup_alpha=0.2", "data.mixup_alpha"),
                          ("model.arch=small_expert_resnet", "model.arch"), ("model.bbn=true", "model.bbn"),
                          ("model.freeze_backbone=true", "model.freeze_backbone")]:
        with pytest.raises(ConfigError, match=key):
            load_config(IMAGENET_PACO, [override])
    # randcls_sim runs on both image loaders (DALI included); the in-memory sets have no RandAugment
    assert load_config(IMAGENET_PACO, ["data.paco_views=randcls_sim"])["data"]["backend"] == "dali"
    with pytest.raises(ConfigError, match="data.paco_views"):
        load_config(FMNIST_PACO, ["data.paco_views=randcls_sim"])
    with pytest.raises(ConfigError, match="model.paco_alpha: only used with model.paco=true"):
        load_config(None, ["model.paco_alpha=0.1"])


# ---------------------------------------------------------------------------------- network and queue

def _network(classes=5, queue=12, momentum=0.9, dim=6, mlp=True, seed=0):
    torch.manual_seed(seed)
    return PaCoNetwork.from_architecture(build_model("small_resnet", classes, 1, 8), classes, dim, mlp, queue,
                                         momentum)


def test_network_structure_and_inference():
    net = _network().eval()
    assert find_head(net, 5)[0] == "fc" and net.fc.in_features == 32            # width 8: 32-d pooled feature
    assert [type(m).__name__ for m in net.projection] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert not any(p.requires_grad for p in net.key_encoder.parameters())
    assert not any(p.requires_grad for p in net.key_projection.parameters())
    for q, k in zip(net.encoder.state_dict().values(), net.key_encoder.state_dict().values()):
        assert torch.equal(q, k)                                                   # the key encoder starts as a copy
    # the seed's queue: normalize(randn(K, D), dim=0), labels in [0, C)
    torch.testing.assert_close(net.queue.norm(dim=0), torch.ones(6))
    assert net.queue_labels.min() >= 0 and net.queue_labels.max() < 5 and int(net.queue_ptr) == 0
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        pooled = F.adaptive_avg_pool2d(net.encoder.layer3(net.encoder.layer2(net.encoder.layer1(net.encoder.stem(x)))),
                                       1).flatten(1)
        torch.testing.assert_close(net(x), F.linear(pooled, net.fc.weight, net.fc.bias))   # MoCo._inference
    assert isinstance(_network(mlp=False).projection, torch.nn.Linear)


def test_momentum_update_is_mocos_rule():
    net = _network(momentum=0.9)
    with torch.no_grad():
        for p in list(net.encoder.parameters()) + list(net.projection.parameters()):
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in net.named_parameters()}
    net.momentum_update()
    for name, param in net.named_parameters():
        if name.startswith(("key_encoder.", "key_projection.")):
            query = name.replace("key_encoder.", "encoder.", 1).replace("key_projection.", "projection.", 1)
            torch.testing.assert_close(param, before[name] * 0.9 + before[query] * 0.1)
        else:
            assert torch.equal(param, before[name])                                # the query side is not touched


def test_enqueue_replaces_the_oldest_and_wraps():
    net = _network(queue=12)
    original = net.queue.clone()
    keys = [F.normalize(torch.randn(4, 6), dim=1) for _ in range(4)]
    labels = [torch.full((4,), step, dtype=torch.long) for step in range(4)]
    net.enqueue(keys[0], labels[0])
    assert torch.equal(net.queue[:4], keys[0]) and torch.equal(net.queue[4:], original[4:])
    assert net.queue_labels[:4].tolist() == [0] * 4 and int(net.queue_ptr) == 4
    net.enqueue(keys[1], labels[1])
    net.enqueue(keys[2], labels[2])
    assert int(net.queue_ptr) == 0                                                 # (ptr + batch) % K
    net.enqueue(keys[3], labels[3])
    assert torch.equal(net.queue, torch.cat((keys[3], keys[1], keys[2])))
    assert net.queue_labels.tolist() == [3] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match="multiple"):
        net.enqueue(torch.randn(5, 6), torch.zeros(5, dtype=torch.long))
    empty = _network(queue=0)
    empty.enqueue(keys[0], labels[0])                                              # K = 0: nothing to keep
    assert empty.queue.shape == (0, 6)


# ------------------------------------------------------------------------- the step vs the seed's code

def _paco_loss_transcription(features, labels, sup_logits, weight, alpha, beta, gamma, temperature, K, num_classes,
                             supt=1.0):
    """The survey's PaCo-codebase/losses.py PaCoLoss.forward, transcribed (device-agnostic)."""
    batch_size = (features.shape[0] - K) // 2
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels[:batch_size], labels.T).to(features.dtype)
    anchor_dot_contrast = torch.div(torch.matmul(features[:batch_size], features.T), temperature)
    anchor_dot_contrast = torch.cat(((sup_logits + torch.log(weight + 1e-9)) / supt, anchor_dot_contrast), dim=1)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size).view(-1, 1), 0)
    mask = mask * logits_mask
    one_hot_label = F.one_hot(labels[:batch_size].view(-1), num_classes=num_classes).to(features.dtype)
    mask = torch.cat((one_hot_label * beta, mask * alpha), dim=1)
    logits_mask = torch.cat((torch.ones(batch_size, num_classes, dtype=features.dtype), gamma * logits_mask), dim=1)
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True) + 1e-12)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -(temperature / temperature) * mean_log_prob_pos.mean()


def _moco_train_transcription(net, im_q, im_k, labels):
    """moco/builder.py MoCo._train (single process: no shuffle-BN) on PaCoNetwork's modules."""
    feat_q = net.encoder(im_q)
    q = F.normalize(net.projection(feat_q), dim=1)
    with torch.no_grad():
        for pq, pk in zip(list(net.encoder.parameters()) + list(net.projection.parameters()),
                          list(net.key_encoder.parameters()) + list(net.key_projection.parameters())):
            pk.data = pk.data * net.momentum + pq.data * (1. - net.momentum)
        k = F.normalize(net.key_projection(net.key_encoder(im_k)), dim=1)
    features = torch.cat((q, k, net.queue.clone().detach()), dim=0)
    target = torch.cat((labels, labels, net.queue_labels.clone().detach()), dim=0)
    # _dequeue_and_enqueue after the features were taken (the seed cannot run K = 0: its slice
    # assignment fails; ltfast keeps no queue then)
    if net.queue.shape[0] == 0:
        return features, target, net.fc(feat_q)
    batch, ptr = k.shape[0], int(net.queue_ptr)
    net.queue[ptr:ptr + batch, :] = k
    net.queue_labels[ptr:ptr + batch] = labels
    net.queue_ptr[0] = (ptr + batch) % net.queue.shape[0]
    return features, target, net.fc(feat_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("queue, alpha, beta, gamma, temperature", [(12, 0.05, 1.0, 1.0, 0.07), (0, 0.3, 0.5, 2.0, 0.2),
                                                                     (24, 1.0, 1.0, 0.5, 0.1)])
def test_train_step_matches_the_seed(dtype, queue, alpha, beta, gamma, temperature):
    classes, batch = 5, 6
    counts = [40, 20, 9, 4, 1]
    net = _network(classes, queue, momentum=0.9).to(dtype).train()
    seed_net = copy.deepcopy(net)
    cfg = load_config(None, TINY + ["model.paco=true", f"model.paco_queue={queue}", f"model.paco_alpha={alpha}",
                                    f"model.paco_beta={beta}", f"model.paco_gamma={gamma}",
                                    f"model.paco_temperature={temperature}", "data.batch_size=6"])
    method = PaCo(cfg)
    method.network, method.log_prior = net, priors.log_prior(counts, dtype=dtype)
    gen = torch.Generator().manual_seed(queue)
    im_q, im_k = torch.randn(batch, 1, 12, 12, generator=gen, dtype=dtype), torch.randn(batch, 1, 12, 12, generator=gen,
                                                                                          dtype=dtype)
    labels = torch.tensor([0, 1, 1, 2, 4, 0])
    loss = method.train_step(net, im_q, labels, {KEY_VIEW_LOADER: (im_k, labels)}, ltfast.nn.CrossEntropyLoss())

    features, target, logits = _moco_train_transcription(seed_net, im_q, im_k, labels)
    prior = torch.tensor(counts, dtype=dtype).view(1, -1) / sum(counts)    # cal_weight_for_classes
    expected = _paco_loss_transcription(features, target, logits, prior, alpha, beta, gamma, temperature, queue, classes)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, expected, **tol)
    # the loss is reference.paco_loss on similarity = q @ [q, k, queue].T
    q = features[:batch]
    direct = reference.paco_loss(q @ features.T, labels, target, logits, priors.log_prior(counts, dtype=dtype),
                                 temperature, alpha, beta, gamma)
    torch.testing.assert_close(loss, direct, **tol)
    loss.backward()
    expected.backward()
    # float32 gradients through ~10 layers: ~5e-6 apart from summation order (float64 agrees to 1e-10)
    grad_tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else tol
    for (name, p), s in zip(net.named_parameters(), seed_net.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, s.grad, **grad_tol, msg=lambda m: f"{name}: {m}")
        else:
            assert p.grad is None
            torch.testing.assert_close(p, s, **tol, msg=name)                # the momentum update
    for (name, b), s in zip(net.named_buffers(), seed_net.buffers()):       # queue, labels, pointer, BN statistics
        torch.testing.assert_close(b, s, **tol, msg=name)


# ------------------------------------------------------------------------------------------ the views

def test_in_memory_views_hold_the_same_images():
    """The key loader reads the training loader's sampler: with no augmentation (pad 0, no flip) both
    streams give the same pixels; with it, the same labels and different crops."""
    from ltfast.train.data import build_data
    for augment, expect_equal in ((["data.pad=0", "data.flip=false"], True), ([], False)):
        cfg = load_config(None, TINY + ["model.paco=true", "model.paco_queue=64"] + augment)
        data = build_data(cfg, 0, 1, torch.device("cpu"))
        run = type("Run", (), {"rank": 0, "world": 1, "device": torch.device("cpu")})()
        method = PaCo(cfg)
        key_loader = method.extra_loaders(data, run)[KEY_VIEW_LOADER]
        assert key_loader.sampler is data["train_loader"].sampler and len(key_loader) == len(data["train_loader"])
        torch.testing.assert_close(method.log_prior, priors.log_prior(data["class_counts"]))
        for epoch in (0, 2):
            data["train_loader"].set_epoch(epoch)
            key_loader.set_epoch(epoch)
            pairs = list(zip(data["train_loader"], key_loader))
            for (x1, y1), (x2, y2) in pairs:
                assert torch.equal(y1, y2)
                assert torch.equal(x1, x2) == expect_equal
            assert not expect_equal or len(pairs) == len(data["train_loader"])


def test_image_views_read_the_same_images(rgb_jpegs):
    """PIL backend: the key loader's batches are the training loader's indices, under PaCo's mocov2
    view (crop scale 0.2-1 and the colour / grey / blur steps); grey draws give grey images."""
    from ltfast.train.data import build_data
    cfg = load_config(IMAGENET_PACO, [f"data.root={rgb_jpegs}", f"data.train_list={rgb_jpegs / 'train.txt'}",
                                      f"data.val_list={rgb_jpegs / 'val.txt'}", f"data.test_list={rgb_jpegs / 'test.txt'}",
                                      "data.backend=pil", "data.num_threads=0", "data.crop_size=16",
                                      "data.resize_size=16", "data.batch_size=4", "model.paco_queue=8",
                                      "data.eval_batch_size=4", "train.device=cpu"])
    data = build_data(cfg, 0, 1, torch.device("cpu"))
    run = type("Run", (), {"rank": 0, "world": 1, "device": torch.device("cpu")})()
    key_loader = PaCo(cfg).extra_loaders(data, run)[KEY_VIEW_LOADER]
    train_loader = data["train_loader"]
    assert key_loader.view.name == "mocov2" and key_loader.scale == (0.2, 1.0) and train_loader.view is None
    for epoch in (0, 1):
        train_loader.set_epoch(epoch)
        key_loader.set_epoch(epoch)
        assert [b.tolist() for _, b in train_loader._batches()] == [b.tolist() for _, b in key_loader._batches()]
        for (x1, y1), (x2, y2) in zip(train_loader, key_loader):
            assert torch.equal(y1, y2) and x1.shape == x2.shape and not torch.equal(x1, x2)


def _view_randoms(seed, batch):
    from ltfast.data.augmentation import _batch_generator, draw_train_randoms, draw_view_randoms
    rng = _batch_generator(seed, 0, 0, 0)
    randoms = draw_train_randoms(rng, batch)
    randoms.update(draw_view_randoms(rng, batch))
    return randoms


def test_view_params_follow_paco_lt():
    from ltfast.data.augmentation import CONTRASTIVE_VIEWS, draw_train_randoms, train_params, view_params, _batch_generator
    n = 20000
    randoms = _view_randoms(3, n)
    standard = draw_train_randoms(_batch_generator(3, 0, 0, 0), n)
    for key in standard:                                 # the view's draws come after: crop and flip drawn alike
        assert np.array_equal(standard[key], randoms[key])
    sizes = np.full((n, 2), 300)
    for name, (jitter_p, hue) in {"mocov2": (0.8, 0.1), "sim": (1.0, 0.0)}.items():
        view = CONTRASTIVE_VIEWS[name]
        p = view_params(randoms, view, train_params(sizes, randoms, 0.4, view.scale))
        jittered = p["brightness"] != 1
        assert abs(jittered.mean() - jitter_p) < 0.015
        assert np.all(p["hue"][~jittered] == 0) and np.abs(p["hue"]).max() <= hue + 1e-7
        assert abs(p["grayscale"].mean() - 0.2) < 0.015 and abs((p["sigma"] > 0).mean() - 0.5) < 0.015
        blurred = p["sigma"][p["sigma"] > 0]
        assert blurred.min() >= 0.1 and blurred.max() <= 2.0
        area = p["height"] * p["width"] / (300 * 300)
        assert area.min() >= view.scale[0] - 0.01       # RandomResizedCrop(scale=(0.2, 1)) for mocov2


@pytest.mark.parametrize("view", ["sim", "mocov2"])
def test_dali_view_matches_pil(view):
    """The DALI graph of a contrastive view against the PIL path on real photos. Without hue (sim) they
    agree as the standard view does (< 4 grey levels on average); DALI's hue is a YIQ rotation, not
    torchvision's HSV shift, so mocov2 is compared on the images its draw leaves without hue."""
    pytest.importorskip("nvidia.dali")
    from ltfast.data import InstanceSampler, ListDataset, read_list_file
    from ltfast.data.dali import IMAGENET_STD, make_image_loader
    from ltfast.data.photos import default_photo_dir, prepare_photo_set
    photos = read_list_file(prepare_photo_set(default_photo_dir(300), count=300))
    subset = ListDataset(photos.root, photos.paths[:20], photos.labels[:20])
    sampler = InstanceSampler(subset.labels, seed=5)
    kwargs = dict(dataset=subset, sampler=sampler, batch_size=20, train=True, view=view, seed=2)
    (xd, yd), = [(x.clone(), y.clone()) for x, y in make_image_loader("dali", num_threads=2, **kwargs)]
    (xp, yp), = [(x.clone(), y.clone()) for x, y in make_image_loader("pil", num_workers=0, **kwargs)]
    assert torch.equal(yd, yp)
    diff = ((xd - xp).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255).flatten(1).mean(1)
    from ltfast.data.augmentation import CONTRASTIVE_VIEWS, view_params, train_params
    randoms = _view_randoms(2, 20)                      # the loaders' augmentation seed
    p = view_params(randoms, CONTRASTIVE_VIEWS[view], train_params(np.full((20, 2), 400), randoms, 0.4))
    no_hue = torch.from_numpy(p["hue"] == 0)
    assert no_hue.sum() >= 2
    assert diff[no_hue].mean() < 4.0, diff
    grey = torch.from_numpy(p["grayscale"])
    assert grey.any()
    for x in (xd, xp):                                   # grey images: the three channels agree (in grey levels)
        pixels = x[grey] * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        assert (pixels.amax(1) - pixels.amin(1)).max() * 255 < 1.5


# ------------------------------------------------------------------------------------------ end to end

def test_imagenet_lt_recipe_runs(jpeg_lists, tmp_path):
    """Two steps of configs/imagenet_lt/paco.yaml (ResNeXt-50, MoCo v2 key view) on tiny JPEGs, PIL then DALI,
    then DALI with PaCo's RandAugment query view (randcls_sim)."""
    root, lists = jpeg_lists
    for backend, views in (("pil", "regular_regular"), ("dali", "regular_regular"), ("dali", "randcls_sim")):
        out = tmp_path / f"{backend}-{views}"
        cfg = load_config(IMAGENET_PACO, [
            f"data.root={root}", f"data.train_list={lists['train']}", f"data.val_list={lists['val']}",
            f"data.test_list={lists['test']}", f"data.backend={backend}", f"data.paco_views={views}", "data.num_threads=1",
            "data.batch_size=4",
            "data.eval_batch_size=8", "data.crop_size=16", "data.resize_size=18", "optim.epochs=1",
            "optim.warmup_epochs=0", "optim.reference_batch=null", "model.paco_queue=8", "train.progress=false",
            "train.plot=false", f"train.out_dir={out}", "train.device=cpu"])
        summary = train(cfg)
        assert summary["status"] == "finished" and summary["test"]["samples"] == 6 and summary["name"] == "PaCo"
        assert math.isfinite(summary["history"][0]["loss"]) and summary["history"][0]["loss"] > 0
        weights = torch.load(out / "best.pt", weights_only=True)["model"]
        assert weights["fc.weight"].shape == (3, 2048) and weights["queue"].shape == (8, 128)
        assert weights["projection.3.weight"].shape == (128, 2048) and "key_encoder.layer4.2.conv2.weight" in weights
        assert int(weights["queue_ptr"]) == 12 % 8         # 14 images: 3 steps of 4 enqueue 12 keys into K = 8


def test_bf16_autocast_step(tmp_path):
    summary = train(load_config(None, TINY + ["model.paco=true", "model.paco_queue=64", "train.amp=bf16",
                                              "optim.epochs=1", "train.plot=false", f"train.out_dir={tmp_path}"]))
    assert summary["bf16"] and math.isfinite(summary["history"][0]["loss"]) and summary["history"][0]["loss"] > 0
    queue = torch.load(tmp_path / "last.pt", weights_only=True)["model"]["queue"]
    assert queue.dtype == torch.float32 and torch.allclose(queue[:32].norm(dim=1), torch.ones(32), atol=1e-2)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes(tmp_path):
    """Under DDP each rank enqueues the all-gathered keys of both ranks: the pointer moves by the global
    batch (32 = 2 x 16) per step, not by a rank's 16."""
    overrides = TINY + [f"train.out_dir={tmp_path}", "model.paco=true", "model.paco_queue=64", "optim.epochs=1",
                        "train.seed=3", "train.plot=false"]
    mp.spawn(_ddp_worker, args=(2, free_port(), overrides), nprocs=2, join=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    assert math.isfinite(summary["history"][0]["loss"])
    weights = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    steps = sum(summary["class_counts"]) // 32
    assert int(weights["queue_ptr"]) == (steps * 32) % 64
    assert torch.allclose(weights["queue"][:32].norm(dim=1), torch.ones(32), atol=1e-5)   # keys, not the random init


SMALL_FMNIST = ["data.n_max=150", "data.val_per_class=10", "data.eval_batch_size=1000", "train.plot=false"]


def test_fmnist_recipe_trains_evaluates_and_resumes(tmp_path):
    out = tmp_path / "run"
    summary = train(load_config(FMNIST_PACO, SMALL_FMNIST + ["optim.epochs=2", f"train.out_dir={out}"]))
    assert summary["status"] == "finished" and len(summary["history"]) == 2
    assert all(math.isfinite(record["loss"]) for record in summary["history"])
    weights = torch.load(out / "last.pt", weights_only=True)["model"]
    assert weights["queue"].shape == (1024, 128) and weights["fc.weight"].shape == (10, 64)
    steps = 2 * (sum(summary["class_counts"]) // 64)
    assert int(weights["queue_ptr"]) == (steps * 64) % 1024
    evaluated = tmp_path / "eval"
    assert evaluate_main([str(out), "--out", str(evaluated), "--no-plot"]) == 0
    result = json.loads((evaluated / "evaluation.json").read_text())
    assert result["results"]["plain"]["correct"] == summary["test"]["correct"]
    # resume: the queue and the key encoder come back with the weights
    cut = tmp_path / "cut"
    base = SMALL_FMNIST + ["optim.epochs=2", f"train.out_dir={cut}"]
    assert train(load_config(FMNIST_PACO, base + ["train.stop_after=1"]))["status"] == "stopped"
    train(load_config(FMNIST_PACO, base + ["train.resume=true"]))
    resumed = torch.load(cut / "last.pt", weights_only=True)["model"]
    for key in weights:
        assert torch.equal(weights[key], resumed[key]), key


@pytest.mark.parametrize("group", ["cifar10_lt", "cifar100_lt"])
def test_cifar_configs(group):
    """The authors' CIFAR-100-LT script's values (PaCo/LT/sh/CIFAR100_train_imb0.01.sh), on ResNet-32."""
    cfg = load_config(os.path.join(ROOT, "configs", group, "paco.yaml"))
    model, optim = cfg["model"], cfg["optim"]
    assert model["paco"] and model["arch"] == "resnet32" and cfg["loss"]["name"] == "ce"
    assert (model["paco_alpha"], model["paco_beta"], model["paco_gamma"]) == (0.01, 1.0, 1.0)
    assert (model["paco_temperature"], model["paco_queue"], model["paco_dim"]) == (0.05, 1024, 32)
    assert (optim["epochs"], optim["lr"], optim["weight_decay"], optim["schedule"]) == (400, 0.05, 5e-4, "cosine")
    assert model["paco_queue"] % cfg["data"]["batch_size"] == 0


# ----------------------------------------------------------------------------- RandAugment (randcls_sim)

def _randaugment_py(img, name, argument, bicubic):
    """The survey's PaCo-codebase/randaugment.py op functions, transcribed (PIL >= 5.2 branches), with
    paco_lt.py's ra_params fill (the ImageNet mean in 0-255) and the interpolation already drawn."""
    from PIL import Image, ImageEnhance, ImageOps
    kwargs = dict(fillcolor=tuple(min(255, round(255 * x)) for x in (0.485, 0.456, 0.406)),
                  resample=Image.BICUBIC if bicubic else Image.BILINEAR)

    def solarize_add(img, add, thresh=128):
        lut = [min(255, i + add) if i < thresh else i for i in range(256)]
        return img.point(lut + lut + lut)

    return {
        "AutoContrast": lambda: ImageOps.autocontrast(img), "Equalize": lambda: ImageOps.equalize(img),
        "Invert": lambda: ImageOps.invert(img), "Rotate": lambda: img.rotate(argument, **kwargs),
        "PosterizeTpu": lambda: img if argument >= 8 else ImageOps.posterize(img, argument),
        "Solarize": lambda: ImageOps.solarize(img, argument), "SolarizeAdd": lambda: solarize_add(img, argument),
        "Color": lambda: ImageEnhance.Color(img).enhance(argument),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(argument),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(argument),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(argument),
        "ShearX": lambda: img.transform(img.size, Image.AFFINE, (1, argument, 0, 0, 1, 0), **kwargs),
        "ShearY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, argument, 1, 0), **kwargs),
        "TranslateXRel": lambda: img.transform(img.size, Image.AFFINE, (1, 0, argument * img.size[0], 0, 1, 0),
                                               **kwargs),
        "TranslateYRel": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, argument * img.size[1]),
                                               **kwargs),
    }[name]()


def test_rand_augment_ops_are_randaugment_py():
    from PIL import Image
    from ltfast.data.augmentation import RAND_AUGMENT_OPS
    from ltfast.data.pil import _PilDataset
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8), "RGB")
    arguments = {"Rotate": -21.0, "PosterizeTpu": 2, "Solarize": 200, "SolarizeAdd": 77, "Color": 0.4, "Contrast": 1.7,
                 "Brightness": 1.3, "Sharpness": 0.2, "ShearX": 0.25, "ShearY": -0.3, "TranslateXRel": -0.4,
                 "TranslateYRel": 0.33}
    for name in RAND_AUGMENT_OPS:
        for bicubic in (False, True):
            ours = _PilDataset._rand_augment(None, img, [(name, arguments.get(name), bicubic)])
            theirs = _randaugment_py(img, name, arguments.get(name), bicubic)
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), name


def test_rand_augment_draws_follow_rand_n2_m10_mstd05():
    from ltfast.data.augmentation import (RAND_AUGMENT_OPS, _batch_generator, draw_rand_augment_randoms,
                                          parse_rand_augment, rand_augment_ops_of)
    assert parse_rand_augment("rand-n2-m10-mstd0.5") == (2, 10, 0.5) and parse_rand_augment("rand") == (2, 10, 0.0)
    for bad in ("randaugment", "rand-w0", "rand-x3"):
        with pytest.raises(ValueError, match="rand_augment"):
            parse_rand_augment(bad)
    n = 20000
    randoms = draw_rand_augment_randoms(_batch_generator(1, 0, 0, 0), n, 2)
    ops = [rand_augment_ops_of(randoms, row, 10, 0.5) for row in range(n)]
    applied = [op for row in ops for op in row]
    assert abs(len(applied) / (2 * n) - 0.5) < 0.01                       # AutoAugmentOp prob 0.5
    frequency = np.bincount([RAND_AUGMENT_OPS.index(name) for name, _, _ in applied], minlength=15) / len(applied)
    assert np.abs(frequency - 1 / 15).max() < 0.01                          # uniform choice, no weights
    rotations = np.array([arg for name, arg, _ in applied if name == "Rotate"])
    assert np.abs(rotations).max() <= 30 and abs((rotations < 0).mean() - 0.5) < 0.05
    # magnitude N(10, 0.5) clipped to 10: the level is 10 half the time, else ~ 10 - |N(0, 0.5)|
    enhance = np.array([arg for name, arg, _ in applied if name == "Color"])
    assert enhance.max() == pytest.approx(1.9) and abs((enhance > 1.9 - 1e-9).mean() - 0.5) < 0.05
    assert enhance.min() > (10 - 4 * 0.5) / 10 * 1.8 + 0.1


def test_randcls_sim_views(rgb_jpegs):
    """randcls_sim: RandAugment on the training loader, the sim view on the key loader."""
    from ltfast.train.data import build_data
    overrides = [f"data.root={rgb_jpegs}", f"data.train_list={rgb_jpegs / 'train.txt'}",
                 f"data.val_list={rgb_jpegs / 'val.txt'}", f"data.test_list={rgb_jpegs / 'test.txt'}",
                 "data.num_threads=0", "data.crop_size=16", "data.resize_size=16", "data.batch_size=4",
                 "model.paco_queue=8", "data.eval_batch_size=4", "train.device=cpu", "data.paco_views=randcls_sim"]
    with pytest.raises(ConfigError, match="in-memory"):
        load_config(FMNIST_PACO, ["data.paco_views=randcls_sim"])
    cfg = load_config(IMAGENET_PACO, overrides + ["data.backend=pil"])
    data = build_data(cfg, 0, 1, torch.device("cpu"))
    run = type("Run", (), {"rank": 0, "world": 1, "device": torch.device("cpu")})()
    key_loader = PaCo(cfg).extra_loaders(data, run)[KEY_VIEW_LOADER]
    assert data["train_loader"].rand_augment == (2, 10, 0.5) and data["train_loader"].view is None
    assert key_loader.view.name == "sim" and key_loader.scale == (0.08, 1.0) and key_loader.rand_augment is None
    for (x1, y1), (x2, y2) in zip(data["train_loader"], key_loader):
        assert torch.equal(y1, y2) and torch.isfinite(x1).all()
    with pytest.raises(RuntimeError, match="already been iterated"):
        data["train_loader"].set_rand_augment("rand-n2-m10-mstd0.5")
    pytest.importorskip("nvidia.dali")
    from ltfast.data.dali import DaliImageLoader
    from ltfast.data import InstanceSampler
    train_set = data["train_loader"].dataset
    dali = DaliImageLoader(train_set, InstanceSampler(train_set.labels), batch_size=4, crop_size=16, num_threads=1,
                           seed=1)
    with pytest.raises(ValueError, match="rand_augment"):
        dali.set_rand_augment("randaugment")
    dali.set_rand_augment("rand-n2-m10-mstd0.5")
    assert dali.rand_augment == (2, 10, 0.5)
    batches = [x.clone() for x, _ in dali]
    assert batches and all(x.shape == (4, 3, 16, 16) and torch.isfinite(x).all() for x in batches)


_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def test_dali_rand_augment_op_matches_pil(monkeypatch):
    """Each RandAugment operation alone (the draw forced: layer 1 applies it at magnitude 9 = 10 - 2 x
    mstd 0.5, as at 10 Solarize's threshold 256 is the identity; random sign; layer 2 skipped), DALI's graph against the PIL path on 6 real photos, 224 x 224, in grey levels (mean
    |difference| per image, 0-255). The inputs already differ by the decoders and resamplers (~0.5-3.5
    levels per image, test_dali_view_matches_pil's < 4); measured here: every op but Equalize within 4.3
    per image and 2.1 on average (the bicubic draws, resampled bilinear by DALI's warp_affine, the worst);
    each op's DALI output is closer to PIL's output with the op than to PIL's without it. Equalize is
    OpenCV's in DALI (1-4 levels from PIL's on the same image) and amplifies the inputs' 1-level
    differences in peaked histograms (up to 29 levels per image): not compared here (its own test bounds it on
    identical inputs)."""
    pytest.importorskip("nvidia.dali")
    import ltfast.data.dali as dali_module
    import ltfast.data.pil as pil_module
    from ltfast.data import InstanceSampler, ListDataset, read_list_file
    from ltfast.data.augmentation import RAND_AUGMENT_OPS
    from ltfast.data.dali import IMAGENET_STD, make_image_loader
    from ltfast.data.photos import default_photo_dir, prepare_photo_set
    photos = read_list_file(prepare_photo_set(default_photo_dir(300), count=300))
    subset = ListDataset(photos.root, photos.paths[:6], photos.labels[:6])
    grey_levels = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    def batch(backend, **kwargs):
        kwargs = dict(dataset=subset, sampler=InstanceSampler(subset.labels, seed=5), batch_size=6, train=True,
                      seed=2, **kwargs)
        threads = {"num_threads": 1} if backend == "dali" else {"num_workers": 0}
        (x,), = [(x.clone(),) for x, _ in make_image_loader(backend, **threads, **kwargs)]
        return x

    without = batch("pil")
    for name in RAND_AUGMENT_OPS:
        if name == "Equalize":
            continue
        for bicubic in ((False, True) if name in _GEOMETRIC else (False,)):
            def forced(rng, rows, layers, op=RAND_AUGMENT_OPS.index(name), bicubic=bicubic):
                signs = np.random.default_rng(7).random((rows, layers))
                return {"ra_op": np.full((rows, layers), op), "ra_apply": np.tile([0.0] + [1.0] * (layers - 1), (rows, 1)),
                        "ra_normal": np.full((rows, layers), -2.0), "ra_sign": signs,
                        "ra_bicubic": np.full((rows, layers), float(bicubic))}
            monkeypatch.setattr(pil_module, "draw_rand_augment_randoms", forced)
            monkeypatch.setattr(dali_module, "draw_rand_augment_randoms", forced)
            xd, xp = batch("dali", rand_augment="rand-n2-m10-mstd0.5"), batch("pil", rand_augment="rand-n2-m10-mstd0.5")
            diff = ((xd - xp).abs() * grey_levels).flatten(1).mean(1)
            # Solarize's threshold turns an input 1 level apart into 255 - x: 8.3 levels on the photo
            # whose inputs differ most (3.5 levels before RandAugment), the others within 1.1
            assert diff.max() < (10.0 if name == "Solarize" else 5.0) and diff.mean() < 2.5, (name, bicubic, diff)
            assert diff.mean() < ((xd - without).abs() * grey_levels).flatten(1).mean(1).mean(), (name, bicubic)


def test_dali_rand_augment_inputs_follow_the_draws():
    """The DALI per-sample parameters are the PIL path's operations: identity for skipped layers, PIL's
    rotation matrix about the centre."""
    from PIL import Image
    from ltfast.data.augmentation import RAND_AUGMENT_OPS, _batch_generator, draw_rand_augment_randoms, rand_augment_ops_of
    from ltfast.data.dali import _RA_IDENTITY, rand_augment_inputs
    randoms = draw_rand_augment_randoms(_batch_generator(0, 0, 0, 0), 200, 2)
    params, matrices = rand_augment_inputs(randoms, 200, 2, 10, 0.5, 32)
    assert params.shape == (2, 200, 10) and matrices.shape == (2, 200, 2, 3)
    for row in range(200):
        applied = {k for k in range(2) if randoms["ra_apply"][row, k] <= 0.5}
        for k in set(range(2)) - applied:
            assert np.array_equal(params[k, row], _RA_IDENTITY) and np.array_equal(matrices[k, row], [[1, 0, 0], [0, 1, 0]])
        for k, (name, argument, _) in zip(sorted(applied), rand_augment_ops_of(randoms, row, 10, 0.5)):
            assert RAND_AUGMENT_OPS[randoms["ra_op"][row, k]] == name
            if name == "Rotate":  # PIL's own matrix: a point maps where Image.rotate's transform maps it
                img = Image.new("L", (32, 32))
                captured = {}
                img.transform = lambda size, method, data, *a, **kw: captured.setdefault("m", data)
                Image.Image.rotate(img, argument)
                assert np.allclose(matrices[k, row].ravel(), captured["m"], atol=1e-5)


def test_dali_rand_augment_layer_on_pil_inputs():
    """One DALI RandAugment layer against the PIL path's ``_rand_augment`` on the SAME uint8 inputs (8 photos
    resized to 224 x 224, magnitude ~ N(9, 1), random signs): the point and blend operations (Invert,
    Posterize, Solarize, SolarizeAdd, Color, Contrast, Brightness, Sharpness) are bit-exact; AutoContrast is
    within 1 level (float32 vs PIL's double scale); the geometric ones drawn bilinear within 0.6 levels per
    image on average (measured 0.3-0.56: rounding, and the 1-pixel borders that DALI blends with the fill
    where PIL leaves the fill), drawn bicubic within 2.0 (measured 1.0-1.96: DALI resamples them bilinear).
    Equalize (OpenCV's in DALI) is measured 2.4 levels apart on average, 3.8 on the worst image, and held to
    < 3 / < 5: the one operation not matched (a different algorithm: documented in methods/paco.py and
    docs/training.md)."""
    pytest.importorskip("nvidia.dali")
    from PIL import Image
    from nvidia.dali import Pipeline, fn, types
    from nvidia.dali import math as dmath
    from ltfast.data import InstanceSampler, ListDataset, read_list_file
    from ltfast.data.augmentation import RAND_AUGMENT_OPS, rand_augment_ops_of
    from ltfast.data.dali import DaliImageLoader, rand_augment_inputs
    from ltfast.data.photos import default_photo_dir, prepare_photo_set
    from ltfast.data.pil import _PilDataset
    photos = read_list_file(prepare_photo_set(default_photo_dir(300), count=300))
    batch = 8
    images = []
    for path in photos.paths[:batch]:
        with Image.open(path if os.path.isabs(path) else os.path.join(photos.root, path)) as im:
            images.append(im.convert("RGB").resize((224, 224), Image.BILINEAR))
    subset = ListDataset(photos.root, photos.paths[:batch], photos.labels[:batch])
    loader = DaliImageLoader(subset, InstanceSampler(subset.labels), batch_size=batch, crop_size=224, num_threads=1)
    pipe = Pipeline(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
    with pipe:
        loader._rand_augment_constants(fn, types)
        x = fn.cast(fn.external_source(name="x", dtype=types.UINT8, ndim=3, layout="HWC"), dtype=types.FLOAT)
        pipe.set_outputs(loader._rand_augment_layer(x, 0, fn, types, dmath))
    pipe.build()
    exact = ("Invert", "PosterizeTpu", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness")
    for name in RAND_AUGMENT_OPS:
        for bicubic in ((False, True) if name in _GEOMETRIC else (False,)):
            rng = np.random.default_rng(3)
            randoms = {"ra_op": np.full((batch, 1), RAND_AUGMENT_OPS.index(name)), "ra_apply": np.zeros((batch, 1)),
                       "ra_normal": rng.standard_normal((batch, 1)) - 1.0, "ra_sign": rng.random((batch, 1)),
                       "ra_bicubic": np.full((batch, 1), float(bicubic))}
            params, matrices = rand_augment_inputs(randoms, batch, 1, 10, 0.5, 224)
            pipe.feed_input("x", [np.asarray(im) for im in images])
            pipe.feed_input("ra_params0", params[0])
            pipe.feed_input("ra_matrix0", matrices[0])
            out, = pipe.run()
            pil = [np.asarray(_PilDataset._rand_augment(None, images[k], rand_augment_ops_of(randoms, k, 10, 0.5)))
                   for k in range(batch)]
            assert sum(np.array_equal(p, np.asarray(im)) for p, im in zip(pil, images)) <= 2, name  # the op acts
            diff = np.stack([np.abs(np.asarray(out[k]) - pil[k].astype(np.float32)) for k in range(batch)])
            per_image = diff.reshape(batch, -1).mean(1)
            if name in exact:
                assert diff.max() == 0, name
            elif name == "AutoContrast":
                assert diff.max() <= 1, name
            elif name == "Equalize":  # OpenCV's algorithm, not PIL's: measured 2.4 mean, 3.8 on the worst image
                assert per_image.mean() < 3.0 and per_image.max() < 5.0, (name, per_image)
            else:
                assert per_image.max() < (2.0 if bicubic else 0.6), (name, bicubic, per_image)
