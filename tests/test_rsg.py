"""RSG (ltfast.train.methods.rsg): the module against a plain-PyTorch transcription of the seed's
``RSG-codebase/models/RSG.py`` (CESC loss, MV loss, the generated samples and the labels they get) in
values and gradients, with and without head / tail samples in the batch; the head classes of
``imagenet_lt_train.py``; the generation switched on after ``epoch_thresh``; config checks; the
Fashion-MNIST-LT recipe end to end with ``python -m ltfast.evaluate``; a ResNeXt-50 step of the
ImageNet-LT recipe on tiny list-file data."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltfast.train import load_config, methods, train
from ltfast.train.config import ConfigError
from ltfast.train.evaluation import main as evaluate_main
from ltfast.train.methods.rsg import RareClassSampleGenerator, head_classes

from test_train import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ seed transcription

class SeedRSG(nn.Module):
    """models/RSG.py's RSG, verbatim but for the device (``.cuda()`` dropped) and the module's
    parameters copied in from an ltfast ``RareClassSampleGenerator``."""

    def __init__(self, ours, H):
        super().__init__()
        self.num_classes = ours.num_classes
        self.C, self.H, self.W = ours.channels, H, H
        self.n_center = ours.num_centers
        self.pooling = nn.AvgPool2d(self.H)
        self.linear = nn.Parameter(ours.assignment_weight.detach().clone())
        self.bias = nn.Parameter(ours.assignment_bias.detach().clone())
        self.centers = nn.Parameter(ours.centers.detach().clone())
        self.softmax = nn.Softmax(dim=1)
        self.strength = ours.strength
        self.epoch_thresh = ours.epoch_thresh
        self.contrastive_module_dim = ours.contrastive_dim
        self.vec_transformation_module = nn.Sequential(nn.Conv2d(self.C, self.C, kernel_size=3, stride=1, padding=1))
        self.contrastive_module = nn.Sequential(
            nn.Conv2d(self.C * 2, self.contrastive_module_dim, kernel_size=1, stride=1, padding=0),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.contrastive_module_dim, self.contrastive_module_dim, kernel_size=3, stride=1, padding=1),
            nn.AvgPool2d(self.H))
        self.contrastive_fc = nn.Linear(self.contrastive_module_dim, 2)
        self.to(ours.centers.dtype)
        with torch.no_grad():
            for mine, theirs in ((ours.transformation, self.vec_transformation_module[0]),
                                 (ours.pair_reduce, self.contrastive_module[0]),
                                 (ours.pair_conv, self.contrastive_module[2])):
                theirs.weight.copy_(mine.weight)
                theirs.bias.copy_(mine.bias)
            self.contrastive_fc.weight.copy_(ours.pair_fc_weight)
            self.contrastive_fc.bias.copy_(ours.pair_fc_bias)

    def compute_cesc_loss(self, feature_maps, c, gamma, target, epoch):
        num, C, H, W = feature_maps.size()
        gamma = gamma.unsqueeze(1)
        if epoch <= self.epoch_thresh:
            feature1 = feature_maps[0:num // 2, :, :, :]
            feature2 = feature_maps[num // 2:num, :, :, :]
            target1 = target[0: num // 2]
            target2 = target[num // 2: num]
            feature_cat = torch.cat([feature1, feature2], dim=1)
            target_cat = torch.eq(target1, target2).long()
            pair_fea = self.contrastive_module(feature_cat).contiguous().view(-1, self.contrastive_module_dim)
            pair_pred = self.contrastive_fc(pair_fea)
            loss = torch.sum(torch.bmm(gamma, torch.pow((feature_maps.unsqueeze(1).expand(-1, c.size()[1], -1, -1, -1)
                                                         - c), 2).view(num, self.n_center, -1))) / (num) \
                + F.cross_entropy(pair_pred, target_cat)
        else:
            loss = torch.sum(torch.bmm(gamma, torch.pow((feature_maps.unsqueeze(1).expand(-1, c.size()[1], -1, -1, -1)
                                                         - c), 2).view(num, self.n_center, -1))) / (num)
        return loss

    def to_one_hot_vector(self, num_class, label):
        label = label.cpu().numpy()
        b = np.zeros((label.shape[0], num_class))
        b[np.arange(label.shape[0]), label] = 1
        b = torch.from_numpy(b)
        return b

    def compute_mv_loss(self, origin_feature, origin_center, target_center, target_features, gamma_head, target,
                        gamma_tail):
        c = origin_center.detach()
        num, C, H, W = target_features.size()
        gamma_h = gamma_head.detach()
        gamma_t = gamma_tail.detach()
        ori_f = origin_feature.detach()
        c_ = target_center.detach()
        for p in self.contrastive_module.parameters():
            p.requires_grad = False
        for p in self.contrastive_fc.parameters():
            p.requires_grad = False
        index = gamma_h.argmax(dim=1)
        index_ = gamma_t.argmax(dim=1)
        index = self.to_one_hot_vector(self.n_center, index).unsqueeze(1)
        index_ = self.to_one_hot_vector(self.n_center, index_).unsqueeze(1)
        c_o = torch.bmm(index, c.view(-1, self.n_center, self.H * self.W * self.C).double()).view(ori_f.size())
        c_t = torch.bmm(index_, c_.view(-1, self.n_center, self.H * self.W * self.C).double()).view(ori_f.size())
        var_map = (ori_f - c_o.float())
        var_map_t = self.vec_transformation_module(var_map)
        target_features_vector = target_features - c_t.float()
        target_features_f = target_features + var_map_t
        target_features_norm = F.normalize(target_features_vector.view(-1, self.C), dim=1)
        var_map_norm = F.normalize(var_map_t.view(-1, self.C), dim=1)
        paired = torch.cat([ori_f, var_map_t], dim=1)
        pair_fea = self.contrastive_module(paired).contiguous().view(-1, self.contrastive_module_dim)
        pair_pred = self.contrastive_fc(pair_fea)
        loss = F.cross_entropy(pair_pred, torch.zeros(num).long()) + \
            (torch.sum(torch.abs(torch.norm(var_map_t.view(-1, self.C), dim=1) - torch.norm(var_map.view(-1, self.C),
                                                                                            dim=1)))
             + torch.sum(torch.abs(target_features_norm * var_map_norm - torch.ones(target_features_norm.size())))) / (num)
        return loss, target_features_f

    def _select(self, maps, target_select, size):
        linear = self.linear[target_select, :, :].view(-1, self.C, self.n_center)
        bias = self.bias[target_select, :].view(-1, self.n_center)
        fc = torch.bmm(self.pooling(maps).view(-1, self.C).unsqueeze(1), linear).view(-1, self.n_center) + bias
        center = self.centers[target_select, :, :].view(-1, self.n_center, size[1]).unsqueeze(3).unsqueeze(4).repeat(
            1, 1, 1, size[2], size[3])
        return self.softmax(fc), center

    def forward(self, feature_maps, head_class_lists, target, epoch):
        maps_detach = feature_maps.detach()
        total = target.size()[0]
        num_head_list = len(head_class_lists)
        head_class_lists_tensor = torch.Tensor(head_class_lists)
        head_class_lists_tensor = head_class_lists_tensor.unsqueeze(0).repeat(total, 1)
        target_expand = target.unsqueeze(1).repeat(1, num_head_list)
        index_head = torch.sum((target_expand == head_class_lists_tensor).long(), dim=1)
        index_tail = 1 - index_head
        index_head_ = torch.eq(index_head, 1)
        index_tail_ = torch.eq(index_tail, 1)
        gamma, centers_ = self._select(maps_detach, target.unsqueeze(1), maps_detach.size())
        loss_cesc = self.compute_cesc_loss(maps_detach, centers_, gamma, target, epoch)
        loss_mv_total = torch.zeros(loss_cesc.size(), dtype=loss_cesc.dtype)
        maps_tail = maps_detach[index_tail_, :, :, :]
        maps_head = maps_detach[index_head_, :, :, :]
        target_tail = target[index_tail_]
        target_head = target[index_head_]
        segment = 1
        num_tail = maps_tail.size()[0]
        num_head = maps_head.size()[0]
        if num_tail != 0 and num_head != 0 and epoch > self.epoch_thresh:
            if num_head >= num_tail:
                segment = int(num_head * self.strength / num_tail)
                if segment == 0:
                    segment = 1
                for j in range(0, segment):
                    latent_2 = maps_tail
                    feature_origin = maps_head[j * num_tail: (j + 1) * num_tail, :, :, :]
                    gamma_head, center_origin = self._select(
                        feature_origin, target_head[j * num_tail: (j + 1) * num_tail].unsqueeze(1), maps_detach.size())
                    gamma_tail, target_center = self._select(latent_2, target_tail.unsqueeze(1), maps_detach.size())
                    loss_mv, feature_f = self.compute_mv_loss(feature_origin, center_origin, target_center, latent_2,
                                                              gamma_head, target_tail, gamma_tail)
                    loss_mv_total += loss_mv
                    feature_maps = torch.cat((feature_maps, feature_f), dim=0)
                    target = torch.cat((target, target_tail), dim=0)
            else:
                segment = int(num_tail * self.strength / num_head)
                if segment == 0:
                    segment = 1
                for j in range(0, segment):
                    latent_2 = maps_tail[j * num_head: (j + 1) * num_head, :, :, :]
                    feature_origin = maps_head
                    gamma_head, center_origin = self._select(feature_origin, target_head.unsqueeze(1),
                                                             maps_detach.size())
                    tail_select = target_tail[j * num_head: (j + 1) * num_head].unsqueeze(1)
                    gamma_tail, target_center = self._select(latent_2, tail_select, maps_detach.size())
                    loss_mv, feature_f = self.compute_mv_loss(feature_origin, center_origin, target_center, latent_2,
                                                              gamma_head, target_tail, gamma_tail)
                    feature_maps = torch.cat((feature_maps, feature_f), dim=0)
                    loss_mv_total += loss_mv
                    target = torch.cat((target, target_tail[j * num_head: (j + 1) * num_head]), dim=0)
        return feature_maps, loss_cesc, loss_mv_total / segment, target


# ------------------------------------------------------------------------------ helpers

CLASSES, CHANNELS, SIZE = 6, 4, 3
HEADS = [0, 2]  # head classes of the comparisons


def _modules(seed=0, strength=1.0, thresh=2, centers=3, dim=5):
    torch.manual_seed(seed)
    ours = RareClassSampleGenerator(CHANNELS, CLASSES, centers, dim, strength, thresh).double()
    with torch.no_grad():  # centres away from 0 (values float32 can hold: the seed casts them to float)
        ours.centers.copy_(torch.randn(ours.centers.shape).float().double())
        ours.transformation.bias.normal_()
        ours.pair_reduce.bias.normal_()
        ours.pair_fc_bias.normal_()
    mask = torch.zeros(CLASSES, dtype=torch.bool)
    mask[HEADS] = True
    ours.set_head_classes(mask)
    return ours, SeedRSG(ours, SIZE)


def _batch(labels, seed=1):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(len(labels), CHANNELS, SIZE, SIZE, generator=g, dtype=torch.float64)
    return maps, torch.tensor(labels)


def _grads(module, names):
    params = dict(module.named_parameters())
    return [params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]) for n in names]


OURS_NAMES = ["assignment_weight", "assignment_bias", "centers", "transformation.weight", "transformation.bias",
              "pair_reduce.weight", "pair_reduce.bias", "pair_conv.weight", "pair_conv.bias", "pair_fc_weight",
              "pair_fc_bias"]
SEED_NAMES = ["linear", "bias", "centers", "vec_transformation_module.0.weight", "vec_transformation_module.0.bias",
              "contrastive_module.0.weight", "contrastive_module.0.bias", "contrastive_module.2.weight",
              "contrastive_module.2.bias", "contrastive_fc.weight", "contrastive_fc.bias"]

CASES = [  # (labels, epoch): head = classes 0 and 2
    ([0, 1, 2, 3, 0, 5, 2, 4], 1),              # contrastive term, no generation
    ([0, 1, 2, 3, 0, 5, 2, 4], 2),              # epoch == thresh: still no generation
    ([0, 2, 0, 0, 1, 2, 0, 3, 2, 0], 3),        # 7 heads, 3 tails: 2 segments of 3 heads
    ([1, 3, 0, 4, 5, 1, 3, 2, 4, 5], 4),        # 2 heads, 8 tails: 4 segments of 2 tails
    ([0, 1, 3, 4, 5, 1], 3),                    # 1 head, 5 tails: 5 segments
    ([1, 3, 4, 5, 1, 4], 3),                    # no head sample: no generation
    ([0, 2, 0, 2, 2, 0], 3),                    # no tail sample: no generation
    ([0, 2, 0, 2, 2, 0], 0),
    ([1, 3, 4, 5], 0),
]


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("labels, epoch", CASES)
def test_module_matches_the_seed(labels, epoch, strength):
    ours, seed = _modules(strength=strength)
    maps, target = _batch(labels)
    ours_in, seed_in = maps.clone().requires_grad_(True), maps.clone().requires_grad_(True)
    out = ours(ours_in, target, epoch)
    features, cesc, mv, combined = seed(seed_in, HEADS, target, epoch)
    assert torch.equal(out.labels, combined)
    torch.testing.assert_close(out.features, features, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.cesc_loss, cesc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.mv_loss, mv.to(out.mv_loss.dtype), rtol=1e-10, atol=1e-10)
    generates = epoch > 2 and any(x in HEADS for x in labels) and any(x not in HEADS for x in labels)
    assert (len(combined) > len(labels)) == generates
    assert (out.mv_loss != 0) == generates
    # gradients of the losses and of a functional of the returned maps (the generated samples included)
    g = torch.Generator().manual_seed(5)
    probe = torch.randn(out.features.shape, generator=g, dtype=torch.float64)
    (0.7 * out.cesc_loss + 0.3 * out.mv_loss + (probe * out.features).sum()).backward()
    (0.7 * cesc + 0.3 * mv + (probe * features).sum()).backward()
    torch.testing.assert_close(ours_in.grad, seed_in.grad, rtol=1e-10, atol=1e-10)
    assert torch.equal(ours_in.grad, probe[:len(labels)])  # the losses do not reach the backbone's maps
    for name, a, b in zip(OURS_NAMES, _grads(ours, OURS_NAMES), _grads(seed, SEED_NAMES)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    if generates:
        assert ours.transformation.weight.grad.abs().sum() > 0
        assert ours.pair_reduce.weight.grad is None or not ours.pair_reduce.weight.grad.any()  # frozen in MV


def test_odd_batch_pairs_the_first_halves():
    ours, seed = _modules()
    maps, target = _batch([0, 1, 2, 3, 0, 5, 2])
    loss = ours(maps, target, 1).cesc_loss
    # the seed's terms: centres over all 7 samples (its post-threshold branch), pairs over the first 6
    centre = seed(maps, HEADS, target, 5)[1]
    pairs = seed(maps[:6], HEADS, target[:6], 1)[1] - seed(maps[:6], HEADS, target[:6], 5)[1]
    torch.testing.assert_close(loss, centre + pairs, rtol=1e-10, atol=1e-10)
    single = ours(maps[:1], target[:1], 1)
    torch.testing.assert_close(single.cesc_loss, ours.center_loss(maps[:1], target[:1]))


def test_float32_under_autocast_and_bad_input():
    ours, _ = _modules()
    ours = ours.float()
    maps, target = _batch([0, 1, 2, 3, 0, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(maps.bfloat16(), target, 3)
    assert out.features.dtype == torch.bfloat16 and out.cesc_loss.dtype == torch.float32
    reference = ours(maps.bfloat16().float(), target, 3)
    torch.testing.assert_close(out.cesc_loss, reference.cesc_loss)
    torch.testing.assert_close(out.mv_loss, reference.mv_loss)
    with pytest.raises(ValueError, match="feature maps"):
        ours(maps[:, :2].float(), target, 0)
    with pytest.raises(ValueError, match="labels"):
        ours(maps.float(), target[:3], 0)
    with pytest.raises(ValueError, match="rsg_transfer_strength"):
        RareClassSampleGenerator(4, 3, transfer_strength=1.5)


def test_head_classes_are_the_seed_list():
    counts = [5, 40, 40, 7, 100, 3, 40, 9, 1, 12]
    seed_counts, heads = list(counts), []
    for _ in range(int(10 * 0.3)):  # imagenet_lt_train.py, verbatim
        heads.append(seed_counts.index(max(seed_counts)))
        seed_counts[seed_counts.index(max(seed_counts))] = 0
    assert head_classes(counts, 0.3).nonzero().flatten().tolist() == sorted(heads) == [1, 2, 4]
    assert head_classes(list(range(1000, 0, -1)), 0.2).sum() == 200
    with pytest.raises(ValueError, match="rsg_head_ratio"):
        head_classes(counts, 1.0)


def test_generation_switches_on_after_epoch_thresh_in_the_model():
    from ltfast.train.methods.rsg import attach_generator
    from ltfast.train.models import build_model
    cfg = load_config(None, TINY + ["model.rsg=true", "model.rsg_epoch_thresh=1"])
    model = build_model("small_resnet", 7, 1, 8)
    generator = attach_generator(model, 7, cfg["model"])
    generator.set_head_classes(head_classes([50, 40, 30, 20, 10, 5, 2], 0.3))
    images, labels = torch.randn(8, 1, 12, 12), torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    model.train()
    sizes = []
    for epoch in range(3):
        generator.arm(labels, epoch)
        logits = model(images)
        result = generator.take_result()
        assert logits.shape == (len(result.labels), 7)
        sizes.append(len(result.labels))
    assert sizes[:2] == [8, 8] and sizes[2] > 8           # epoch > 1 only
    model.eval()
    assert model(images).shape == (8, 7)                  # evaluation: no module
    with pytest.raises(RuntimeError, match="armed"):
        generator.take_result()


def test_config_checks():
    assert "rsg" in methods.available()
    base = TINY + ["model.rsg=true"]
    assert load_config(None, base)["model"]["rsg_centers"] == 15
    for key in ("model.rsg_centers=3", "model.rsg_mv_weight=0.5", "data.rsg_resample_epoch=1"):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            load_config(None, TINY + [key])                # an RSG key without model.rsg
    for overrides, key in [(["model.rsg_head_ratio=1.0"], "model.rsg_head_ratio"),
                           (["model.rsg_transfer_strength=2"], "model.rsg_transfer_strength"),
                           (["data.rsg_resample_epoch=3"], "data.rsg_resample_epoch"),
                           (["model.arch=small_expert_resnet"], "model.arch"),
                           (["data.mixup_alpha=0.2"], "data.mixup_alpha"),
                           (["model.bbn=true"], "model.bbn"),
                           (["model.rsg_centers=0"], "model.rsg_centers")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, base + overrides)


def test_rsg_configs():
    imagenet = load_config(os.path.join(ROOT, "configs", "imagenet_lt", "rsg.yaml"))
    model, loss, optim, data = imagenet["model"], imagenet["loss"], imagenet["optim"], imagenet["data"]
    assert (model["arch"], model["classifier"], model["rsg"], model["rsg_centers"], model["rsg_contrastive_dim"],
            model["rsg_head_ratio"], model["rsg_transfer_strength"], model["rsg_epoch_thresh"]) == \
        ("resnext50_32x4d", "cosine", True, 15, 256, 0.2, 1.0, 160)
    assert (model["rsg_cesc_weight"], model["rsg_mv_weight"]) == (0.1, 0.01)
    assert (data["rsg_resample_epoch"], data["rsg_resample_beta"], data["batch_size"]) == (160, 0.9999, 256)
    assert (loss["name"], loss["max_margin"], loss["s"], loss["ldam_scale_logits"], loss["drw_epoch"]) == \
        ("ldam_drw", 0.3, 30.0, True, None)
    assert (optim["lr"], optim["epochs"], optim["schedule"], optim["milestones"], optim["gamma"],
            optim["warmup_epochs"], optim["weight_decay"], optim["momentum"]) == \
        (0.1, 200, "multistep", [120, 160, 180], 0.1, 5, 5e-4, 0.9)
    assert imagenet["eval"]["reported"]["e90"]["top1"] == 49.6 and imagenet["eval"]["reported"]["e200"]["top1"] == 52.9
    fmnist = load_config(os.path.join(ROOT, "configs", "fmnist_lt", "rsg.yaml"))
    assert fmnist["model"]["rsg"] and fmnist["model"]["rsg_epoch_thresh"] == fmnist["data"]["rsg_resample_epoch"] == 24


# ------------------------------------------------------------------------------ end to end

def test_fmnist_recipe_trains_and_evaluates(tmp_path):
    """configs/fmnist_lt/rsg.yaml on TINY's synthetic 7-class data, 2 epochs, generation and the
    resampled loader from the second epoch (0-based 1)."""
    out = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "configs", "fmnist_lt", "rsg.yaml"), TINY + [
        "optim.epochs=2", "optim.milestones=[1]", "model.rsg_epoch_thresh=0", "data.rsg_resample_epoch=1",
        "train.plot=false", f"train.out_dir={out}"])
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["test"]["samples"] == 7 * 15
    assert all(np.isfinite(record["loss"]) for record in summary["history"])
    state = torch.load(out / "best.pt", weights_only=True)["model"]
    assert state["rsg.centers"].shape == (7, 15, 16) and state["rsg.head_mask"].sum() == 1  # int(7 x 0.2)
    assert state["rsg.centers"].abs().sum() > 0                                           # the centres trained
    assert evaluate_main([str(out), "--out", str(tmp_path / "eval"), "--no-plot"]) == 0
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["results"]["plain"]["correct"] == summary["test"]["correct"]


def test_resnext50_imagenet_recipe_runs(jpeg_lists, tmp_path):
    """One ResNeXt-50 epoch of configs/imagenet_lt/rsg.yaml with the generation and the resampled
    loader on (epoch_thresh -1 is not allowed: the 0-based epoch 0 generates only after it, so 2 epochs)."""
    root, lists = jpeg_lists
    out = tmp_path / "rsg"
    cfg = load_config(os.path.join(ROOT, "configs", "imagenet_lt", "rsg.yaml"), [
        f"data.root={root}", f"data.train_list={lists['train']}", f"data.val_list={lists['val']}",
        f"data.test_list={lists['test']}", "data.num_threads=1", "data.batch_size=8", "data.eval_batch_size=8",
        "data.crop_size=16", "data.resize_size=18", "optim.epochs=2", "optim.milestones=[1]",
        "optim.reference_batch=null", "model.rsg_epoch_thresh=0", "data.rsg_resample_epoch=1",
        "model.rsg_head_ratio=0.4", "train.progress=false", "train.plot=false", f"train.out_dir={out}",
        "train.device=cpu", "optim.warmup_epochs=0"])
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["test"]["samples"] == 6
    model = torch.load(out / "best.pt", weights_only=True)["model"]
    assert model["rsg.centers"].shape == (3, 15, 1024) and model["rsg.transformation.weight"].shape == (1024, 1024, 3, 3)
    assert model["rsg.head_mask"].tolist() == [True, False, False]


@pytest.mark.parametrize("arch, channels, size, stage_channels", [("resnet32", 3, 32, 32), ("small_resnet", 1, 28, 16)])
def test_module_on_the_architectures(arch, channels, size, stage_channels):
    from ltfast.train.methods.rsg import attach_generator, generator_stage
    from ltfast.train.models import build_model
    cfg = load_config(None, TINY + ["model.rsg=true", "model.rsg_epoch_thresh=0"])
    model = build_model(arch, 5, channels, 8)
    assert generator_stage(model) == ("layer2", stage_channels)
    generator = attach_generator(model, 5, cfg["model"])
    generator.set_head_classes(torch.tensor([True, False, False, False, False]))
    images, labels = torch.randn(6, channels, size, size), torch.tensor([0, 0, 0, 1, 2, 3])
    generator.arm(labels, 1)
    logits = model(images)
    result = generator.take_result()
    assert result.features.shape[2:] == (size // 2, size // 2) and logits.shape == (len(result.labels), 5)
    assert result.labels.tolist() == [0, 0, 0, 1, 2, 3, 1, 2, 3]
    (logits.sum() + result.cesc_loss + result.mv_loss).backward()
    assert generator.transformation.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_train_with_the_module_idle_and_generating(tmp_path):
    """Under DDP (no find_unused_parameters) the transformation conv is idle in epoch 0 and the
    contrastive module in epoch 1: every module parameter still has a gradient to reduce."""
    import torch.multiprocessing as mp

    from ddp_support import free_port
    from test_train import _ddp_worker
    overrides = TINY + [f"train.out_dir={tmp_path}", "model.rsg=true", "model.rsg_epoch_thresh=0",
                        "data.rsg_resample_epoch=1", "optim.epochs=2", "train.plot=false"]
    mp.spawn(_ddp_worker, args=(2, free_port(), overrides), nprocs=2, join=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    assert all(np.isfinite(record["loss"]) for record in summary["history"])


def test_resume_is_exact(tmp_path):
    """Stopped after the first epoch and resumed: the generation (after epoch 0) and the resampled
    loader (from epoch 1) pick up where an uninterrupted run is."""
    extra = TINY + ["model.rsg=true", "model.rsg_epoch_thresh=0", "data.rsg_resample_epoch=1", "optim.epochs=3",
                    "train.plot=false"]
    train(load_config(None, extra + [f"train.out_dir={tmp_path / 'full'}"]))
    cut = extra + [f"train.out_dir={tmp_path / 'cut'}"]
    assert train(load_config(None, cut + ["train.stop_after=1"]))["status"] == "stopped"
    train(load_config(None, cut + ["train.resume=true"]))
    full, resumed = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("full", "cut"))
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert full["state"]["history"][-1]["loss"] == resumed["state"]["history"][-1]["loss"]


def test_train_step_adds_the_weighted_losses():
    from ltfast.train.methods.rsg import RSG
    from ltfast.train.models import build_model
    cfg = load_config(None, TINY + ["model.rsg=true", "model.rsg_epoch_thresh=0", "model.rsg_cesc_weight=0.25",
                                    "model.rsg_mv_weight=0.5"])
    method = RSG(cfg)
    torch.manual_seed(0)
    model = build_model("small_resnet", 7, 1, 8)
    method.build_head(model, 7)
    method.generator.set_head_classes(head_classes([50, 40, 30, 20, 10, 5, 2], 0.3))
    method.on_epoch_start(model, "fc", 1)
    model.train()
    images, labels = torch.randn(8, 1, 12, 12), torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = method.train_step(model, images, labels, {}, nn.CrossEntropyLoss())
    model.load_state_dict(state)  # the same BN statistics for the second forward
    method.generator.arm(labels, 1)
    logits = model(images)
    result = method.generator.take_result()
    expected = F.cross_entropy(logits, result.labels) + 0.25 * result.cesc_loss + 0.5 * result.mv_loss
    assert len(result.labels) > 8 and result.mv_loss > 0
    torch.testing.assert_close(loss, expected)


def test_effective_number_sampler_is_the_seeds_law():
    from ltfast.train.methods.rsg import EffectiveNumberSampler
    labels = torch.tensor([0] * 50 + [1] * 9 + [2] * 3 + [3] * 1)
    sampler = EffectiveNumberSampler(labels, beta=0.99, seed=3)
    # ImbalancedDatasetSampler: image weight (1 - beta) / (1 - beta^n_c); a class's mass is n_c times it
    counts = np.array([50, 9, 3, 1], dtype=np.float64)
    mass = counts * (1 - 0.99) / (1 - np.power(0.99, counts))
    np.testing.assert_allclose(sampler.class_probabilities().numpy(), mass / mass.sum(), rtol=1e-12)
    sampler.set_epoch(0)
    drawn = labels[torch.as_tensor(list(sampler))]
    assert len(drawn) == len(labels) and set(drawn.tolist()) <= {0, 1, 2, 3}
