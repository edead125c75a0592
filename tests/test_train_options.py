"""Trainer options (ltfast.train.optimization, models.find_head): gradient accumulation, fp16 with a
GradScaler, AdamW / nesterov SGD, linear lr scaling, init from torchvision / plain state dicts (and
never from a pickle that runs code), and the classifier-finding rule."""
import os

import pytest
import torch
from torch import nn

from ltfast.train import load_config, train
from ltfast.train.config import ConfigError
from ltfast.train.models import CosineLinear, build_model, find_head, freeze_backbone, use_cosine_classifier
from ltfast.train.models import load_init_weights
from ltfast.train.optimization import Stepper, build_optimizer, scaled_lr

from test_train import TINY

ONE = ["optim.epochs=1", "optim.warmup_epochs=0", "train.plot=false"]


def _linear_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return nn.Linear(5, 3), torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)


@pytest.mark.parametrize("batches", [4, 3])      # 3: the last group of 2 holds one batch
def test_accumulation_equals_one_step_on_the_group(batches):
    torch.manual_seed(0)
    model, x, y = _linear_problem()
    reference = nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    chunks = list(zip(x.chunk(4)[:batches], y.chunk(4)[:batches]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = Stepper(opt, 2, len(chunks))
    assert stepper.steps_per_epoch == (batches + 1) // 2
    stepped = [stepper.backward(nn.functional.cross_entropy(model(a), b), i) for i, (a, b) in enumerate(chunks)]
    assert stepped == [False, True, False, True][:batches - 1] + [True]
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for group in (chunks[0:2], chunks[2:4]):
        if not group:
            continue
        ref_opt.zero_grad()
        loss = sum(nn.functional.cross_entropy(reference(a), b) for a, b in group) / len(group)
        loss.backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_accumulate_and_fp16_in_the_trainer(tmp_path):
    summary = train(load_config(None, TINY + ONE + [f"train.out_dir={tmp_path}", "optim.accumulate=2",
                                                    "train.amp=fp16"]))
    assert summary["status"] == "finished" and summary["history"][0]["loss"] > 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    # 371 images / batch 32 = 11 batches -> 6 optimizer steps of the schedule
    assert ckpt["schedule"]["step"] == 6


def test_optimizers():
    params = [nn.Parameter(torch.zeros(2))]
    cfg = load_config(None, ["optim.name=adamw", "optim.betas=[0.8, 0.99]", "optim.weight_decay=0.05"])
    adamw = build_optimizer(params, cfg["optim"], 1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.99)
    assert adamw.defaults["weight_decay"] == 0.05
    sgd = build_optimizer(params, load_config(None, ["optim.nesterov=true"])["optim"], 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ConfigError, match="optim.nesterov"):
        load_config(None, ["optim.nesterov=true", "optim.momentum=0"])
    with pytest.raises(ConfigError, match="optim.betas"):
        load_config(None, ["optim.betas=[0.9]"])


def test_adamw_trains(tmp_path):
    summary = train(load_config(None, TINY + ONE + [f"train.out_dir={tmp_path}", "optim.name=adamw",
                                                    "optim.lr=0.003"]))
    assert summary["status"] == "finished"


def test_linear_lr_scaling(capsys, tmp_path):
    cfg = load_config(None, ["optim.lr=0.1", "optim.reference_batch=256", "data.batch_size=64"])
    lr, note = scaled_lr(cfg)
    assert lr == pytest.approx(0.025) and "linear scaling" in note and "256" in note
    cfg = load_config(None, ["optim.lr=0.1", "optim.reference_batch=256", "data.batch_size=64", "optim.accumulate=4"])
    assert scaled_lr(cfg)[0] == pytest.approx(0.1)
    assert scaled_lr(load_config(None, ["optim.lr=0.1"])) == (0.1, None)
    summary = train(load_config(None, TINY + ONE + [f"train.out_dir={tmp_path}", "optim.lr=0.1",
                                                    "optim.reference_batch=64", "optim.schedule=constant"]))
    assert summary["history"][0]["lr"] == pytest.approx(0.05)           # batch 32 of 64
    assert "lr 0.05 = optim.lr 0.1 (for batch 64)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ init_from

def test_init_from_a_torchvision_state_dict(tmp_path):
    source = build_model("resnet18", 1000)                             # an ImageNet checkpoint's shapes
    state = {"module." + k: v for k, v in source.state_dict().items()}  # as saved by DDP code
    torch.save(state, tmp_path / "resnet18.pth")
    target = build_model("resnet18", 10)
    messages = []
    result = load_init_weights(target, str(tmp_path / "resnet18.pth"), num_classes=10, log=messages.append)
    assert result["skipped_head"] == ["fc.weight", "fc.bias"] and "keeps its fresh" in messages[0]
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert torch.equal(target.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    with pytest.raises(ValueError, match="missing"):
        load_init_weights(build_model("resnet34", 10), str(tmp_path / "resnet18.pth"), num_classes=10)


def test_init_from_trainer_checkpoint_keeps_the_classifier(tmp_path):
    train(load_config(None, TINY + ONE + [f"train.out_dir={tmp_path / 'a'}"]))
    summary = train(load_config(None, TINY + ONE + [f"train.out_dir={tmp_path / 'b'}",
                                                    f"model.init_from={tmp_path / 'a' / 'best.pt'}",
                                                    "model.freeze_backbone=true", "optim.lr=0.000000001"]))
    a = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert summary["status"] == "finished"
    assert torch.allclose(a["fc.weight"], b["fc.weight"], atol=1e-6) and torch.equal(a["stem.0.weight"], b["stem.0.weight"])


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_init_from_never_runs_code(tmp_path):
    _Payload.marker = tmp_path / "ran"
    torch.save({"model": _Payload()}, tmp_path / "evil.pt")
    from ltfast.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="model.init_from: refusing to load .*nothing in it was run"):
        load_init_weights(build_model("small_resnet", 7, 1, 8), str(tmp_path / "evil.pt"), num_classes=7)
    assert not _Payload.marker.exists()


# ---------------------------------------------------------------------------------------- heads

def test_head_rule_on_torchvision_models():
    import torchvision
    assert find_head(build_model("resnet18", 10), 10)[0] == "fc"
    assert find_head(build_model("mobilenet_v3_small", 10), 10)[0] == "classifier.3"
    assert find_head(build_model("efficientnet_b0", 10), 10)[0] == "classifier.1"
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                               hidden_dim=8, mlp_dim=8, num_classes=5)
    assert find_head(vit, 5)[0] == "heads.head"
    with pytest.raises(ValueError, match="model.head: no module 'nope'"):
        find_head(vit, 5, "nope")
    with pytest.raises(ValueError, match="no nn.Linear with 3 outputs"):
        find_head(vit, 3)


def test_freeze_backbone_keeps_only_the_found_head_trainable():
    model = build_model("mobilenet_v3_small", 10)
    trainable = freeze_backbone(model, num_classes=10)
    assert trainable == ["classifier.3.weight", "classifier.3.bias"]
    assert not model.classifier[0].weight.requires_grad


def test_cosine_classifier():
    model = build_model("small_resnet", 7, 1, 8)
    assert use_cosine_classifier(model, 7) == "fc" and isinstance(model.fc, CosineLinear)
    out = model(torch.randn(3, 1, 12, 12))
    assert out.shape == (3, 7) and out.abs().max() <= 1 + 1e-5
    assert find_head(model, 7)[0] == "fc"
