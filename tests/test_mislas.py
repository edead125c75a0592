"""MiSLAS (ltfast.train.methods.mislas): label-aware smoothing values by hand, the stage-2 loss against the
authors' formula, mixup (lambda distribution, permutation, loss combination), LearnableWeightScaling
in the head, shift-BN, the classifier's lr factor, and both stages end to end on tiny data."""
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ltfast.nn
from ltfast import priors
from ltfast.train import load_config, train
from ltfast.train.config import ConfigError
from ltfast.train.evaluation import main as evaluate_main
from ltfast.train.methods.classifier_lr import parameter_groups
from ltfast.train.methods.mislas import (Mixup, ScaledClassifier, label_aware_smoothing_loss, mixed_loss,
                                 use_learnable_weight_scaling)
from ltfast.train.models import build_model, find_head, freeze_backbone

from test_train import TINY

COUNTS = [1000, 400, 100, 10]      # n_max 1000, n_min 10: relative counts 1, 390/990, 90/990, 0


# ------------------------------------------------------------------------------ label-aware eps

def test_concave_epsilons_by_hand():
    eps = priors.label_aware_smoothing(COUNTS, head=0.3, tail=0.0, shape="concave", dtype=torch.float64)
    expected = [0.3 * math.sin(math.pi / 2 * (n - 10) / 990) for n in COUNTS]
    assert eps.tolist() == pytest.approx(expected, abs=1e-15)
    assert eps[0] == pytest.approx(0.3) and eps[-1] == 0.0
    # concave: above the straight line between the tail and the head
    linear = priors.label_aware_smoothing(COUNTS, 0.3, 0.0, "linear", dtype=torch.float64)
    assert linear.tolist() == pytest.approx([0.3 * (n - 10) / 990 for n in COUNTS], abs=1e-15)
    assert (eps[1:3] > linear[1:3]).all()
    convex = priors.label_aware_smoothing(COUNTS, 0.3, 0.0, "convex", dtype=torch.float64)
    assert convex[0] == pytest.approx(0.3) and convex[-1] == pytest.approx(0.0, abs=1e-15)
    assert (convex[1:3] < linear[1:3]).all()
    power = priors.label_aware_smoothing(COUNTS, 0.3, 0.1, "exp", power=2.0, dtype=torch.float64)
    assert power.tolist() == pytest.approx([0.1 + 0.2 * ((n - 10) / 990) ** 2 for n in COUNTS], abs=1e-15)


@pytest.mark.parametrize("kwargs, message", [
    ({"class_counts": [5, 5, 5]}, "n_max > n_min"),
    ({"shape": "wavy"}, "shape must be one of"),
    ({"head": 1.5}, "head must be"),
    ({"tail": -0.1}, "tail must be"),
    ({"shape": "exp"}, "power must be > 0"),
    ({"power": 2.0}, "power is only used"),
])
def test_label_aware_smoothing_errors(kwargs, message):
    args = {"class_counts": COUNTS, **kwargs}
    with pytest.raises(ValueError, match=message):
        priors.label_aware_smoothing(**args)


# --------------------------------------------------------------------------------- stage-2 loss

def _authors_loss(logits, target, eps):
    """MiSLAS methods.py LabelAwareSmoothing.forward, written out."""
    log_p = F.log_softmax(logits, dim=-1)
    e = eps[target]
    return ((1 - e) * -log_p.gather(1, target[:, None]).squeeze(1) + e * -log_p.mean(-1)).mean()


def test_stage2_loss_matches_the_authors_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 4, (16,), generator=gen)
    cfg = load_config(None, ["loss.name=label_aware_smoothing"])
    criterion = label_aware_smoothing_loss(COUNTS, cfg["loss"])
    eps = priors.label_aware_smoothing(COUNTS, dtype=torch.float64)
    assert torch.allclose(criterion(logits.float(), target).double(), _authors_loss(logits, target, eps), atol=1e-6)
    assert getattr(type(criterion), "supports_mixed_targets", False)
    # a scalar epsilon is F.cross_entropy's label smoothing
    scalar = ltfast.nn.CrossEntropyLoss(label_smoothing=0.2)
    assert torch.allclose(scalar(logits, target), F.cross_entropy(logits, target, label_smoothing=0.2))
    # ignored rows drop out of the mean
    ignored = target.clone()
    ignored[:5] = -100
    expected = _authors_loss(logits[5:], target[5:], eps)
    assert torch.allclose(criterion(logits.float(), ignored).double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="class_label_smoothing must be a 1-D tensor of C = 3"):
        criterion(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------- mixup

def test_mixup_lambda_follows_beta():
    torch.manual_seed(0)
    mixup = Mixup(0.2)
    lams = torch.tensor([mixup.draw(4)[0] for _ in range(20000)], dtype=torch.float64)
    assert ((lams >= 0) & (lams <= 1)).all()
    # Beta(0.2, 0.2): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.1786, U-shaped (most mass near 0 and 1)
    n = lams.numel()
    assert abs(lams.mean().item() - 0.5) < 4 * math.sqrt(0.1786 / n)
    assert lams.var().item() == pytest.approx(1 / (4 * 1.4), rel=0.03)
    near_ends = ((lams < 0.1) | (lams > 0.9)).double().mean().item()
    # Beta(0.2, 0.2) puts 67.34% of its mass there (2 * scipy.stats.beta(0.2, 0.2).cdf(0.1)); 6 standard errors
    assert abs(near_ends - 0.6734) < 6 * math.sqrt(0.6734 * 0.3266 / n)
    with pytest.raises(ValueError, match="data.mixup_alpha"):
        Mixup(0.0)


def test_mixup_mixes_with_a_permutation_of_the_batch():
    images = torch.arange(6 * 2, dtype=torch.float32).view(6, 1, 2, 1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    torch.manual_seed(3)
    mixed, labels_b, lam = Mixup(0.2).mix(images, labels)
    torch.manual_seed(3)
    lam_again, perm = Mixup(0.2).draw(6)
    assert lam == lam_again and sorted(perm.tolist()) == list(range(6))
    assert torch.equal(labels_b, labels[perm])
    assert torch.allclose(mixed, lam * images + (1 - lam) * images[perm])


class _RecordingLoss(nn.Module):
    supports_mixed_targets = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, logits, target, target_b=None, mix_weight=None):
        self.calls.append((target, target_b, mix_weight))
        return logits.sum() * 0


def test_mixed_loss_combination():
    gen = torch.Generator().manual_seed(1)
    logits, a, b = torch.randn(8, 5, generator=gen), torch.randint(0, 5, (8,), generator=gen), \
        torch.randint(0, 5, (8,), generator=gen)
    plain = nn.CrossEntropyLoss()
    expected = 0.3 * F.cross_entropy(logits, a) + 0.7 * F.cross_entropy(logits, b)
    assert torch.allclose(mixed_loss(plain, logits, a, b, 0.3), expected)            # two calls
    fused = ltfast.nn.CrossEntropyLoss()
    assert torch.allclose(mixed_loss(fused, logits, a, b, 0.3), expected, atol=1e-6)  # one call
    recording = _RecordingLoss()
    mixed_loss(recording, logits, a, b, 0.25)
    (target, target_b, weight), = recording.calls
    assert target is a and target_b is b and weight.dim() == 0 and weight.item() == 0.25


# ------------------------------------------------------------------------------ stage-2 pieces

def test_scaled_head_param_groups_and_head_rule():
    model = build_model("small_resnet", 7, 1, 8)
    freeze_backbone(model, num_classes=7)
    assert use_learnable_weight_scaling(model, 7) == "fc"
    name, head = find_head(model, 7)
    assert name == "fc" and isinstance(head, ScaledClassifier)          # the wrapper, not fc.classifier
    with torch.no_grad():
        head.scale.scale.copy_(torch.arange(1.0, 8.0))
    x = torch.randn(2, 1, 12, 12)
    features = torch.flatten(F.adaptive_avg_pool2d(model.layer3(model.layer2(model.layer1(model.stem(x)))), 1), 1)
    assert torch.allclose(model(x), head.classifier(features) * torch.arange(1.0, 8.0), atol=1e-6)
    groups = parameter_groups(model, "fc", 0.05)
    by_name = {g["name"]: g for g in groups}
    assert by_name["classifier"]["lr_factor"] == 0.05 and by_name["other"]["lr_factor"] == 1.0
    assert [p.shape for p in by_name["classifier"]["params"]] == [(7, 32), (7,)]
    assert [p.shape for p in by_name["other"]["params"]] == [(7,)]      # only the scale: the rest is frozen
    with pytest.raises(ValueError, match="scaled already"):
        use_learnable_weight_scaling(model, 7)


@pytest.mark.parametrize("override, key", [
    ("model.shift_bn=false", "model.shift_bn"),
    # the loss that reads the smoothing keys: with another loss they are refused first (issue 19 §4.9d)
    ("loss.name=label_aware_smoothing,loss.smooth_shape=exp", "loss.smooth_power"),
    ("loss.smooth_power=2", "loss.smooth_power"),
    ("loss.smooth_head=1.2", "loss.smooth_head"),
    ("data.mixup_alpha=-1", "data.mixup_alpha"),
    ("optim.head_lr_factor=0", "optim.head_lr_factor"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, override.split(","))
    with pytest.raises(ConfigError, match="model.learnable_scale"):
        load_config(None, ["model.learnable_scale=true", "model.classifier=causal"])


# ----------------------------------------------------------------------------------- end to end

ONE = ["train.plot=false", "optim.warmup_epochs=0"]


def _stage2(tmp_path, stage1, name, *extra):
    return load_config(None, TINY + ONE + [
        f"train.out_dir={tmp_path / name}", f"model.init_from={stage1}", "model.freeze_backbone=true",
        "model.learnable_scale=true", "optim.head_lr_factor=0.05", "loss.name=label_aware_smoothing", "data.sampler=class_balanced",
        "optim.epochs=2", "optim.schedule=constant"] + list(extra))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("mislas") / "stage1"
    summary = train(load_config(None, TINY + ONE + [f"train.out_dir={out}", "optim.epochs=2", "data.mixup_alpha=0.2"]))
    assert summary["status"] == "finished"
    return out / "best.pt"


def test_stage2_shift_bn_lws_and_lr_factor(stage1, tmp_path):
    before = torch.load(stage1, weights_only=True)["model"]
    summary = train(_stage2(tmp_path, stage1, "shift"))
    ckpt = torch.load(tmp_path / "shift" / "last.pt", weights_only=True)
    after = ckpt["model"]
    assert summary["status"] == "finished"
    assert torch.equal(before["stem.0.weight"], after["stem.0.weight"])                  # frozen backbone
    assert not torch.equal(before["stem.1.running_mean"], after["stem.1.running_mean"])  # shifted BN statistics
    assert not torch.equal(before["fc.weight"], after["fc.classifier.weight"])           # classifier trains
    assert not torch.equal(after["fc.scale.scale"], torch.ones(7))             # and so does the scale
    lrs = {g["name"]: g["lr"] for g in ckpt["optimizer"]["param_groups"]}
    assert lrs["classifier"] == pytest.approx(0.05 * lrs["other"]) and lrs["other"] == pytest.approx(0.05)

    train(_stage2(tmp_path, stage1, "frozen_bn", "model.shift_bn=false"))
    frozen = torch.load(tmp_path / "frozen_bn" / "last.pt", weights_only=True)["model"]
    for key in ("stem.1.running_mean", "stem.1.running_var", "layer3.bn2.running_mean"):
        assert torch.equal(before[key], frozen[key]), key                               # eval-mode backbone
    assert not torch.equal(before["fc.weight"], frozen["fc.classifier.weight"])


def test_stage2_checkpoint_evaluates_with_its_scale(stage1, tmp_path):
    summary = train(_stage2(tmp_path, stage1, "run"))
    assert evaluate_main([str(tmp_path / "run"), "--out", str(tmp_path / "eval"), "--no-plot"]) == 0
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["results"]["plain"]["correct"] == summary["test"]["correct"]
    assert result["head"] == "fc"
    # --tau-norm needs a plain linear head: refused for the scaled one instead of ignoring the scale
    assert evaluate_main([str(tmp_path / "run"), "--tau-norm", "1", "--out", str(tmp_path / "x")]) == 2
