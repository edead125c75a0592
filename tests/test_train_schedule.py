"""Learning-rate schedules and models of the trainer."""
import math

import pytest
import torch

from ltfast.train.models import build_model, freeze_backbone
from ltfast.train.schedule import lr_factor


def optim(**kw):
    base = {"epochs": 10, "schedule": "cosine", "warmup_epochs": 0, "milestones": [], "step_size": 3, "gamma": 0.1}
    base.update(kw)
    return base


def test_cosine_per_step_never_trains_at_zero():
    o = optim(epochs=4)
    factors = [lr_factor(s, 5, o) for s in range(20)]
    assert factors[0] == 1.0
    assert factors[10] == pytest.approx(0.5)                   # half-way
    assert all(b < a for a, b in zip(factors, factors[1:]))    # strictly decreasing
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20))) and factors[-1] > 0
    # The survey's per-epoch CosineAnnealingLR stepped before the epoch ran its last epoch at 0:
    # 0.5 * (1 + cos(pi * 4 / 4)) == 0. Not here: the last epoch's steps all have lr > 0.
    assert min(factors[15:]) > 0


def test_step_multistep_warmup():
    assert [lr_factor(e * 2, 2, optim(schedule="step", step_size=3)) for e in range(7)] == \
        pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])
    o = optim(epochs=200, schedule="multistep", milestones=[120, 160], warmup_epochs=5)
    assert lr_factor(0, 10, o) == pytest.approx(1 / 50)        # per-step linear warm-up over 50 steps
    assert lr_factor(49, 10, o) == pytest.approx(1.0)
    assert lr_factor(50, 10, o) == 1.0
    assert lr_factor(1199, 10, o) == 1.0 and lr_factor(1200, 10, o) == pytest.approx(0.1)
    assert lr_factor(1600, 10, o) == pytest.approx(0.01)
    assert lr_factor(5, 10, optim(schedule="constant")) == 1.0


def test_models_and_freeze():
    model = build_model("small_resnet", 7, in_channels=1, width=8)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    trainable = freeze_backbone(model)
    assert trainable == ["fc.weight", "fc.bias"]
    assert not model.stem[0].weight.requires_grad and model.training
    x = build_model("resnext50_32x4d", 11)
    assert x.fc.out_features == 11 and x.fc.in_features == 2048
    assert x.layer1[0].conv2.groups == 32
    with pytest.raises(ValueError, match="model.arch"):
        build_model("no_such_net", 3)
