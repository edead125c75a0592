"""Multi-expert models (ltfast.train.models.experts), the SADE / RIDE losses (ltfast.nn, checked
here against hand-written formulas), and the trainer, ltfast.evaluate and DDP with them."""
import json
import math
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ltfast.nn import DiverseExpertLoss, RIDELoss
from ltfast.priors import inverse_prior
from ltfast.train import load_config, train
from ltfast.train.config import ConfigError
from ltfast.train.models.experts import (ExpertOutput, ExpertResNeXt, SmallExpertResNet, build_expert_model,
                                  count_expert_correct, loss_input)
from ltfast.train.models import CosineLinear, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["data.dataset=synthetic", "data.num_classes=7", "data.n_max=128", "data.ratio=10", "data.image_size=12",
        "data.channels=1", "data.val_per_class=4", "data.test_per_class=15", "data.batch_size=32",
        "data.eval_batch_size=16", "data.pad=1", "data.mean=[0.5]", "data.std=[0.25]", "model.width=8",
        "optim.epochs=2", "optim.lr=0.05", "optim.warmup_epochs=0", "train.progress=false", "train.plot=false",
        "model.arch=small_expert_resnet", "model.classifier=cosine"]


# ------------------------------------------------------------------------------------------ models

@pytest.mark.parametrize("num_experts", [1, 2, 3, 4])
def test_small_expert_model_outputs(num_experts):
    torch.manual_seed(0)
    model = build_expert_model("small_expert_resnet", 5, in_channels=1, width=8, num_experts=num_experts)
    out = model(torch.randn(6, 1, 12, 12))
    assert isinstance(out, ExpertOutput)
    assert out.expert_logits.shape == (6, num_experts, 5) and out.logits.shape == (6, 5)
    assert out.features.shape == (6, num_experts, 24)                 # 3w with reduce_dimension (w = 8)
    assert torch.allclose(out.logits, out.expert_logits.mean(1))
    # cosine x 30: every logit in [-30, 30], one weight-normalised classifier per expert
    assert out.expert_logits.abs().max() <= 30 + 1e-4
    assert len(model.linears) == num_experts and all(isinstance(h, CosineLinear) for h in model.linears)
    for head in model.linears:
        assert torch.allclose(F.normalize(head.weight, dim=1).norm(dim=1), torch.ones(5))
    if num_experts > 1:  # the experts differ (own layer3 and classifier)
        assert not torch.allclose(out.expert_logits[:, 0], out.expert_logits[:, 1])


def test_small_expert_model_linear_heads_and_full_width():
    model = SmallExpertResNet(4, in_channels=3, width=8, num_experts=2, reduce_dimension=False, cosine=False)
    out = model(torch.randn(2, 3, 16, 16))
    assert model.scale == 1.0 and isinstance(model.linears[0], torch.nn.Linear)
    assert out.features.shape == (2, 2, 32)


def test_expert_resnext50_matches_the_survey_layout():
    torch.manual_seed(0)
    model = build_expert_model("expert_resnext50_32x4d", 10, num_experts=2)
    assert isinstance(model, ExpertResNeXt) and model.feature_dim == 1536 and model.scale == 30.0
    # shared stem / layer1 / layer2 (torchvision's ResNeXt widths), per-expert layer3 (192 planes,
    # 32 groups x 4 x 192/64 = 384 wide, 768 out) and layer4 (384 planes, 768 wide, 1536 out)
    assert model.layer2[0].conv3.out_channels == 512
    assert len(model.layer3s) == len(model.layer4s) == len(model.linears) == 2
    assert [len(model.layer3s[0]), len(model.layer4s[0])] == [6, 3]
    assert model.layer3s[0][0].conv2.out_channels == 384 and model.layer3s[0][0].conv2.groups == 32
    assert model.layer3s[0][-1].conv3.out_channels == 768
    assert model.layer4s[0][0].conv2.out_channels == 768 and model.layer4s[0][-1].conv3.out_channels == 1536
    assert model.layer3s[0][0].conv1.weight.data_ptr() != model.layer3s[1][0].conv1.weight.data_ptr()
    # upstream's init: conv ~ N(0, 2 / (k*k*out)), BN 1 / 0; no zero-initialised last BN
    conv = model.layer4s[1][0].conv2
    expected = math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.equal(model.layer3s[0][0].bn3.weight, torch.ones(768))
    out = model(torch.randn(2, 3, 32, 32))                              # adaptive pooling: small images work
    assert out.expert_logits.shape == (2, 2, 10) and out.features.shape == (2, 2, 1536)
    full = build_expert_model("expert_resnext50_32x4d", 10, num_experts=1, reduce_dimension=False)
    assert full.feature_dim == 2048 and full.layer4s[0][-1].conv3.out_channels == 2048


def test_build_model_and_bad_arguments():
    assert isinstance(build_model("small_expert_resnet", 3, 1, 8), SmallExpertResNet)
    with pytest.raises(ValueError, match="num_experts"):
        build_expert_model("small_expert_resnet", 3, num_experts=0)
    with pytest.raises(ValueError, match="multi-expert"):
        build_expert_model("resnet18", 3)


def test_expert_correct_counts():
    logits = torch.tensor([[[2., 0.], [0., 1.]], [[0., 3.], [0., 1.]], [[1., 0.], [1., 0.]]])  # [3, 2, 2]
    target = torch.tensor([0, 1, 1])
    counts = count_expert_correct(logits, target, 2)
    assert counts.tolist() == [[1, 1], [0, 1]]  # expert 1: samples 0 and 1 right; expert 2: sample 1 only


# ------------------------------------------------------------------------------------------ losses

COUNTS = [40, 20, 20, 10, 5]


def test_inverse_prior_reverses_the_frequency_rank():
    prior = torch.tensor([0.4, 0.1, 0.3, 0.2])
    assert inverse_prior(prior).tolist() == pytest.approx([0.1, 0.4, 0.2, 0.3])
    # ties keep class order (stable): [5, 3, 3, 1] -> ranks 0, 1, 2, 3 -> values 1, 3, 3, 5
    assert inverse_prior(torch.tensor([5., 3., 3., 1.])).tolist() == [1., 3., 3., 5.]


def test_sade_loss_is_the_three_expert_sum():
    torch.manual_seed(0)
    z = torch.randn(8, 3, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    loss = DiverseExpertLoss(COUNTS, tau=2.0)(z, target)
    prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    # ascending (stable) ranks: class 4, 3, 1, 2, 0 -> the values 5, 10, 20, 20, 40 handed out in reverse
    inverse = torch.tensor([5, 20, 10, 20, 40], dtype=torch.float64) / sum(COUNTS)
    log_p, log_inv = torch.log(prior + 1e-9).float(), torch.log(inverse + 1e-9).float()
    expected = (F.cross_entropy(z[:, 0], target) + F.cross_entropy(z[:, 1] + log_p, target)
                + F.cross_entropy(z[:, 2] + log_p - 2.0 * log_inv, target))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert (z.grad.abs().sum(dim=(0, 2)) > 0).all()          # every expert gets a gradient
    assert DiverseExpertLoss.takes_expert_logits


def _ride_by_hand(z, target, counts, epoch, drw_epoch):
    counts_t = torch.tensor(counts, dtype=torch.float64)
    m = counts_t ** -0.25
    m = (m * 0.5 / m.max()).float()
    weights = temperature = None
    if drw_epoch is not None and epoch >= drw_epoch:
        effective = (1 - 0.9999) / (1 - 0.9999 ** counts_t)
        weights = (effective / effective.sum() * len(counts)).float()
        t = len(counts) * counts_t / counts_t.sum() * 0.02 + 0.98
        temperature = (t / t.max()).float()
    mean = z.mean(1)
    T = temperature.view(1, -1) if temperature is not None else 1.0
    t_mean = temperature.mean().item() if temperature is not None else 1.0
    total = 0.0
    for k in range(z.shape[1]):
        x = z[:, k].clone()
        x[torch.arange(len(target)), target] -= 30.0 * m[target]
        total = total + F.cross_entropy(x, target, weight=weights)
        p_mean = F.softmax(mean / T, 1)
        kl = (p_mean * (torch.log(p_mean) - F.log_softmax(z[:, k] / T, 1))).sum() / len(target)
        total = total - 0.2 * t_mean ** 2 * kl
    return total


@pytest.mark.parametrize("epoch", [0, 3])
def test_ride_loss_before_and_after_drw(epoch):
    torch.manual_seed(1)
    z = 10 * torch.randn(16, 3, 5)
    target = torch.randint(0, 5, (16,))
    loss = RIDELoss(COUNTS, drw_epoch=2)
    loss.set_epoch(epoch)
    assert loss.reweighting == (epoch >= 2)
    assert loss(z, target).item() == pytest.approx(_ride_by_hand(z, target, COUNTS, epoch, 2).item(), rel=1e-5)
    state = loss.state_dict()
    fresh = RIDELoss(COUNTS, drw_epoch=2)
    fresh.load_state_dict(state)
    assert fresh.epoch == epoch                                  # resume restores the DRW phase


def test_expert_loss_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"expert_logits must be a 3-D tensor \[N, E, C\]"):
        RIDELoss(COUNTS)(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="must hold E = 3 experts"):
        DiverseExpertLoss(COUNTS)(torch.randn(4, 2, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must have C = 6 classes \(from class_counts\)"):
        DiverseExpertLoss([1, 2, 3, 4, 5, 6])(torch.randn(4, 3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="class_counts"):
        RIDELoss([3, 0, 1])
    with pytest.raises(ValueError, match="reweight_factor"):
        RIDELoss([1000, 1], reweight_factor=-5.0)


def test_loss_input_routes_expert_logits():
    out = ExpertOutput(torch.zeros(2, 3), torch.ones(2, 3, 3), torch.zeros(2, 3, 4))
    assert loss_input(out, DiverseExpertLoss([1, 2, 3])) is out.expert_logits
    assert loss_input(out, torch.nn.CrossEntropyLoss()) is out.logits
    plain = torch.zeros(2, 3)
    assert loss_input(plain, torch.nn.CrossEntropyLoss()) is plain
    with pytest.raises(ValueError, match="multi-expert model.arch"):
        loss_input(plain, RIDELoss([1, 2, 3]))


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("overrides, key", [
    (["model.arch=small_resnet", "loss.name=sade"], "loss.name"),
    (["loss.name=sade", "model.num_experts=2"], "model.num_experts"),
    (["loss.name=ride", "model.num_experts=0"], "model.num_experts"),
    (["loss.name=ride", "loss.reweight_factor=1.5"], "loss.reweight_factor"),
    (["model.init_from=x.pt", "model.freeze_backbone=true"], "model.freeze_backbone"),
])
def test_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, TINY + overrides)


# ----------------------------------------------------------------------------------------- trainer

@pytest.fixture(scope="module")
def sade_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "sade"
    summary = train(load_config(None, TINY + [f"train.out_dir={out}", "loss.name=sade"]))
    return out, summary


def test_trainer_reports_aggregate_and_each_expert(sade_run):
    out, summary = sade_run
    test = summary["test"]
    assert len(test["experts"]) == 3 and test["samples"] == 7 * 15
    for expert in test["experts"]:
        assert sum(expert["correct"]) <= 7 * 15 and set(expert) >= {"top1", "many", "medium", "few", "per_class"}
    record = json.loads((out / "summary.json").read_text())["history"][-1]
    assert {f"val_expert{k}_top1" for k in (1, 2, 3)} <= set(record)
    lines = (out / "history.jsonl").read_text().splitlines()
    assert "val_expert3_few" in json.loads(lines[-1])

    # the test counts are those of the mean logits of best.pt, each expert's those of its own logits
    from ltfast.train.checkpoint import load_model_weights
    from ltfast.train.data import build_data
    from ltfast.train.engine import evaluate_with_experts
    cfg = load_config(None, TINY + [f"train.out_dir={out}", "loss.name=sade"])
    data = build_data(cfg, 0, 1, torch.device("cpu"))
    model = build_model("small_expert_resnet", 7, 1, 8)
    load_model_weights(model, str(out / "best.pt"))
    correct, total, experts = evaluate_with_experts(model, data["test_loader"], 7, torch.device("cpu"))
    assert correct.tolist() == test["correct"] and total.tolist() == test["total"]
    assert [e.tolist() for e in experts] == [e["correct"] for e in test["experts"]]


def test_evaluate_cli_on_an_expert_run(sade_run, tmp_path):
    from ltfast.train.evaluation import main
    out, summary = sade_run
    assert main([str(out), "--out", str(tmp_path), "--no-plot", "--logit-adjust", "1"]) == 0
    result = json.loads((tmp_path / "evaluation.json").read_text())["results"]
    assert result["plain"]["correct"] == summary["test"]["correct"]
    assert [r["correct"] for r in result["experts"]] == [e["correct"] for e in summary["test"]["experts"]]
    assert "posthoc" in result
    assert main([str(out), "--out", str(tmp_path), "--no-plot", "--tau-norm", "1"]) == 2


def test_ride_resume_is_exact(tmp_path):
    # RIDE switches weights and temperatures at drw_epoch: the loss's epoch and the schedule resume.
    extra = ["loss.name=ride", "loss.drw_epoch=1", "optim.epochs=2", "data.n_max=64"]
    train(load_config(None, TINY + extra + [f"train.out_dir={tmp_path / 'full'}"]))
    train(load_config(None, TINY + extra + [f"train.out_dir={tmp_path / 'cut'}", "train.stop_after=1"]))
    train(load_config(None, TINY + extra + [f"train.out_dir={tmp_path / 'cut'}", "train.resume=true"]))
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    assert cut["criterion"]["_extra_state"]["epoch"] == 1


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_expert_model_counts_equal_single_process(tmp_path):
    # DDP with a NamedTuple output; the per-expert counts are all-reduced like the aggregate ones.
    overrides = TINY + [f"train.out_dir={tmp_path}", "loss.name=ride", "optim.epochs=1", "train.seed=3"]
    from ddp_support import free_port
    from test_train import _ddp_worker
    mp.spawn(_ddp_worker, args=(2, free_port(), overrides), nprocs=2, join=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test"]["samples"] == 105
    from ltfast.train.checkpoint import load_model_weights
    from ltfast.train.data import build_data
    from ltfast.train.engine import evaluate_with_experts
    data = build_data(load_config(None, overrides), 0, 1, torch.device("cpu"))
    model = build_model("small_expert_resnet", 7, 1, 8)
    load_model_weights(model, str(tmp_path / "best.pt"))
    correct, _, experts = evaluate_with_experts(model, data["test_loader"], 7, torch.device("cpu"))
    assert correct.tolist() == summary["test"]["correct"]
    assert [e.tolist() for e in experts] == [e["correct"] for e in summary["test"]["experts"]]


# -------------------------------------------------------------------------- ImageNet-LT recipes

# seed-methods.md §5: (Acc, UA, RA, head, middle, tail) at 90 and 200 epochs
REPORTED = {"ride": ("RIDE", (55.5, 60.2, 92.2, 66.9, 52.3, 34.5), (56.1, 60.9, 92.1, 67.9, 52.3, 36.0)),
            "sade": ("TADE (SADE)", (57.3, 61.9, 92.6, 65.3, 55.2, 42.0), (58.8, 63.2, 93.0, 67.2, 55.3, 40.0))}
SEED_METHODS = os.path.join(ROOT, "..", "shared", "reference", "seed-methods.md")


def _imagenet(method, *overrides):
    return load_config(os.path.join(ROOT, "configs", "imagenet_lt", f"{method}.yaml"), list(overrides))


def test_imagenet_lt_expert_recipes():
    sade, ride = _imagenet("sade"), _imagenet("ride")
    for cfg in (sade, ride):
        model = cfg["model"]
        assert (model["arch"], model["num_experts"], model["reduce_dimension"], model["classifier"],
                model["expert_scale"]) == ("expert_resnext50_32x4d", 3, True, "cosine", 30.0)
        assert cfg["optim"]["nesterov"] and cfg["optim"]["weight_decay"] == 5e-4 and cfg["optim"]["epochs"] == 200
        assert cfg["data"]["dataset"] == "list" and cfg["train"]["seed"] == 1
    assert (sade["loss"]["name"], sade["loss"]["sade_tau"]) == ("sade", 2.0)
    assert (sade["data"]["batch_size"], sade["optim"]["lr"], sade["optim"]["schedule"],
            sade["optim"]["warmup_epochs"]) == (256, 0.1, "cosine", 0)
    loss = ride["loss"]
    assert (loss["name"], loss["drw_epoch"], loss["reweight_factor"], loss["diversity_factor"], loss["s"],
            loss["max_margin"], loss["beta"], loss["base_temperature"]) == ("ride", 160, 0.02, -0.2, 30.0, 0.5,
                                                                             0.9999, 1.0)
    optim = ride["optim"]
    assert (ride["data"]["batch_size"], optim["lr"], optim["schedule"], optim["milestones"],
            optim["warmup_epochs"]) == (64, 0.025, "multistep", [120, 160], 5)
    keys = ("top1", "ua", "ra", "many", "medium", "few")
    for method, (_, e90, e200) in REPORTED.items():
        cfg = _imagenet(method)
        assert cfg["eval"]["reported"]["e90"] == dict(zip(keys, e90))
        assert cfg["eval"]["reported"]["e200"] == dict(zip(keys, e200)) and cfg["eval"]["ua"] == e200[1]


@pytest.mark.skipif(not os.path.exists(SEED_METHODS), reason="shared/reference/seed-methods.md not present")
def test_expert_transcription_matches_seed_methods():
    text = open(SEED_METHODS, encoding="utf-8").read()
    for row_name, e90, e200 in REPORTED.values():
        row = re.search(r"^\|\s*\w+\s*\|\s*" + re.escape(row_name) + r"\s*\|(.*)\|\s*$", text, re.M)
        acc90, ua90, ra90, acc200, ua200, ra200, h90, m90, t90, h200, m200, t200 = \
            [float(v) for v in row.group(1).split("|")]
        assert e90 == (acc90, ua90, ra90, h90, m90, t90) and e200 == (acc200, ua200, ra200, h200, m200, t200)


@pytest.mark.parametrize("method, extra", [
    ("sade", []),
    ("ride", ["loss.drw_epoch=0", "optim.milestones=[0]", "optim.warmup_epochs=0"]),
])
def test_imagenet_lt_expert_recipe_runs(rgb_jpegs, tmp_path, method, extra):
    # The ResNeXt-50 expert recipe end to end for one epoch (one step): 12 tiny JPEGs, 16-pixel crops, CPU.
    cfg = _imagenet(method, f"data.root={rgb_jpegs}", f"data.train_list={rgb_jpegs / 'train.txt'}",
                    f"data.val_list={rgb_jpegs / 'val.txt'}", f"data.test_list={rgb_jpegs / 'test.txt'}",
                    "data.backend=pil", "data.num_threads=0", "data.crop_size=16", "data.resize_size=16",
                    "data.batch_size=12", "data.eval_batch_size=8", "optim.epochs=1", "train.progress=false",
                    "train.plot=false", "train.device=cpu", "train.save_checkpoints=false",  # 2 x 0.5 GB otherwise
                    f"train.out_dir={tmp_path}", *extra)
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["test"]["samples"] == 8 and len(summary["test"]["experts"]) == 3
    assert math.isfinite(summary["history"][0]["loss"]) and summary["history"][0]["loss"] > 0
    assert "SADE" in summary["name"] or "RIDE" in summary["name"]


@pytest.mark.parametrize("loss", ["sade", "ride"])
def test_bf16_autocast_trains_expert_losses(tmp_path, loss):
    # bf16 expert logits reach the losses, which compute in float32
    summary = train(load_config(None, TINY + [f"train.out_dir={tmp_path}", f"loss.name={loss}", "train.amp=bf16",
                                              "optim.epochs=1", "data.n_max=64", "train.save_checkpoints=false"]))
    assert summary["bf16"] and math.isfinite(summary["history"][0]["loss"]) and len(summary["test"]["experts"]) == 3
